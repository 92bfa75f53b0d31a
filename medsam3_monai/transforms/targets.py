"""Targets per (image, prompt) in slice space, and negative prompts sampled from absent concepts.

A target is a plain dict (collate- and pickle-friendly)::

    {"label": int,            # label value of the prompt (-1 for a concept sampled from a pool)
     "text": str,             # the prompt text
     "boxes": Tensor (n, 4),  # float32 cx, cy, w, h normalised to [0, 1] in slice space
     "masks": InstanceMasks (n, S, S) bool instance masks in slice space, stored as crops (dense on the
                              training device only: ``InstanceMasks.to_dense``)
     "is_negative": bool}     # n == 0: the concept is absent (trains presence -> 0)

``d["targets"]`` holds one per prompt of the item (label order), then sampled negatives.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Randomizable, Transform

from ..instance_masks import InstanceMasks
from ..tensors import plain_tensor
from ..threads import one_blas_thread
from .errors import source_name
from .labels import parse_prompts
from .slices import band_limits

__all__ = ["BuildTargetsd", "PromptTarget", "RandNegativePromptsd", "empty_target", "interpolation_weights",
           "masks_to_boxes_cxcywh", "resize_instances",
           "resize_masks"]


class PromptTarget(TypedDict):
    label: int
    text: str
    boxes: torch.Tensor
    masks: InstanceMasks
    is_negative: bool


def empty_target(text: str, size: Sequence[int], label: int = -1) -> PromptTarget:
    """A negative prompt: no boxes, no masks."""
    return {"label": int(label), "text": text, "boxes": torch.zeros(0, 4), "masks": InstanceMasks(size),
            "is_negative": True}


@functools.lru_cache(maxsize=64)
def interpolation_weights(source: int, target: int) -> torch.Tensor:
    """``(target, source)`` weights of torch's linear interpolation (``align_corners=False``, antialiased
    when shrinking): row ``i`` says how output pixel ``i`` mixes the input pixels."""
    rows, columns, values = _weight_entries(source, target)
    weights = torch.zeros(target, source, dtype=torch.float32)
    weights[rows, columns] = values
    return weights


@functools.lru_cache(maxsize=64)
def _weight_entries(source: int, target: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zero entries of :func:`interpolation_weights`: output pixel, input pixel, weight (``(E,)`` each).

    Interpolating an identity (one channel per input pixel) gives them, in ``O(source * target)``. Each output
    mixes a window of fewer than ``period`` neighbouring inputs, so ``period`` combs (channel ``j``: the inputs ``i``
    with ``i % period == j``) give the same weights -- every output sees at most one input of each comb, so its
    value is that input's weight alone -- in ``O(period * target)``: the window then says which input it was."""
    antialias = target < source
    scale = source / target
    radius = scale if antialias else 1.0  # the filter's reach in input pixels (the triangle widens when shrinking)
    period = int(2 * radius) + 6  # > the widest window: [floor(centre - radius) - 1, ceil(centre + radius) + 1]
    if period >= source:  # small inputs: the identity itself
        basis = torch.eye(source, dtype=torch.float32)
    else:
        basis = (torch.arange(source) % period == torch.arange(period)[:, None]).float()
    values = F.interpolate(basis.view(1, basis.shape[0], 1, source), size=(1, target), mode="bilinear",
                           align_corners=False, antialias=antialias)[0, :, 0, :].T  # (target, channels)
    outputs = torch.arange(target)[:, None]
    if period >= source:
        inputs = torch.arange(source)[None, :].expand(target, source)
    else:
        centre = (torch.arange(target, dtype=torch.float64) + 0.5) * scale - 0.5
        low = torch.floor(centre - radius).long()[:, None] - 1
        inputs = low + (torch.arange(period)[None, :] - low) % period  # the input of comb j in output o's window
    kept = values != 0
    return outputs.expand_as(values)[kept], inputs[kept], values[kept]


#: output rows (columns) per matrix product of :func:`_banded_product` for masks that reach more than twice as many:
#: each block reads only the input rows its weights touch, so a large mask costs its band, not the dense
#: ``(output, input)`` weight matrix
PRODUCT_BLOCK = 64


class _AxisWeights(NamedTuple):
    """:func:`interpolation_weights` ``(target, source)`` as numpy with its band: the first and one past the last
    input pixel each output pixel mixes (``reads_from``, ``reads_to``: ``(target,)``), and the first and last output
    pixel each input pixel reaches (``first``, ``last``: ``(source,)``; an input pixel no output uses has
    first = target, last = -1)."""

    weights: np.ndarray
    reads_from: np.ndarray
    reads_to: np.ndarray
    first: np.ndarray
    last: np.ndarray


@functools.lru_cache(maxsize=64)
def _axis_weights(source: int, target: int) -> _AxisWeights:
    rows, columns, _ = _weight_entries(source, target)
    reads_from, reads_to = band_limits(rows, columns, target, source)
    first, stop = band_limits(columns, rows, source, target)
    return _AxisWeights(interpolation_weights(source, target).numpy(), reads_from.numpy(), reads_to.numpy(),
                        first.numpy(), stop.numpy() - 1)


def _reached(axis: _AxisWeights, starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The output pixels that input ranges ``starts[k]:stops[k]`` reach, for all masks at once: (first, one past
    the last), ``(N,)`` each (meaningless for an empty range)."""
    bounds = np.stack([starts, stops], axis=1).ravel()  # reduceat over [start, stop) pairs; stop may be the size
    first = np.minimum.reduceat(np.append(axis.first, 0), bounds)[::2]
    last = np.maximum.reduceat(np.append(axis.last, 0), bounds)[::2]
    return first, last + 1


def _banded_product(axis: _AxisWeights, outputs: tuple[int, int], inputs: tuple[int, int],
                    values: np.ndarray) -> np.ndarray:
    """``axis.weights[o1:o2, k1:k2] @ values`` for ``outputs`` = (o1, o2), ``inputs`` = (k1, k2), ``values``
    ``(k2 - k1, n)`` float32 -> ``(o2 - o1, n)`` float32, ``PRODUCT_BLOCK`` output rows at a time, each block's
    product over the inputs its weights touch (the terms left out are products with zero weights)."""
    (o1, o2), (k1, k2) = outputs, inputs
    if o2 - o1 <= 2 * PRODUCT_BLOCK:  # a small mask: one product (the blocks' calls would cost more than the zeros)
        return axis.weights[o1:o2, k1:k2] @ values
    out = np.empty((o2 - o1, values.shape[1]), dtype=np.float32)
    for start in range(o1, o2, PRODUCT_BLOCK):
        stop = min(start + PRODUCT_BLOCK, o2)
        lo = max(k1, int(axis.reads_from[start:stop].min()))
        hi = min(k2, int(axis.reads_to[start:stop].max()))
        if hi <= lo:
            out[start - o1:stop - o1] = 0.0
            continue
        np.matmul(axis.weights[start:stop, lo:hi], values[lo - k1:hi - k1], out=out[start - o1:stop - o1])
    return out


def resize_masks(masks: torch.Tensor, size: Sequence[int], threshold: float = 0.5) -> torch.Tensor:
    """``(N, H, W)`` bool -> ``(N, *size)`` bool: bilinear (antialiased when shrinking), then ``>= threshold``.

    Closer to the true area than nearest neighbour. Computed separably on each mask's bounding box only
    (``W_y[:, box] @ mask[box] @ W_x[:, box].T``), which equals full-image interpolation and keeps a hundred
    small nuclei at 1008 px cheap.
    """
    return resize_instances(masks, size, threshold)[0].to_dense()


def resize_instances(masks: torch.Tensor | InstanceMasks, size: Sequence[int], threshold: float = 0.5
                     ) -> tuple[InstanceMasks, torch.Tensor]:
    """:func:`resize_masks` as :class:`~medsam3_monai.instance_masks.InstanceMasks` (each resized mask cropped to
    its bounding box: no dense ``(N, *size)`` tensor is made) plus the boxes of the resized masks, ``(N, 4)``
    cxcywh in ``[0, 1]`` (zeros, and an empty crop, for a mask that vanished).

    ``masks``: ``(N, H, W)`` bool, dense or as tight bounding-box crops (``LabelToInstancesd``'s output); each
    crop is resized on its own, which equals full-image interpolation."""
    size = (int(size[0]), int(size[1]))
    instances = masks if isinstance(masks, InstanceMasks) else InstanceMasks.from_dense(masks)
    n = len(instances)
    height, width = instances.size
    if (height, width) == size:
        return instances, instances.boxes_cxcywh()
    boxes = np.zeros((n, 4), dtype=np.float32)
    offsets = np.zeros((n, 2), dtype=np.int64)
    crops: list[torch.Tensor] = []
    if n == 0:
        return InstanceMasks(size), torch.from_numpy(boxes)
    # numpy for the small products (torch's CPU matmul has a large fixed cost per call), on one BLAS thread: the
    # products are small, and idle BLAS threads spinning after each would cost more CPU than the products
    rows, columns = _axis_weights(height, size[0]), _axis_weights(width, size[1])
    starts = instances.offsets.numpy()
    stops = starts + np.array([crop.shape for crop in instances.crops], dtype=np.int64).reshape(n, 2)
    reached_rows = _reached(rows, starts[:, 0], stops[:, 0])  # the output rows and columns each mask reaches
    reached_columns = _reached(columns, starts[:, 1], stops[:, 1])
    empty = torch.zeros(0, 0, dtype=torch.bool)
    with one_blas_thread():
        for k, crop in enumerate(instances.crops):
            if crop.numel() == 0:
                crops.append(empty)
                continue
            (r1, c1), (r2, c2) = starts[k].tolist(), stops[k].tolist()
            i1, i2, j1, j2 = reached_rows[0][k], reached_rows[1][k], reached_columns[0][k], reached_columns[1][k]
            # W_rows[i1:i2, r1:r2] @ crop @ W_cols[j1:j2, c1:c2].T, the second product as (W_cols @ (...).T).T
            along_rows = _banded_product(rows, (i1, i2), (r1, r2), crop.numpy().astype(np.float32))
            block = _banded_product(columns, (j1, j2), (c1, c2), along_rows.T).T >= threshold
            on_rows, on_cols = np.flatnonzero(block.any(axis=1)), np.flatnonzero(block.any(axis=0))
            if on_rows.size == 0:
                crops.append(empty)
                continue
            a1, a2, b1, b2 = on_rows[0], on_rows[-1] + 1, on_cols[0], on_cols[-1] + 1
            crops.append(torch.from_numpy(np.ascontiguousarray(block[a1:a2, b1:b2])))
            y1, y2, x1, x2 = i1 + a1, i1 + a2, j1 + b1, j1 + b2
            offsets[k] = (y1, x1)
            boxes[k] = ((x1 + x2) / 2 / size[1], (y1 + y2) / 2 / size[0], (x2 - x1) / size[1], (y2 - y1) / size[0])
    return InstanceMasks(size, crops, torch.from_numpy(offsets)), torch.from_numpy(boxes)


def masks_to_boxes_cxcywh(masks: torch.Tensor) -> torch.Tensor:
    """``(N, H, W)`` bool -> ``(N, 4)`` cx, cy, w, h in ``[0, 1]``; a box spans the pixel edges it covers."""
    n, height, width = masks.shape
    if n == 0:
        return torch.zeros(0, 4)
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    arange_h, arange_w = torch.arange(height), torch.arange(width)
    y1 = torch.where(rows, arange_h, height).amin(dim=1).float()
    y2 = torch.where(rows, arange_h, -1).amax(dim=1).float() + 1
    x1 = torch.where(cols, arange_w, width).amin(dim=1).float()
    x2 = torch.where(cols, arange_w, -1).amax(dim=1).float() + 1
    return torch.stack([(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height], 1)


class BuildTargetsd(Transform):
    """Instance masks (native resolution) -> one :class:`PromptTarget` per prompt in slice space.

    Masks are resized to the current spatial size of ``image_key`` (S x S after :class:`ResizeToSliced`),
    boxes are computed from the resized masks; an instance that vanishes when shrunk is dropped. A prompt
    without instances is a negative (``is_negative``).

    Args:
        instances_key, labels_key: from :class:`LabelToInstancesd`.
        prompts_key: item key with ``{label value: text}``.
        image_key: the image whose spatial shape sets the target size (or give ``spatial_size``).
        output_key: where the list of targets goes.
        spatial_size: fixed ``S`` or ``(H, W)``; None uses the image's.
        threshold: mask threshold after bilinear resizing.
        remove_instances: drop the native-resolution ``instances`` from the item afterwards (saves memory).
    """

    def __init__(
        self,
        instances_key: str = "instances",
        labels_key: str = "instance_labels",
        prompts_key: str = "prompts",
        image_key: str = "image",
        output_key: str = "targets",
        spatial_size: int | Sequence[int] | None = None,
        threshold: float = 0.5,
        remove_instances: bool = True,
    ) -> None:
        self.instances_key = instances_key
        self.labels_key = labels_key
        self.prompts_key = prompts_key
        self.image_key = image_key
        self.output_key = output_key
        self.spatial_size = spatial_size
        self.threshold = threshold
        self.remove_instances = remove_instances

    def _size(self, d: Mapping[Hashable, Any]) -> tuple[int, int]:
        if self.spatial_size is not None:
            size = (self.spatial_size,) * 2 if isinstance(self.spatial_size, int) else tuple(self.spatial_size)
            return int(size[0]), int(size[1])
        return tuple(int(s) for s in d[self.image_key].shape[-2:])  # type: ignore[return-value]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        instances = d[self.instances_key]
        prompts = parse_prompts(d.get(self.prompts_key), source_name(instances, d, "label")
                                or source_name(d.get("label")))
        if not isinstance(instances, InstanceMasks):
            instances = plain_tensor(instances)
            if instances.ndim != 3:
                raise ValueError(f"'{self.instances_key}' must be (N, H, W) 2D instance masks, "
                                 f"got {tuple(instances.shape)}")
        labels = torch.as_tensor(d[self.labels_key]).long()
        size = self._size(d)
        resized, boxes = resize_instances(instances, size, self.threshold)
        kept = boxes[:, 2] > 0  # an instance that vanished when shrunk has no box
        targets: list[PromptTarget] = []
        for value, text in prompts.items():
            select = (labels == value) & kept
            if bool(select.all()):
                target_masks, target_boxes = resized, boxes
            else:
                target_masks, target_boxes = resized[select], boxes[select]
            targets.append({"label": value, "text": text, "boxes": target_boxes, "masks": target_masks,
                            "is_negative": bool(target_masks.shape[0] == 0)})
        d[self.output_key] = targets
        if self.remove_instances:
            d.pop(self.instances_key, None)
        return d


def _same_thing(a: str, b: str) -> bool:
    """Whether two canonical concepts name the same thing, one more specifically: equal, or the words of one end
    the other's ("lung" / "left lung", "tumor" / "breast tumor"; not "liver" / "liver tumor")."""
    short, long = sorted((a.split(), b.split()), key=len)
    return bool(short) and long[len(long) - len(short):] == short


class RandNegativePromptsd(Randomizable, Transform):
    """Append negative prompts: concepts of a pool that are absent from the image (empty targets).

    A concept counts as present when a positive target has that text, one SAM3 reads the same (the same token ids:
    "kidney(left)" / "Kidney (left)") or a synonym of it (case-insensitive;
    ``datasets_meta/synonyms.json``: "nuclei" present rules out "cell nucleus"), or names the same thing more or
    less specifically (one's words end the other's: "left lung" present rules out "lung", "tumor" rules out
    "breast tumor"); texts already among the targets (present or not) are not sampled again.

    Args:
        concepts: the pool (the dataset's other classes, or other datasets' concepts); an item may give its
            own pool under ``concepts_key``.
        num_negatives: how many to add per item (fewer when the pool is short).
        targets_key: the list from :class:`BuildTargetsd`.
        image_key: sets the (empty) mask size.
        prob: probability of adding negatives to an item at all.
        seed: seed of the sampler (``set_random_state``; a Compose/DataLoader may reseed it).
    """

    def __init__(
        self,
        concepts: Sequence[str] = (),
        num_negatives: int = 1,
        targets_key: str = "targets",
        image_key: str = "image",
        concepts_key: str = "negative_concepts",
        prob: float = 1.0,
        seed: int | None = None,
    ) -> None:
        self.set_random_state(seed)
        self.concepts = list(dict.fromkeys(concepts))
        self.num_negatives = int(num_negatives)
        self.targets_key = targets_key
        self.image_key = image_key
        self.concepts_key = concepts_key
        self.prob = float(prob)
        self._chosen: list[str] = []
        self._canonical: dict[str, str] = {}  # text -> its synonym group's canonical concept (catalogue), memoised

    def _concept(self, text: str) -> str:
        """``text``'s canonical concept: the first of its synonym group, else the text normalised."""
        concept = self._canonical.get(text)
        if concept is None:
            from ..data.catalogue import canonical_concept

            concept = self._canonical[text] = canonical_concept(text)
        return concept

    def randomize(self, pool: Sequence[str]) -> None:
        self._chosen = []
        if self.R.rand() >= self.prob or not pool:
            return
        count = min(self.num_negatives, len(pool))
        picks = self.R.choice(len(pool), size=count, replace=False)
        self._chosen = [pool[i] for i in sorted(picks.tolist())]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        targets = list(d.get(self.targets_key, []))
        from ..networks.tokenizer import prompt_reading

        taken = {self._concept(t["text"]) for t in targets}
        read = {prompt_reading(t["text"]) for t in targets}  # "kidney(left)" reads as "Kidney (left)"
        pool = []
        for concept in dict.fromkeys(d.get(self.concepts_key) or self.concepts):
            reading = prompt_reading(concept)
            if reading in read:  # a target's, or an earlier spelling's in the pool
                continue
            read.add(reading)
            if not any(_same_thing(self._concept(concept), t) for t in taken):
                pool.append(concept)
        self.randomize(pool)
        size = tuple(int(s) for s in d[self.image_key].shape[-2:])
        targets.extend(empty_target(text, size) for text in self._chosen)
        d[self.targets_key] = targets
        return d


class RandBoxPromptsd(Randomizable, Transform):
    """Choose which positive prompts of a training item also carry a box prompt (``box_prompts`` training).

    Each target gets ``box_prompt``: True with probability ``prob`` when it has a target, False for a negative
    prompt (nothing to draw a box around), so that having a box does not tell the network that the concept is
    present: with ``prob`` < 1 some present concepts stay text-only, as Meta's ``TextQueryToVisual(probability,
    keep_text_queries=True)`` leaves them. :func:`~medsam3_monai.engines.collate_find_queries` gives the chosen ones the
    box of their largest component. One draw per target, present or not, so the draws of an item do not depend on
    which of its concepts are present.

    Args:
        prob: probability that a present concept carries its box (1: every one, 0: none).
        targets_key: the list from :class:`BuildTargetsd` (and :class:`RandNegativePromptsd`).
        seed: seed of the draws (``set_random_state``; the bundle reseeds it every epoch).
    """

    def __init__(self, prob: float = 0.5, targets_key: str = "targets", seed: int | None = None) -> None:
        from ..bundle import number_in

        if not number_in(prob, 0.0, 1.0):
            raise ValueError(f"box_prompt_probability must be a number in [0, 1], got {prob!r}")
        self.set_random_state(seed)
        self.prob = float(prob)
        self.targets_key = targets_key
        self._draws = np.zeros(0)

    def randomize(self, count: int) -> None:
        self._draws = self.R.rand(count)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        targets = [dict(target) for target in d.get(self.targets_key, [])]
        self.randomize(len(targets))
        for target, draw in zip(targets, self._draws):
            target["box_prompt"] = bool(not target.get("is_negative") and draw < self.prob)
        d[self.targets_key] = targets
        return d
