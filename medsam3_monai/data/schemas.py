"""JSON Schema validation of the catalogue and datalists (``datasets_meta/schema``), with ``jsonschema``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator

__all__ = ["schema_errors", "validate"]


def schema_errors(instance: Any, schema: Mapping[str, Any]) -> list[str]:
    """Every violation of ``schema`` (draft 2020-12) by ``instance``, as ``path: message`` (empty when valid)."""
    Draft202012Validator.check_schema(schema)
    errors = sorted(Draft202012Validator(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [f"{e.json_path}: {e.message}" for e in errors]


def validate(instance: Any, schema: Mapping[str, Any], what: str = "document") -> None:
    """Raise ``ValueError`` listing every violation when ``instance`` does not satisfy ``schema``."""
    errors = schema_errors(instance, schema)
    if errors:
        raise ValueError(f"{what} does not match its schema:\n  " + "\n  ".join(errors))
