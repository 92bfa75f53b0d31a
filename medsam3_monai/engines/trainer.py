"""MedSAM3Trainer: MONAI's SupervisedTrainer with the find-query iteration of SAM3 training."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from .batch import PrepareFindBatch

logger = logging.getLogger(__name__)


def autocast_for(device: torch.device | str, bf16: bool):
    """bf16 autocast on CUDA when asked (SAM3 trains in bfloat16); a no-op elsewhere."""
    device = torch.device(device)
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class MedSAM3Trainer(SupervisedTrainer):
    """One iteration = forward B find-queries, the set-prediction criterion, backward, (clip, step).

    Args (beyond SupervisedTrainer's): ``bf16`` autocast on CUDA; ``grad_clip_norm`` max L2 norm of the
    gradients at each optimiser step (SAM3's configs use 0.1; None disables); ``accumulation_steps`` as MONAI's.

    ``engine.state.output`` is a one-element list (MONAI's decollated shape) of ``{image, label, pred, loss}``
    where ``loss`` maps ``"loss"`` (weighted total) and every criterion term (plus ``grad_norm``) to floats, so
    MONAI's default ``from_engine(["loss"], first=True)`` hands StatsHandler and MLFlowHandler every term. The
    floats are read once per iteration, after the optimiser step is queued (during it the terms are detached
    tensors on the device): the only host syncs of a step are the matcher's.
    """

    def __init__(self, *args: Any, bf16: bool = True, grad_clip_norm: float | None = 0.1, **kwargs: Any) -> None:
        kwargs.setdefault("prepare_batch", PrepareFindBatch())
        kwargs.setdefault("decollate", False)
        super().__init__(*args, **kwargs)
        self.bf16 = bf16
        self.grad_clip_norm = grad_clip_norm
        if bf16 and torch.device(self.state.device).type != "cuda":
            logger.info("bf16 autocast applies on CUDA only: this %s run trains in float32",
                        torch.device(self.state.device).type)

    def _should_zero_and_step(self, engine: "MedSAM3Trainer") -> tuple[bool, bool]:
        acc = engine.accumulation_steps
        if acc <= 1:
            return True, True
        epoch_length = engine.state.epoch_length
        local = (engine.state.iteration - 1) % epoch_length if epoch_length else engine.state.iteration - 1
        last_of_epoch = epoch_length is not None and local + 1 == epoch_length
        return local % acc == 0, (local + 1) % acc == 0 or last_of_epoch

    def _iteration(self, engine: "MedSAM3Trainer", batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        images, targets, _, network_kwargs = engine.prepare_batch(
            batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs
        )
        zero_grad, step = self._should_zero_and_step(engine)
        engine.network.train()
        if zero_grad:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        output: dict[str, Any] = {Keys.IMAGE: images, Keys.LABEL: targets}
        engine.state.output = [output]
        with autocast_for(engine.state.device, self.bf16):
            outputs = engine.inferer(images, engine.network, **network_kwargs)
        output[Keys.PRED] = outputs
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        terms = engine.loss_function(outputs, targets)
        values = {name: value.detach() for name, value in terms.items()}  # read once the step is queued
        output[Keys.LOSS] = values
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        (terms["loss"] / engine.accumulation_steps).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if step:
            if self.grad_clip_norm:
                params = [p for g in engine.optimizer.param_groups for p in g["params"] if p.grad is not None]
                values["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
            engine.optimizer.step()
            engine.fire_event(IterationEvents.MODEL_COMPLETED)
        output[Keys.LOSS] = loss_floats(values)
        return engine.state.output


def loss_floats(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """The loss terms (scalar tensors, possibly on the GPU) as floats with one device-to-host copy: read after
    backward and the optimiser step are queued, so the GPU never waits for the host in between."""
    if not values:
        return {}
    stacked = torch.stack([value.float().reshape(()) for value in values.values()]).tolist()
    return dict(zip(values, stacked))
