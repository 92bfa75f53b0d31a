"""The text files of a reproduction besides the table: which datasets were found (and what was expected where they
were not), how their copies compare with Medical SAM3 Table 1, and the measured time per case with the
estimate for a full run. Stdlib only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .discovery import DatasetStatus, table1_comparison

__all__ = ["Timing", "datasets_markdown", "table_notes", "timing_markdown"]


@dataclass
class Timing:
    """Wall time of one (column, dataset) evaluation: loading, inference, metrics and its report files."""

    column: str
    dataset: str
    cases: int
    seconds: float
    full_cases: int

    @property
    def per_case(self) -> float:
        return self.seconds / max(self.cases, 1)

    @property
    def estimated_full_seconds(self) -> float:
        return self.per_case * self.full_cases

    def as_dict(self) -> dict[str, Any]:
        return {"column": self.column, "dataset": self.dataset, "cases": self.cases, "seconds": round(self.seconds, 3),
                "seconds_per_case": round(self.per_case, 4), "full_split_cases": self.full_cases,
                "estimated_full_seconds": round(self.estimated_full_seconds, 1)}


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def datasets_markdown(title: str, statuses: Sequence[DatasetStatus], root: Path) -> str:
    """Every dataset of the table: found or not, where, its splits, the prompt, and the Table 1 comparison."""
    found = sum(s.found for s in statuses)
    lines = [f"**{title}: evaluation sets under {root}** ({found} of {len(statuses)} found)", "",
             "| Dataset | Group | Status | Folder, or what was expected | Items (train/val/test) | Prompt | "
             "Images vs Medical SAM3 Table 1 |", "|---|---|---|---|---|---|---|"]
    for s in statuses:
        where = s.folder if s.found else s.message
        if s.left_out:  # (--skip-unreadable) every file named: the console line lists the first few
            where = f"{where}; {len(s.left_out)} file(s) left out (--skip-unreadable): " + "; ".join(s.left_out)
        items = "/".join(str(s.counts.get(k, 0)) for k in ("training", "validation", "test")) if s.found else "–"
        prompt = " & ".join(s.prompts.values()) if s.found else "–"
        if s.prompt_note:
            prompt += f" ({s.prompt_note})"
        status = {"found": "found", "missing": "not found", "no_converter": "no converter yet",
                  "unreadable": "not in the expected layout",
                  "unreadable_cases": "no readable case"}[s.status]
        lines.append("| " + " | ".join(_cell(x) for x in (s.dataset, s.group, status, where, items, prompt,
                                                             table1_comparison(s))) + " |")
    return "\n".join(lines) + "\n"


def timing_markdown(timings: Sequence[Timing], device: str) -> str:
    """Measured seconds per case and the full-split estimate (this device, this image size)."""
    lines = [f"**Time per case on this machine ({device})**", "",
             "| Column | Dataset | Cases run | Seconds | s / case | Cases in the full split | Estimated full (s) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for t in timings:
        lines.append(f"| {t.column} | {t.dataset} | {t.cases} | {t.seconds:.1f} | {t.per_case:.3f} | {t.full_cases} | "
                     f"{t.estimated_full_seconds:.0f} |")
    lines += ["", "Seconds include loading, inference, inversion to the image's own size, metrics, overlays and the "
              "dataset's report files; the first dataset of each column also pays the warm-up. Estimated full = "
              "s / case × cases of the evaluation split (test if present, else validation): linear in the cases, so "
              "from a run of a few cases (--max-cases) it over-counts the fixed cost of each dataset; measure with 20 "
              "or more."]
    return "\n".join(lines) + "\n"


def table_notes(table: Any, statuses: Sequence[DatasetStatus], settings: Any, ran: Mapping[str, bool],
                sources: Mapping[str, str]) -> list[str]:
    """The lines under the reproduction table: what was run, on what, and what the published side is."""
    found = [s.dataset for s in statuses if s.found]
    missing = [s.dataset for s in statuses if not s.found]
    notes = []
    if settings.max_cases:
        notes.append(f"WARNING: at most {settings.max_cases} cases per dataset (--max-cases): not the paper's "
                     "protocol; these numbers exercise the pipeline and are not comparable with the paper.")
    if "tiny" in sources.values():
        notes.append("WARNING: the tiny random-init network (`tiny`) was evaluated: the machinery runs, the numbers "
                     "are far from the paper's by construction.")
    notes += [f"WARNING: {s.split_warning(settings.max_cases)}." for s in statuses if s.split_warning()]
    notes.append(f"Found {len(found)} of {len(statuses)} datasets" + (f"; not evaluated: {', '.join(missing)} "
                 "(datasets.md says what was expected)" if missing else "") + ". A group mean over all its datasets "
                 "is shown for ours only when every one was found; 'found only' rows average the found datasets, "
                 "ours and published alike (published: the mean of the published per-dataset values, '–' when one "
                 "is unknown).")
    protocols = set(getattr(settings, "protocols", None) or table.protocols)
    for column in table.columns:
        if column.runs is None or (column.protocol or "T") not in protocols:
            continue
        source = sources.get(column.key)
        if source:
            notes.append(f"{column.method}" + (f" ({column.protocol})" if len(table.protocols) > 1 else "")
                         + f": checkpoint `{source}`.")
        elif not ran.get(column.key):
            option = "--baseline" if column.runs == "baseline" else "--checkpoint"
            notes.append(f"{column.method}: not run (give {option} WEIGHTS).")
    protocol = f"Protocol: {table.protocol}."
    if getattr(settings, "release_rules", False):
        notes.append("Rules (--release-rules): the 2D datasets are scored as the Medical-SAM3 release's evaluation "
                     "script scores them: per prompt the best query scoring at least 0.1, else an empty mask "
                     "(top_query_floor), and images without foreground left out; volumes by top_query.")
        protocol = f"Protocol of the published numbers: {table.protocol}; ours follows the rules above."
    notes.append(f"{protocol} Split: each datalist's test list when it has one, else its validation "
                 "list (85/15, seed 42; external sets are all test). Dice = 100 when prediction and truth are both "
                 "empty.")
    notes += [f"Published: {line}" for line in table.sources]
    notes.append("Δ = ours − published, in Dice points; '–' where either side is unknown.")
    return list(dict.fromkeys(notes))  # columns of two protocols share a method's line
