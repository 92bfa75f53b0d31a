"""Radar charts of a reproduction, drawn by :func:`medsam3_monai.metrics.plots.radar_chart` (one axis per dataset).

* ``radar.png``: the paper's figure (Medical SAM3 Fig. 3 layout): our Dice of each evaluated checkpoint, one line
  each, on the datasets that were found (horizontal bars when fewer than three were found);
* ``radar_<column>_vs_paper.png``: one checkpoint, ours against the published Dice, on the found datasets
  whose published value is known (not drawn when there is none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["reproduction_charts"]


def _table(names: Sequence[str], series: Mapping[str, Mapping[str, float]], protocol: str | None) -> Any:
    from ..metrics.aggregate import MetricTable

    rows = [{"kind": "dataset", "name": name, **{label: values[name] / 100.0 for label, values in series.items()}}
            for name in names]
    return MetricTable(rows, tuple(series), protocol)


def reproduction_charts(table: Any, ours: Mapping[str, Mapping[str, float | None]], out_dir: Path,
                        protocol: str | None = None, suffix: str = "") -> list[Path]:
    """Draw the charts of the columns in ``ours`` (column key -> dataset -> Dice %) into ``out_dir``."""
    from ..metrics.plots import radar_chart

    columns = [c for c in table.columns if c.key in ours]
    names = [name for name, _ in table.datasets if any((ours[c.key].get(name) is not None) for c in columns)]
    if not names:
        return []
    written = []
    series = {f"{c.method} (ours)": {n: ours[c.key].get(n) or 0.0 for n in names} for c in columns}
    written.append(radar_chart(_table(names, series, protocol), out_dir / f"radar{suffix}.png",
                               metrics=tuple(series), title=f"{table.title}: our Dice per dataset", unit="Dice (%)"))
    for column in columns:
        known = [n for n in names if ours[column.key].get(n) is not None and column.published.get(n) is not None]
        if not known:
            continue
        pair = {f"{column.method} (ours)": {n: ours[column.key][n] for n in known},
                f"{column.method} (published)": {n: column.published[n] for n in known}}
        written.append(radar_chart(_table(known, pair, protocol), out_dir / f"radar_{column.key}_vs_paper.png",
                                   metrics=tuple(pair), title=f"{column.method}: ours vs published Dice",
                                   unit="Dice (%)"))
    return written
