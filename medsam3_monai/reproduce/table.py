"""The reproduction table: ours, published and Δ per dataset and column, plus labelled group averages.

Rows (``kind``):

* ``dataset``: every dataset of the paper's table, found or not (``found`` says which); ours is blank for a
  dataset that was not evaluated, never dropped;
* ``paper_mean``: the group mean over **all** its datasets, as the paper reports it; ours only when every dataset
  of the group was evaluated (else blank, and the row says how many were found);
* ``found_mean``: when only some datasets of a group were found, the mean over those, labelled so; its
  published side is the mean of the published per-dataset values of the same datasets (blank when one is
  unknown), so its Δ compares like with like.

Values are Dice in % (the paper's unit). Markdown shows one decimal, as the papers do (Δ = ours − published,
``0.0`` when it rounds to zero); the CSV keeps full precision. Stdlib only.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ReproductionTable", "build_table", "fmt_delta", "fmt_dice"]


def _mean(values: Sequence[float | None]) -> float | None:
    if not values or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    return sum(values) / len(values)


def _side_by_side(key: str, ours: float | None, published: float | None) -> dict[str, float | None]:
    delta = None if ours is None or published is None else ours - published
    return {f"{key}_ours": ours, f"{key}_published": published, f"{key}_delta": delta}


def fmt_dice(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def fmt_delta(ours: float | None, published: float | None) -> str:
    if ours is None or published is None:
        return "–"
    text = f"{ours - published:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else text


@dataclass
class ReproductionTable:
    """Rows of one reproduction (see the module doc); ``columns`` are :class:`~.published.Column`\\ s."""

    title: str
    columns: tuple[Any, ...]
    ran: Mapping[str, bool]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def row(self, name: str) -> dict[str, Any]:
        for row in self.rows:
            if row["name"] == name:
                return row
        raise KeyError(f"no row named {name!r}")

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        fields = ["kind", "name", "group", "found", "cases", "split"]
        for column in self.columns:
            fields += [f"{column.key}_ours", f"{column.key}_published", f"{column.key}_delta"]
        with path.open("w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        return path

    def to_markdown(self, columns: Sequence[Any] | None = None, title: str | None = None, notes: bool = True) -> str:
        """The table (``columns``: a subset, e.g. one protocol's), with the notes under it unless ``notes=False``."""
        columns = list(columns or self.columns)
        header = ["Dataset", "Group", "Found", "Cases"]
        for column in columns:
            if self.ran.get(column.key) is None:  # a method without a checkpoint to run (U-Net, MedSAM)
                header.append(f"{column.method} paper")
            else:
                header += [f"{column.method} ours", f"{column.method} paper", "Δ"]
        lines = [f"**{title or self.title}**", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|"]
        for row in self.rows:
            name = row["name"] if row["kind"] == "dataset" else f"**{row['name']}**"
            cells = [name, row["group"], row["found"], "" if row["cases"] is None else str(row["cases"])]
            for column in columns:
                ours, published = row[f"{column.key}_ours"], row[f"{column.key}_published"]
                if self.ran.get(column.key) is None:
                    cells.append(fmt_dice(published))
                    continue
                shown = fmt_dice(ours) if self.ran[column.key] or ours is not None else "not run"
                cells += [shown, fmt_dice(published), fmt_delta(ours, published)]
            lines.append("| " + " | ".join(cells) + " |")
        text = "\n".join(lines) + "\n"
        if not notes or not self.notes:
            return text
        return text + "".join(f"\n- {note}" for note in self.notes) + "\n"


def build_table(
    table: Any,
    ours: Mapping[str, Mapping[str, float | None]],
    found: Mapping[str, bool | str],
    cases: Mapping[str, int | None],
    ran: Mapping[str, bool],
    notes: Sequence[str] = (),
    splits: Mapping[str, str] | None = None,
) -> ReproductionTable:
    """Assemble the rows.

    Args:
        table: the :class:`~.published.PaperTable`.
        ours: column key -> dataset -> our Dice in % (absent or None: not evaluated).
        found: dataset -> whether it was found (and so evaluated): a bool, or a status text where ``"found"``
            means found and any other text (``not found``, ``no converter``) is shown as it is.
        cases: dataset -> evaluated cases (None: not evaluated).
        ran: column key -> whether its checkpoint was evaluated (a column without one to run, ``runs`` None, such
            as U-Net, is shown published-only; one not evaluated shows ``not run``).
        notes: lines under the Markdown table.
        splits: dataset -> the split it was scored on (``test``, or ``validation`` where no labelled test images
            exist): table.csv's ``split`` field.
    """
    rows: list[dict[str, Any]] = []
    columns = table.columns
    shown = {name: ("yes" if value in (True, "found") else "no" if value in (False, None) else str(value))
             for name, value in found.items()}
    found = {name: value in (True, "found") for name, value in found.items()}
    ran_map = {c.key: (None if c.runs is None else bool(ran.get(c.key))) for c in columns}
    for group in table.groups:
        members = table.members(group)
        for name in members:
            row = {"kind": "dataset", "name": name, "group": group, "found": shown.get(name, "no"),
                   "cases": cases.get(name), "split": (splits or {}).get(name) if found.get(name) else None}
            for column in columns:
                value = (ours.get(column.key) or {}).get(name)
                row.update(_side_by_side(column.key, value, column.published.get(name)))
            rows.append(row)
        present = [name for name in members if found.get(name)]
        total_cases = sum(cases.get(name) or 0 for name in present)
        paper = {"kind": "paper_mean", "group": group, "found": f"{len(present)}/{len(members)}",
                 "name": f"{group}: mean of all {len(members)} datasets (as published)", "cases": None}
        for column in columns:
            values = [(ours.get(column.key) or {}).get(name) for name in members]
            value = _mean(values) if len(present) == len(members) else None
            paper.update(_side_by_side(column.key, value, column.averages.get(group)))
        if len(present) == len(members):
            paper["cases"] = total_cases
        rows.append(paper)
        if present and len(present) < len(members):
            subset = {"kind": "found_mean", "group": group, "found": f"{len(present)}/{len(members)}",
                      "name": f"{group}: mean of the {len(present)} found dataset{'s' * (len(present) != 1)} only",
                      "cases": total_cases}
            for column in columns:
                value = _mean([(ours.get(column.key) or {}).get(name) for name in present])
                subset.update(_side_by_side(column.key, value, _mean([column.published.get(n) for n in present])))
            rows.append(subset)
    return ReproductionTable(table.title, tuple(columns), ran_map, rows, list(notes))
