"""Validation during training: Dice of the top-scoring query per prompt (the papers' protocol)."""

from __future__ import annotations

from collections.abc import Sized
from typing import Any

import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.engines import SupervisedEvaluator
from monai.utils.enums import CommonKeys as Keys

from ..inferers.protocols import dice_per_prompt
from ..protocol_registry import get_protocol
from .batch import PrepareFindBatch
from .trainer import autocast_for


class PromptDice(Metric):
    """Mean Dice over prompts with a target, between a predicted mask and the prompt's union mask.

    ``protocol``: a registered protocol usable for validation (``protocol_registry``): ``"top_query"`` (the
    papers' protocol: the highest-scoring query's mask, logit > 0) or ``"semantic"`` (the semantic head).
    Negative prompts are left out of this number (their quality is the presence score, evaluated by the
    evaluation reports); it is the model-selection metric of the training bundle (``val_protocol``).
    """

    def __init__(self, protocol: str = "top_query", output_transform=lambda output: output,
                 device: str | torch.device = "cpu") -> None:
        self.protocol = get_protocol(protocol, validation=True)
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, device=self._device, dtype=torch.float64)
        self._count = torch.tensor(0, device=self._device)

    @reinit__is_reduced
    def update(self, output: tuple[Any, Any]) -> None:
        outputs, targets = output
        truth = targets.semantic_masks()
        size = tuple(truth.shape[-2:])
        logits, _ = self.protocol.logits(outputs, size)
        dice = dice_per_prompt(logits > 0, truth)
        positive = truth.flatten(1).any(1)
        self._sum += dice[positive].double().sum().to(self._device)
        self._count += int(positive.sum())

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        return float(self._sum / self._count.clamp(min=1))


class TopQueryDice(PromptDice):
    """:class:`PromptDice` with the papers' protocol (highest-scoring query per prompt)."""

    def __init__(self, output_transform=lambda output: output, device: str | torch.device = "cpu") -> None:
        super().__init__("top_query", output_transform=output_transform, device=device)


class MedSAM3Evaluator(SupervisedEvaluator):
    """SupervisedEvaluator over find-query batches; ``output`` = [{pred: MedSAM3Output, label: FindTargets}]."""

    def __init__(self, *args: Any, bf16: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("prepare_batch", PrepareFindBatch())
        kwargs.setdefault("decollate", False)
        super().__init__(*args, **kwargs)
        self.bf16 = bf16

    def run(self, global_epoch: int = 1) -> None:  # type: ignore[override]
        """One validation pass; ``global_epoch`` 0 (validation before training starts) also runs exactly one.

        A loader without a length (``engines.ImageBudgetBatches``) is read to its end on every pass: Ignite
        would otherwise keep the first pass's count of batches as the length of every later one."""
        if not isinstance(self.data_loader, Sized):
            self.state.epoch_length = None
        super().run(max(int(global_epoch), 1))

    def _iteration(self, engine: "MedSAM3Evaluator", batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        images, targets, _, network_kwargs = engine.prepare_batch(
            batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs
        )
        engine.network.eval()
        with torch.no_grad(), autocast_for(engine.state.device, self.bf16):
            outputs = engine.inferer(images, engine.network, **network_kwargs)
        engine.state.output = [{Keys.IMAGE: images, Keys.LABEL: targets, Keys.PRED: outputs}]
        return engine.state.output


def pred_and_label(output: dict | list[dict]) -> tuple[Any, Any]:
    """Ignite output_transform for :class:`TopQueryDice` (engine output: a one-element list of dicts)."""
    output = output[0] if isinstance(output, list) else output
    return output[Keys.PRED], output[Keys.LABEL]
