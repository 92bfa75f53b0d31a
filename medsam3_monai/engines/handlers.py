"""Ignite handlers of the training bundle: per-epoch seeding (exact resume), MLflow parameters and artifacts."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from ignite.engine import Engine, Events

from ..compat import attached_handlers
from ..networks.outputs import unwrap
from .distributed import get_rank

logger = logging.getLogger(__name__)


class EpochSeedHandler:
    """Re-seed every source of randomness at each epoch start from (seed, epoch).

    Shuffling (``sampler.set_epoch`` or a seeded generator), random transforms (``set_random_state``) and torch's
    global RNG (dropout) then depend only on the epoch, so a run resumed from an epoch-boundary checkpoint draws
    exactly what the uninterrupted run drew -- with a ``set_epoch`` sampler (the bundle's). A generator-seeded
    ``RandomSampler`` is exact only when each epoch runs its iterator to the end: when the items fill whole batches
    the loader leaves it suspended, and the next epoch's first batch resumes it, spending one permutation of the
    freshly seeded generator.

    Under DDP the sampler shuffles alike on every rank (``set_epoch``: one permutation, split into shards),
    while random transforms and the global RNG get ``+ rank`` so that ranks do not draw the same augmentations.

    ``transform`` is one chain or a list of chains (the training bundle's 2D-picture and volume chains), each
    re-seeded with the epoch's seed in list order; a random transform shared by two chains keeps the seed the last
    chain gives it.
    """

    def __init__(self, seed: int = 42, sampler: Any = None, transform: Any = None) -> None:
        self.seed, self.sampler = seed, sampler
        chains = transform if isinstance(transform, (list, tuple)) else [transform]
        self.transforms = [chain for chain in chains if chain is not None]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch_seed = self.seed + 1000 * engine.state.epoch
        rank_seed = epoch_seed + get_rank()
        torch.manual_seed(rank_seed)
        if self.sampler is not None:
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(engine.state.epoch)
            elif getattr(self.sampler, "generator", None) is not None:
                self.sampler.generator.manual_seed(epoch_seed)
        for chain in self.transforms:
            if hasattr(chain, "set_random_state"):
                chain.set_random_state(seed=rank_seed % (2**32))


def mlflow_run_of(engine: Engine) -> tuple[Any, str] | None:
    """(MlflowClient, run id) of the MONAI MLFlowHandler attached to ``engine`` (e.g. by ``--tracking mlflow``)."""
    from monai.handlers import MLFlowHandler

    for handler in attached_handlers(engine):
        owner = getattr(handler, "__self__", None)
        if isinstance(owner, MLFlowHandler) and owner.cur_run is not None:
            return owner.client, owner.cur_run.info.run_id
    return None


class MLflowRunInfoHandler:
    """Log every hyper-parameter, the named learning rates and the final artifacts into the run of MONAI's
    MLFlowHandler.

    ``--tracking bundles/medsam3/configs/mlflow.json`` (or ``--tracking mlflow``) attaches MONAI's MLFlowHandler,
    which logs losses and metrics; this handler adds the run parameters (after this process's first iteration, when
    the run exists: a resumed training's too, whose run is a new one when the previous one finished), each optimiser
    group's learning rate by its name (``lr/detector``, ``lr/vision.layer3``, ...) every ``lr_interval`` iterations
    on the iteration axis (the rate that iteration's optimiser step used), and on COMPLETED the ``artifacts``
    (files that exist: final and best checkpoints) and ``documents`` (name -> JSON-able content, e.g. the bundle's
    metadata) -- before that handler closes the run: attach this one first, as the bundle does. Without an MLflow
    handler it does nothing.
    """

    def __init__(self, params: Mapping[str, Any] | None = None, artifacts: Sequence[str] = (),
                 documents: Mapping[str, Any] | None = None, optimizer: Any = None, lr_interval: int = 10) -> None:
        self.params = dict(params or {})
        self.artifacts = list(artifacts)
        self.documents = dict(documents or {})
        self.optimizer = optimizer
        self.lr_interval = max(int(lr_interval), 1)
        self._params_logged = False
        self._rates: tuple[int, dict[str, float]] | None = None  # (iteration, its rates), read as it starts

    def attach(self, engine: Engine) -> None:
        # the first iteration this process runs, whatever its number (a resumed run starts past iteration 1)
        first = Events.ITERATION_COMPLETED(event_filter=lambda _engine, _iteration: not self._params_logged)
        engine.add_event_handler(first, self.log_params)
        if self.optimizer is not None:  # read before the iteration's step (the scheduler steps after it), logged after
            engine.add_event_handler(Events.ITERATION_STARTED(every=self.lr_interval), self.read_learning_rates)
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.lr_interval), self.log_learning_rates)
        engine.add_event_handler(Events.COMPLETED, self.log_artifacts)

    def read_learning_rates(self, engine: Engine) -> None:
        """Each group's learning rate as the iteration starts: the one its optimiser step uses."""
        rates: dict[str, float] = {}
        for i, group in enumerate(self.optimizer.param_groups):
            name = str(group.get("name", f"group_{i}")).removesuffix(".no_decay")
            rates.setdefault(f"lr/{name}", float(group["lr"]))
        self._rates = (int(engine.state.iteration), rates)

    def log_learning_rates(self, engine: Engine) -> None:
        """``lr/<group name>`` at step = iteration, the rate that iteration trained with (groups without a name:
        ``lr/group_<i>``)."""
        found = mlflow_run_of(engine)
        step = int(engine.state.iteration)
        if found is None or self._rates is None or self._rates[0] != step:
            return
        import time

        from mlflow.entities import Metric

        client, run_id = found
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in self._rates[1].items()])

    @staticmethod
    def flatten(value: Any, prefix: str = "") -> dict[str, str]:
        """Nested mapping -> {"a.b": "value"} (MLflow parameters are flat strings of at most 500 characters)."""
        if not isinstance(value, Mapping):
            return {prefix: str(value)[:500]}
        flat: dict[str, str] = {}
        for key, inner in value.items():
            flat.update(MLflowRunInfoHandler.flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return flat

    def log_params(self, engine: Engine) -> None:
        self._params_logged = True
        found = mlflow_run_of(engine)
        if found is None:
            return
        client, run_id = found
        logged = client.get_run(run_id).data.params
        for key, value in self.flatten(self.params).items():
            if key not in logged:
                client.log_param(run_id, key, value)

    def log_artifacts(self, engine: Engine) -> None:
        found = mlflow_run_of(engine)
        if found is None:
            return
        client, run_id = found
        for path in self.artifacts:
            if Path(path).exists():
                client.log_artifact(run_id, str(path))
            else:
                logger.info("MLflow artifact %s does not exist, not logged: no validation of this run has beaten the "
                            "best so far, or none ran (a training resumed from another folder's checkpoint carries "
                            "that run's best value; its best model file stays in that folder)", path)
        for name, content in self.documents.items():
            client.log_dict(run_id, content, name)


class TrainerIteration:
    """The trainer's iteration, for logging validation metrics on the iteration axis without a reference from the
    validator back to the trainer (a cycle in the bundle config): attach it to the trainer, then pass it as
    ``global_epoch_transform`` of the validator's ``MLFlowHandler`` (it ignores the epoch it is given)."""

    def __init__(self) -> None:
        self.iteration = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self.record)  # before any handler of COMPLETED

    def record(self, engine: Engine) -> None:
        self.iteration = int(engine.state.iteration)

    def __call__(self, _epoch: int) -> int:
        return self.iteration


class LossProgressBar:
    """Ignite's ``ProgressBar`` over the trainer with the running total loss (``output[0]["loss"]["loss"]``); the
    full term list goes to the log every ``log_interval`` iterations (``StatsHandler``)."""

    def __init__(self, persist: bool = True, desc: str = "train") -> None:
        self.persist, self.desc = persist, desc

    def attach(self, engine: Engine) -> None:
        from ignite.handlers import ProgressBar

        from ..bundle import log_above_progress_bars

        ProgressBar(persist=self.persist, desc=self.desc).attach(
            engine, output_transform=lambda output: {"loss": float(output[0]["loss"]["loss"])})
        # MONAI's StatsHandlers make their console handlers when the bundle builds them, after its initialize
        engine.add_event_handler(Events.STARTED, lambda _engine: log_above_progress_bars())


def save_model_file(network: torch.nn.Module, path: str | Path, preprocessing: Mapping[str, Any] | None = None,
                    **extra: Any) -> None:
    """Write ``network`` (a ``MedSAM3Net``, DDP-wrapped or compiled alike) as our model file (config + state dict,
    :func:`~medsam3_monai.networks.checkpoints.save_checkpoint_file`), on rank 0 only; ``extra`` is stored beside,
    ``preprocessing`` (the training's ``resize_kernel`` and ``ct_window``) as the settings inference repeats.
    The state a subclass adds outside the SAM3 model (a head of one's own) is saved with it, under its own names."""
    if get_rank() > 0:
        return
    from ..networks.checkpoints import save_checkpoint_file

    net = unwrap(network)
    own = {name: value for name, value in net.state_dict().items() if not name.startswith("sam3.")}
    save_checkpoint_file(net.sam3, path, extra=extra, extra_state=own, preprocessing=preprocessing)


class ValidateAtStart:
    """Run the validator once when the training starts, after the training checkpoint is restored: list it after
    ``TrainingCheckpoint`` (Ignite runs a ``STARTED`` event's handlers in the order they were attached). MONAI's
    ``ValidationHandler(exec_at_start=True)``, attached before the checkpoint, scored the network before its
    weights were restored, and the best-model saver, its best value not restored yet either, wrote that network.

    Args:
        validator: the validation engine (``validate#evaluator``).
        enabled: the bundle's ``validate_at_start``.
    """

    def __init__(self, validator: Any, enabled: bool = True) -> None:
        self.validator, self.enabled = validator, bool(enabled)

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.validator.run(engine.state.epoch)


class ValidateAtEnd:
    """Validate the final network once when a training ends between two of ``ValidationHandler``'s validations
    (its last iteration not a multiple of ``interval``), so that every run that trains is scored on its last weights
    and the best model can be the final one: a run shorter than ``val_interval`` iterations validates once, at its
    end. List it before ``TrainingCheckpoint`` (Ignite runs a ``COMPLETED`` event's handlers in the order they were
    attached): the end-of-run checkpoint then carries the best value this validation may have set.

    Nothing runs when this process trained no iteration (a rerun of a finished training) or when the run stopped
    before ``max_epochs``.

    Args:
        validator: the validation engine (``validate#evaluator``).
        interval: the ``ValidationHandler``'s interval in iterations (``val_interval``).
        enabled: False when the training does not validate (no validation items).
    """

    def __init__(self, validator: Any, interval: int, enabled: bool = True) -> None:
        self.validator, self.interval, self.enabled = validator, int(interval), bool(enabled)
        self._trained = False

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self._start)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._count)
            engine.add_event_handler(Events.COMPLETED, self)

    def _start(self, engine: Engine) -> None:
        self._trained = False

    def _count(self, engine: Engine) -> None:
        self._trained = True

    def __call__(self, engine: Engine) -> None:
        state = engine.state
        if self._trained and state.epoch >= state.max_epochs and state.iteration % self.interval:
            self.validator.run(state.epoch)


class OptimizerStepLrSchedule:
    """Step the learning-rate scheduler once per optimiser step: at the trainer's ``MODEL_COMPLETED``, which
    :class:`~.trainer.MedSAM3Trainer` fires after ``optimizer.step()``, so with ``accumulation_steps`` N every N
    iterations. Warm-up and decay then count optimiser steps whatever N is (MONAI's ``LrScheduleHandler`` steps at
    every iteration, reaching the peak learning rate N times too early)."""

    def __init__(self, lr_scheduler: Any) -> None:
        self.lr_scheduler = lr_scheduler

    def attach(self, engine: Engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.lr_scheduler.step()


class FinalCheckpoint:
    """Save the network as the bundle's ``models/model.pt`` (config + state dict, our checkpoint format) on COMPLETED;
    ``preprocessing``: the training's ``{"resize_kernel", "ct_window"}``, recorded for inference to repeat."""

    def __init__(self, network: torch.nn.Module, path: str, preprocessing: Mapping[str, Any] | None = None) -> None:
        self.network, self.path, self.preprocessing = network, path, preprocessing

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        save_model_file(self.network, self.path, self.preprocessing, iteration=engine.state.iteration)
        logger.info("saved final model to %s", self.path)


class BestModelCheckpoint:
    """Save the network whenever a validation beats the best ``metric`` so far, in the format of ``models/model.pt``
    (config + state dict), so that ``MedSAM3Net(path)``, ``--checkpoint`` and ``convert-checkpoint`` load it as they
    load the final model. Attach it to the validator.

    Args:
        network: the trained ``MedSAM3Net``.
        path: the file, rewritten atomically at each improvement.
        metric: the validator's metric to maximise (stored in the file beside the weights).
        iteration: the trainer's iteration (a :class:`TrainerIteration`), stored in the file; None leaves it out.
        preprocessing: the training's ``{"resize_kernel", "ct_window"}``, recorded for inference to repeat.

    The best value so far is state (``state_dict``): give the handler to ``TrainingCheckpoint``'s objects (as
    ``best_model``, as ``train.json`` does) and a resumed training keeps the best model of the run it resumes,
    instead of writing the file afresh at its first validation. The validator's own record of its best (MONAI's
    ``state.best_metric`` and ``best_metric_epoch``, which it logs as "Got new best metric" and "best value ... at
    epoch") is restored with it, so a resumed run's first validation is not announced as a new best when it is not.
    """

    def __init__(self, network: torch.nn.Module, path: str, metric: str = "val_dice",
                 iteration: TrainerIteration | None = None, preprocessing: Mapping[str, Any] | None = None) -> None:
        self.network, self.path, self.metric, self.iteration = network, path, metric, iteration
        self.preprocessing = preprocessing
        self.best = float("-inf")
        self.best_epoch = -1
        self._validator: Engine | None = None

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "metric": self.metric, "epoch": self.best_epoch}  # type: ignore[dict-item]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("metric", self.metric) != self.metric:
            return
        self.best, self.best_epoch = float(state["best"]), int(state.get("epoch", 0))
        validator_state = getattr(self._validator, "state", None)
        if math.isfinite(self.best) and getattr(validator_state, "key_metric_name", None) == self.metric:
            validator_state.best_metric = self.best
            validator_state.best_metric_epoch = max(self.best_epoch, 0)  # -1 would make MONAI take any value

    def attach(self, engine: Engine) -> None:
        self._validator = engine
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.metric not in engine.state.metrics:
            raise KeyError(f"BestModelCheckpoint: the validator has no metric '{self.metric}' (it has "
                           f"{sorted(engine.state.metrics)})")
        value = float(engine.state.metrics[self.metric])
        if not value > self.best:  # NaN never counts as better
            return
        self.best, self.best_epoch = value, int(engine.state.epoch)
        extra: dict[str, Any] = {self.metric: value}
        if self.iteration is not None:
            extra["iteration"] = self.iteration(0)
        save_model_file(self.network, self.path, self.preprocessing, **extra)
        logger.info("saved best model (%s %.4f) to %s", self.metric, value, self.path)
