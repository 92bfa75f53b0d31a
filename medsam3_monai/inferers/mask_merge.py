"""The native-size label map of a volume slice's binary masks, each prompt's mask resized only inside its box.

A volume's slices come out of the detector and the tracker as one binary mask per prompt
(:class:`~.bitmasks.BitMasks`). Their way back is MONAI ``Invertd``'s bilinear resize of the mask logits
(``MASK_LOGIT`` on the mask, ``EMPTY_LOGIT`` elsewhere; mask = logit > 0) and of the confidence (the mask times the
slice's score), then the merge by maximum confidence (:class:`~.postprocess.MergePromptsd`). An output pixel whose
bilinear taps all lie outside a prompt's mask gets ``EMPTY_LOGIT`` from it and is not claimed, so each prompt needs
resizing only on the outputs whose taps reach its mask's box. :func:`mask_label_index` makes a prompt's two maps on
the slice-space rows and columns those outputs read, resizes them with the dense resize's arithmetic
(:func:`~medsam3_monai.transforms.slices.bilinear_two_pass`) and merges prompt by prompt: a pixel goes to the
claimant of highest confidence, the earlier prompt on a tie, as ``merge_classes`` decides. The work follows the
masks' boxes at the slice's size instead of 2 x P float maps of S x S (41 TotalSegmentator classes at 1008 px:
``scripts/bench_eval.py``, ``volume_way_back_1008``).

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

from ..transforms.slices import bilinear_two_pass
from .bitmasks import BitMasks
from .boundary_merge import _Axis, _axis, _Confidence, _dense_index
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


def _taps(axis: _Axis, outputs: slice) -> tuple[slice, tuple[torch.Tensor, ...]]:
    """The source range that ``outputs`` read, and their taps (offset into that range) and weights."""
    first, second, first_weight, second_weight = (t[outputs] for t in axis.weights)
    low = int(first[0])
    return slice(low, int(second[-1]) + 1), (first - low, second - low, first_weight, second_weight)


_Window = tuple[tuple[slice, slice], tuple[slice, slice], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]


def _window(bits: np.ndarray, width: int, rows: _Axis, columns: _Axis) -> _Window | None:
    """One packed (S, ceil(S / 8)) mask -> the outputs its box reaches (rows, columns), the slice-space rows and
    columns they read, and their row and column taps; None for an empty mask or one that no output reads."""
    set_rows = np.flatnonzero(bits.any(1))
    if set_rows.size == 0:
        return None
    top, bottom = int(set_rows[0]), int(set_rows[-1])
    set_columns = np.flatnonzero(np.unpackbits(np.bitwise_or.reduce(bits[top:bottom + 1], axis=0), count=width))
    out_rows, out_columns = _reaching(rows, top, bottom), _reaching(columns, int(set_columns[0]),
                                                                    int(set_columns[-1]))
    if out_rows is None or out_columns is None:
        return None
    (source_rows, row_taps), (source_columns, column_taps) = _taps(rows, out_rows), _taps(columns, out_columns)
    return (out_rows, out_columns), (source_rows, source_columns), row_taps, column_taps


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
    if not _rounds_as_two_pass(num_prompts, (height, width)):  # small, or 3 prompts on 1 thread: Invertd's resize
        logits, confidence = mask_maps(bits.unpack(), scores)
        weights = _Confidence(None, confidence, (height, width), tuple(logits.shape))
        whole = num_prompts * height * width  # one tile: F.interpolate of the whole slice, as Invertd
        return _dense_index(logits, (height, width), threshold, weights, progress, whole).numpy()
    rows, columns = _axis(h, height), _axis(w, width)
    index = np.zeros((height, width), np.uint8 if num_prompts + 1 <= 255 else np.int32)
    best = np.full((height, width), -np.inf, np.float32)  # the confidence of each pixel's claimant so far
    packed = bits.bits.numpy()
    for prompt in range(num_prompts):
        window = _window(packed[prompt], w, rows, columns)
        if window is None:
            continue
        outputs, (source_rows, source_columns), row_taps, column_taps = window
        mask = torch.from_numpy(np.unpackbits(packed[prompt, source_rows], axis=-1, count=w)[:, source_columns]
                                .view(np.bool_))
        maps = torch.cat(mask_maps(mask[None], scores[prompt:prompt + 1]))  # (2, h', w'): logits, confidence
        logits, confidence = bilinear_two_pass(maps, row_taps, column_taps).numpy()
        claimed, so_far = index[outputs], best[outputs]  # views
        wins = (logits > threshold) & (confidence > so_far)  # strict: the earlier prompt keeps a tie
        claimed[wins] = prompt + 1
        so_far[wins] = confidence[wins]
    if progress is not None:
        progress(height)
    return index
