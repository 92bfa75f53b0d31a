"""Learning-rate schedule of SAM3 / Medical SAM3: linear warm-up, then inverse square-root decay."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def inverse_sqrt_factor(step: int, warmup_steps: int, timescale: int, cooldown_steps: int = 0,
                        total_steps: int | None = None) -> float:
    """Multiplier of the base learning rate at ``step`` (Meta's InverseSquareRootParamScheduler).

    ``1 / sqrt((step + timescale - warmup) / timescale)`` after the warm-up (1 at its end), times the linear
    warm-up ``min(1, step / warmup)``, times an optional linear cool-down over the last ``cooldown_steps``.
    """
    factor = 1.0
    if step > warmup_steps:
        factor = 1.0 / math.sqrt((step + timescale - warmup_steps) / timescale)
    if warmup_steps:
        factor *= min(1.0, step / warmup_steps)
    if cooldown_steps and total_steps:
        factor *= max(0.0, min(1.0, (total_steps - step) / cooldown_steps))
    return factor


class WarmupInverseSqrtLR(LambdaLR):
    """Per-iteration schedule applying :func:`inverse_sqrt_factor` to every parameter group's own lr."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 20, timescale: int = 20, cooldown_steps: int = 0,
                 total_steps: int | None = None, last_epoch: int = -1) -> None:
        if warmup_steps < 0 or timescale <= 0:
            raise ValueError(f"warmup_steps must be >= 0 and timescale > 0; got {warmup_steps}, {timescale}")
        if cooldown_steps and not total_steps:
            raise ValueError(f"cooldown_steps {cooldown_steps} needs total_steps, the optimiser steps of the whole "
                             "training (the bundle derives them from the epochs: optimizer_steps)")
        self.warmup_steps, self.timescale = warmup_steps, timescale
        self.cooldown_steps, self.total_steps = cooldown_steps, total_steps
        super().__init__(optimizer, self._factor, last_epoch=last_epoch)

    def _factor(self, step: int) -> float:
        return inverse_sqrt_factor(step, self.warmup_steps, self.timescale, self.cooldown_steps, self.total_steps)

    def load_state_dict(self, state_dict: dict) -> None:
        """A resumed schedule takes its step from the checkpoint and its settings from this run (LambdaLR would
        restore the checkpoint's): a resume with more epochs moves the cool-down to the new end, and one given
        ``cooldown_steps`` (or another warm-up or timescale) applies it from here on."""
        settings = (self.warmup_steps, self.timescale, self.cooldown_steps, self.total_steps)
        super().load_state_dict(state_dict)
        self.warmup_steps, self.timescale, self.cooldown_steps, self.total_steps = settings


def optimizer_steps(iterations_per_epoch: int, max_epochs: int, accumulation_steps: int = 1) -> int:
    """The optimiser steps of a whole training: one every ``accumulation_steps`` iterations and one at each epoch's
    end (:class:`~.trainer.MedSAM3Trainer`), so ``ceil(iterations_per_epoch / accumulation_steps)`` an epoch."""
    return math.ceil(iterations_per_epoch / max(1, accumulation_steps)) * max_epochs
