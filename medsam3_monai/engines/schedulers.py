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
        self.warmup_steps, self.timescale = warmup_steps, timescale
        self.cooldown_steps, self.total_steps = cooldown_steps, total_steps
        super().__init__(optimizer, self._factor, last_epoch=last_epoch)

    def _factor(self, step: int) -> float:
        return inverse_sqrt_factor(step, self.warmup_steps, self.timescale, self.cooldown_steps, self.total_steps)
