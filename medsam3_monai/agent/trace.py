"""The run's trace: a JSON record of what the agent did, written beside the output (``<out>.trace.json``).

It holds the planner's settings, the messages exchanged with image payloads replaced by a short description
(``<image: image/png, 123456 base64 characters, sha256 ...>``), every LLM call (attempts, errors, finish reason,
token usage, seconds), every tool call (arguments as received, result or correction), the marks of each round
(phrase, score, size, position), the decision and the timings. No image data and no key is ever written.
"""

from __future__ import annotations

import copy
import hashlib
import time
from typing import Any

__all__ = ["TRACE_FORMAT", "Trace", "scrub_images"]

TRACE_FORMAT = "medsam3-agent-trace/1"


def _describe_data_url(url: str) -> str:
    head, _, payload = url.partition(",")
    kind = head[len("data:"):].split(";")[0] or "unknown"
    digest = hashlib.sha256(payload.encode("ascii", "ignore")).hexdigest()[:16]
    return f"<image: {kind}, {len(payload)} base64 characters, sha256 {digest}>"


def scrub_images(value: Any) -> Any:
    """A deep copy with every ``data:`` URL replaced by a short description."""
    if isinstance(value, str):
        return _describe_data_url(value) if value.startswith("data:") else value
    if isinstance(value, list):
        return [scrub_images(v) for v in value]
    if isinstance(value, dict):
        return {k: scrub_images(v) for k, v in value.items()}
    return copy.copy(value)


class Trace:
    """Collects the run's events; :meth:`as_json` gives the document."""

    def __init__(self, **header: Any) -> None:
        self._start = time.perf_counter()
        self.data: dict[str, Any] = {"format": TRACE_FORMAT, "status": "running", **header, "planner": {},
                                     "notes": [], "llm_calls": [], "tool_calls": [], "rounds": [], "messages": [],
                                     "tokens": {"prompt": 0, "completion": 0, "total": 0}, "decision": None,
                                     "error": None, "outputs": {}, "timings": {}}

    def note(self, text: str) -> None:
        self.data["notes"].append(text)

    def time(self, name: str, seconds: float) -> None:
        self.data["timings"][name] = round(self.data["timings"].get(name, 0.0) + float(seconds), 4)

    def llm_call(self, **fields: Any) -> None:
        usage = fields.get("usage") or {}
        tokens = self.data["tokens"]
        tokens["prompt"] += usage.get("prompt_tokens", 0)
        tokens["completion"] += usage.get("completion_tokens", 0)
        tokens["total"] += usage.get("total_tokens", 0)
        self.data["llm_calls"].append({"call": len(self.data["llm_calls"]) + 1, **fields})

    def tool_call(self, **fields: Any) -> None:
        self.data["tool_calls"].append(fields)

    def round(self, **fields: Any) -> None:
        self.data["rounds"].append(fields)

    def set_messages(self, messages: list[dict[str, Any]]) -> None:
        self.data["messages"] = scrub_images(messages)

    def finish(self, status: str, error: str | None = None) -> None:
        self.data["status"] = status
        self.data["error"] = error
        self.data["timings"]["total"] = round(time.perf_counter() - self._start, 4)

    def as_json(self) -> dict[str, Any]:
        return scrub_images(self.data)
