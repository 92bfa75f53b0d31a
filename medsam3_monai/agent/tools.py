"""The planner's tools (the names and arguments of Meta's SAM3 Agent), their OpenAI function schemas, and the
parsing of calls: native ``tool_calls`` or, for servers without function calling, one JSON object in the reply
text (``{"tool": ..., "arguments": {...}}``, Hermes ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``,
a fenced JSON block, ...).

A call that cannot be used raises :class:`ToolCallError` whose message is sent back to the planner as a
correction (what was wrong and what to send instead).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TOOL_NAMES", "ToolCall", "ToolCallError", "parse_call", "parse_text_call", "tool_schemas",
           "tools_as_text"]

TOOL_NAMES = ("segment_phrase", "examine_each_mask", "select_masks_and_return", "report_no_mask")

_SCHEMAS: dict[str, dict[str, Any]] = {
    "segment_phrase": {
        "description": "Segment everything in the image that matches a short noun phrase with MedSAM3 (e.g. "
                       "'polyp', 'liver tumor', 'optic disc'). Adds one numbered mark, then shows the image with "
                       "all marks. A phrase already tried is refused.",
        "parameters": {
            "type": "object",
            "properties": {"text_prompt": {"type": "string", "description": "a short noun phrase, 1-4 words: "
                                           "the structure only, no location, no verb"}},
            "required": ["text_prompt"],
        },
    },
    "examine_each_mask": {
        "description": "Look at marks one by one, zoomed in, each shown without and with the mark.",
        "parameters": {
            "type": "object",
            "properties": {"masks": {"type": "array", "items": {"type": "integer"},
                                     "description": "mark numbers (1-based); default: every non-empty mark"}},
        },
    },
    "select_masks_and_return": {
        "description": "Finish: the answer is the union of these marks.",
        "parameters": {
            "type": "object",
            "properties": {"final_answer_masks": {"type": "array", "items": {"type": "integer"}, "minItems": 1,
                                                  "description": "mark numbers (1-based) of the answer"}},
            "required": ["final_answer_masks"],
        },
    },
    "report_no_mask": {
        "description": "Finish: nothing in the image matches the request.",
        "parameters": {
            "type": "object",
            "properties": {"reason": {"type": "string", "description": "why nothing matches, one sentence"}},
        },
    },
}

_EXAMPLES = {
    "segment_phrase": '{"text_prompt": "polyp"}',
    "examine_each_mask": '{"masks": [1, 2]}',
    "select_masks_and_return": '{"final_answer_masks": [1]}',
    "report_no_mask": '{"reason": "no lesion is visible"}',
}


class ToolCallError(ValueError):
    """A call the agent cannot execute; the message tells the planner what to send instead."""


@dataclass
class ToolCall:
    """One parsed call.

    Attributes:
        name: a tool of :data:`TOOL_NAMES`.
        arguments: the validated arguments.
        raw: the arguments as received (a JSON string).
        call_id: the ``tool_calls`` id (None for a call written in the reply text).
        from_text: parsed from the reply text rather than native ``tool_calls``.
    """

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    raw: str = "{}"
    call_id: str | None = None
    from_text: bool = False


def tool_schemas() -> list[dict[str, Any]]:
    """The ``tools`` of a chat-completions request."""
    return [{"type": "function", "function": {"name": name, **_SCHEMAS[name]}} for name in TOOL_NAMES]


def tools_as_text() -> str:
    """The tools described for a planner without function calling."""
    lines = []
    for name in TOOL_NAMES:
        schema = _SCHEMAS[name]
        lines.append(f"- {name}: {schema['description']} Arguments, e.g.: {_EXAMPLES[name]}")
    return "\n".join(lines)


def _mark_numbers(value: Any, key: str, name: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    numbers = []
    for v in values:
        if isinstance(v, bool):
            v = None
        if isinstance(v, str) and v.strip().lstrip("#").isdigit():
            v = int(v.strip().lstrip("#"))
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int):
            raise ToolCallError(f"{name}: {key} must be a list of mark numbers (integers, 1-based), got "
                                f"{json.dumps(value)}; e.g. {_EXAMPLES[name]}")
        numbers.append(v)
    return numbers


def parse_call(name: Any, raw: Any, call_id: str | None = None, from_text: bool = False) -> ToolCall:
    """Validate a call's name and arguments (a JSON string or an already decoded dict)."""
    if not isinstance(name, str) or name not in TOOL_NAMES:
        raise ToolCallError(f"unknown tool {name!r}: the tools are {', '.join(TOOL_NAMES)}")
    if isinstance(raw, dict):
        arguments, text = dict(raw), json.dumps(raw)
    else:
        text = "" if raw is None else str(raw)
        try:
            arguments = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as err:
            shown = text if len(text) <= 200 else text[:200] + "..."
            raise ToolCallError(f"the arguments of {name} are not valid JSON ({err.msg} at character {err.pos}): "
                                f"{shown!r}; send a JSON object, e.g. {_EXAMPLES[name]}") from None
    if not isinstance(arguments, dict):
        raise ToolCallError(f"the arguments of {name} must be a JSON object, e.g. {_EXAMPLES[name]}")
    if name == "segment_phrase":
        phrase = arguments.get("text_prompt")
        if not isinstance(phrase, str) or not phrase.strip():
            raise ToolCallError(f"segment_phrase needs text_prompt, a non-empty string; e.g. {_EXAMPLES[name]}")
        arguments = {"text_prompt": " ".join(phrase.split())}
    elif name == "select_masks_and_return":
        if "final_answer_masks" not in arguments:
            raise ToolCallError(f"select_masks_and_return needs final_answer_masks; e.g. {_EXAMPLES[name]}")
        numbers = _mark_numbers(arguments["final_answer_masks"], "final_answer_masks", name)
        if not numbers:
            raise ToolCallError("select_masks_and_return needs at least one mark number; if no mark fits, call "
                                "report_no_mask")
        arguments = {"final_answer_masks": numbers}
    elif name == "examine_each_mask":
        masks = arguments.get("masks")
        arguments = {"masks": None if masks in (None, []) else _mark_numbers(masks, "masks", name)}
    else:
        reason = arguments.get("reason")
        arguments = {"reason": reason.strip() if isinstance(reason, str) and reason.strip() else None}
    return ToolCall(name, arguments, text or "{}", call_id, from_text)


_TAGGED = re.compile(r"<(?:tool_call|function_call)>\s*(.*?)\s*</(?:tool_call|function_call)>", re.S)


def _json_objects(text: str) -> list[Any]:
    """Every JSON object that can be decoded from a '{' in ``text``, outermost first."""
    decoder = json.JSONDecoder()
    found, position = [], 0
    while True:
        start = text.find("{", position)
        if start < 0:
            return found
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            position = start + 1
            continue
        found.append(value)
        position = end


def parse_text_call(content: str | None) -> tuple[str, Any] | None:
    """(name, arguments) of a call written in a reply's text, or None when the text holds none.

    Accepted: ``{"tool"|"name"|"function": NAME, "arguments"|"parameters"|"args": {...}}`` (bare, fenced or in
    ``<tool_call>`` tags), ``{"function": {"name": NAME, "arguments": ...}}``, and ``{NAME: {...}}``."""
    if not content:
        return None
    tagged = _TAGGED.findall(content)
    candidates = [obj for block in tagged for obj in _json_objects(block)] or _json_objects(content)
    for obj in candidates:
        if not isinstance(obj, dict):
            continue
        function = obj.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"], function.get("arguments", {})
        for key in ("tool", "name", "function", "tool_name"):
            if isinstance(obj.get(key), str):
                for args_key in ("arguments", "parameters", "args", "input"):
                    if args_key in obj:
                        return obj[key], obj[args_key]
                rest = {k: v for k, v in obj.items() if k != key}
                return obj[key], rest
        if len(obj) == 1:
            (name, arguments), = obj.items()
            if name in TOOL_NAMES:
                return name, arguments if arguments is not None else {}
    return None
