"""Per-case segmentation metrics on binary masks: Dice, IoU, NSD (surface Dice) and HD95.

Every function takes one case: a predicted and a ground-truth mask of the same shape, ``(H, W)`` for a 2D
image or ``(D, H, W)`` (any axis order) for a volume, as torch tensors or numpy arrays of bool, integer or
float dtype. Non-zero means foreground; float masks must already be binary ({0, 1}) — threshold
probabilities first, a map with other values is an error rather than a silent guess.

Values are fractions in [0, 1] (HD95 in mm); reports turn them into %.

Empty masks (``bundles/medsam3/docs/conventions.md``, Metrics):

==============================  ======  ======  ======  ======
prediction / truth              Dice    IoU     NSD     HD95
==============================  ======  ======  ======  ======
both empty                      1.0     1.0     1.0     NaN
truth empty, prediction not     0.0     0.0     0.0     NaN
prediction empty, truth not     0.0     0.0     0.0     NaN
==============================  ======  ======  ======  ======

HD95 has no finite value when a surface is missing; it is NaN and the aggregation (``aggregate.py``)
averages it with ``nanmean`` and reports how many cases had a finite value.

Surface metrics are MONAI's (``compute_surface_dice``, ``compute_hausdorff_distance``): surfaces are the edge
voxels of each mask (the mask minus its erosion); distances are Euclidean in mm given ``spacing``, one value
per axis **in the array's axis order** (a single number means isotropic; ``None`` means 1 per voxel, so
tolerances and distances are then in voxels). HD95 follows MONAI: the larger of the two directed 95th
percentiles of edge-to-edge distances. The edge distances come from :func:`~.surface.edge_distances` (MONAI's
values, bit for bit, in about half the time); the subvoxel NSD is MONAI's own.

NSD tolerance: :data:`DEFAULT_NSD_TOLERANCE_MM` = 2 mm, the tolerance of MedSAM's evaluation
(``compute_multi_class_nsd(..., tolerance=2.0)`` in bowang-lab/MedSAM ``evaluation/compute_metrics.py``, also
used by the CVPR 2024 MedSAM-on-laptop challenge). Medical SAM3 reports Dice and IoU only, so it sets no
convention. NSD counts edge voxels (MONAI's default, ``use_subvoxels=False``); DeepMind's surface-area
weighting, which MedSAM's copy of ``surface-distance`` uses, is available with ``use_subvoxels=True``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .surface import _spacing_arg, edge_distances

__all__ = [
    "DEFAULT_NSD_TOLERANCE_MM",
    "as_binary_mask",
    "as_label_map",
    "case_metrics",
    "dice",
    "hd95",
    "iou",
    "label_areas",
    "label_map_metrics",
    "label_overlaps",
    "surface_dice",
]

DEFAULT_NSD_TOLERANCE_MM = 2.0

Spacing = float | Sequence[float] | None


def as_binary_mask(mask: torch.Tensor | np.ndarray, name: str = "mask") -> torch.Tensor:
    """A CPU bool tensor of a 2D or 3D binary mask (non-zero = foreground).

    Raises ValueError for other dimensionalities and for float masks whose values are not 0 or 1.
    """
    if isinstance(mask, torch.Tensor):
        t = mask.detach().cpu()
    else:
        t = torch.from_numpy(np.ascontiguousarray(mask))
    if t.ndim not in (2, 3):
        raise ValueError(f"{name} must be (H, W) or (D, H, W), got shape {tuple(t.shape)}")
    if t.dtype == torch.bool:
        return t
    if t.is_floating_point() and not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(
            f"{name} is a float map with values other than 0 and 1; threshold probabilities or logits "
            "into a binary mask before computing metrics"
        )
    return t != 0


def _pair(pred, truth) -> tuple[torch.Tensor, torch.Tensor]:
    p, t = as_binary_mask(pred, "pred"), as_binary_mask(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred and truth must have the same shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    return p, t


def _counts(pred, truth) -> tuple[int, int, int]:
    p, t = _pair(pred, truth)
    return _bool_counts(p, t)


#: elements counted at a time (:func:`label_overlaps`, the masks' counts): the temporaries of a chunk stay in the
#: CPU's cache, so a picture of a megapixel or more counts 1.7-2x faster, and a volume needs no volume-sized
#: temporaries (a 117-class joint histogram of 300 x 512 x 512 voxels took 900 MB more and 19x the time at once)
COUNT_CHUNK = 1 << 18


def _chunks(size: int, step: int | None = None) -> list[slice]:
    """Slices of ``step`` (default ``COUNT_CHUNK``) elements covering ``size``."""
    step = step or COUNT_CHUNK
    return [slice(start, start + step) for start in range(0, size, step)]


def _bool_counts(p: torch.Tensor | np.ndarray, t: torch.Tensor | np.ndarray) -> tuple[int, int, int]:
    """|P∩T|, |P|, |T| of two bool masks (CPU tensors or numpy arrays), counted in numpy (on a CPU its elementwise
    ``&`` and counts of bytes are several times torch's), ``COUNT_CHUNK`` elements at a time."""
    p, t = np.asarray(p).reshape(-1), np.asarray(t).reshape(-1)
    counts = [0, 0, 0]
    for part in _chunks(p.size):
        a, b = p[part], t[part]
        counts[0] += int(np.count_nonzero(a & b))
        counts[1] += int(np.count_nonzero(a))
        counts[2] += int(np.count_nonzero(b))
    return counts[0], counts[1], counts[2]


def _dice_of(inter: int, n_p: int, n_t: int) -> float:
    return 1.0 if n_p + n_t == 0 else 2.0 * inter / (n_p + n_t)


def _iou_of(inter: int, n_p: int, n_t: int) -> float:
    union = n_p + n_t - inter
    return 1.0 if union == 0 else inter / union


def dice(pred, truth) -> float:
    """Dice = 2|P∩T| / (|P| + |T|); 1.0 when both masks are empty, 0.0 when only one is."""
    return _dice_of(*_counts(pred, truth))


def iou(pred, truth) -> float:
    """IoU (Jaccard) = |P∩T| / |P∪T|; 1.0 when both masks are empty, 0.0 when only one is."""
    return _iou_of(*_counts(pred, truth))


#: voxels kept around the two masks' union when the surface metrics crop them: MONAI's own margin
#: (``get_mask_edges`` crops to the union's foreground with ``margin=1``), so MONAI then crops the same voxels
SURFACE_MARGIN = 1


def _grown_box(starts: Sequence[int], stops: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """The box ``starts:stops`` grown by ``SURFACE_MARGIN`` voxels on every side, within ``shape``."""
    margin = SURFACE_MARGIN
    return tuple(slice(max(a - margin, 0), min(b + margin, n)) for a, b, n in zip(starts, stops, shape))


def _union_box(p: torch.Tensor, t: torch.Tensor) -> tuple[slice, ...]:
    """The bounding box of ``p | t`` (bool, one shape) grown by ``SURFACE_MARGIN``; empty slices when both are
    empty."""
    union = np.asarray(p) | np.asarray(t)
    spans = []
    for axis in range(union.ndim):
        hits = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        if hits.size == 0:
            return tuple(slice(0, 0) for _ in union.shape)
        spans.append((int(hits[0]), int(hits[-1]) + 1))
    return _grown_box([a for a, _ in spans], [b for _, b in spans], union.shape)


def _surface_pair(pred, truth) -> tuple[torch.Tensor, torch.Tensor]:
    """The two masks (:func:`_pair`) cropped to the box around their union that MONAI's surface metrics read.

    MONAI crops the masks to that box itself, but first compares, converts and copies them whole (a float copy of
    each, several passes): for a CT those passes cost seconds per class. The crop holds the same voxels, so the
    values are the same; surface distances do not depend on where the box lies."""
    p, t = _pair(pred, truth)
    box = _union_box(p, t)
    return p[box], t[box]


def surface_dice(
    pred,
    truth,
    spacing: Spacing = None,
    tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    use_subvoxels: bool = False,
) -> float:
    """Normalised surface Dice (NSD) at ``tolerance_mm``: the fraction of both masks' surfaces lying within
    the tolerance of the other's surface. 1.0 when both masks are empty, 0.0 when exactly one is.

    ``spacing``: voxel size per axis in the array's axis order (None = 1, tolerance then in voxels).
    """
    p, t = _surface_pair(pred, truth)
    has_p, has_t = bool(p.any()), bool(t.any())
    if not has_p and not has_t:
        return 1.0
    if not (has_p and has_t):
        return 0.0
    if not use_subvoxels:
        return _nsd_of(*edge_distances(p, t, spacing), tolerance_mm)
    from monai.metrics import compute_surface_dice  # lazy: importing MONAI costs seconds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's deprecation chatter inside get_mask_edges
        value = compute_surface_dice(
            p[None, None].float(),
            t[None, None].float(),
            class_thresholds=[float(tolerance_mm)],
            include_background=True,
            spacing=_spacing_arg(spacing, p.ndim),
            use_subvoxels=True,
        )
    return float(value.reshape(-1)[0])


def hd95(pred, truth, spacing: Spacing = None) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (voxels when ``spacing`` is None).

    NaN when either mask is empty (no surface to measure from); aggregate with nanmean.
    """
    p, t = _surface_pair(pred, truth)
    if not (bool(p.any()) and bool(t.any())):
        return math.nan
    return _hd95_of(*edge_distances(p, t, spacing))


def case_metrics(
    pred,
    truth,
    spacing: Spacing = None,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    use_subvoxels: bool = False,
) -> dict[str, float]:
    """All metrics of one case: ``{"dice", "iou"}``, plus ``"nsd"`` and ``"hd95"`` when ``spacing`` is given.

    Without spacing (e.g. photographs, most 2D sets) surface metrics in mm are meaningless, so they are left
    out rather than computed in pixels; pass ``spacing=1.0`` to get them per pixel anyway.
    """
    p, t = _pair(pred, truth)
    return _metrics_of(_bool_counts(p, t), p, t, spacing, nsd_tolerance_mm, use_subvoxels)


def _metrics_of(counts: tuple[int, int, int], p: Any, t: Any, spacing: Spacing, nsd_tolerance_mm: float,
                use_subvoxels: bool, workers: int | None = None) -> dict[str, float]:
    """:func:`case_metrics` from the overlap counts; ``p``/``t`` (masks, or callables making them) are read only for
    the surface metrics (``workers``: threads of their edge-distance lookups, :func:`~.surface.edge_distances`)."""
    out = {"dice": _dice_of(*counts), "iou": _iou_of(*counts)}
    if spacing is not None:
        p, t = _surface_pair(*(x() if callable(x) else x for x in (p, t)))  # cropped once for both metrics
        if use_subvoxels or not (bool(p.any()) and bool(t.any())):
            out["nsd"] = surface_dice(p, t, spacing, nsd_tolerance_mm, use_subvoxels)
            out["hd95"] = hd95(p, t, spacing)
        else:
            out["nsd"], out["hd95"] = _nsd_and_hd95(p, t, spacing, nsd_tolerance_mm, workers)
    return out


def _nsd_and_hd95(p: torch.Tensor, t: torch.Tensor, spacing: Spacing, tolerance_mm: float,
                  workers: int | None = None) -> tuple[float, float]:
    """:func:`surface_dice` (edge voxels) and :func:`hd95` of two non-empty masks from one computation of their edge
    distances (most of their time)."""
    distances = edge_distances(p, t, spacing, workers)
    return _nsd_of(*distances, tolerance_mm), _hd95_of(*distances)


def _nsd_of(to_truth: torch.Tensor, to_pred: torch.Tensor, tolerance_mm: float) -> float:
    """MONAI ``compute_surface_dice``'s reduction (edge voxels): the fraction of both sets of edge distances within
    the tolerance, in float32 as MONAI returns it."""
    within = torch.sum(to_truth <= float(tolerance_mm)) + torch.sum(to_pred <= float(tolerance_mm))
    return float((within / (len(to_truth) + len(to_pred))).float())


def _hd95_of(to_truth: torch.Tensor, to_pred: torch.Tensor) -> float:
    """MONAI ``compute_hausdorff_distance(percentile=95)``'s reduction: the larger of the two directed 95th
    percentiles (``torch.quantile``), float32."""
    return float(torch.stack([torch.quantile(d, 0.95) for d in (to_truth, to_pred)]).max().float())


#: largest joint histogram :func:`label_overlaps` makes (bins); beyond it, label values are counted one by one
MAX_JOINT_BINS = 1 << 22
#: up to this many label values, counting each value's masks is cheaper than the joint histogram (CPU, one thread)
FEW_VALUES = 3


def label_overlaps(pred: torch.Tensor, truth: torch.Tensor, values: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(|P∩T|, |P|, |T|)`` of every label value, from two label maps of one shape (integer, 0 = background).

    More than ``FEW_VALUES`` values: one joint histogram of the (pred, truth) label pairs, whatever their number
    (a 117-class CT costs what one class does). Fewer, or label values so large that the histogram would exceed
    ``MAX_JOINT_BINS``: each value's masks counted (cheaper for one or two). The counts are the same either way;
    both count ``COUNT_CHUNK`` elements at a time."""
    pred, truth = torch.as_tensor(pred).reshape(-1), torch.as_tensor(truth).reshape(-1)
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth must have the same number of elements, got {pred.numel()} and "
                         f"{truth.numel()}")
    values = [int(v) for v in values]
    if any(v <= 0 for v in values):
        raise ValueError(f"label values must be positive (0 is the background), got {values}")
    if pred.numel() == 0:
        return [(0, 0, 0) for _ in values]
    if _has_negative(pred) or _has_negative(truth):
        raise ValueError("label maps must hold non-negative label values")
    if len(values) <= FEW_VALUES:
        return _value_counts(pred, truth, values)
    length = max([*values, int(pred.max()), int(truth.max())]) + 1
    if length * length > MAX_JOINT_BINS:
        return _value_counts(pred, truth, values)
    joint = _histogram(pred.numel(), length * length,  # int32 pairs: the bins are far below 2**31
                       lambda part: pred[part].to(torch.int32) * length + truth[part].to(torch.int32))
    joint = joint.reshape(length, length)  # [pred value, truth value]
    n_pred, n_truth = joint.sum(1), joint.sum(0)
    return [(int(joint[v, v]), int(n_pred[v]), int(n_truth[v])) for v in values]


def label_areas(labels: torch.Tensor | np.ndarray, values: Sequence[int]) -> list[int]:
    """The pixels (voxels) of each label value in a label map (integer, 0 = background): one histogram of the map,
    ``COUNT_CHUNK`` elements at a time, whatever the number of values (a value absent from the map counts 0)."""
    flat = torch.as_tensor(labels).reshape(-1)
    values = [int(v) for v in values]
    if flat.numel() == 0:
        return [0 for _ in values]
    if _has_negative(flat):
        raise ValueError("label maps must hold non-negative label values")
    length = int(flat.max()) + 1
    if length > MAX_JOINT_BINS:  # label values too large for a histogram: each value's pixels counted
        return [n for _, n, _ in _value_counts(flat, flat, values)]
    counts = _histogram(flat.numel(), length, lambda part: flat[part].long())
    return [int(counts[v]) if 0 <= v < length else 0 for v in values]


def _histogram(size: int, bins: int, keys: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """(bins,) int64 counts of the bin numbers ``keys(part)`` gives for each chunk ``part`` of ``size`` elements;
    a chunk's histogram costs its bins, so a chunk has at least 4 x bins elements."""
    counts = torch.zeros(bins, dtype=torch.int64)
    for part in _chunks(size, max(COUNT_CHUNK, 4 * bins)):
        counts += torch.bincount(keys(part), minlength=bins)
    return counts


def _has_negative(labels: torch.Tensor) -> bool:
    return labels.dtype not in (torch.uint8, torch.bool) and int(labels.min()) < 0


def _value_counts(pred: torch.Tensor, truth: torch.Tensor, values: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(|P∩T|, |P|, |T|)`` of each value of two flat label maps, its masks compared one value and one
    ``COUNT_CHUNK`` at a time (in numpy, as ``_bool_counts``)."""
    p, t = pred.cpu().numpy(), truth.cpu().numpy()
    counts = np.zeros((len(values), 3), dtype=np.int64)
    for part in _chunks(p.size):
        a, b = p[part], t[part]
        for row, value in enumerate(values):
            counts[row] += _bool_counts(a == value, b == value)
    return [(int(x), int(y), int(z)) for x, y, z in counts]


#: most classes whose surface metrics run at once (each holds its masks' crops, edges and coordinates: for a
#: class spanning a whole-body CT, about a GB)
MAX_METRIC_THREADS = 8


def label_map_metrics(
    pred: torch.Tensor,
    truth: torch.Tensor,
    values: Sequence[int],
    spacing: Spacing = None,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    use_subvoxels: bool = False,
) -> list[tuple[dict[str, float], int, int]]:
    """:func:`case_metrics` of ``pred == v`` against ``truth == v`` for every ``v`` of ``values``, from the two label
    maps: the overlaps of all values in three passes (:func:`label_overlaps`); a value's masks are made only for
    the surface metrics (when ``spacing`` is given), and only in the box around its voxels in either map (one
    ``scipy.ndimage.find_objects`` pass per map). Several values' surface metrics (edge voxels) run at once, on
    ``torch.get_num_threads()`` threads (at most ``MAX_METRIC_THREADS``; numpy and scipy's KD-tree release the
    GIL), each value's on one; the values are the same either way. Returns ``(metrics, |P|, |T|)`` per value, in
    order."""
    pred, truth = as_label_map(pred, "pred"), as_label_map(truth, "truth")
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth must have the same shape, got {tuple(pred.shape)} and {tuple(truth.shape)}")
    overlaps = label_overlaps(pred, truth, values)
    boxes = _value_boxes(pred, truth, values) if spacing is not None and len(values) else {}
    # (the subvoxel NSD stays serial: MONAI's, under warnings.catch_warnings, which threads must not share)
    threads = torch.get_num_threads() if spacing is not None and not use_subvoxels and len(values) > 1 else 1
    workers = 1 if threads > 1 else None  # the KD-tree lookups' threads: the values' own when they run at once

    def value_metrics(value: int, counts: tuple[int, int, int]) -> tuple[dict[str, float], int, int]:
        box = boxes.get(int(value), ())
        masks = (lambda v=int(value), b=box: pred[b] == v), (lambda v=int(value), b=box: truth[b] == v)
        return _metrics_of(counts, *masks, spacing, nsd_tolerance_mm, use_subvoxels, workers), counts[1], counts[2]

    if threads == 1:
        return [value_metrics(value, counts) for value, counts in zip(values, overlaps)]
    with ThreadPoolExecutor(min(threads, len(values), MAX_METRIC_THREADS)) as pool:
        return list(pool.map(value_metrics, values, overlaps))


#: largest label value whose box :func:`_value_boxes` finds in one pass (``scipy.ndimage.find_objects`` lists
#: every value up to it); beyond it, each value's box is found from its masks
MAX_BOX_LABEL = 1 << 16


def _value_boxes(pred: torch.Tensor, truth: torch.Tensor, values: Sequence[int]) -> dict[int, tuple[slice, ...]]:
    """Per label value, the box around its voxels in either map that the surface metrics read (:func:`_union_box`):
    one ``find_objects`` pass over each map for all values."""
    from scipy.ndimage import find_objects

    values = [int(v) for v in values]
    if max(values) > MAX_BOX_LABEL:
        return {v: _union_box(pred == v, truth == v) for v in values}
    found = [find_objects(labels.numpy(), max_label=max(values)) for labels in (pred, truth)]
    boxes = {}
    for v in values:
        spans = [box for box in (found[0][v - 1], found[1][v - 1]) if box is not None]
        boxes[v] = tuple(slice(0, 0) for _ in pred.shape) if not spans else _grown_box(
            [min(box[axis].start for box in spans) for axis in range(pred.ndim)],
            [max(box[axis].stop for box in spans) for axis in range(pred.ndim)], pred.shape)
    return boxes


def as_label_map(labels: torch.Tensor | np.ndarray, name: str = "labels") -> torch.Tensor:
    """A CPU integer tensor of a 2D or 3D label map (bool becomes 0/1); float maps must hold whole numbers."""
    t = labels.detach().cpu() if isinstance(labels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(labels))
    if t.ndim not in (2, 3):
        raise ValueError(f"{name} must be (H, W) or (D, H, W), got shape {tuple(t.shape)}")
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    if t.is_floating_point():
        if not bool((t == t.round()).all()):
            raise ValueError(f"{name} is a float map with non-integer values; a label map holds label values")
        return t.to(torch.int64)
    return t
