"""The native-size label map of slice-space logits, computed exactly but only near the masks' boundaries.

Going back to a picture's own size is a bilinear resize of each prompt's (h, w) mask logits to (H, W), then
``mask = logit > threshold`` and, where several prompts claim a pixel, the most confident one
(:func:`~medsam3_monai.metrics.merge.merge_classes`). A bilinear value is a convex combination of its 2 x 2
source taps, so wherever all four taps of every prompt lie clearly on one side of the threshold, the
thresholded value is known without interpolating:

* every prompt's taps below the threshold -> background;
* one prompt's taps all above it, every other prompt's all below -> that prompt;
* otherwise (a boundary, or two prompts overlapping) the pixel is *open*: its logits are interpolated with
  the arithmetic of :func:`~medsam3_monai.transforms.slices.upsample_rows` and merged by the usual rule.

"Clearly" means beyond a margin of ``MARGIN x`` the largest |logit| (the float rounding of a two-tap
interpolation is below ``1e-6 x``), so a decided pixel is what the dense resize gives, and an open one is
computed as the dense resize computes it: the label map equals the dense one's
(``tests/test_boundary_merge.py``). The work at native size is one gather of the (h, w) block labels and a pass
over the open pixels, a few per cent of a typical picture. A row tile where open pixels are many (noisy
logits, prompts that overlap widely) is resized densely instead, which is then cheaper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import torch

from ..metrics.merge import merge_classes
from ..transforms.intensity import row_tiles
from ..transforms.slices import bilinear_weights, upsample_rows

__all__ = ["MARGIN", "boundary_label_index"]

#: decided taps lie beyond this fraction of the largest |logit| (or |threshold|) from the threshold
MARGIN = 1e-5
#: an open pixel costs about this many pixels of a dense resize: a row tile with more open pixels than its
#: pixels / DENSE_BREAK_EVEN is resized densely
DENSE_BREAK_EVEN = 6


class _Axis:
    """Bilinear interpolation along one axis (:func:`bilinear_weights`, shared and read-only): per output index its
    two taps and weights, as torch tensors and numpy arrays; and per source index ``i`` the outputs whose first tap
    is ``i``, ``start[i]:start[i] + count[i]`` (first taps never decrease)."""

    def __init__(self, in_size: int, out_size: int) -> None:
        self.weights = bilinear_weights(in_size, out_size)
        self.first, self.second, self.first_weight, self.second_weight = (t.numpy() for t in self.weights)
        self.count = np.bincount(self.first, minlength=in_size)
        self.start = np.cumsum(self.count) - self.count


@lru_cache(maxsize=64)
def _axis(in_size: int, out_size: int) -> _Axis:
    return _Axis(in_size, out_size)


def _block_all(x: np.ndarray) -> np.ndarray:
    """(P, h, w) bool -> (P, h, w): True where the 2 x 2 taps of block (i, j) -- rows i, i + 1 and columns j, j + 1,
    the last row and column repeated at the border -- are all True."""
    x = x.copy()
    x[:, :-1] &= x[:, 1:]
    x[:, :, :-1] &= x[:, :, 1:]
    return x


def _block_index(maps: np.ndarray, threshold: float, open_mark: int, dtype: type) -> np.ndarray:
    """(P, h, w) logits -> (h, w) block labels: 0 background, c + 1 prompt c, ``open_mark`` undecided."""
    finite = np.abs(maps[np.isfinite(maps)]) if maps.size else maps
    margin = MARGIN * max(float(finite.max()) if finite.size else 0.0, abs(threshold)) + 1e-30
    above = _block_all(maps > threshold + margin)
    not_below = ~_block_all(maps <= threshold - margin)
    if maps.shape[0] == 1:
        return np.where(above[0], 1, np.where(not_below[0], open_mark, 0)).astype(dtype)
    claims = not_below.sum(0)
    index = np.where(claims == 0, 0, not_below.argmax(0) + 1)
    decided = (claims == 0) | ((claims == 1) & above.any(0))
    return np.where(decided, index, open_mark).astype(dtype)


def _along_columns(maps: torch.Tensor, slice_rows: np.ndarray, columns: _Axis, q: np.ndarray) -> torch.Tensor:
    """(P, h, w) maps interpolated along the columns only, at slice rows ``slice_rows`` and output columns ``q``
    (both (K,)) -> (P, K), as ``upsample_rows`` computes its first pass."""
    flat, width = maps.reshape(maps.shape[0], -1).numpy(), maps.shape[-1]
    at = slice_rows * width
    first = torch.from_numpy(np.take(flat, at + columns.first[q], axis=1))
    second = torch.from_numpy(np.take(flat, at + columns.second[q], axis=1))
    return torch.addcmul(second * torch.from_numpy(columns.second_weight[q]), first,
                         torch.from_numpy(columns.first_weight[q]))


def _open_values(maps: torch.Tensor, rows: _Axis, columns: _Axis, pair_rows: np.ndarray, pair_columns: np.ndarray
                 ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The bilinear values of the open pixels of K (slice row, output column) pairs: each pair stands for the output
    rows whose first tap is that slice row. Returns (P, N) values and their output rows and columns (N,), computed
    as ``upsample_rows`` computes them (columns first, once per pair; then rows)."""
    top = _along_columns(maps, pair_rows, columns, pair_columns)
    bottom = _along_columns(maps, rows.second[rows.start[pair_rows]], columns, pair_columns)
    repeats = rows.count[pair_rows]
    pair = np.repeat(np.arange(pair_rows.size), repeats)
    o = rows.start[pair_rows][pair] + (np.arange(pair.size) - (np.cumsum(repeats) - repeats)[pair])
    top, bottom = (torch.from_numpy(np.take(x.numpy(), pair, axis=1)) for x in (top, bottom))
    values = torch.addcmul(bottom * torch.from_numpy(rows.second_weight[o]), top, torch.from_numpy(rows.first_weight[o]))
    return values, o, pair_columns[pair]


class _Confidence:
    """The merge's per-prompt confidence at output pixels: ``scores * sigmoid(logit)`` (or ``sigmoid(logit)``), or
    given maps: (P, H, W) at the output size, or (P, h, w) in slice space, resized bilinearly like the logits."""

    def __init__(self, scores: torch.Tensor | None, maps: torch.Tensor | None, size: tuple[int, int],
                 slice_shape: tuple[int, ...]) -> None:
        self.scores = None if scores is None else torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
        self.maps = None if maps is None else maps.detach().float().cpu().contiguous()
        self.size = size
        self.native = self.maps is not None and tuple(self.maps.shape) == (slice_shape[0], *size)
        if self.maps is not None and not self.native and tuple(self.maps.shape) != tuple(slice_shape):
            raise ValueError(f"confidence maps {tuple(self.maps.shape)} fit neither the logits {tuple(slice_shape)} "
                             f"nor the output {(slice_shape[0], *size)}")

    def of_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scores is None:
            return logits.sigmoid()
        return self.scores.reshape(-1, *([1] * (logits.ndim - 1))) * logits.sigmoid()

    def tile(self, logits: torch.Tensor, start: int, stop: int, columns: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(P, stop - start, W) for output rows ``start:stop``."""
        if self.maps is None:
            return self.of_logits(logits)
        if self.native:
            return self.maps[:, start:stop]
        return upsample_rows(self.maps, self.size, start, stop, columns)

    def pixels(self, logits: torch.Tensor, o: np.ndarray, q: np.ndarray,
               values: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(P, N) at output pixels (``o``, ``q``); ``values`` resizes slice-space maps to them."""
        if self.maps is None:
            return self.of_logits(logits)
        if self.native:
            return torch.from_numpy(np.take(self.maps.reshape(self.maps.shape[0], -1).numpy(), o * self.size[1] + q,
                                            axis=1))
        return values(self.maps)


def _merged(logits: torch.Tensor, confidence: Callable[[], torch.Tensor], threshold: float) -> np.ndarray:
    """(P, ...) logits -> label index (...): the mask of a single prompt, else the most confident claimant."""
    masks = logits > threshold
    if logits.shape[0] == 1:
        return masks[0].numpy().view(np.uint8)
    if logits.ndim == 2:  # merge_classes takes (C, H, W)
        return merge_classes(confidence()[:, None], masks[:, None])[0].numpy()
    return merge_classes(confidence(), masks).numpy()


def _tiles(rows: _Axis, height: int, width: int, channels: int) -> list[tuple[int, int]]:
    """Output row tiles (:func:`row_tiles`) moved to whole block rows: (first, one past the last) slice row."""
    starts = sorted({int(rows.first[start]) for start, _ in row_tiles(height, width, channels)})
    return list(zip(starts, starts[1:] + [int(rows.first[-1]) + 1]))


def boundary_label_index(
    maps: torch.Tensor,
    size: Sequence[int],
    threshold: float = 0.0,
    scores: torch.Tensor | None = None,
    confidence: torch.Tensor | None = None,
    progress: Callable[[int], object] | None = None,
) -> np.ndarray:
    """Slice-space logits -> the label index at ``size`` that thresholding and merging their bilinear resize gives.

    Args:
        maps: (P, h, w) mask logits (mask = logit > ``threshold``).
        size: the output (H, W); any size (bilinear, ``align_corners=False``).
        scores: (P,) prompt scores: the merge's confidence is ``scores * sigmoid(logit)`` (None: ``sigmoid(logit)``).
        confidence: instead, per-prompt confidence maps: (P, H, W), or (P, h, w) resized bilinearly like ``maps``.
        progress: called with the number of output rows after each row tile (a progress bar's ``update``).

    Returns:
        (H, W) numpy uint8 (int32 beyond 254 prompts): 0 background, c + 1 = prompt c.
    """
    maps = maps.detach().float().cpu().contiguous()
    num_prompts, h, w = maps.shape
    height, width = int(size[0]), int(size[1])
    open_mark = num_prompts + 1
    rows, columns = _axis(h, height), _axis(w, width)
    blocks = _block_index(maps.numpy(), float(threshold), open_mark, np.uint8 if open_mark <= 255 else np.int32)
    open_columns = (blocks == open_mark).take(columns.first, axis=1)  # (h, W): block row i, output column
    index = blocks.take(columns.first, axis=1).take(rows.first, axis=0)
    if not open_columns.any():
        return index
    flat = index.reshape(-1)
    weights = _Confidence(scores, confidence, (height, width), tuple(maps.shape))
    pair_rows, pair_columns = np.divmod(np.flatnonzero(open_columns), width)
    for low, high in _tiles(rows, height, width, num_prompts):
        start, stop = int(rows.start[low]), int(rows.start[high - 1] + rows.count[high - 1])
        first, last = np.searchsorted(pair_rows, [low, high])
        tile_rows, tile_columns = pair_rows[first:last], pair_columns[first:last]
        opened = int(rows.count[tile_rows].sum())
        if opened == 0:
            pass
        elif opened * DENSE_BREAK_EVEN >= (stop - start) * width:
            logits = upsample_rows(maps, (height, width), start, stop, columns.weights)
            index[start:stop] = _merged(logits, lambda: weights.tile(logits, start, stop, columns.weights), threshold)
        else:
            logits, o, q = _open_values(maps, rows, columns, tile_rows, tile_columns)
            flat[o * width + q] = _merged(logits, lambda: weights.pixels(
                logits, o, q, lambda m: _open_values(m, rows, columns, tile_rows, tile_columns)[0]), threshold)
        if progress is not None:
            progress(stop - start)
    return index
