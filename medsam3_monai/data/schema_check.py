"""A small JSON Schema (draft 2020-12 subset) validator for the catalogue and datalist schemas.

``jsonschema`` is not a dependency of this project, so the schemas in ``datasets_meta/schema`` use only the
keywords implemented here; an unknown keyword raises ``SchemaError`` instead of being ignored, so a schema
can never pass by silently skipping a rule. When ``jsonschema`` is installed the tests validate with both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["SchemaError", "schema_errors", "validate"]

_ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "default", "examples", "$defs"}
_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


class SchemaError(ValueError):
    """The schema itself uses a keyword this checker does not implement, or a bad $ref."""


def _resolve(ref: str, root: Mapping[str, Any]) -> Mapping[str, Any]:
    if not ref.startswith("#/"):
        raise SchemaError(f"only local $ref ('#/...') is supported, got {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise SchemaError(f"$ref {ref!r} does not resolve")
        node = node[part]
    return node


def _check(value: Any, schema: Any, root: Mapping[str, Any], path: str, errors: list[str]) -> None:
    if schema is True:
        return
    if schema is False:
        errors.append(f"{path}: no value is allowed here")
        return
    unknown = set(schema) - _ANNOTATIONS - set(_KEYWORDS)
    if unknown:
        raise SchemaError(f"unsupported schema keyword(s) {sorted(unknown)} at {path}")
    for keyword in _KEYWORDS:
        if keyword in schema:
            _KEYWORDS[keyword](value, schema[keyword], schema, root, path, errors)


def _type(value, expected, schema, root, path, errors):
    names = [expected] if isinstance(expected, str) else list(expected)
    if not any(_TYPES[name](value) for name in names):
        errors.append(f"{path}: expected {' or '.join(names)}, got {type(value).__name__}")


def _enum(value, options, schema, root, path, errors):
    if value not in options:
        errors.append(f"{path}: {value!r} is not one of {options}")


def _const(value, expected, schema, root, path, errors):
    if value != expected:
        errors.append(f"{path}: expected {expected!r}, got {value!r}")


def _required(value, names, schema, root, path, errors):
    if isinstance(value, dict):
        for name in names:
            if name not in value:
                errors.append(f"{path}: missing required key {name!r}")


def _properties(value, props, schema, root, path, errors):
    if isinstance(value, dict):
        for name, sub in props.items():
            if name in value:
                _check(value[name], sub, root, f"{path}.{name}", errors)


def _pattern_properties(value, patterns, schema, root, path, errors):
    if isinstance(value, dict):
        for name, item in value.items():
            for pattern, sub in patterns.items():
                if re.search(pattern, name):
                    _check(item, sub, root, f"{path}.{name}", errors)


def _additional(value, sub, schema, root, path, errors):
    if not isinstance(value, dict):
        return
    known = set(schema.get("properties", {}))
    patterns = list(schema.get("patternProperties", {}))
    for name, item in value.items():
        if name in known or any(re.search(p, name) for p in patterns):
            continue
        if sub is False:
            errors.append(f"{path}: unexpected key {name!r}")
        else:
            _check(item, sub, root, f"{path}.{name}", errors)


def _property_names(value, sub, schema, root, path, errors):
    if isinstance(value, dict):
        for name in value:
            _check(name, sub, root, f"{path}[key {name!r}]", errors)


def _items(value, sub, schema, root, path, errors):
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check(item, sub, root, f"{path}[{index}]", errors)


def _min_items(value, count, schema, root, path, errors):
    if isinstance(value, list) and len(value) < count:
        errors.append(f"{path}: needs at least {count} item(s), has {len(value)}")


def _unique_items(value, flag, schema, root, path, errors):
    if flag and isinstance(value, list):
        seen: list[Any] = []
        for item in value:
            if item in seen:
                errors.append(f"{path}: duplicate item {item!r}")
            seen.append(item)


def _min_properties(value, count, schema, root, path, errors):
    if isinstance(value, dict) and len(value) < count:
        errors.append(f"{path}: needs at least {count} key(s), has {len(value)}")


def _min_length(value, count, schema, root, path, errors):
    if isinstance(value, str) and len(value) < count:
        errors.append(f"{path}: string shorter than {count}")


def _pattern(value, pattern, schema, root, path, errors):
    if isinstance(value, str) and not re.search(pattern, value):
        errors.append(f"{path}: {value!r} does not match {pattern!r}")


def _minimum(value, bound, schema, root, path, errors):
    if _TYPES["number"](value) and value < bound:
        errors.append(f"{path}: {value} is below the minimum {bound}")


def _any_of(value, subs, schema, root, path, errors):
    branches = []
    for sub in subs:
        found: list[str] = []
        _check(value, sub, root, path, found)
        if not found:
            return
        branches.append("; ".join(found))
    errors.append(f"{path}: matches none of the allowed forms ({' | '.join(branches)})")


def _one_of(value, subs, schema, root, path, errors):
    matches = 0
    for sub in subs:
        found: list[str] = []
        _check(value, sub, root, path, found)
        matches += not found
    if matches != 1:
        errors.append(f"{path}: must match exactly one allowed form, matches {matches}")


def _all_of(value, subs, schema, root, path, errors):
    for sub in subs:
        _check(value, sub, root, path, errors)


def _ref(value, ref, schema, root, path, errors):
    _check(value, _resolve(ref, root), root, path, errors)


_KEYWORDS = {
    "$ref": _ref,
    "type": _type,
    "enum": _enum,
    "const": _const,
    "required": _required,
    "properties": _properties,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional,
    "propertyNames": _property_names,
    "minProperties": _min_properties,
    "items": _items,
    "minItems": _min_items,
    "uniqueItems": _unique_items,
    "minLength": _min_length,
    "pattern": _pattern,
    "minimum": _minimum,
    "anyOf": _any_of,
    "oneOf": _one_of,
    "allOf": _all_of,
}


def schema_errors(instance: Any, schema: Mapping[str, Any]) -> list[str]:
    """Every violation of ``schema`` by ``instance``, as ``path: message`` strings (empty when valid)."""
    errors: list[str] = []
    _check(instance, schema, schema, "$", errors)
    return errors


def validate(instance: Any, schema: Mapping[str, Any], what: str = "document") -> None:
    """Raise ``ValueError`` listing every violation when ``instance`` does not satisfy ``schema``."""
    errors = schema_errors(instance, schema)
    if errors:
        raise ValueError(f"{what} does not match its schema:\n  " + "\n  ".join(errors))
