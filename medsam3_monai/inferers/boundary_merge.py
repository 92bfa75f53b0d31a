"""The native-size label map of slice-space logits, computed exactly but only near the masks' boundaries.

Going back to a picture's own size is a bilinear resize of each prompt's (h, w) mask logits to (H, W), then
``mask = logit > threshold`` and, where several prompts claim a pixel, the most confident one
(:func:`~medsam3_monai.metrics.merge.merge_classes`). A bilinear value is a convex combination of its source
taps, so wherever every prompt's taps lie clearly on one side of the threshold, the thresholded value is known
without interpolating:

* every prompt below the threshold -> background;
* one prompt above it, every other one below -> that prompt;
* otherwise (a boundary, or two prompts overlapping) the pixel stays *open*.

This is decided in three steps, each on fewer pixels than the last:

1. per *block* (the 2 x 2 taps shared by the outputs between two source rows and two source columns);
2. in open blocks, per *column segment* (one output column between two source rows): the interpolation along
   the columns -- ``upsample_rows``'s first pass -- gives the two values the segment's outputs are convex
   combinations of;
3. the remaining pixels: the second pass, then threshold and merge as the dense resize does.

Blocks and segments are written at (h, W) and expanded to (H, W) by copying rows. "Clearly" means beyond a margin
of ``MARGIN x`` the largest |logit| (the float rounding of a two-tap interpolation is below ``1e-6 x``), so a
decided pixel is what the dense resize gives, and an open one is computed with
:func:`~medsam3_monai.transforms.slices.upsample_rows`'s arithmetic. A row tile where open segments are many (noisy
logits, prompts that overlap widely), or an output with fewer than ``BLOCK_MIN_UPSCALE`` times the logits' pixels
(a block per output pixel: a 1008 px map and a smaller picture), is resized densely instead,
which is then cheaper: with ``torch.nn.functional.interpolate`` (MONAI ``Invertd``'s resize) when it is the whole
picture, else ``upsample_rows``. The label map is the one of MONAI's dense inverse up to float rounding: only a pixel
whose bilinear logit lies within rounding (about ``1e-6 x`` the largest |logit|) of the threshold, or whose two
best confidences are that close, can differ (``tests/test_boundary_merge.py``).

A prompt may also have several maps (``groups``: the kept queries of ``threshold``, each resized on its own): its
mask is the union of theirs and its logit at a pixel the largest of theirs, so the steps above decide per prompt
("clearly above" when one of its maps is, "not clearly below" when one is not) and open pixels take each prompt's
largest interpolated value.

All of this is for the host. Maps on an accelerator are resized densely where they are (a few kernels per row
tile), and only the (H, W) uint8 label index is copied to the host instead of P float maps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics.merge import merge_classes
from ..transforms.intensity import MAX_TILE_ELEMENTS, row_tiles
from ..transforms.slices import bilinear_weights, upsample_rows
from .image import confidence_of

__all__ = ["MARGIN", "boundary_label_index", "group_max", "merged_index"]

#: decided taps lie beyond this fraction of the largest |logit| (or |threshold|) from the threshold
MARGIN = 1e-5
#: an open segment's pixel costs about this many pixels of a dense resize: a row tile with more open-segment
#: pixels than its pixels / DENSE_BREAK_EVEN is resized densely
DENSE_BREAK_EVEN = 6
#: the block method needs the output to have at least this many times the logits' pixels (each block
#: standing for a few outputs); a smaller output is resized densely
BLOCK_MIN_UPSCALE = 2
#: maps on an accelerator are resized densely there, in row tiles of about this many floats (all prompts together)
DEVICE_TILE_ELEMENTS = 1 << 25


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


class _Groups:
    """Maps in consecutive groups, one group per prompt (``sizes``: maps per prompt): a prompt's mask is the union of
    its maps' masks and its logit the largest of theirs. ``None`` stands for one map per prompt (nothing to do)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        sizes = [int(n) for n in sizes]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"groups must give each prompt at least one map, got {sizes}")
        self.count = len(sizes)
        self.starts = np.cumsum([0, *sizes[:-1]])
        self.ranges = [(int(a), int(a) + n) for a, n in zip(self.starts, sizes)]

    def any(self, x: np.ndarray) -> np.ndarray:
        """(maps, ...) bool -> (prompts, ...): whether any of a prompt's maps is True."""
        return np.logical_or.reduceat(x, self.starts, axis=0)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """(maps, ...) -> (prompts, ...): the largest of a prompt's maps' values."""
        if x.device.type == "cpu":
            return torch.from_numpy(np.maximum.reduceat(x.numpy(), self.starts, axis=0))
        return torch.stack([x[a:b].amax(dim=0) for a, b in self.ranges])


def group_max(maps: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
    """(M, ...) maps in consecutive groups of ``groups`` maps -> (len(groups), ...), the largest value of each group's
    maps (a prompt's logit when its mask is the union of its maps' masks)."""
    return _Groups(groups).max(maps)


def _any_of(x: np.ndarray, groups: _Groups | None) -> np.ndarray:
    return x if groups is None else groups.any(x)


def _max_of(x: torch.Tensor, groups: _Groups | None) -> torch.Tensor:
    return x if groups is None else groups.max(x)


def _labels(above: np.ndarray, not_below: np.ndarray, open_mark: int) -> np.ndarray:
    """Per-prompt (P, ...) "clearly above" and "not clearly below" -> (...) labels: 0 background, c + 1 when prompt c
    alone claims and is clearly above, ``open_mark`` otherwise."""
    if above.shape[0] == 1:  # open_mark is 2: 2 x not_below - above (above implies not below)
        return np.ascontiguousarray(not_below[0]).view(np.uint8) * np.uint8(2) \
            - np.ascontiguousarray(above[0]).view(np.uint8)
    claims = not_below.sum(0)
    index = np.where(claims == 0, 0, not_below.argmax(0) + 1)
    return np.where((claims == 0) | ((claims == 1) & above.any(0)), index, open_mark)


def _block_all(x: np.ndarray) -> np.ndarray:
    """(P, h, w) bool -> the same array, in place: True where the 2 x 2 taps of block (i, j) -- rows i, i + 1 and
    columns j, j + 1, the last row and column repeated at the border -- are all True."""
    x[:, :-1] &= x[:, 1:]
    x[:, :, :-1] &= x[:, :, 1:]
    return x


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenated ranges ``starts[k]:starts[k] + counts[k]`` (int64)."""
    out = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    out += np.arange(out.size)
    return out


class _Segments:
    """Open column segments: K (source row, output column) pairs, each standing for the outputs of that column whose
    first row tap is that source row; their interpolation along the columns (``upsample_rows``'s first pass)."""

    def __init__(self, rows: _Axis, columns: _Axis, source_rows: np.ndarray, output_columns: np.ndarray) -> None:
        self.rows, self.source_rows, self.output_columns = rows, source_rows, output_columns
        self.left, self.right = np.take(columns.first, output_columns), np.take(columns.second, output_columns)
        self.left_weight = torch.from_numpy(np.take(columns.first_weight, output_columns))
        self.right_weight = torch.from_numpy(np.take(columns.second_weight, output_columns))
        self.lower_rows = np.take(rows.second, np.take(rows.start, source_rows))

    def along_columns(self, maps: np.ndarray) -> torch.Tensor:
        """(P, h, w) maps -> (P, 2, K): their column-interpolated values on each segment's upper and lower source
        rows."""
        flat = maps.reshape(maps.shape[0], -1)
        base = np.stack([self.source_rows, self.lower_rows]) * maps.shape[-1]  # (2, K)
        return torch.addcmul(torch.from_numpy(np.take(flat, base + self.right, axis=1)) * self.right_weight,
                             torch.from_numpy(np.take(flat, base + self.left, axis=1)), self.left_weight)

    def pixels(self, pairs: torch.Tensor, chosen: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """The second pass over the outputs of segments ``chosen`` (``pairs``: :meth:`along_columns`): (P, N) values
        and their output rows and columns."""
        source_rows = self.source_rows[chosen]
        repeats = self.rows.count[source_rows]
        rows = _ranges(self.rows.start[source_rows], repeats)  # segment k's outputs: its rows, consecutively
        pairs = torch.from_numpy(np.repeat(pairs.numpy()[:, :, chosen], repeats, axis=2))
        values = torch.addcmul(pairs[:, 1] * torch.from_numpy(np.take(self.rows.second_weight, rows)), pairs[:, 0],
                               torch.from_numpy(np.take(self.rows.first_weight, rows)))
        return values, rows, np.repeat(self.output_columns[chosen], repeats)


class _Confidence:
    """The merge's per-prompt confidence at output pixels: ``scores * sigmoid(logit)`` (or ``sigmoid(logit)``), or
    given maps: (P, H, W) at the output size, or (P, h, w) in slice space, resized bilinearly like the logits."""

    def __init__(self, scores: torch.Tensor | None, maps: torch.Tensor | None, size: tuple[int, int],
                 slice_shape: tuple[int, ...], device: torch.device = torch.device("cpu")) -> None:
        self.scores = None if scores is None else torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
        self.maps = None if maps is None else maps.detach().float().to(device).contiguous()
        self.size = size
        self.native = self.maps is not None and tuple(self.maps.shape) == (slice_shape[0], *size)
        if self.maps is not None and not self.native and tuple(self.maps.shape) != tuple(slice_shape):
            raise ValueError(f"confidence maps {tuple(self.maps.shape)} fit neither the logits {tuple(slice_shape)} "
                             f"nor the output {(slice_shape[0], *size)}")

    def of_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid() if self.scores is None else confidence_of(logits, self.scores)

    def tile(self, logits: torch.Tensor, start: int, stop: int, columns: _Axis) -> torch.Tensor:
        """(P, stop - start, W) for output rows ``start:stop``, slice-space maps resized as the logits are
        (:func:`_resized_rows`: a tie between prompts is then broken as MONAI's dense inverse breaks it)."""
        if self.maps is None:
            return self.of_logits(logits)
        if self.native:
            return self.maps[:, start:stop]
        return _resized_rows(self.maps, self.size, start, stop, columns)

    def pixels(self, logits: torch.Tensor, segments: _Segments, chosen: np.ndarray, rows: np.ndarray,
               columns: np.ndarray) -> torch.Tensor:
        """(P, N) at the outputs of segments ``chosen`` (rows ``rows``, columns ``columns``)."""
        if self.maps is None:
            return self.of_logits(logits)
        if self.native:
            return torch.from_numpy(np.take(self.maps.reshape(self.maps.shape[0], -1).numpy(),
                                            rows * self.size[1] + columns, axis=1))
        return segments.pixels(segments.along_columns(self.maps.numpy()), chosen)[0]


def merged_index(logits: torch.Tensor, confidence: Callable[[], torch.Tensor], threshold: float) -> torch.Tensor:
    """(P, ...) logits -> label index (...) on their device (mask = logit > ``threshold``): the mask of a single
    prompt, else the most confident claimant by ``confidence()``, (P, ...), made only when needed."""
    masks = logits > threshold
    if logits.shape[0] == 1:
        return masks[0].view(torch.uint8)
    if logits.ndim == 2:  # merge_classes takes (C, H, W)
        return merge_classes(confidence()[:, None], masks[:, None])[0]
    return merge_classes(confidence(), masks)


def _resized_rows(maps: torch.Tensor, size: tuple[int, int], start: int, stop: int, columns: _Axis) -> torch.Tensor:
    """Output rows ``start:stop`` of the dense bilinear resize, (P, stop - start, W): all rows at once with
    ``torch.nn.functional.interpolate`` (MONAI ``Invertd``'s arithmetic, and several times faster), a row tile of
    a large picture with ``upsample_rows`` (equal up to float rounding)."""
    if start == 0 and stop == size[0]:
        return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
    return upsample_rows(maps, size, start, stop, columns.weights)


def _dense_labels(maps: torch.Tensor, size: tuple[int, int], start: int, stop: int, columns: _Axis,
                  weights: _Confidence, threshold: float, groups: _Groups | None = None) -> torch.Tensor:
    """The label index of output rows ``start:stop`` from the dense resize of every pixel (``_resized_rows``), on
    the maps' device."""
    logits = _max_of(_resized_rows(maps, size, start, stop, columns), groups)
    return merged_index(logits, lambda: weights.tile(logits, start, stop, columns), threshold)


def _dense_index(maps: torch.Tensor, size: tuple[int, int], threshold: float, weights: _Confidence,
                 progress: Callable[[int], object] | None, tile_elements: int,
                 groups: _Groups | None = None) -> torch.Tensor:
    """(H, W) label index of the dense resize on the maps' device, in row tiles of about ``tile_elements`` floats
    (all maps together): uint8, int32 beyond 254 prompts."""
    num_maps = maps.shape[0]
    num_prompts = num_maps if groups is None else groups.count
    columns = _axis(maps.shape[-1], size[1])
    dtype = torch.uint8 if num_prompts + 1 <= 255 else torch.int32
    index = torch.empty(size, dtype=dtype, device=maps.device)
    for start, stop in row_tiles(size[0], size[1], num_maps, tile_elements):
        index[start:stop] = _dense_labels(maps, size, start, stop, columns, weights, threshold, groups)
        if progress is not None:
            progress(stop - start)
    return index


def _tiles(rows: _Axis, height: int, width: int, channels: int) -> list[tuple[int, int]]:
    """Row tiles (:func:`row_tiles` of up to ``MAX_TILE_ELEMENTS``: a picture of up to that many pixels is one)
    moved to whole source rows: (first, one past the last) source row, each with at least one output row."""
    starts = sorted({int(rows.first[start]) for start, _ in row_tiles(height, width, channels, MAX_TILE_ELEMENTS)})
    return list(zip(starts, starts[1:] + [int(rows.first[-1]) + 1]))


def _claiming_maps(maps: torch.Tensor, groups: list[int], threshold: float) -> tuple[torch.Tensor, list[int]]:
    """Grouped maps without those that claim no pixel at any size (every value at or below ``threshold``: a
    bilinear value lies between its taps), each group keeping at least its largest map: the same union, with fewer
    maps to resize (``threshold``'s low-scoring queries often have empty masks)."""
    largest = maps.flatten(1).amax(dim=1)
    keep = ~(largest <= threshold)  # (NaN kept: the dense result decides)
    ranges = _Groups(groups).ranges
    for start, stop in ranges:
        if not bool(keep[start:stop].any()):
            keep[start + int(largest[start:stop].argmax())] = True
    if bool(keep.all()):
        return maps, groups
    return maps[keep], [int(keep[start:stop].sum()) for start, stop in ranges]


def boundary_label_index(
    maps: torch.Tensor,
    size: Sequence[int],
    threshold: float = 0.0,
    scores: torch.Tensor | None = None,
    confidence: torch.Tensor | None = None,
    progress: Callable[[int], object] | None = None,
    groups: Sequence[int] | None = None,
) -> np.ndarray:
    """Slice-space logits -> the label index at ``size`` that thresholding and merging their bilinear resize gives.

    Args:
        maps: (P, h, w) mask logits (mask = logit > ``threshold``); with ``groups``, (M, h, w), several per prompt.
        size: the output (H, W); any size (bilinear, ``align_corners=False``).
        scores: (P,) prompt scores: the merge's confidence is ``scores * sigmoid(logit)`` (None: ``sigmoid(logit)``).
        confidence: instead, per-prompt confidence maps: (P, H, W), or (P, h, w) resized bilinearly like ``maps``.
        progress: called with the number of output rows after each row tile (a progress bar's ``update``).
        groups: the number of maps of each prompt, whose maps come consecutively in ``maps`` (None: one each). A
            prompt's mask is then the union of its maps' masks, each resized on its own, and its logit at a pixel
            the largest of theirs (what the merge's confidence reads); ``confidence`` maps cannot be given.

    Returns:
        (H, W) numpy uint8 (int32 beyond 254 prompts): 0 background, c + 1 = prompt c.

    Maps on an accelerator (``PromptInferer`` leaves them on the network's device) are resized densely there, in
    row tiles of ``DEVICE_TILE_ELEMENTS``; only the label index is copied to the host.
    """
    num_maps, h, w = maps.shape
    height, width = int(size[0]), int(size[1])
    maps = maps.detach().float().contiguous()
    if groups is not None:
        if sum(groups) != num_maps or confidence is not None:
            raise ValueError(f"groups {list(groups)} must add up to the {num_maps} maps, and come without confidence "
                             "maps")
        maps, groups = _claiming_maps(maps, list(groups), threshold)
        num_maps = maps.shape[0]
    group = None if groups is None else _Groups(groups)
    num_prompts = num_maps if group is None else group.count
    weights = _Confidence(scores, confidence, (height, width), tuple(maps.shape), maps.device)
    if maps.device.type != "cpu":
        return _dense_index(maps, (height, width), threshold, weights, progress, DEVICE_TILE_ELEMENTS,
                            group).cpu().numpy()
    values = maps.numpy()
    open_mark = num_prompts + 1
    dtype = np.uint8 if open_mark <= 255 else np.int32
    rows, columns = _axis(h, height), _axis(w, width)
    if height * width < BLOCK_MIN_UPSCALE * h * w:  # blocks of about one pixel: nothing to save, resize densely
        return _dense_index(maps, (height, width), threshold, weights, progress, MAX_TILE_ELEMENTS, group).numpy()
    largest = float(np.abs(values).max()) if values.size else 0.0  # NaN / inf: every pixel open (the dense result)
    margin = MARGIN * max(largest, abs(threshold)) + 1e-30
    high, low = threshold + margin, threshold - margin
    blocks = _labels(_any_of(_block_all(values > high), group), _any_of(~_block_all(values <= low), group),
                     open_mark).astype(dtype, copy=False)
    # the open segments: per open block (i, j), source row i and the output columns whose first tap is j
    open_rows, open_columns = np.divmod(np.flatnonzero(blocks == open_mark), w)
    per_block = columns.count[open_columns]
    source_rows, output_columns = np.repeat(open_rows, per_block), _ranges(columns.start[open_columns], per_block)
    strip = np.repeat(blocks, columns.count, axis=1)  # (h, W): source row i, output column
    tiles = _tiles(rows, height, width, num_maps)
    edges = np.searchsorted(source_rows, [first for first, _ in tiles] + [tiles[-1][1]])
    index = None if len(tiles) == 1 else np.empty((height, width), dtype)
    for (first, last), lo, hi in zip(tiles, edges[:-1], edges[1:]):
        start, stop = int(rows.start[first]), int(rows.start[last - 1] + rows.count[last - 1])
        if int(rows.count[source_rows[lo:hi]].sum()) * DENSE_BREAK_EVEN >= (stop - start) * width:
            labels = _dense_labels(maps, (height, width), start, stop, columns, weights, threshold, group).numpy()
        else:
            part = strip[first:last]
            pixels = None
            if hi > lo:
                segments = _Segments(rows, columns, source_rows[lo:hi], output_columns[lo:hi])
                pairs = segments.along_columns(values)
                both = pairs.numpy()
                decided = _labels(_any_of((both > high).all(1), group), _any_of(~(both <= low).all(1), group),
                                  open_mark)
                part.reshape(-1)[(segments.source_rows - first) * width + segments.output_columns] = decided
                chosen = np.flatnonzero(decided == open_mark)
                if chosen.size:
                    logits, o, q = segments.pixels(pairs, chosen)
                    logits = _max_of(logits, group)
                    pixels = ((o - start) * width + q, merged_index(
                        logits, lambda: weights.pixels(logits, segments, chosen, o, q), threshold).numpy())
            labels = np.repeat(part, rows.count[first:last], axis=0)
            if pixels is not None:
                labels.reshape(-1)[pixels[0]] = pixels[1]
        if index is None:
            index = labels.astype(dtype, copy=False)
        else:
            index[start:stop] = labels
        if progress is not None:
            progress(stop - start)
    return index
