"""The engine of the inference and evaluation bundles: a MONAI ``SupervisedEvaluator`` over cases (lists of
slice items), one iteration per batch of cases.

``configs/inference.json``: ``inferers.inputs.inference_items`` -> the preprocessing ``Compose`` (a case becomes
the list of its slice items) -> :func:`collate_cases` -> :class:`MedSAM3CaseEvaluator` with
``inferers.predict.PromptInferer`` and the post-processing ``Compose(map_items=False)`` (per slice item in turn:
``MaskLogitsd``, ``InvertToInputd``, ``MergePromptsd``; then ``RestackSlicesd``, ``SaveImaged``), run on each case as
a whole.
``configs/evaluate.json``: the same engine with ``engines.evaluation.CaseInferer`` (that pipeline, back to a
prediction per prompt) and ``engines.evaluation.CaseMetrics`` as the post-processing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from ignite.engine import Events
from monai.data import Dataset
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.transforms import apply_transform

from ..inferers.inputs import user_error
from ..transforms.errors import ChannelError

__all__ = ["CaseDataset", "MedSAM3CaseEvaluator", "UnreadableCase", "collate_cases"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnreadableCase:
    """A datalist item whose files could not be read, and why. ``stop``: the run ends with that input error
    (``CaseDataset(skip_unreadable=False)``: the marker carries it out of a loader worker as one line, where the
    worker's own exception would reach the main process as a traceback); else the case is skipped."""

    item: dict[str, Any]
    error: str
    stop: bool = False
    option: bool = False  # a setting that does not fit the input (a ChannelError): stops, never skipped


class CaseDataset(Dataset):
    """MONAI ``Dataset`` of cases that, with ``skip_unreadable``, turns an input error of one item (a truncated
    or unreadable image or mask: our ``DataError`` inside MONAI's transform wrappers) into an
    :class:`UnreadableCase` that the evaluator skips and the report lists, instead of stopping the run.
    Without it the marker says ``stop`` and the evaluator raises the input error in the main process (``medsam3``
    prints its one line and exits 2), with DataLoader workers or without."""

    def __init__(self, data: Sequence[Any], transform: Callable | None = None, skip_unreadable: bool = False) -> None:
        super().__init__(data=data, transform=transform)
        self.skip_unreadable = bool(skip_unreadable)

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except (RuntimeError, ValueError, FileNotFoundError) as err:
            cause = user_error(err) if isinstance(err, RuntimeError) else err
            if cause is None:  # a bug, not an input error: its traceback
                raise
            if isinstance(cause, ChannelError):  # an option to change, not an unreadable file
                return UnreadableCase(dict(self.data[index]), str(cause), stop=True, option=True)
            return UnreadableCase(dict(self.data[index]), str(cause), stop=not self.skip_unreadable)


def _log_intensity_note(case: Sequence[dict[str, Any]]) -> None:
    """Say, once per case, what the intensity step noted about its input (a volume without a modality whose values
    look like CT Hounsfield units was min-max scaled: ``transforms.intensity.INTENSITY_NOTE``), as ``medsam3 segment``
    says it."""
    from ..transforms.intensity import INTENSITY_NOTE

    image = case[0].get("image") if case and isinstance(case[0], dict) else None
    note = getattr(image, "meta", {}).get(INTENSITY_NOTE)
    if note:
        logger.warning("%s: %s", image.meta.get("filename_or_obj", "an input"), note)


def collate_cases(batch: Sequence[Any]) -> list[list[dict[str, Any]] | UnreadableCase]:
    """DataLoader ``collate_fn``: a list of cases, each the list of its slice items (one for a 2D image);
    :class:`UnreadableCase` markers pass through."""
    return [case if isinstance(case, (list, UnreadableCase)) else [case] for case in batch]


class MedSAM3CaseEvaluator(SupervisedEvaluator):
    """One iteration per batch of cases: ``inferer`` on each case, then ``postprocessing`` on each case.

    ``engine.state.output`` is the list of post-processed cases: for inference one dict each (``pred`` the label
    map in the input's geometry, ``prompt_texts``, ``prompt_scores``, ...), for evaluation
    ``{"prediction": CasePrediction, "records": [metric record per prompt]}`` (``CaseMetrics``).
    Cases the dataset could not read (:class:`UnreadableCase`) are skipped and collected in
    ``engine.state.unreadable``.

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
        self.add_event_handler(Events.COMPLETED, self._something_was_read)

    @staticmethod
    def _something_was_read(engine: MedSAM3CaseEvaluator) -> None:
        """A run whose every case was skipped as unreadable ends as an error, not as a run with nothing written."""
        unreadable = getattr(engine.state, "unreadable", [])
        if unreadable and not getattr(engine.state, "cases_read", 0):
            raise ValueError(f"none of the {len(unreadable)} case(s) could be read (first: {unreadable[0].error})")

    def _register_postprocessing(self, posttrans: Callable) -> None:
        """Post-process each case as a whole (MONAI's default would map the transform over its slices)."""

        @self.on(IterationEvents.MODEL_COMPLETED)
        def _run_postprocessing(engine: MedSAM3CaseEvaluator) -> None:
            engine.state.output = [apply_transform(posttrans, case, map_items=False) for case in engine.state.output]

    def _iteration(self, engine: MedSAM3CaseEvaluator, batchdata: list[list[dict[str, Any]]]) -> list[Any]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if not hasattr(engine.state, "unreadable") or engine.state.iteration == 1:
            engine.state.unreadable, engine.state.cases_read = [], 0
        cases = []
        for case in batchdata:
            if isinstance(case, UnreadableCase) and case.stop:
                raise ValueError(case.error if case.option else f"{case.error} (to go on past unreadable cases: "
                                 "--skip-unreadable, the bundles' --skip_unreadable true)")
            if isinstance(case, UnreadableCase):
                logger.warning("skipped an unreadable case: %s", case.error)
                engine.state.unreadable.append(case)
            else:
                cases.append(case)
                _log_intensity_note(case)
        engine.state.cases_read += len(cases)
        engine.network.eval()
        with torch.no_grad():
            if hasattr(engine.inferer, "infer_cases") and cases:  # 2D cases batched: several images per forward
                engine.state.output = engine.inferer.infer_cases(cases, engine.network)
            else:
                engine.state.output = [engine.inferer(case, engine.network) for case in cases]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
