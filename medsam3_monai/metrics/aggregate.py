"""Per-dataset and per-group tables from per-case metric records, comparisons, CSV and Markdown.

A record is one (case, prompt) evaluation::

    {"dataset": "CVC-ClinicDB", "group": "external", "case": "12", "prompt": "polyp",
     "protocol": "top-query",                      # optional
     "metrics": {"dice": 0.91, "iou": 0.83}}        # or the metric keys at top level

Conventions (Medical SAM3's tables):

- A dataset's value is the mean over its records (every case and every class prompt weigh the same);
  ``std`` is the population standard deviation (numpy's ``ddof=0``) over those records.
- A group's value (``internal`` / ``external``) is the mean of its datasets' means, so every dataset weighs
  the same however many cases it has; its ``std`` is the spread between those dataset means.
- The ``overall`` row is the mean over all datasets' means.
- NaN (HD95 with an empty mask) and missing metrics (NSD / HD95 without spacing) are skipped: means are
  nanmeans and ``<metric>_n`` counts the values that entered: on a group or the ``overall`` row, the per-record
  values under it (the sum of its datasets' counts; ``n_datasets`` counts the datasets). A dataset without any
  value gives NaN and is left out of its group's mean.

Values stay fractions in [0, 1] (HD95 in mm) in rows and CSV files; Markdown shows Dice / IoU / NSD in %
with two decimals and HD95 in mm.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "ComparisonTable",
    "METRIC_NAMES",
    "MetricTable",
    "aggregate",
    "compare",
    "read_cases_csv",
    "write_cases_csv",
]

METRIC_NAMES = ("dice", "iou", "nsd", "hd95")
PERCENT_METRICS = frozenset({"dice", "iou", "nsd"})
GROUP_ORDER = ("internal", "external")
_LABELS = {"dice": "Dice (%)", "iou": "IoU (%)", "nsd": "NSD (%)", "hd95": "HD95 (mm)"}
_ID_KEYS = ("dataset", "group", "case", "prompt", "protocol")


def _metrics_of(record: dict) -> dict[str, float]:
    values = record["metrics"] if "metrics" in record else {k: record[k] for k in METRIC_NAMES if k in record}
    out = {}
    for k, v in values.items():
        if v is None or v == "":
            continue
        out[k] = float(v)
    return out


def _metric_order(names: Iterable[str]) -> tuple[str, ...]:
    names = set(names)
    return tuple(m for m in METRIC_NAMES if m in names) + tuple(sorted(names - set(METRIC_NAMES)))


def _group_key(group: str) -> tuple[int, str]:
    return (GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER), group)


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan, 0
    return float(arr.mean()), float(arr.std()), int(arr.size)


def _fmt(value: float, metric: str, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "–"
    shown = value * 100.0 if metric in PERCENT_METRICS else value
    shown = 0.0 if abs(shown) < 0.005 else shown  # no "-0.00" for a difference that rounds to nothing
    return f"{shown:+.2f}" if signed else f"{shown:.2f}"


def _markdown(header: list[str], rows: list[list[str]], title: str | None, text_columns: int = 2) -> str:
    """A Markdown table: the first ``text_columns`` left-aligned, the numbers right-aligned."""
    lines = [f"**{title}**", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * text_columns + ["---:"] * (len(header) - text_columns)) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: str | Path, fieldnames: list[str], rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return path


@dataclass
class MetricTable:
    """Rows of dataset, group and overall statistics, in display order.

    Every row has ``kind`` ("dataset", "group" or "overall"), ``name``, ``group``, ``n`` (records),
    ``n_datasets`` and, per metric ``m``: ``m`` (mean), ``m_std`` and ``m_n``.
    """

    rows: list[dict]
    metrics: tuple[str, ...]
    protocol: str | None = None

    def row(self, name: str, kind: str | None = None) -> dict:
        for r in self.rows:
            if r["name"] == name and (kind is None or r["kind"] == kind):
                return r
        raise KeyError(f"no row named {name!r}" + (f" of kind {kind!r}" if kind else ""))

    def dataset_rows(self) -> list[dict]:
        return [r for r in self.rows if r["kind"] == "dataset"]

    def to_dicts(self) -> list[dict]:
        return [dict(r) for r in self.rows]

    def to_csv(self, path: str | Path) -> Path:
        fields = ["kind", "name", "group", "n", "n_datasets"]
        for m in self.metrics:
            fields += [m, f"{m}_std", f"{m}_n"]
        rows = [dict(r, protocol=r.get("protocol", self.protocol or "")) for r in self.rows]
        return write_csv(path, fields + ["protocol"], rows)

    def mixes_protocols(self) -> bool:
        """Whether its datasets were evaluated under different protocols (then the Markdown has a Protocol
        column)."""
        return _mixes_protocols(self.rows)

    def to_markdown(self, std: bool = False, title: str | None = None) -> str:
        """One table row per dataset, group and overall; Dice/IoU/NSD in % (2 decimals), HD95 in mm; a Protocol
        column when the datasets' protocols differ."""
        if title is None and self.protocol:
            title = f"protocol: {self.protocol}"
        mixed = self.mixes_protocols()
        header = ["Dataset", "Group", *(["Protocol"] if mixed else []), "n", *(_LABELS.get(m, m) for m in self.metrics)]
        body = []
        for r in self.rows:
            cells = []
            for m in self.metrics:
                cell = _fmt(r[m], m)
                if std and not math.isnan(r[m]):
                    cell += f" ± {_fmt(r[f'{m}_std'], m)}"
                cells.append(cell)
            k = r["n_datasets"]
            name = r["name"] if r["kind"] == "dataset" else f"**{r['name']} (mean of {k} dataset{'s' * (k != 1)})**"
            body.append([name, r["group"], *([r.get("protocol", "")] if mixed else []), str(r["n"])] + cells)
        return _markdown(header, body, title, text_columns=3 if mixed else 2)


def aggregate(records: Iterable[dict], metrics: Sequence[str] | None = None) -> MetricTable:
    """Per-dataset statistics, per-group means of dataset means and an overall row (see module doc).

    Datasets keep their first-appearance order inside each group; groups come internal, external, then others.
    A dataset's records must share one ``protocol`` (when they carry one): aggregate each protocol separately.
    Datasets of different protocols (a run's 2D datasets under ``semantic``, its volumes under the detector's
    ``top_query``) keep theirs in their rows' ``protocol``; the table's is then the list of them.
    """
    records = list(records)
    per_dataset: dict[str, list[dict[str, float]]] = {}
    group_of: dict[str, str] = {}
    protocol_of: dict[str, str] = {}
    for r in records:
        if "dataset" not in r or "group" not in r:
            raise ValueError(f"a record needs 'dataset' and 'group' keys, got {sorted(r)}")
        ds, grp = str(r["dataset"]), str(r["group"])
        if group_of.setdefault(ds, grp) != grp:
            raise ValueError(f"dataset {ds!r} has records in groups {group_of[ds]!r} and {grp!r}")
        if r.get("protocol") and protocol_of.setdefault(ds, str(r["protocol"])) != str(r["protocol"]):
            raise ValueError(f"dataset {ds!r} has records of evaluation protocols {protocol_of[ds]!r} and "
                             f"{r['protocol']!r}; aggregate one protocol at a time")
        per_dataset.setdefault(ds, []).append(_metrics_of(r))
    if metrics is None:
        metrics = _metric_order(k for ms in per_dataset.values() for m in ms for k in m)
    metrics = tuple(metrics)

    dataset_rows: dict[str, dict] = {}
    for ds, ms in per_dataset.items():
        row = {"kind": "dataset", "name": ds, "group": group_of[ds], "n": len(ms), "n_datasets": 1,
               "protocol": protocol_of.get(ds, "")}
        for m in metrics:
            row[m], row[f"{m}_std"], row[f"{m}_n"] = _stats([x[m] for x in ms if m in x])
        dataset_rows[ds] = row

    def summary(kind: str, name: str, group: str, members: list[dict]) -> dict:
        row = {"kind": kind, "name": name, "group": group, "n": sum(r["n"] for r in members),
               "n_datasets": len(members), "protocol": _protocols_of(members)}
        for m in metrics:
            mean, sd, _ = _stats([r[m] for r in members])
            row[m], row[f"{m}_std"], row[f"{m}_n"] = mean, sd, sum(r[f"{m}_n"] for r in members)
        return row

    rows: list[dict] = []
    for grp in sorted(set(group_of.values()), key=_group_key):
        members = [row for ds, row in dataset_rows.items() if group_of[ds] == grp]
        rows += members
        rows.append(summary("group", grp, grp, members))
    if dataset_rows:
        rows.append(summary("overall", "overall", "all", list(dataset_rows.values())))
    return MetricTable(rows, metrics, _protocols_of(dataset_rows.values()) or None)


def _mixes_protocols(rows: Iterable[dict]) -> bool:
    """Whether the dataset rows among ``rows`` carry more than one ``protocol``."""
    return len({r.get("protocol", "") for r in rows if r["kind"] == "dataset"}) > 1


def _protocols_of(rows: Iterable[dict]) -> str:
    """The protocols of dataset rows, in first-appearance order: ``"semantic, top_query"`` ("" for none)."""
    return ", ".join(dict.fromkeys(r["protocol"] for r in rows if r.get("protocol")))


@dataclass
class ComparisonTable:
    """Two tables side by side with Δ = b − a per metric (Medical SAM3 Table 3: SAM3 vs Medical SAM3).

    Rows carry ``kind``, ``name``, ``group`` and per metric ``m_a``, ``m_b``, ``m_delta`` (NaN where a row is
    missing from one table).
    """

    rows: list[dict]
    metrics: tuple[str, ...]
    labels: tuple[str, str] = ("A", "B")
    notes: list[str] = field(default_factory=list)

    def row(self, name: str, kind: str | None = None) -> dict:
        for r in self.rows:
            if r["name"] == name and (kind is None or r["kind"] == kind):
                return r
        raise KeyError(f"no row named {name!r}")

    def to_dicts(self) -> list[dict]:
        return [dict(r) for r in self.rows]

    def to_csv(self, path: str | Path) -> Path:
        """Columns ``m_a``, ``m_b``, ``m_delta`` per metric, then ``protocol`` and the labels of ``a`` and ``b``
        (the file names its two sides without comparison.md)."""
        fields = ["kind", "name", "group"]
        for m in self.metrics:
            fields += [f"{m}_a", f"{m}_b", f"{m}_delta"]
        named = [{**row, "a": self.labels[0], "b": self.labels[1]} for row in self.rows]
        return write_csv(path, fields + ["protocol", "a", "b"], named)

    def to_markdown(self, title: str | None = None) -> str:
        """Dataset, group and overall rows with both tables' metrics and their Δ; a Protocol column when the
        datasets ran under different protocols (a run of pictures and volumes)."""
        a, b = self.labels
        mixed = _mixes_protocols(self.rows)
        header = ["Dataset", "Group", *(["Protocol"] if mixed else [])]
        for m in self.metrics:
            label = _LABELS.get(m, m)
            header += [f"{label} {a}", f"{label} {b}", f"Δ {label.split(' ')[0]}"]
        body = []
        for r in self.rows:
            name = r["name"] if r["kind"] == "dataset" else f"**{r['name']}**"
            cells = [name, r["group"], *([r.get("protocol", "")] if mixed else [])]
            for m in self.metrics:
                cells += [_fmt(r[f"{m}_a"], m), _fmt(r[f"{m}_b"], m), _fmt(r[f"{m}_delta"], m, signed=True)]
            body.append(cells)
        text = _markdown(header, body, title, text_columns=3 if mixed else 2)
        return text + "".join(f"\n{n}\n" for n in self.notes)


def compare(
    table_a: MetricTable,
    table_b: MetricTable,
    labels: tuple[str, str] = ("A", "B"),
    metrics: Sequence[str] | None = None,
) -> ComparisonTable:
    """Match rows by (kind, name) and add Δ = b − a for every metric both tables have.

    Row order: table a's, then rows only table b has. Comparing different protocols is allowed (that is
    how prompt-protocol ablations are shown) and noted under the Markdown table.
    """
    if metrics is None:
        metrics = tuple(m for m in table_a.metrics if m in table_b.metrics)
    metrics = tuple(metrics)
    index_b = {(r["kind"], r["name"]): r for r in table_b.rows}
    keys = [(r["kind"], r["name"]) for r in table_a.rows]
    keys += [k for k in index_b if k not in set(keys)]
    index_a = {(r["kind"], r["name"]): r for r in table_a.rows}
    rows = []
    for key in keys:
        ra, rb = index_a.get(key), index_b.get(key)
        ref = ra or rb
        protocols = dict.fromkeys(r.get("protocol", "") for r in (ra, rb) if r is not None)
        row = {"kind": ref["kind"], "name": ref["name"], "group": ref["group"], "protocol": " / ".join(protocols)}
        for m in metrics:
            va = ra.get(m, math.nan) if ra else math.nan
            vb = rb.get(m, math.nan) if rb else math.nan
            row[f"{m}_a"], row[f"{m}_b"], row[f"{m}_delta"] = va, vb, vb - va
        rows.append(row)
    notes = []
    if table_a.protocol != table_b.protocol:
        notes.append(f"{labels[0]}: protocol {table_a.protocol or 'unspecified'}; "
                     f"{labels[1]}: protocol {table_b.protocol or 'unspecified'}.")
    return ComparisonTable(rows, metrics, tuple(labels), notes)


def write_cases_csv(records: Iterable[dict], path: str | Path, metrics: Sequence[str] | None = None) -> Path:
    """The per-case CSV: one line per record, identity columns then metric columns (fractions, HD95 in mm)."""
    records = list(records)
    flat = [{**{k: r.get(k, "") for k in _ID_KEYS}, **_metrics_of(r)} for r in records]
    if metrics is None:
        metrics = _metric_order(k for r in records for k in _metrics_of(r))
    return write_csv(path, list(_ID_KEYS) + list(metrics), flat)


def read_cases_csv(path: str | Path) -> list[dict]:
    """Records back from :func:`write_cases_csv` (metrics nested under ``"metrics"``; blanks dropped)."""
    out = []
    with Path(path).open(newline="") as f:
        for line in csv.DictReader(f):
            ids = {k: line[k] for k in _ID_KEYS if line.get(k)}
            metrics = {k: float(v) for k, v in line.items() if k not in _ID_KEYS and v not in ("", None)}
            out.append({**ids, "metrics": metrics})
    return out
