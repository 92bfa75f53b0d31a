"""MONAI's MLFlowHandler with two changes (the bundles' ``mlflow.json`` handlers).

* Runs: MONAI's handler (1.6) logs into the latest run of its name that is not FINISHED: a KILLED or FAILED run, such
  as the one an interrupted ``medsam3 train`` leaves, would be continued by the resume (its redone iterations logged
  twice) and then set FINISHED, hiding the interruption. This one continues a RUNNING run of its name, the one
  another handler of the same bundle opened (the trainer's, then the validator's), and otherwise opens a new run.
* Artifacts of a SQLite store: MONAI puts them in ``mlruns/`` beside the database, but takes the database's path
  from the URI without decoding it, so a path with a space or an accent (``my%20work`` in the URI
  ``path_to_sqlite_uri`` makes) gave a new folder literally named ``my%20work``, outside the run folder. This one
  decodes it.
"""

from __future__ import annotations

import os
from typing import Any

from ignite.engine import Engine
from monai.handlers import MLFlowHandler
from monai.utils import path_to_uri

__all__ = ["MLFlowRunHandler", "running_runs", "sqlite_artifact_location"]


def running_runs(client: Any, experiment_id: str, run_name: str) -> list[Any]:
    """The RUNNING runs named ``run_name`` of an experiment, newest first (the name compared here, not in MLflow's
    filter string, where a quote in it would break the quoting)."""
    found = client.search_runs([experiment_id], "attributes.status = 'RUNNING'",
                               order_by=["attributes.start_time DESC"])
    return [run for run in found if run.info.run_name == run_name]


def sqlite_artifact_location(tracking_uri: str | None) -> str | None:
    """``file:`` URI of ``mlruns/`` beside a ``sqlite:///`` store's database (its path decoded); None for another
    kind of store (MLflow decides)."""
    from ..bundle import sqlite_database

    database = sqlite_database(tracking_uri)
    return path_to_uri(database.parent / "mlruns") if database is not None else None


class MLFlowRunHandler(MLFlowHandler):
    """:class:`monai.handlers.MLFlowHandler` (same arguments) that never re-opens a run which has ended, and puts a
    SQLite store's artifacts beside its database whatever characters its path holds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from ..bundle import prepare_sqlite_store

        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or kwargs.get("tracking_uri")  # MONAI's order
        tidy = prepare_sqlite_store(tracking_uri)
        super().__init__(*args, **kwargs)
        tidy()
        if kwargs.get("artifact_location") is None:  # MONAI's rule, the path decoded
            self.artifact_location = sqlite_artifact_location(tracking_uri) or self.artifact_location

    def start(self, engine: Engine) -> None:
        if not self.cur_run and self.run_name is not None:
            self._set_experiment()
            if self.experiment is not None:
                running = running_runs(self.client, self.experiment.experiment_id, self.run_name)
                self.cur_run = (self.client.get_run(running[0].info.run_id) if running else
                                self.client.create_run(experiment_id=self.experiment.experiment_id,
                                                       run_name=self.run_name))
        super().start(engine)
