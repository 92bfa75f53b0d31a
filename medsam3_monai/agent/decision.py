"""What a planner decides: the marks whose union is the answer, or that nothing matches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .marks import Mark

__all__ = ["Decision"]


@dataclass
class Decision:
    """A planner's answer.

    Attributes:
        status: ``"selected"`` (the union of ``marks`` is the answer) or ``"no_mask"`` (nothing matches).
        marks: the selected marks (``selected``), in the order the planner named them.
        reason: why nothing matches (``no_mask``), as the planner said it.
        planner: ``"llm"``, ``"offline"`` or ``"offline (fallback)"`` (the endpoint could not be reached).
        details: planner-specific facts for the trace and the sidecar (the offline fusion's table, ...).
    """

    status: str
    marks: list[Mark] = field(default_factory=list)
    reason: str | None = None
    planner: str = "llm"
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in ("selected", "no_mask"):
            raise ValueError(f"unknown decision status {self.status!r}")
        if self.status == "selected" and not self.marks:
            raise ValueError("a 'selected' decision needs at least one mark")

    @property
    def phrases(self) -> list[str]:
        return [m.phrase for m in self.marks]

    def as_json(self) -> dict[str, Any]:
        """The trace's ``decision`` entry."""
        return {"status": self.status, "planner": self.planner, "marks": [m.facts() for m in self.marks],
                "reason": self.reason, "details": self.details}
