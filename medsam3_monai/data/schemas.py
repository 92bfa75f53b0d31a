"""JSON Schema validation of the catalogue and datalists (``datasets_meta/schema``), with ``jsonschema``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator

__all__ = ["schema_errors", "schema_validator", "validate"]


def schema_validator(schema: Mapping[str, Any]) -> Draft202012Validator:
    """A checked draft 2020-12 validator of ``schema``: build it once to check many documents."""
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def schema_errors(instance: Any, schema: Mapping[str, Any] | Draft202012Validator) -> list[str]:
    """Every violation of ``schema`` (or a :func:`schema_validator`) by ``instance``, as ``path: message`` (empty
    when valid)."""
    validator = schema if isinstance(schema, Draft202012Validator) else schema_validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [f"{e.json_path}: {e.message}" for e in errors]


def validate(instance: Any, schema: Mapping[str, Any], what: str = "document") -> None:
    """Raise ``ValueError`` listing every violation when ``instance`` does not satisfy ``schema``."""
    errors = schema_errors(instance, schema)
    if errors:
        raise ValueError(f"{what} does not match its schema:\n  " + "\n  ".join(errors))
