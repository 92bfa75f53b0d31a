"""MONAI's MLFlowHandler, continuing only a RUNNING run of its name (the bundles' ``mlflow.json`` handlers).

MONAI's handler (1.6) logs into the latest run of its name that is not FINISHED: a KILLED or FAILED run, such as the
one an interrupted ``medsam3 train`` leaves, would be continued by the resume (its redone iterations logged twice)
and then set FINISHED, hiding the interruption. This one continues a RUNNING run of its name, the one another
handler of the same bundle opened (the trainer's, then the validator's), and otherwise opens a new run.
"""

from __future__ import annotations

from ignite.engine import Engine
from monai.handlers import MLFlowHandler

__all__ = ["MLFlowRunHandler"]


class MLFlowRunHandler(MLFlowHandler):
    """:class:`monai.handlers.MLFlowHandler` (same arguments) that never re-opens a run which has ended."""

    def start(self, engine: Engine) -> None:
        if not self.cur_run and self.run_name is not None:
            self._set_experiment()
            if self.experiment is not None:
                running = [run for run in self.client.search_runs([self.experiment.experiment_id],
                                                                  order_by=["attributes.start_time DESC"])
                           if run.info.run_name == self.run_name and run.info.status == "RUNNING"]
                self.cur_run = (self.client.get_run(running[0].info.run_id) if running else
                                self.client.create_run(experiment_id=self.experiment.experiment_id,
                                                       run_name=self.run_name))
        super().start(engine)
