"""The engine of the inference and evaluation bundles: a MONAI ``SupervisedEvaluator`` over cases (lists of
slice items), one iteration per batch of cases.

``configs/inference.json``: ``inferers.inputs.inference_items`` -> the preprocessing ``Compose`` (a case becomes
the list of its slice items) -> :func:`collate_cases` -> :class:`MedSAM3CaseEvaluator` with
``inferers.predict.PromptInferer`` and the post-processing ``Compose(map_items=False)`` (``Invertd`` per slice,
``RestackSlicesd``, ``MergePromptsd``, ``SaveImaged``), run on each case as a whole.
``configs/evaluate.json``: the same engine with ``engines.evaluation.CaseInferer`` (that pipeline, back to a
prediction per prompt) and ``engines.evaluation.CaseMetrics`` as the post-processing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.transforms import apply_transform

__all__ = ["MedSAM3CaseEvaluator", "collate_cases"]


def collate_cases(batch: Sequence[Any]) -> list[list[dict[str, Any]]]:
    """DataLoader ``collate_fn``: a list of cases, each the list of its slice items (one for a 2D image)."""
    return [case if isinstance(case, list) else [case] for case in batch]


class MedSAM3CaseEvaluator(SupervisedEvaluator):
    """One iteration per batch of cases: ``inferer`` on each case, then ``postprocessing`` on each case.

    ``engine.state.output`` is the list of post-processed cases: for inference one dict each (``pred`` the label
    map in the input's geometry, ``prompt_texts``, ``prompt_scores``, ...), for evaluation
    ``{"prediction": CasePrediction, "records": [metric record per prompt]}`` (``CaseMetrics``).

    Args:
        device, val_data_loader, network, val_handlers, epoch_length: as MONAI's ``SupervisedEvaluator`` (the
            loader yields lists of cases: use :func:`collate_cases`).
        inferer: a :class:`~medsam3_monai.inferers.predict.PromptInferer` (inference) or an
            :class:`~medsam3_monai.engines.evaluation.CaseInferer` (evaluation).
        postprocessing: a transform of a whole case (a ``Compose`` built with ``map_items=False``), e.g. the
            ``postprocessing`` of ``configs/inference.json``, or ``CaseMetrics``.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Any,
        network: torch.nn.Module,
        inferer: Any,
        postprocessing: Callable | None = None,
        val_handlers: Sequence[Any] | None = None,
        epoch_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(device=torch.device(device), val_data_loader=val_data_loader, network=network,
                         inferer=inferer, postprocessing=postprocessing, val_handlers=val_handlers,
                         epoch_length=epoch_length, **kwargs)

    def _register_postprocessing(self, posttrans: Callable) -> None:
        """Post-process each case as a whole (MONAI's default would map the transform over its slices)."""

        @self.on(IterationEvents.MODEL_COMPLETED)
        def _run_postprocessing(engine: MedSAM3CaseEvaluator) -> None:
            engine.state.output = [apply_transform(posttrans, case, map_items=False) for case in engine.state.output]

    def _iteration(self, engine: MedSAM3CaseEvaluator, batchdata: list[list[dict[str, Any]]]) -> list[Any]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        engine.network.eval()
        with torch.no_grad():
            engine.state.output = [engine.inferer(case, engine.network) for case in batchdata]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
