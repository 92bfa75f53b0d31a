"""MedSAM3 behind the agent: phrases -> masks in the input's geometry, through the same predictor as
``medsam3 segment`` (``inferers.predict.Predictor``), so a phrase's mark is exactly what
``medsam3 segment INPUT --prompt PHRASE`` writes with the same checkpoint and settings.

Several phrases go through one predictor call (``segment_many``): on a 2D picture all of them share one network
call, so the vision encoder runs once; on a volume the detector sees every slice once for all of them (and the
tracker's features are computed once). Their masks come back merged by confidence (each pixel to the phrase with
the highest score x sigmoid(mask logit)), which is what the offline planner fuses.
"""

from __future__ import annotations

import time
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["PhraseSegmenter", "SegmenterSettings"]


@dataclass
class SegmenterSettings:
    """The predictor options of ``medsam3 segment`` that the agent passes on."""

    checkpoint: str = "tiny"
    image_size: int | None = None
    device: str = "auto"
    tracker: str = "auto"
    protocol: str = "top_query"
    score_threshold: float = 0.5
    ct_window: Any = None  # None: the model's own (its training's), else abdomen
    resize_kernel: str | None = None  # None: the model's own, else sam3
    modality: str | None = None
    channel: int | None = None
    progress: bool = False
    max_pixels: Any = "auto"
    detector_chunk: int | None = None


@dataclass
class PhraseSegmenter:
    """A loaded predictor bound to one input file.

    Attributes:
        predictor: a :class:`~medsam3_monai.inferers.predict.Predictor`.
        path: the input.
        settings: the options it was built with (modality, channel are applied per call).
        seconds: time spent segmenting, per call (for the trace).
    """

    predictor: Any
    path: str
    settings: SegmenterSettings
    seconds: list[float] = field(default_factory=list)
    last_prediction: Any = None

    @classmethod
    def load(cls, path: str, settings: SegmenterSettings) -> PhraseSegmenter:
        from ..inferers.predict import Predictor
        from ..tensors import resolve_device

        predictor = Predictor.from_checkpoint(
            settings.checkpoint, settings.image_size, resolve_device(settings.device), tracker=settings.tracker,
            protocol=settings.protocol, score_threshold=settings.score_threshold, ct_window=settings.ct_window,
            resize_kernel=settings.resize_kernel,
            progress=settings.progress, max_pixels=settings.max_pixels, detector_chunk=settings.detector_chunk,
        )
        # the settings as they apply: the model's own CT window and resize where none was given
        settings = dataclasses.replace(settings, ct_window=predictor.ct_window, resize_kernel=predictor.resize_kernel)
        return cls(predictor, str(path), settings)

    @property
    def network(self) -> Any:
        return self.predictor.network

    def check_phrase(self, phrase: str) -> str:
        """The phrase if the model can take it (non-empty, at most 32 tokens); raises PromptError (ValueError)."""
        phrase = " ".join(str(phrase).split())
        if not phrase:
            raise ValueError("the phrase is empty")
        self.predictor.check_prompts([phrase])
        return phrase

    def segment_many(self, phrases: Sequence[str], before_merge: Any = None) -> Any:
        """One predictor call with all ``phrases``: a ``Prediction`` (label map merged by confidence;
        ``before_merge``: see ``Predictor.__call__``)."""
        start = time.perf_counter()
        try:
            self.last_prediction = self.predictor(self.path, list(phrases), modality=self.settings.modality,
                                                  channel=self.settings.channel, protocol=self.settings.protocol,
                                                  score_threshold=self.settings.score_threshold,
                                                  before_merge=before_merge)
            return self.last_prediction
        finally:
            self.seconds.append(time.perf_counter() - start)

    def segment(self, phrase: str) -> tuple[Any, float, Any]:
        """(bool mask in the input's geometry, score, Prediction) of one phrase, as ``medsam3 segment`` makes it."""
        import numpy as np

        prediction = self.segment_many([phrase])
        labels = prediction.label_map
        labels = labels.as_tensor() if hasattr(labels, "as_tensor") else labels
        mask = np.asarray(labels.cpu().numpy() == int(prediction.label_values[0]))
        return mask, float(prediction.scores[0]), prediction
