"""Decode a raw mask into a class map whose values are the prompts' label values (plus instance ids).

Mask encodings (``mask_encoding`` of the catalogue / datalist item):

* ``binary``: foreground = value > threshold (0, or 127 for JPEG files whose compression adds noise) -> class 1
* ``label_map``: pixel value = class id (= a key of ``prompts``)
* ``instance_map``: nonzero value = instance id of class 1 (the ids go to ``instance_key``)
* ``outline``: a binary contour, filled (per 2D slice) -> class 1. A contour clipped by the image edge is open:
  it is closed against the image border, keeping the background regions on its concave side (mostly inside
  the convex hull of the open contour). A slice whose filled area stays implausibly small for its contour
  (open or degenerate contour) raises :class:`OutlineFillWarning`.
* ``None``/``"auto"``: ``instance_map`` when the rule is ``instance_ids``; ``label_map`` when every value is
  a prompt key; ``binary`` when there is one prompt and the mask does not hold its value beside others (a 0/255
  mask for label 1, a JPEG's noisy levels); otherwise an error (values without a prompt are never merged silently).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage
from skimage.morphology import convex_hull_image

from ..distinct import distinct_values
from ..tensors import plain_tensor
from .errors import DataError, source_name

__all__ = ["MASK_ENCODINGS", "INSTANCE_RULES", "DecodeLabeld", "OutlineFillWarning", "parse_prompts",
           "rule_for_label"]

MASK_ENCODINGS = ("binary", "label_map", "instance_map", "outline")
INSTANCE_RULES = ("instance_ids", "components", "semantic")


def parse_prompts(prompts: Mapping[Any, str] | None, path: str | None = None) -> dict[int, str]:
    """``{"1": "liver"}`` -> ``{1: "liver"}``; keys must be positive integers (0 is background)."""
    if not prompts:
        raise DataError(path, "item has no 'prompts' (label value -> text)",
                        "give the dataset's label -> concept mapping from the catalogue (datasets_meta)")
    if not isinstance(prompts, Mapping):
        raise DataError(path, f"'prompts' is a {type(prompts).__name__}, not an object of label value -> text",
                        'write it as {"1": "polyp"} (one entry per label value)')
    out: dict[int, str] = {}
    for key, text in prompts.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise DataError(path, f"prompt key {key!r} is not an integer label value",
                            "prompts map label values ('1', '2', ...) to texts") from None
        if value == 0:
            raise DataError(path, f"prompt key {key!r}: label 0 is background and cannot be prompted",
                            "remove it from 'prompts'")
        if value < 0:
            raise DataError(path, f"prompt key {key!r}: label values are positive integers",
                            "use the mask's label values 1, 2, ...")
        if not isinstance(text, str):
            raise DataError(path, f"prompt for label {key!r} is {text!r}, not a text",
                            'give a concept text, e.g. "polyp"')
        if not text.strip():
            raise DataError(path, f"prompt text for label {key!r} is empty", "give a concept text")
        out[value] = text
    return dict(sorted(out.items()))


def rule_for_label(rule: str | Mapping[Any, str] | None, label: int, default: str = "components") -> str:
    """The instance rule of one label value: a single rule, or a per-label mapping (missing -> ``default``)."""
    if rule is None:
        found = default
    elif isinstance(rule, str):
        found = rule
    else:
        found = {int(k): v for k, v in rule.items()}.get(int(label), default)
    if found not in INSTANCE_RULES:
        raise ValueError(f"unknown instance rule {found!r}; choose from {INSTANCE_RULES}")
    return found


class OutlineFillWarning(UserWarning):
    """An ``outline`` mask whose filled area is implausibly small for its contour (open or degenerate contour)."""


_MIN_FILL_RATIO = 1.5  # filled area / contour pixels below this: the fill enclosed (almost) nothing
_MIN_HULL_SHARE = 0.1  # a border region must lie at least this much inside the contour's convex hull to be filled


def _implausible(filled: np.ndarray, contour: np.ndarray) -> bool:
    return int(filled.sum()) < _MIN_FILL_RATIO * int(contour.sum())


def _border_ids(labels: np.ndarray) -> np.ndarray:
    """Ids (> 0) of the labelled components that touch the image border."""
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return np.unique(edge[edge > 0])


def _close_against_border(outline: np.ndarray, open_contour: np.ndarray) -> np.ndarray:
    """The background regions that ``open_contour`` (clipped by the image edge) encloses with the image border.

    The contour and the border split the background into regions that touch the border; the enclosed ones lie on
    the contour's concave side, i.e. mostly inside its convex hull, while the outside lies beyond it. A region is
    kept when its share inside the hull is at least half the best region's (and >= ``_MIN_HULL_SHARE``); never all
    of them (the outside must remain). 2D ``outline`` (every contour pixel) and ``open_contour`` (the open ones).
    """
    labels, _ = ndimage.label(~outline)
    ids = _border_ids(labels)
    if ids.size < 2:  # the contour does not cut the image in two: it encloses nothing
        return np.zeros_like(outline)
    hull = convex_hull_image(open_contour)
    share = np.bincount(labels.ravel(), weights=hull.ravel())[ids] / np.bincount(labels.ravel())[ids]
    keep = (share >= _MIN_HULL_SHARE) & (share >= 0.5 * share.max())
    return np.isin(labels, ids[keep]) if not keep.all() else np.zeros_like(outline)


def _fill_slice(outline: np.ndarray, where: str) -> np.ndarray:
    """Fill one 2D slice: holes first; contours that touch the border and enclose nothing are closed against it."""
    filled = ndimage.binary_fill_holes(outline)
    if not outline.any():
        return filled
    parts, _ = ndimage.label(outline, np.ones((3, 3), bool))
    on_border = _border_ids(parts)
    open_ids = [k for k in on_border if _implausible(ndimage.binary_fill_holes(parts == k), parts == k)]
    if open_ids:
        filled |= _close_against_border(outline, np.isin(parts, open_ids))
    if _implausible(filled, outline):
        warnings.warn(
            f"{where}: outline mask filled to only {filled.mean():.2%} of the image ({int(filled.sum())} px for a "
            f"{int(outline.sum())} px contour): the contour is open or degenerate. Check that the annotation is a "
            "closed outline (or an outline clipped by the image edge), or use mask_encoding 'binary' if the mask is "
            "already filled", OutlineFillWarning, stacklevel=4)
    return filled


def _fill_outline(mask: np.ndarray, path: str | None = None) -> np.ndarray:
    """Fill contours, slice by slice along the last axis for volumes. ``mask``: (1, *spatial) bool.

    Closed contours are hole-filled; contours clipped by the image border are closed against it
    (:func:`_close_against_border`); :class:`OutlineFillWarning` when a slice's fill is implausibly small.
    """
    name = path or "<in-memory mask>"
    if mask.ndim == 3:
        return _fill_slice(mask[0], name)[None]
    return np.stack([_fill_slice(mask[0, ..., k], f"{name} (slice {k})") for k in range(mask.shape[-1])], -1)[None]


class DecodeLabeld(MapTransform):
    """Raw mask -> class map (values = prompt label values), checked against the prompts mapping.

    Args:
        keys: mask keys (``(1, *spatial)`` integer, as :class:`LoadMedicalImaged` gives them).
        prompts_key: item key with ``{label value: text}``.
        mask_encoding: fixed encoding; None reads ``encoding_key`` from the item, then falls back to auto.
        encoding_key: item key with the encoding.
        instance_rule: fixed rule (or per-label mapping); None reads ``rule_key`` from the item.
        rule_key: item key with the rule.
        instance_key: where ``instance_map`` ids go (same shape as the mask, int32).
        threshold: binary/outline foreground threshold; None: 127 for JPEG files, else 0.
        unknown_labels: ``"error"`` (default) raises on a label value that no prompt names;
            ``"background"`` sets such values to 0. An item's own ``"unknown_labels"`` (a datalist field: score a
            few classes of a multi-class label map, e.g. 4 of TotalSegmentator's 117) overrides it.

    Raises:
        DataError: a label value missing from the prompts (the catalogue), a binary mask without a class-1
            prompt, an encoding that cannot be told apart automatically.
    """

    def __init__(
        self,
        keys: KeysCollection = ("label",),
        prompts_key: str = "prompts",
        mask_encoding: str | None = None,
        encoding_key: str = "mask_encoding",
        instance_rule: str | Mapping[str, str] | None = None,
        rule_key: str = "instance_rule",
        instance_key: str = "instance_ids",
        threshold: float | None = None,
        unknown_labels: str = "error",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if mask_encoding not in (None, "auto", *MASK_ENCODINGS):
            raise ValueError(f"unknown mask_encoding {mask_encoding!r}; choose from {MASK_ENCODINGS}")
        if unknown_labels not in ("error", "background"):
            raise ValueError("unknown_labels must be 'error' or 'background'")
        self.prompts_key = prompts_key
        self.mask_encoding = mask_encoding
        self.encoding_key = encoding_key
        self.instance_rule = instance_rule
        self.rule_key = rule_key
        self.instance_key = instance_key
        self.threshold = threshold
        self.unknown_labels = unknown_labels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            raw = d[key]
            path = source_name(raw, d, key)
            prompts = parse_prompts(d.get(self.prompts_key), path)
            rule = self.instance_rule if self.instance_rule is not None else d.get(self.rule_key)
            encoding = self.mask_encoding if self.mask_encoding is not None else d.get(self.encoding_key)
            array = plain_tensor(raw).numpy()
            nonzero: set[int] | None = None  # the mask's values, read only where the encoding needs them
            is_jpeg = bool(raw.meta.get("is_jpeg", False)) if isinstance(raw, MetaTensor) else False
            if encoding in (None, "auto"):
                nonzero = _nonzero_values(array)
                unknown_as_background = (d.get("unknown_labels") or self.unknown_labels) == "background"
                encoding = self._auto_encoding(prompts, rule, nonzero, path, is_jpeg, unknown_as_background, array)
            rules = set(rule.values()) if isinstance(rule, Mapping) else {rule}
            if "instance_ids" in rules and encoding != "instance_map":  # (training would fail on it, late)
                raise DataError(path, f"\"instance_rule\": \"instance_ids\" with \"mask_encoding\": {encoding!r}: "
                                      "the ids of the instances are not kept that way",
                                "give \"mask_encoding\": \"instance_map\" (or leave it out), or another "
                                "instance_rule such as \"components\"")
            threshold = self.threshold if self.threshold is not None else (127 if is_jpeg else 0)
            if encoding == "label_map":
                nonzero = _nonzero_values(array) if nonzero is None else nonzero
                classes = self._check_label_map(array, prompts, nonzero, path, d.get("unknown_labels"))
            else:
                class_id = self._binary_class(prompts, encoding, path)
                foreground = array > threshold if encoding != "instance_map" else array > 0
                if encoding == "outline":
                    foreground = _fill_outline(foreground, path)
                if class_id == 1:  # bool is one byte of 0 or 1: the class map without a copy
                    classes = foreground.view(np.uint8)
                else:
                    classes = foreground.astype(np.uint8 if class_id <= 255 else np.int32) * class_id
                if encoding == "instance_map":
                    ids = torch.from_numpy(array.astype(np.int32))
                    d[self.instance_key] = _with_meta(ids, raw)
            out = _with_meta(torch.from_numpy(np.ascontiguousarray(classes)), raw)
            if isinstance(out, MetaTensor):
                out.meta["mask_encoding"] = encoding
            d[key] = out
        return d

    @staticmethod
    def _auto_encoding(prompts: Mapping[int, str], rule: Any, nonzero: set[int], path: str | None,
                       is_jpeg: bool = False, unknown_as_background: bool = False,
                       array: np.ndarray | None = None) -> str:
        """The mask's encoding read from its values. ``unknown_as_background`` (``"unknown_labels": "background"``):
        a mask of several values, or holding a prompted one, is a label map whose other values are background (one
        foreground value that no prompt names, 255 for label 1, stays a binary mask)."""
        if rule == "instance_ids" or (isinstance(rule, Mapping) and set(rule.values()) == {"instance_ids"}):
            return "instance_map"
        if nonzero <= set(prompts):
            return "label_map"
        if unknown_as_background and not is_jpeg and (len(prompts) > 1 or len(nonzero) > 1 or nonzero & set(prompts)):
            return "label_map"
        if len(prompts) == 1:
            (value, text), = prompts.items()
            if not is_jpeg and _soft_edged(nonzero, array):
                raise DataError(path, f"mask of {len(nonzero)} grey levels ({min(nonzero)}-{max(nonzero)}): a "
                                      "soft-edged (anti-aliased or resized) binary mask, not a label map",
                                "binarise it at its middle (e.g. > 127) and save it again; \"mask_encoding\": "
                                "\"binary\" would take every nonzero pixel, the soft edge too, as the mask")
            # a label map (or instance ids) of which one value is named, or none (ids 2, 3, 5: not one binary value)
            if (value in nonzero or len(nonzero) > 1) and not is_jpeg:
                others = sorted(nonzero - {value})
                raise DataError(path, f"mask values {sorted(nonzero)[:20]}{' ...' if len(nonzero) > 20 else ''} but "
                                      f"the prompts name only {value} ({text!r}): no prompt for {others[:20]}"
                                      f"{f' ... ({len(others)} values)' if len(others) > 20 else ''}",
                                "give each value its prompt; if they are instance ids of one concept, set "
                                "\"instance_rule\": \"instance_ids\"; to take every nonzero value as "
                                f"{text!r}, set \"mask_encoding\": \"binary\"")
            return "binary"
        unknown = sorted(nonzero - set(prompts))
        raise DataError(path, f"mask values {sorted(nonzero)[:20]} do not match the prompt labels {sorted(prompts)} "
                              f"(no prompt for {unknown[:20]})",
                        "give a prompt for each label value in 'prompts' (or relabel the mask); if the mask is "
                        "encoded otherwise (e.g. one foreground value such as 255 for label 1), set 'mask_encoding' "
                        "(binary, label_map, instance_map, outline) for this dataset")

    def _check_label_map(self, array: np.ndarray, prompts: Mapping[int, str], nonzero: set[int],
                         path: str | None, item_policy: str | None = None) -> np.ndarray:
        policy = self.unknown_labels if item_policy is None else item_policy
        if policy not in ("error", "background"):
            raise DataError(path, f"the item's \"unknown_labels\" is {policy!r}", "give \"error\" or \"background\"")
        unknown = sorted(nonzero - set(prompts))
        if not unknown:
            return array
        if policy == "background":
            return np.where(np.isin(array, unknown), 0, array).astype(array.dtype)
        raise DataError(path, f"label value(s) {unknown[:20]} are not in the prompts/catalogue "
                              f"(known: {sorted(prompts)})",
                        "give each a prompt in the item's 'prompts' (or the dataset's labels in datasets_meta); a "
                        "mask with one foreground value (e.g. 255) is \"mask_encoding\": \"binary\"; to score "
                        "or train the prompted classes alone, the others as background, give the item "
                        "\"unknown_labels\": \"background\"")

    @staticmethod
    def _binary_class(prompts: Mapping[int, str], encoding: str, path: str | None) -> int:
        if encoding not in MASK_ENCODINGS:
            raise DataError(path, f"unknown mask_encoding {encoding!r}", f"choose from {MASK_ENCODINGS}")
        if 1 in prompts:
            return 1
        if len(prompts) == 1:
            return next(iter(prompts))
        raise DataError(path, f"a {encoding} mask has one class (1) but the prompts name labels {sorted(prompts)}",
                        "map label '1' to the concept text")


#: more nonzero values than this in a one-prompt mask, 255 by far its commonest: a soft-edged binary mask
SOFT_EDGE_LEVELS = 32


def _soft_edged(nonzero: set[int], array: np.ndarray | None) -> bool:
    """Whether a mask is a binary mask with a soft (anti-aliased, resized) edge: many grey levels, 255 the commonest
    nonzero value by a factor of 3 (its inside; each edge level holds a thin ring), where an instance-id map's values
    hold similar shares."""
    if array is None or array.dtype != np.uint8 or len(nonzero) <= SOFT_EDGE_LEVELS or max(nonzero) != 255:
        return False
    counts = np.bincount(array.reshape(-1), minlength=256)[1:]
    inside, edge = int(counts[-1]), int(np.sort(counts[:-1])[-1])
    return inside >= 3 * edge


def soft_edge_pixels(path: str) -> tuple[int, int] | None:
    """For a 2D picture mask (not JPEG, whose edge is thresholded at 127 anyway) with a soft (anti-aliased or
    resized) edge (:func:`_soft_edged`): its pixels above 0, which ``"mask_encoding": "binary"`` takes as the
    mask, and above 127 (its middle). None for any other mask (a volume, a JPEG, a mask of few levels)."""
    from .io import JPEG_SUFFIXES, is_picture_path, load_medical_image

    if not is_picture_path(path) or path.lower().endswith(JPEG_SUFFIXES):
        return None
    array = plain_tensor(load_medical_image(path, mask=True)).numpy()
    if array.dtype != np.uint8:
        array = array.astype(np.uint8) if array.size and array.min() >= 0 and array.max() <= 255 else array
    if not _soft_edged(_nonzero_values(array), array):
        return None
    return int((array > 0).sum()), int((array > 127).sum())


def _nonzero_values(array: np.ndarray) -> set[int]:
    """The nonzero values of a mask (one counting pass, :func:`~medsam3_monai.distinct.distinct_values`)."""
    return {int(v) for v in distinct_values(array) if v != 0}


def _with_meta(out: torch.Tensor, ref: Any) -> torch.Tensor:
    if isinstance(ref, MetaTensor):
        return MetaTensor(out, meta=dict(ref.meta), applied_operations=list(ref.applied_operations))
    return out
