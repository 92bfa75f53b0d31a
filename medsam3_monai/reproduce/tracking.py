"""One MLflow run per reproduction: parameters, every number of the table and every file of the output folder.

The store defaults to ``sqlite:///<out>/mlruns.db`` with artifacts in ``<out>/mlartifacts`` (as ``medsam3
evaluate``); the evaluations themselves log nothing of their own, so the reproduction is exactly one run.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_EXPERIMENT", "ReproductionRun", "table_metrics"]

DEFAULT_EXPERIMENT = "medsam3-reproduce"
_SKIP = {"mlruns.db", "mlartifacts"}


def _key(*parts: str) -> str:
    return "/".join(re.sub(r"[^0-9A-Za-z_\-. :]+", "_", str(p)) for p in parts)


def table_metrics(table: Any) -> dict[str, float]:
    """``<column>/<dataset or row>/{dice,published_dice,delta_dice}`` in % for every known value of the table."""
    out = {}
    for row in table.rows:
        name = (row["name"],) if row["kind"] == "dataset" else (row["kind"], row["group"])
        for column in table.columns:
            for what, suffix in (("ours", "dice"), ("published", "published_dice"), ("delta", "delta_dice")):
                value = row.get(f"{column.key}_{what}")
                if value is not None:
                    out[_key(column.key, *name, suffix)] = float(value)
    return out


class ReproductionRun:
    """Open the run first (its id goes into the manifest), then :meth:`finish` with metrics and the folder."""

    def __init__(self, out_dir: Path, tracking_uri: str | None = None, experiment: str | None = None,
                 run_name: str | None = None) -> None:
        from ..engines.reports import default_tracking_uri, open_experiment

        self.out_dir = Path(out_dir)
        self.tracking_uri = tracking_uri or default_tracking_uri(self.out_dir)
        artifacts = self.out_dir / "mlartifacts" if tracking_uri is None else None
        self.client, experiment_id = open_experiment(self.tracking_uri, experiment or DEFAULT_EXPERIMENT, artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def finish(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> str:
        """Log ``params``, ``metrics`` and every file and folder of the output folder, then close the run."""
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id,
                              params=[Param(_key(*str(k).split("/")), str(v)[:6000]) for k, v in params.items()],
                              metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        for path in sorted(self.out_dir.iterdir()):
            if path.name in _SKIP:
                continue
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id)
        return self.run_id

    def fail(self) -> None:
        try:
            self.client.set_terminated(self.run_id, status="FAILED")
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
