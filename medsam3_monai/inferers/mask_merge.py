"""The native-size label map of a volume slice's binary masks, each prompt's mask resized only inside its box.

A volume's slices come out of the detector and the tracker as one binary mask per prompt
(:class:`~.bitmasks.BitMasks`). Their way back is MONAI ``Invertd``'s bilinear resize of the mask logits
(``MASK_LOGIT`` on the mask, ``EMPTY_LOGIT`` elsewhere; mask = logit > 0) and of the confidence (the mask times the
slice's score), then the merge by maximum confidence (:class:`~.postprocess.MergePromptsd`). An output pixel whose
bilinear taps all lie outside a prompt's mask gets ``EMPTY_LOGIT`` from it and is not claimed, so each prompt needs
resizing only on the outputs whose taps reach its mask's box. Inside the box, a bilinear value is a convex
combination of its (up to) four taps, so an output whose taps all lie in the mask has the logit ``MASK_LOGIT`` and
one whose taps all lie outside it ``EMPTY_LOGIT``, up to rounding far from the threshold: :func:`mask_label_index`
sorts a box's outputs by their taps with boolean gathers and computes the dense resize's arithmetic
(:func:`~medsam3_monai.transforms.slices.bilinear_two_pass`, value by value) only for the outputs on the mask's
boundary, every prompt's at once. It merges prompt by prompt: a pixel goes to the claimant of highest confidence,
the earlier prompt on a tie, as ``merge_classes`` decides; the confidences are computed, the same way, only where a
second prompt claims a pixel on either mask's boundary (inside both masks they are the two scores, interpolated
alike: the scores decide, unless they are within rounding of each other). The work follows the masks' boxes at the
slice's size, and the float arithmetic their boundaries, instead of 2 x P float maps of S x S (41 TotalSegmentator
classes at 1008 px: ``scripts/bench_eval.py``, ``volume_way_back_1008``; a slice-filling mask:
``volume_way_back_full``; every class claiming the whole body: ``volume_way_back_overlapping``).

The label map is ``Invertd``'s (``tests/test_mask_merge.py``). Only a tie could differ -- a pixel whose bilinear
logit is exactly 0 (say a mask edge half-way between two taps), which float rounding decides -- and ATen's CPU
resize rounds in two ways, depending on the output's shape and the thread count (``CHANNELS_LAST_MAX_SIDES``).
Where it takes the way ``bilinear_two_pass`` does not reproduce (small outputs; 3 prompts on one thread), the masks
are resized densely by ``F.interpolate`` itself, as ``Invertd`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .bitmasks import BitMasks
from .boundary_merge import MARGIN, _Axis, _axis, _Confidence, _dense_index
from .protocols import EMPTY_LOGIT, MASK_LOGIT

__all__ = ["CHANNELS_LAST_MAX_SIDES", "mask_label_index", "mask_logits", "mask_maps"]

#: ATen's CPU bilinear resize (``F.interpolate``, so MONAI ``Invertd``) takes its channels-last kernel, which rounds
#: differently from the generic one that ``bilinear_two_pass`` reproduces, for outputs of H + W up to this many
#: pixels (``_use_vectorized_kernel_cond_2d``) and for 3 channels on one thread (torch 2.x)
CHANNELS_LAST_MAX_SIDES = 128


def mask_logits(masks: torch.Tensor) -> torch.Tensor:
    """Bool masks -> the mask logits they stand for, float32: ``MASK_LOGIT`` on the mask, ``EMPTY_LOGIT`` elsewhere."""
    return torch.where(masks, MASK_LOGIT, EMPTY_LOGIT).float()


def mask_maps(masks: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, h, w) bool masks and their (P,) scores -> the maps their way back resizes: mask logits
    (:func:`mask_logits`) and confidence (the mask times the score), float32."""
    scores = torch.as_tensor(scores, dtype=torch.float32).to(masks.device).reshape(-1, 1, 1)
    return mask_logits(masks), torch.where(masks, scores, 0.0)


def _rounds_as_two_pass(channels: int, size: tuple[int, int]) -> bool:
    """Whether ``F.interpolate`` resizes (1, channels, h, w) to ``size`` on the CPU with ``bilinear_two_pass``'s
    arithmetic, so that a tie (a bilinear logit that is 0 but for rounding) falls the same way."""
    return size[0] + size[1] > CHANNELS_LAST_MAX_SIDES and not (channels == 3 and torch.get_num_threads() == 1)


def _reaching(axis: _Axis, low: int, high: int) -> slice | None:
    """The outputs along ``axis`` that have a tap in ``[low, high]``, or None. Taps never decrease, so they are a
    range, and every output outside it reads taps outside ``[low, high]`` only."""
    start = int(np.searchsorted(axis.second, low, "left"))
    stop = int(np.searchsorted(axis.first, high, "right"))
    return slice(start, stop) if start < stop else None


def _window(bits: np.ndarray, width: int, rows: _Axis, columns: _Axis) -> tuple[slice, slice] | None:
    """One packed (S, ceil(S / 8)) mask -> the outputs its box reaches (rows, columns); None for an empty mask or
    one that no output reads."""
    set_rows = np.flatnonzero(bits.any(1))
    if set_rows.size == 0:
        return None
    top, bottom = int(set_rows[0]), int(set_rows[-1])
    set_columns = np.flatnonzero(np.unpackbits(np.bitwise_or.reduce(bits[top:bottom + 1], axis=0), count=width))
    out_rows, out_columns = _reaching(rows, top, bottom), _reaching(columns, int(set_columns[0]),
                                                                    int(set_columns[-1]))
    if out_rows is None or out_columns is None:
        return None
    return out_rows, out_columns


def _tap_extent(bits: np.ndarray, width: int, rows: _Axis, columns: _Axis, outputs: tuple[slice, slice]
                ) -> tuple[np.ndarray, np.ndarray]:
    """The outputs ``outputs`` of one packed mask: (H', W') bool each, whether all of an output's taps lie in the
    mask, and whether any does (boolean gathers: rows first when there are fewer output rows than source rows, as
    gathering rows copies them whole, else columns first)."""
    (row_range, row_first, row_second), (column_range, column_first, column_second) = (
        _local_taps(axis, out) for axis, out in ((rows, outputs[0]), (columns, outputs[1])))
    mask = np.unpackbits(bits[row_range], axis=-1, count=width)[:, column_range].view(np.bool_)
    if row_first.size < mask.shape[0]:
        upper, lower = mask[row_first], mask[row_second]  # (H', w')
        every, some = upper & lower, upper | lower
        return every[:, column_first] & every[:, column_second], some[:, column_first] | some[:, column_second]
    left, right = mask[:, column_first], mask[:, column_second]  # (h', W')
    every, some = left & right, left | right
    return every[row_first] & every[row_second], some[row_first] | some[row_second]


def _local_taps(axis: _Axis, outputs: slice) -> tuple[slice, np.ndarray, np.ndarray]:
    """The source range that ``outputs`` read, and their two taps offset into it."""
    first, second = axis.first[outputs], axis.second[outputs]
    low = int(first[0])
    return slice(low, int(second[-1]) + 1), first - low, second - low


def _nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows and columns of a 2D bool array's True entries (as ``np.nonzero``, ten times sooner)."""
    return np.divmod(np.flatnonzero(mask), mask.shape[1])


def _values_at(packed: np.ndarray, prompts: np.ndarray, ys: np.ndarray, xs: np.ndarray, rows: _Axis,
               columns: _Axis, inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """The dense resize's values at chosen outputs, computed one by one: at output ``(ys[k], xs[k])`` of the slice,
    the map of packed mask ``packed[prompts[k]]`` ((P, S, ceil(S / 8)) bits) that is ``inside`` (a scalar or (K,))
    on the mask and ``outside`` elsewhere, float32 -- with
    :func:`~medsam3_monai.transforms.slices.bilinear_two_pass`'s arithmetic (along the columns, then the rows,
    ``w0 * x0 + (w1 * x1)``), so each value is the one the resize of the whole map gives. (K,) float32."""
    source_rows = np.stack([rows.first[ys], rows.second[ys]])[[0, 0, 1, 1]]  # the 4 taps: (r1, c1), (r1, c2),
    source_columns = np.stack([columns.first[xs], columns.second[xs]])[[0, 1, 0, 1]]  # (r2, c1), (r2, c2)
    bits = packed[prompts, source_rows, source_columns >> 3] >> (7 - (source_columns & 7)).astype(np.uint8)
    taps = torch.where(torch.from_numpy((bits & 1).view(np.bool_)), inside, outside)  # (4, K)
    first, second = (torch.from_numpy(weight[xs]) for weight in (columns.first_weight, columns.second_weight))
    along_columns = torch.addcmul(taps[[1, 3]] * second, taps[[0, 2]], first)  # rows r1 and r2: (2, K)
    first, second = (torch.from_numpy(weight[ys]) for weight in (rows.first_weight, rows.second_weight))
    return torch.addcmul(along_columns[1] * second, along_columns[0], first)


#: two scores further apart than this fraction of the larger keep their order through any bilinear weights
#: (float32 rounding moves a value by a few units of 1e-7)
SCORE_GAP = 1e-5


def _contest_by_scores(mine: float, held: np.ndarray, both_inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contested pixels settled without interpolating: ``(keep, open)``: whether the owner keeps each pixel, and
    the indices of those still to compute.

    Where both claimants have every tap in their masks (``both_inside``), each confidence is its score interpolated
    with the same weights, and rounding never reverses an order: a score at most the owner's (``held``) never
    wins (it is not strictly greater), one above it by more than ``SCORE_GAP`` always does. Scores closer than that,
    and pixels on either mask's boundary, stay open."""
    gap = mine - held
    decided = both_inside & ((gap <= 0) | (gap > SCORE_GAP * np.maximum(abs(mine), np.abs(held)) + 1e-30))
    return gap <= 0, np.flatnonzero(~decided)


def mask_label_index(
    masks: BitMasks | torch.Tensor,
    scores: torch.Tensor | Sequence[float],
    size: Sequence[int],
    threshold: float = 0.0,
    progress: Callable[[int], object] | None = None,
) -> np.ndarray:
    """Binary slice-space masks -> the label index that resizing their mask logits and confidences bilinearly to
    ``size`` (MONAI ``Invertd``), thresholding and merging give.

    Args:
        masks: (P, h, w) masks, :class:`~.bitmasks.BitMasks` or bool.
        scores: (P,) each mask's score on the slice (its confidence is the mask times the score).
        size: the output (H, W); any size (bilinear, ``align_corners=False``).
        threshold: mask = resized logit > ``threshold``.
        progress: called with H when done (a progress bar's ``update``).

    Returns:
        (H, W) numpy uint8 (int32 beyond 254 prompts): 0 background, c + 1 = prompt c.
    """
    bits = masks if isinstance(masks, BitMasks) else BitMasks.pack(torch.as_tensor(masks).bool())
    num_prompts, h, w = bits.shape
    scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    if scores.numel() != num_prompts:
        raise ValueError(f"{scores.numel()} scores for {num_prompts} masks")
    height, width = int(size[0]), int(size[1])
    margin = MARGIN * max(abs(MASK_LOGIT), abs(EMPTY_LOGIT), abs(threshold))
    if not EMPTY_LOGIT + margin < threshold:
        raise ValueError(f"threshold {threshold} must lie above EMPTY_LOGIT ({EMPTY_LOGIT}): every pixel outside the "
                         "masks would be claimed")
    if not _rounds_as_two_pass(num_prompts, (height, width)):  # small, or 3 prompts on 1 thread: Invertd's resize
        logits, confidence = mask_maps(bits.unpack(), scores)
        weights = _Confidence(None, confidence, (height, width), tuple(logits.shape))
        whole = num_prompts * height * width  # one tile: F.interpolate of the whole slice, as Invertd
        return _dense_index(logits, (height, width), threshold, weights, progress, whole).numpy()
    rows, columns = _axis(h, height), _axis(w, width)
    index = np.zeros((height, width), np.uint8 if num_prompts + 1 <= 255 else np.int32)
    packed = bits.bits.numpy()
    mask_logit, empty_logit = torch.tensor(MASK_LOGIT), torch.tensor(EMPTY_LOGIT)  # float32, as mask_logits makes
    inside_claims = MASK_LOGIT - margin > threshold  # else the logits inside a mask are computed too
    zero = torch.tensor(0.0)
    # each prompt's box: its outputs decided by their taps, and the ones left to compute (window coordinates)
    boxes = []
    for prompt in range(num_prompts):
        outputs = _window(packed[prompt], w, rows, columns)
        if outputs is not None:
            every, some = _tap_extent(packed[prompt], w, rows, columns, outputs)
            boxes.append((prompt, outputs, every, *_nonzero(some & ~every if inside_claims else some)))
    above: list[np.ndarray] = []
    if boxes:  # the logits left to compute, of every prompt at once
        counts = [ys.size for *_, ys, _ in boxes]
        logits = _values_at(packed, np.repeat([box[0] for box in boxes], counts),
                            np.concatenate([ys + outputs[0].start for _, outputs, _, ys, _ in boxes]),
                            np.concatenate([xs + outputs[1].start for _, outputs, _, _, xs in boxes]),
                            rows, columns, mask_logit, empty_logit)
        above = np.split((logits > threshold).numpy(), np.cumsum(counts)[:-1])
    owner_inside = np.zeros((height, width), bool)  # whether a pixel's owner has all four of its taps in its mask
    score_values = scores.numpy().astype(np.float64)
    for (prompt, outputs, every, ys, xs), claimed_there in zip(boxes, above):
        claims = every.copy() if inside_claims else np.zeros_like(every)  # every stays: all taps in the mask
        claims[ys, xs] = claimed_there
        claimed = index[outputs]  # a view
        ys, xs = _nonzero(claims & (claimed != 0)) if claimed.any() else (np.empty(0, np.int64),) * 2
        if ys.size:  # a second claimant: the more confident one keeps the pixel (strict: the earlier on a tie)
            owners = claimed[ys, xs].astype(np.int64) - 1
            keep, open_ = _contest_by_scores(score_values[prompt], score_values[owners],
                                             owner_inside[outputs][ys, xs] & every[ys, xs])
            if open_.size:
                top, left = outputs[0].start, outputs[1].start  # (ys + top, xs + left): the slice's outputs
                o_ys, o_xs, o_owners = ys[open_] + top, xs[open_] + left, owners[open_]
                held = _values_at(packed, o_owners, o_ys, o_xs, rows, columns, scores[o_owners], zero)
                mine = _values_at(packed, np.full(open_.size, prompt), o_ys, o_xs, rows, columns, scores[prompt],
                                  zero)
                keep[open_] = ~(mine > held).numpy()
            claims[ys[keep], xs[keep]] = False
        np.copyto(claimed, prompt + 1, where=claims)
        np.copyto(owner_inside[outputs], every, where=claims)
    if progress is not None:
        progress(height)
    return index
