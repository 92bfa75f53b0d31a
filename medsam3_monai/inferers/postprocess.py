"""Post-processing of per-prompt predictions: back to the input's geometry, one label map, saved to disk.

The chain (``postprocessing`` and ``writer`` of ``configs/inference.json``) works on a *case*: the list of slice
items of one input (one item for a 2D image, D for a volume), each carrying ``pred`` (P, S, S) mask logits (and,
for volumes, ``confidence``) from :class:`~medsam3_monai.inferers.predict.PromptInferer`:

1. MONAI ``Invertd`` on every slice item (a ``Compose`` that maps over the list): the slice-space maps go
   back to the image's (or slice's) own size, bilinearly -- logits stay logits;
2. :class:`~medsam3_monai.transforms.RestackSlicesd`: the slices of a volume become (P, X, Y, Z) with the
   volume's affine (a 2D case passes through);
3. :class:`MergePromptsd`: mask = logit > 0 per prompt; overlaps go to the prompt with the highest
   confidence at the pixel (:func:`~medsam3_monai.metrics.merge.merge_classes`) -> a (1, *spatial) label map;
4. (bundle) :class:`ImageOrVolumed` dispatching to a MONAI ``SaveImaged`` for PNG (2D, with
   :class:`RowsFirstPILWriter`) or NIfTI (volumes).

The outer ``Compose`` must be built with ``map_items=False`` so that steps 2-4 see the whole case.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, Callable

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.image_writer import PILWriter
from monai.transforms import MapTransform, Transform

from ..metrics.merge import merge_classes

__all__ = [
    "ImageOrVolumed",
    "MergePromptsd",
    "RowsFirstPILWriter",
]

def _plain(x: Any) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


class MergePromptsd(MapTransform):
    """Per-prompt mask logits (P, *spatial) -> one label map (1, *spatial), overlaps by maximum confidence.

    Args:
        keys: the logit maps (mask = logit > ``threshold``).
        confidence_key: per-prompt confidence maps of the same shape (volumes: the mask times each slice's score);
            when the item has none, ``score * sigmoid(logit)`` with the prompt's score from ``scores_key`` (2D:
            the confidence of ``bundles/medsam3/docs/conventions.md``, computed in the input's geometry), or
            ``sigmoid(logit)`` without scores.
        values_key: item entry with the label value of each prompt (``prompt_values``; default 1..P).
        scores_key: item entry with each prompt's score (``prompt_scores``).
        threshold: logit threshold (0: probability 0.5).
        drop_confidence: remove ``confidence_key`` from the item once merged (it is as large as the logits).

    Output: MetaTensor (1, *spatial), uint8 (int32 when a label value exceeds 255), 0 = background, keeping
    the input's meta and affine. A single prompt's mask is kept as is (nothing to resolve).
    """

    def __init__(
        self,
        keys: KeysCollection = ("pred",),
        confidence_key: str | None = "confidence",
        values_key: str | None = "prompt_values",
        scores_key: str | None = "prompt_scores",
        threshold: float = 0.0,
        drop_confidence: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.confidence_key = confidence_key
        self.values_key = values_key
        self.scores_key = scores_key
        self.threshold = float(threshold)
        self.drop_confidence = drop_confidence

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            logits = _plain(pred).float()
            masks = logits > self.threshold
            num_prompts = logits.shape[0]
            values = d.get(self.values_key) if self.values_key else None
            values = [int(v) for v in values] if values is not None else list(range(1, num_prompts + 1))
            if len(values) != num_prompts:
                raise ValueError(f"{len(values)} label values for {num_prompts} prompt maps in '{key}'")
            if num_prompts == 1:
                index = masks[0].to(torch.uint8)
            else:
                index = merge_classes(self._confidence(d, logits), masks)
            dtype = torch.uint8 if max(values) <= 255 else torch.int32
            if values == list(range(1, num_prompts + 1)):  # the index is the label map already
                labels = index.to(dtype)[None]
            else:
                lut = torch.tensor([0, *values], dtype=dtype)
                labels = lut[index.long()][None]
            d[key] = MetaTensor(labels, meta=dict(pred.meta)) if isinstance(pred, MetaTensor) else MetaTensor(labels)
            if self.drop_confidence and self.confidence_key:
                d.pop(self.confidence_key, None)
        return d

    def _confidence(self, d: Mapping[Hashable, Any], logits: torch.Tensor) -> torch.Tensor:
        confidence = d.get(self.confidence_key) if self.confidence_key else None
        if confidence is not None:
            return _plain(confidence).float()
        scores = d.get(self.scores_key) if self.scores_key else None
        if scores is None:
            return logits.sigmoid()
        scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1, *([1] * (logits.ndim - 1)))
        return scores * logits.sigmoid()


class ImageOrVolumed(Transform):
    """Apply ``image`` to 2D items and ``volume`` to volumes (decided by ``key``: (C, H, W) vs (C, X, Y, Z)).

    Lets one config save 2D inputs as PNG and volumes as NIfTI with two MONAI ``SaveImaged``. A missing
    branch passes the item through.
    """

    def __init__(self, image: Callable | None = None, volume: Callable | None = None, key: str = "pred") -> None:
        self.image = image
        self.volume = volume
        self.key = key

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        value = data[self.key]
        branch = self.volume if getattr(value, "ndim", 0) >= 4 else self.image
        return branch(data) if branch is not None else dict(data)


class RowsFirstPILWriter(PILWriter):
    """MONAI ``PILWriter`` for the package's rows-first 2D arrays (``(C, H, W)``, as ``Image2DReader`` reads).

    MONAI's default swaps the first two axes (it assumes ``PILReader``'s ``(W, H)`` order); this writer does
    not, so a prediction of an ``H x W`` picture is written ``H x W``.
    """

    def write(self, filename: Any, verbose: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("reverse_indexing", False)
        super().write(filename, verbose=verbose, **kwargs)
