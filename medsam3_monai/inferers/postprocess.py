"""Post-processing of per-prompt predictions: back to the input's geometry, one label map, saved to disk.

The chain (``postprocessing`` and ``writer`` of ``configs/inference.json``) works on a *case*: the list of slice
items of one input (one item for a 2D image, D for a volume), each carrying ``pred`` from
:class:`~medsam3_monai.inferers.predict.PromptInferer`: a 2D image's (P, h, h) mask logits (the mask head's
resolution, or S), a volume slice's (P, S, S) masks (bit-packed
:class:`~medsam3_monai.inferers.bitmasks.BitMasks` or bool, with ``mask_scores``). Steps 1-3 run on one slice
item at a time (:class:`EachItem`), so only one slice's float maps exist at any time:

1. :class:`MaskLogitsd`: a volume slice's masks of the prompts present on it, which stand for mask logits and a
   ``confidence`` (mask x the slice's score): kept bit-packed with the inverse pending (``meta["pending_inverse"]``)
   when the slice-space resize is the only step to invert, else made into those float maps;
2. :class:`InvertToInputd` (MONAI ``Invertd``): the slice-space maps go back to the slice's own size,
   bilinearly -- logits stay logits. A 2D picture (or a volume slice larger than the slice space) whose only
   invertible step is the slice-space resize keeps its slice-space maps with the inverse recorded
   (``meta["pending_inverse"]``), as do pending masks: step 3 applies it;
3. :class:`MergePromptsd`: mask = logit > 0 per prompt; overlaps go to the prompt with the highest
   confidence at the pixel (:func:`~medsam3_monai.metrics.merge.merge_classes`) -> a (1, H, W) label map
   (for a pending inverse: the bilinear values are computed only near the masks' boundaries, exactly --
   :mod:`~medsam3_monai.inferers.boundary_merge` -- or, for masks, only in each mask's box --
   :mod:`~medsam3_monai.inferers.mask_merge` -- so the native-size work and memory are the label map's).
   The merge is pixel-wise, so merging each slice and then restacking gives what restacking the maps and
   merging the volume gives;
4. :class:`~medsam3_monai.transforms.RestackSlicesd`: a volume's label slices become (1, X, Y, Z) with the
   volume's affine (a 2D case passes through);
5. (bundle) :class:`ImageOrVolumed` dispatching to a MONAI ``SaveImaged`` for PNG (2D, with
   :class:`RowsFirstPILWriter`) or NIfTI (volumes, with :class:`ReferenceNibabelWriter`: the input's qform/sform
   codes, as ``medsam3 segment`` writes them), each named by :class:`InputNamedLayout` as ``medsam3 segment
   --out-dir`` names them (two inputs of the same name keep their folders).

The outer ``Compose`` must be built with ``map_items=False`` so that steps 4-5 see the whole case.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from contextlib import nullcontext
from itertools import groupby
from copy import deepcopy
from pathlib import Path
from typing import Any, Callable

import torch
from monai.config import KeysCollection
from monai.data import FolderLayoutBase, MetaTensor
from monai.data.image_writer import ImageWriter, NibabelWriter, PILWriter
from monai.transforms import InvertibleTransform, Invertd, MapTransform, Resized, Transform
from monai.transforms.utils import allow_missing_keys_mode
from monai.utils import TraceKeys

from ..tensors import plain_tensor
from ..transforms.each_item import EachItem, transforms_of
from ..transforms.intensity import row_tiles
from ..transforms.slices import PROGRESS_MIN_PIXELS, bilinear_weights, tile_progress, upsample_rows
from .bitmasks import BitMasks
from .boundary_merge import BLOCK_MIN_UPSCALE, boundary_label_index, group_max, merged_index
from .image import confidence_of
from .mask_merge import mask_label_index, mask_logits, mask_maps

__all__ = [
    "InputNamedLayout",
    "KEPT_PROMPTS",
    "PENDING_INVERSE",
    "EachItem",
    "ImageOrVolumed",
    "InvertToInputd",
    "MaskLogitsd",
    "MergePromptsd",
    "ReferenceNibabelWriter",
    "RowsFirstPILWriter",
    "materialize_inverse",
    "pending_inverse",
    "pending_masks",
    "transforms_of",
]

#: meta key of slice-space maps whose bilinear inverse to the picture's size is still to be applied
PENDING_INVERSE = "pending_inverse"
#: item key of the prompt indices whose maps a volume slice item carries (:class:`MaskLogitsd`)
KEPT_PROMPTS = "kept_prompts"


def pending_inverse(maps: Any) -> tuple[int, int] | None:
    """The (H, W) that slice-space ``maps`` still have to be resized to (:class:`InvertToInputd`), or None."""
    meta = getattr(maps, "meta", None)
    spec = meta.get(PENDING_INVERSE) if isinstance(meta, Mapping) else None
    return None if spec is None else (int(spec["spatial_size"][0]), int(spec["spatial_size"][1]))


def pending_masks(maps: Any) -> BitMasks | None:
    """The binary masks of a volume slice whose inverse is still to be applied (:class:`MaskLogitsd` leaves them
    bit-packed, ``meta["pending_inverse"]["mask_width"]`` their width), or None for anything else."""
    meta = getattr(maps, "meta", None)
    spec = meta.get(PENDING_INVERSE) if isinstance(meta, Mapping) else None
    width = spec.get("mask_width") if isinstance(spec, Mapping) else None
    return None if width is None else BitMasks(plain_tensor(maps), int(width))


def _inverse_tiles(maps: torch.Tensor, size: tuple[int, int], channels: int, desc: str, show: bool):
    """``(start, stop, tile)``: rows ``start:stop`` of ``maps`` resized to ``size``, one row tile at a time."""
    columns = bilinear_weights(maps.shape[-1], size[1])
    with tile_progress(size[0], desc, show) as bar:
        for start, stop in row_tiles(size[0], size[1], channels):
            yield start, stop, upsample_rows(maps, size, start, stop, columns)
            bar.update(stop - start)


def materialize_inverse(maps: Any) -> Any:
    """Maps with a pending inverse -> the (P, H, W) float32 maps ``Invertd`` gives (up to float rounding; pending
    masks: their mask logits); anything else is returned as is. Native-size memory: P x 4 bytes per pixel."""
    size = pending_inverse(maps)
    if size is None:
        return maps
    bits = pending_masks(maps)
    plain = plain_tensor(maps).float() if bits is None else mask_logits(bits.unpack())
    out = torch.empty((plain.shape[0], *size), dtype=torch.float32, device=plain.device)
    for start, stop, tile in _inverse_tiles(plain, size, plain.shape[0], "", False):
        out[:, start:stop] = tile
    out = MetaTensor(out, meta=dict(maps.meta), applied_operations=list(maps.applied_operations))
    out.meta.pop(PENDING_INVERSE, None)
    return out


def _label_values(index: torch.Tensor, values: list[int]) -> torch.Tensor:
    """A merge's index (0 background, c + 1 = prompt c) -> the label map of the prompts' label ``values``: uint8, or
    int32 when a value exceeds 255."""
    dtype = torch.uint8 if max(values) <= 255 else torch.int32
    if values == list(range(1, len(values) + 1)):  # the index is the label map already
        return index.to(dtype)
    return torch.tensor([0, *values], dtype=dtype, device=index.device)[index.long()]


def _inverse_scaling(current: tuple[int, ...], original: tuple[int, ...], rank: int) -> torch.Tensor:
    """(rank, rank) float64: MONAI's ``scale_affine(current, original)`` (centred, ``align_corners=False``, the same
    arithmetic) placed in an affine of ``rank`` (``to_affine_nd``), built without numpy's error-state set-up."""
    scaling = torch.eye(rank, dtype=torch.float64)
    if current == original:
        return scaling
    for axis, (now, before) in enumerate(zip(current, original)):
        factor = float(now) / float(max(before, 1))
        scaling[axis, axis] = factor
        scaling[axis, -1] = (factor - 1) / 2.0
    return scaling


class _SliceSpaceInverse:
    """What :class:`MaskLogitsd` and :class:`InvertToInputd` share: whether the only step of the preprocessing
    ``transform`` to invert on an item is its slice-space resize, and the metadata ``Invertd`` would give maps whose
    inverse is left pending instead."""

    transform: Any

    def _slice_resizer(self) -> Any:
        """The preprocessing's slice-space resizer when its only invertible step is a ``Resized``, else None (looked up
        once per preprocessing)."""
        if getattr(self, "_resizer_of", (None,))[0] is not self.transform:
            invertible = [t for t in transforms_of(self.transform) if isinstance(t, InvertibleTransform)]
            resizer = invertible[0].resizer if len(invertible) == 1 and isinstance(invertible[0], Resized) else None
            self._resizer_of = (self.transform, resizer)
        return self._resizer_of[1]

    def _resize_record(self, image: Any) -> Mapping[str, Any] | None:
        """The slice-space resize record of ``image`` when it is the only operation to invert, else None."""
        if not isinstance(image, MetaTensor) or len(image.applied_operations) != 1 or image.ndim != 3:
            return None
        resizer = self._slice_resizer()
        record = image.applied_operations[0]
        extra = record.get(TraceKeys.EXTRA_INFO, {})
        if resizer is None or record.get(TraceKeys.ID) != id(resizer) or extra.get("mode") != "bilinear" \
                or extra.get("align_corners") not in (False, TraceKeys.NONE) or extra.get("new_dim", 0):
            return None
        return record

    @staticmethod
    def _pending(image: MetaTensor, record: Mapping[str, Any], values: torch.Tensor, **spec: Any) -> MetaTensor:
        """``values`` with the metadata ``Invertd`` would give them and ``meta["pending_inverse"]`` (the image's size
        before the resize, and ``spec``)."""
        orig_size = [int(v) for v in record[TraceKeys.ORIG_SIZE]]
        # what Invertd + Resize.inverse do to the metadata (monai.transforms.inverse.track_transform_meta with
        # lazy=False, trace off): the item's meta with its affine composed with the inverse resize's scaling,
        # and its operations without the resize
        affine = image.affine.to(torch.float64)
        scaling = _inverse_scaling(tuple(image.shape[1:]), tuple(orig_size), affine.shape[-1])
        out = MetaTensor(values, meta={**image.meta, "affine": affine @ scaling},
                         applied_operations=deepcopy(image.applied_operations[:-1]))
        out.meta[PENDING_INVERSE] = {"spatial_size": orig_size, **spec}
        return out


class MaskLogitsd(_SliceSpaceInverse, MapTransform):
    """A volume slice's per-prompt masks -> what the way back reads, made one slice at a time.

    ``keys`` hold (P, S, S) masks (bool, or bit-packed :class:`~.bitmasks.BitMasks`) with each prompt's score on the
    slice in ``scores_key`` (P,) (masks without it are an error). They stand for mask logits, ``MASK_LOGIT`` where
    the mask is set and ``EMPTY_LOGIT`` elsewhere (after bilinear inversion, mask = logit > 0), and for a
    confidence, the mask times the score, which :class:`MergePromptsd` resolves overlaps by. Float maps (a 2D
    image's logits, maps given by hand) pass through.

    * With the preprocessing ``transform``, a slice whose only step to invert is its slice-space resize keeps its
      masks bit-packed, with the metadata ``Invertd`` would give them and the inverse pending
      (``meta["pending_inverse"]``, its ``mask_width`` the masks' width), and the scores stay in ``scores_key``:
      :class:`InvertToInputd` passes them on and :class:`MergePromptsd` resizes each mask only inside its box
      (:func:`~.mask_merge.mask_label_index`, the same label map). A slice's float maps never exist.
    * Otherwise (no ``transform``, ``defer=False``, other steps to invert) ``keys`` become the float mask logits
      and ``confidence_key`` the confidence maps, which MONAI ``Invertd`` resizes.

    A prompt whose mask is empty on the slice can claim no pixel, so it is left out: the item keeps the masks of the
    others (at least one) and ``kept_key`` lists their prompt indices, which :class:`MergePromptsd` reads to give
    each its label value. Most classes of a many-class CT are absent from most slices.

    :class:`~medsam3_monai.inferers.predict.PromptInferer` hands over a volume's slices as views of its bit-packed
    masks (1 bit a pixel), and the chain runs slice by slice.
    """

    def __init__(self, keys: KeysCollection = ("pred",), scores_key: str = "mask_scores",
                 confidence_key: str = "confidence", kept_key: str = KEPT_PROMPTS,
                 allow_missing_keys: bool = True, transform: Any = None, image_key: str = "image",
                 defer: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scores_key = scores_key
        self.confidence_key = confidence_key
        self.kept_key = kept_key
        self.transform = transform
        self.image_key = image_key
        self.defer = bool(defer)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            masks = d[key]
            if not isinstance(masks, BitMasks) and plain_tensor(masks).dtype != torch.bool:
                continue
            if d.get(self.scores_key) is None:
                raise ValueError(f"'{key}' holds masks but the item has no '{self.scores_key}': give each "
                                 "prompt's score on this slice (P,), or float mask logits")
            present = masks.any_pixel() if isinstance(masks, BitMasks) else plain_tensor(masks).flatten(1).any(1)
            kept = torch.nonzero(present.cpu()).flatten()
            kept = kept if kept.numel() else torch.zeros(1, dtype=torch.long)  # nothing set: one empty mask
            scores = torch.as_tensor(d.pop(self.scores_key), dtype=torch.float32).reshape(-1)[kept]
            d[self.kept_key] = kept.tolist()
            image = d.get(self.image_key)
            record = self._resize_record(image) if self.defer and self.transform is not None else None
            if record is not None:
                bits = masks[kept] if isinstance(masks, BitMasks) else BitMasks.pack(plain_tensor(masks)[kept])
                d[key] = self._pending(image, record, bits.bits, mask_width=bits.width)
                d[self.scores_key] = scores
                continue
            masks = masks[kept].unpack() if isinstance(masks, BitMasks) else plain_tensor(masks)[kept.to(masks.device)]
            logits, confidence = mask_maps(masks, scores)
            d[key], d[self.confidence_key] = MetaTensor(logits), MetaTensor(confidence)
        return d


class InvertToInputd(_SliceSpaceInverse, Invertd):
    """MONAI ``Invertd`` that leaves the bilinear inverse of each slice item to :class:`MergePromptsd`.

    A 2D picture, or a volume slice of at least ``BLOCK_MIN_UPSCALE`` times the slice space's pixels (smaller ones
    gain nothing: the merge would resize them densely, as ``Invertd`` does, while keeping the slice-space maps), when
    the preprocessing's only invertible step on it is its slice-space resize (``ResizeToSliced``, bilinear):
    ``keys`` keep their (P, S, S) slice-space values and get the metadata ``Invertd`` would give them (the item's
    affine and meta -- a volume slice's ``slice_index`` and volume geometry for ``RestackSlicesd`` -- with the
    resize popped), plus ``meta["pending_inverse"] = {"spatial_size": [H, W]}``. :class:`MergePromptsd` thresholds
    and merges them at the slice's size without resizing every pixel (:func:`materialize_inverse` makes the full
    maps). Maps whose inverse is pending already (a volume slice's masks from :class:`MaskLogitsd`) pass as they
    are. Other preprocessing is ``Invertd``'s, unchanged.

    Args:
        defer: defer the inverse as above (False: plain ``Invertd`` for every item whose inverse is not pending).
        (others: ``Invertd``'s.)
    """

    def __init__(self, *args: Any, defer: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.defer = bool(defer)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        deferred = {key: out for key in self.key_iterator(d) if (out := self._deferred(d, key)) is not None}
        if not deferred:
            return super().__call__(d)
        if any(key not in deferred for key in self.key_iterator(d)):
            with allow_missing_keys_mode(self):
                d = super().__call__({k: v for k, v in d.items() if k not in deferred})
        d.update(deferred)
        return d

    def _deferred(self, d: Mapping[Hashable, Any], key: Hashable) -> MetaTensor | None:
        """``d[key]`` with its inverse deferred (see the class docstring), or None when ``Invertd`` should run."""
        index = list(self.keys).index(key)
        orig_key, nearest = self.orig_keys[index], self.nearest_interp[index]
        image, maps = d.get(orig_key), d.get(key)
        if pending_inverse(maps) is not None:
            return maps
        if not self.defer or nearest or maps is None:
            return None
        record = self._resize_record(image)
        if record is None:
            return None
        orig_size = record[TraceKeys.ORIG_SIZE]
        upscale = int(orig_size[0]) * int(orig_size[1]) / (image.shape[1] * image.shape[2])
        if "slice_index" in image.meta and upscale < BLOCK_MIN_UPSCALE:
            return None  # a volume slice the block method cannot speed up: Invertd's, freeing each slice-space map
        return self._pending(image, record, plain_tensor(maps).detach().float())


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
        kept_key: item entry listing the prompt of each map ``keys`` hold when they are not one per prompt
            (:class:`MaskLogitsd` drops a slice's empty masks; a 2D ``threshold`` case has each kept query's own map,
            several per prompt): each map gets its prompt's label value and score, so that a prompt's mask is the
            union of its maps' masks; removed once merged.
        mask_scores_key: item entry with the scores of a volume slice's pending masks (:class:`MaskLogitsd`, one
            per mask: the confidence is the mask times it); removed once merged.
        progress: a progress bar (stderr) over the row tiles of a pending inverse of at least
            ``PROGRESS_MIN_PIXELS`` pixels.

    Output: MetaTensor (1, *spatial) on the host, uint8 (int32 when a label value exceeds 255), 0 = background,
    keeping the input's meta and affine. A single prompt's mask is kept as is (nothing to resolve). Maps whose inverse
    is pending (:class:`InvertToInputd`) are thresholded and merged at the slice's own size by
    :func:`~medsam3_monai.inferers.boundary_merge.boundary_label_index` (the same rule; only pixels near a boundary
    are interpolated), pending masks (:class:`MaskLogitsd`) by :func:`~.mask_merge.mask_label_index` (each inside its
    box), with the native-size memory of the label map alone.
    """

    def __init__(
        self,
        keys: KeysCollection = ("pred",),
        confidence_key: str | None = "confidence",
        values_key: str | None = "prompt_values",
        scores_key: str | None = "prompt_scores",
        threshold: float = 0.0,
        drop_confidence: bool = True,
        progress: bool = True,
        kept_key: str | None = KEPT_PROMPTS,
        mask_scores_key: str | None = "mask_scores",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_scores_key = mask_scores_key
        self.confidence_key = confidence_key
        self.values_key = values_key
        self.scores_key = scores_key
        self.threshold = float(threshold)
        self.drop_confidence = drop_confidence
        self.progress = progress
        self.kept_key = kept_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            if pending_inverse(pred) is not None:
                d[key] = self._merge_pending(d, pred)
            else:
                logits = plain_tensor(pred).float()
                values, prompts, groups = self._prompts(d, logits.shape[0], key)
                logits = logits if groups is None else group_max(logits, groups)
                index = merged_index(logits, lambda: self._confidence(d, logits, prompts), self.threshold)
                labels = _label_values(index, values)[None].cpu()  # on the host, as a pending inverse's
                d[key] = MetaTensor(labels, meta=dict(pred.meta) if isinstance(pred, MetaTensor) else None)
            if self.drop_confidence and self.confidence_key:
                d.pop(self.confidence_key, None)
        for entry in (self.kept_key, self.mask_scores_key):
            if entry:
                d.pop(entry, None)
        return d

    def _prompts(self, d: Mapping[Hashable, Any], num_maps: int, key: str = "pred"
                 ) -> tuple[list[int], list[int] | None, list[int] | None]:
        """``(values, prompts, groups)`` of an item's ``num_maps`` maps: the label value of each prompt the merge
        decides between; the indices of those prompts when ``kept_key`` names them (else None: one map per prompt,
        all of them); and, when some prompt has several maps (consecutive in ``kept_key``), the number of each's
        (else None)."""
        values = d.get(self.values_key) if self.values_key else None
        kept = d.get(self.kept_key) if self.kept_key else None
        prompts = groups = None
        if kept is not None:  # the maps of these prompts only, a prompt's maps together
            kept = [int(k) for k in kept]
            if len(kept) != num_maps:
                raise ValueError(f"'{self.kept_key}' names {len(kept)} prompts for {num_maps} maps in '{key}'")
            prompts = list(dict.fromkeys(kept))
            if len(prompts) < len(kept):
                groups = [len(list(run)) for _, run in groupby(kept)]
                if len(groups) != len(prompts):
                    raise ValueError(f"'{self.kept_key}' {kept}: the maps of one prompt must come together")
            values = [int(v) for v in values] if values is not None else list(range(1, max(kept) + 2))
            values = [values[k] for k in prompts]
        count = len(prompts) if prompts is not None else num_maps
        values = [int(v) for v in values] if values is not None else list(range(1, count + 1))
        if len(values) != count:
            raise ValueError(f"{len(values)} label values for {count} prompt maps in '{key}'")
        return values, prompts, groups

    def _merge_pending(self, d: Mapping[Hashable, Any], pred: MetaTensor) -> MetaTensor:
        """The label map of maps with a pending inverse (same rule as ``__call__``), resized only where the masks'
        boundaries are (:func:`~medsam3_monai.inferers.boundary_merge.boundary_label_index`), or of pending masks
        each inside its box (:func:`~.mask_merge.mask_label_index`)."""
        size = pending_inverse(pred)
        masks = pending_masks(pred)
        maps = plain_tensor(pred)
        values, prompts, groups = self._prompts(d, maps.shape[0])
        show = self.progress and size[0] * size[1] >= PROGRESS_MIN_PIXELS
        name = Path(str(pred.meta.get("filename_or_obj", "image"))).name if show else ""
        desc = f"{name}: masks at {size[1]}x{size[0]}"
        with tile_progress(size[0], desc, show) if show else nullcontext() as bar:
            update = bar.update if show else None
            if masks is not None:
                scores = d.get(self.mask_scores_key) if self.mask_scores_key else None
                if scores is None:
                    raise ValueError(f"pending masks but the item has no '{self.mask_scores_key}' (MaskLogitsd "
                                     "keeps each mask's score there)")
                index = mask_label_index(masks, scores, size, self.threshold, progress=update)
            else:
                given = d.get(self.confidence_key) if self.confidence_key else None
                scores = self._prompt_scores(d, prompts) if given is None else None
                index = boundary_label_index(maps, size, self.threshold, scores=scores,
                                             confidence=None if given is None else plain_tensor(given), progress=update,
                                             groups=groups)
        index = torch.from_numpy(index)
        out = MetaTensor(_label_values(index, values)[None], meta=dict(pred.meta))
        out.meta.pop(PENDING_INVERSE, None)
        return out

    def _confidence(self, d: Mapping[Hashable, Any], logits: torch.Tensor, prompts: list[int] | None = None
                    ) -> torch.Tensor:
        confidence = d.get(self.confidence_key) if self.confidence_key else None
        if confidence is not None:
            return plain_tensor(confidence).float()
        scores = self._prompt_scores(d, prompts)
        return logits.sigmoid() if scores is None else confidence_of(logits, scores)

    def _prompt_scores(self, d: Mapping[Hashable, Any], prompts: list[int] | None) -> torch.Tensor | None:
        """The scores (``scores_key``) of ``prompts`` (:meth:`_prompts`; None: all), None without scores."""
        scores = d.get(self.scores_key) if self.scores_key else None
        if scores is None:
            return None
        scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
        return scores if prompts is None else scores[torch.as_tensor(prompts, dtype=torch.long)]


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


class InputNamedLayout(FolderLayoutBase):
    """MONAI ``SaveImage``'s ``folder_layout`` naming each prediction as ``medsam3 segment --out-dir`` does:
    ``output_dir/<stem>_<postfix><extension>``, ``<stem>`` from
    :func:`~medsam3_monai.inferers.inputs.output_stems` over all of the run's ``inputs`` (two inputs named
    ``case_a/imaging.nii.gz`` and ``case_b/imaging.nii.gz`` give ``case_a/imaging_seg.nii.gz`` and
    ``case_b/...``, where MONAI's default layout writes both to one file). ``filename`` takes the input's path
    (MONAI's ``default_name_formatter`` gives the metadata's ``filename_or_obj``); an input not among ``inputs``
    is named by its own file name."""

    def __init__(self, output_dir: str | Path, inputs: Sequence[Mapping[str, Any] | str | Path],
                 postfix: str = "seg", extension: str = ".png") -> None:
        from .inputs import is_volume_path, output_stems

        self.output_dir = Path(output_dir)
        self.postfix = postfix
        self.extension = extension
        paths = [os.path.abspath(item["image"] if isinstance(item, Mapping) else item) for item in inputs]
        kinds = ["volume" if is_volume_path(path) else "image" for path in paths]
        self.stems = dict(zip(paths, output_stems(paths, kinds)))

    def filename(self, subject: Any = "subject", idx: Any = None, **kwargs: Any) -> str:
        from .inputs import output_stems

        path = os.path.abspath(str(subject))
        stem = self.stems.get(path) or output_stems([path], ["image"])[0]
        target = self.output_dir / f"{stem}_{self.postfix}{self.extension}"
        target.parent.mkdir(parents=True, exist_ok=True)
        return str(target)


def write_staged(filename: Any, write: Any) -> None:
    """``write(name)`` under a hidden name beside ``filename`` (its whole name kept last, so the writer picks the
    format by it), then renamed onto ``filename``: a full disk or an interrupt leaves no truncated file."""
    import os

    target = Path(str(filename))
    staged = target.with_name(f".partial-{os.getpid()}-{target.name}")
    try:
        write(str(staged))
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)


class RowsFirstPILWriter(PILWriter):
    """MONAI ``PILWriter`` for the package's rows-first 2D arrays (``(C, H, W)``, as ``Image2DReader`` reads).

    MONAI's default swaps the first two axes (it assumes ``PILReader``'s ``(W, H)`` order); this writer does
    not, so a prediction of an ``H x W`` picture is written ``H x W``. The file is written whole or not at all
    (:func:`write_staged`).
    """

    def write(self, filename: Any, verbose: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("reverse_indexing", False)
        if verbose:  # the final name, not the staged one MONAI's writer would log
            import logging

            logging.getLogger("monai.data.image_writer").info(f"writing: {filename}")
        write_staged(filename, lambda name: super(RowsFirstPILWriter, self).write(name, verbose=False, **kwargs))


def set_nifti_geometry(image: Any, affine: Any, reference: str | Path | None = None) -> None:
    """Give a ``nibabel.Nifti1Image`` its qform and sform (``affine``, (4, 4), in mm) with the codes and units of the
    NIfTI file ``reference`` (0 = unknown included, so viewers place input and output alike; the matrices in the
    reference's spatial unit); a reference of the image's grid gives its own qform and sform matrices too (they may
    differ: each reader picks one); codes 1 and mm when ``reference`` is not a NIfTI file on disk (a DICOM series, an
    image made in memory)."""
    import nibabel as nib
    import numpy as np

    from ..transforms.io import NIFTI_UNIT_MM

    qform = sform = np.asarray(affine, dtype=np.float64)
    qform_code = sform_code = 1
    name = str(reference or "").lower()
    if name.endswith((".nii", ".nii.gz")) and Path(str(reference)).is_file():
        header = nib.load(str(reference)).header
        qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
        units = header.get_xyzt_units()
        image.header.set_xyzt_units(*units)
        qform = sform = np.concatenate([qform[:-1] / NIFTI_UNIT_MM.get(str(units[0]), 1.0), qform[-1:]])
        if tuple(header.get_data_shape()[:3]) == tuple(image.shape[:3]):  # the input's grid: its own matrices
            qform = header.get_qform() if qform_code else qform
            sform = header.get_sform() if sform_code else sform
    else:
        image.header.set_xyzt_units("mm")
    image.set_qform(qform, code=qform_code)
    image.set_sform(sform, code=sform_code)


class ReferenceNibabelWriter(NibabelWriter):
    """MONAI ``NibabelWriter`` that keeps the input file's qform/sform codes and units (:func:`set_nifti_geometry`;
    the input is the metadata's ``filename_or_obj``); MONAI's sets both codes to 1 whatever the input had. The file
    is written whole or not at all (:func:`write_staged`)."""

    def set_metadata(self, meta_dict: Mapping | None, resample: bool = True, **options: Any) -> None:
        self.reference = (meta_dict or {}).get("filename_or_obj")
        super().set_metadata(meta_dict, resample=resample, **options)

    def write(self, filename: Any, verbose: bool = False, **obj_kwargs: Any) -> None:
        import nibabel as nib
        import numpy as np
        from monai.data.utils import to_affine_nd

        ImageWriter.write(self, filename, verbose=verbose)  # MONAI's logging; NibabelWriter's codes are replaced
        self.data_obj = self.create_backend_obj(self.data_obj, affine=self.affine, dtype=self.output_dtype,
                                                **obj_kwargs)
        affine = np.eye(4) if self.affine is None else torch.as_tensor(self.affine).cpu().numpy()
        set_nifti_geometry(self.data_obj, to_affine_nd(3, affine), getattr(self, "reference", None))
        write_staged(filename, lambda name: nib.save(self.data_obj, name))
