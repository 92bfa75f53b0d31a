"""3D volumes into the 2D path: axial slices (all, in order, for inference; foreground-biased samples for
training) and the restack of per-slice predictions into a volume with the input's affine.

Geometry: a volume is ``(C, X, Y, Z)`` (MONAI loading); the axial axis is the last spatial one by default
(``axis=2``; ``"auto"`` picks the voxel axis closest to world superior-inferior). A slice is
``(C, rows, cols)`` with ``rows = Y``, ``cols = X`` (``transpose=True``: as a SimpleITK array slice; the usual
radiological picture for DICOM-ordered (LPS) storage, rotated 180 degrees for RAS-stored NIfTI such as MSD's: slices
are not reoriented, so the detector sees each volume as it is stored), or ``(C, X, Y)`` with
``transpose=False``. Its meta carries ``slice_index``, ``slice_axis``, ``slice_transposed``, ``volume_shape`` and
``volume_affine``, and a 4x4 ``affine`` that maps
its ``(row, col, 0)`` to world coordinates. A slice starts with no applied operations of its own: invert
slice-space transforms per slice, restack, then invert volume-level transforms (if any) on the volume.

2D pictures and volume slices reach slice space through :class:`TiledResizeToSliced` (both bundles). By default
(``kernel="sam3"``) it resizes as SAM3's image processor does: the 8-bit picture, with torchvision's anti-aliased
bilinear ``Resize``. A picture whose intensity mapping is still pending (``ScaleIntensityByModalityd(defer_2d=True)``)
is read one row tile at a time -- its ``uint8`` pixels, the intensity mapping, the 8-bit levels and the resize along
the rows applied per tile -- so no native-size float image is made. The resize is recorded for ``Invertd`` exactly as
``ResizeToSliced`` records it. ``kernel="monai"`` is MONAI ``Resize``'s arithmetic (Gaussian anti-aliasing and
bilinear interpolation of the float intensities, written as two banded matrices for large pictures).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, TraceableTransform, Transform
from monai.transforms.utils import scale_affine
from monai.utils import TraceKeys, get_equivalent_dtype

from ..tensors import plain_tensor
from .errors import DataError, source_name
from .intensity import (
    PENDING_INTENSITY,
    apply_intensity,
    materialize_intensity,
    output_channels,
    pending_intensity,
    row_tiles,
    sam3_levels,
)
from .spatial import ResizeToSliced

__all__ = [
    "EAGER_MAX_PIXELS",
    "INTERPOLATE_MAX_PIXELS",
    "PROGRESS_MIN_PIXELS",
    "RESIZE_KERNELS",
    "AxialSlicesd",
    "RandAxialSliced",
    "RestackSlicesd",
    "TiledResizeToSliced",
    "axial_axis",
    "bilinear_two_pass",
    "bilinear_weights",
    "resize_band",
    "resize_operator",
    "upsample_rows",
    "extract_slice",
    "foreground_slices",
    "restack_slices",
    "sample_slice_indices",
]

SLICE_META_KEYS = ("slice_index", "slice_axis", "slice_transposed", "volume_shape", "volume_affine")
#: 2D pictures from this many pixels show a progress bar (stderr) over their tiled passes
PROGRESS_MIN_PIXELS = 16_000_000
#: 2D pictures up to this many pixels that shrink are resized whole (MONAI's resize, a few MB); larger ones by
#: the tiled passes (equal up to float rounding, memory independent of the picture's size). The way back,
#: whatever the size, is ``inferers.boundary_merge``'s.
EAGER_MAX_PIXELS = 1 << 18
#: images up to this many pixels whose resize only interpolates (no anti-aliasing: every side grows, as a picture
#: of up to 1008 x 1008 does at SAM3's slice space) are interpolated whole, channel by channel, whatever
#: ``EAGER_MAX_PIXELS`` says: a 1 Mpx RGB picture is 12 MB of floats
INTERPOLATE_MAX_PIXELS = 1 << 20
#: picture elements per row tile of the tiled resize (4 MB of float32 values): fewer, larger band products than
#: the intensity tiles' size (a 1070 x 1348 picture: ~30% less time than in the default tiles, 94 -> 67 ms)
RESIZE_TILE_ELEMENTS = 1 << 20
#: :class:`TiledResizeToSliced`'s kernels: ``"sam3"`` (the default) resizes the 8-bit levels as SAM3's image
#: processor does (``Sam3Processor``: torchvision's bilinear ``Resize``, anti-aliased, on the uint8 picture; Meta's
#: training resizes PIL pictures with PIL's bilinear filter, the same triangle filter); ``"monai"`` resizes the float
#: intensities as MONAI's ``Resize`` does (Gaussian smoothing when a side shrinks, then bilinear) and rounds after
RESIZE_KERNELS = ("sam3", "monai")
#: the tiled resize's arithmetic: float32, as MONAI's ``GaussianSmooth`` and ``interpolate`` compute (the band
#: weights are made in float64, then rounded once); float64 gives the same values up to float rounding, in more time
#: and twice the tile memory
RESIZE_DTYPE = torch.float32


def axial_axis(affine: torch.Tensor | np.ndarray) -> int:
    """The voxel axis (0, 1, 2) whose direction is closest to world z (superior-inferior)."""
    a = torch.as_tensor(affine, dtype=torch.float64)[:3, :3]
    direction = a / a.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return int(direction[2].abs().argmax())


def _resolve_axis(axis: int | str, volume: torch.Tensor) -> int:
    if axis == "auto":
        return axial_axis(volume.affine) if isinstance(volume, MetaTensor) else 2
    axis = int(axis)
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1, 2 or 'auto', got {axis}")
    return axis


def plane_axes(axis: int, transpose: bool) -> tuple[int, int]:
    """(row axis, column axis) of a slice, as spatial axes of the volume."""
    p, q = [i for i in range(3) if i != axis]
    return (q, p) if transpose else (p, q)


def extract_slice(volume: torch.Tensor, index: int, axis: int = 2, transpose: bool = True) -> torch.Tensor:
    """``(C, X, Y, Z)`` -> ``(C, rows, cols)`` slice ``index`` along spatial ``axis``, with slice geometry meta."""
    plane = volume.select(axis + 1, int(index))
    if transpose:
        plane = plane.transpose(1, 2)
    plane = plain_tensor(plane).clone(memory_format=torch.contiguous_format)  # one copy, rows first
    if not isinstance(volume, MetaTensor):
        return plane
    affine = volume.affine.to(torch.float64)
    row_axis, col_axis = plane_axes(axis, transpose)
    slice_affine = torch.eye(4, dtype=torch.float64)
    slice_affine[:, 0] = affine[:, row_axis]
    slice_affine[:, 1] = affine[:, col_axis]
    slice_affine[:, 2] = affine[:, axis]
    slice_affine[:3, 3] = affine[:3, 3] + int(index) * affine[:3, axis]
    meta = {k: v for k, v in volume.meta.items() if k not in ("affine", "spatial_shape")}
    meta.update(
        slice_index=int(index),
        slice_axis=int(axis),
        slice_transposed=bool(transpose),
        volume_shape=np.asarray(volume.shape[1:]),
        volume_affine=affine.clone(),
        spatial_shape=np.asarray(plane.shape[1:]),
        is_volume=False,
    )
    return MetaTensor(plane, affine=slice_affine, meta=meta, applied_operations=[])


def foreground_slices(label: torch.Tensor, axis: int = 2) -> list[int]:
    """Indices along spatial ``axis`` of the slices of ``(C, X, Y, Z)`` ``label`` that contain foreground."""
    label = plain_tensor(label)
    dims = [d for d in range(label.ndim) if d != axis + 1]
    return torch.nonzero((label != 0).amax(dim=dims)).flatten().tolist()


def sample_slice_indices(
    num_slices: int, foreground: Sequence[int], num_samples: int, pos_fraction: float,
    rng: np.random.RandomState,
) -> list[int]:
    """Slice indices: each draw is a foreground slice with probability ``pos_fraction`` (when there is one),
    otherwise any slice uniformly."""
    out = []
    for _ in range(num_samples):
        if len(foreground) and rng.rand() < pos_fraction:
            out.append(int(foreground[rng.randint(len(foreground))]))
        else:
            out.append(int(rng.randint(num_slices)))
    return out


def _check_volume(volume: Any, d: Mapping[Hashable, Any], key: Hashable) -> None:
    if getattr(volume, "ndim", 0) != 4:
        raise DataError(source_name(volume, d, key), f"'{key}' has shape {tuple(getattr(volume, 'shape', ()))}",
                        "slicing needs a (C, X, Y, Z) volume")


class _SliceBase(MapTransform):
    def __init__(self, keys: KeysCollection, ref_key: str, axis: int | str, transpose: bool,
                 allow_missing_keys: bool) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.axis = axis
        self.transpose = transpose

    def _volume_axis(self, d: Mapping[Hashable, Any]) -> int | None:
        """The axis to slice the reference volume along, or None for a 2D item (it passes as ``[item]``)."""
        ref = d[self.ref_key]
        if ref.ndim == 3:
            return None
        _check_volume(ref, d, self.ref_key)
        return _resolve_axis(self.axis, ref)

    def _slices(self, d: Mapping[Hashable, Any], indices: Sequence[int], axis: int) -> list[dict[Hashable, Any]]:
        out = []
        for index in indices:
            item = dict(d)
            for key in self.key_iterator(d):
                _check_volume(d[key], d, key)
                item[key] = extract_slice(d[key], index, axis, self.transpose)
            out.append(item)
        return out


class AxialSlicesd(_SliceBase):
    """All slices of a volume, in order: a list of 2D items for inference (2D items pass as ``[item]``).

    Args:
        keys: volume keys to slice (image, label, instance ids, ...); other item entries are shared.
        ref_key: the key that decides 2D vs 3D and the axis for ``"auto"``.
        axis: spatial axis to slice (2 = last, the axial one for RAS/LPS volumes) or ``"auto"``.
        transpose: rows = Y, columns = X (see the module docstring).
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), ref_key: str = "image", axis: int | str = 2,
                 transpose: bool = True, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, ref_key, axis, transpose, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        axis = self._volume_axis(d)
        if axis is None:
            return [d]
        return self._slices(d, range(d[self.ref_key].shape[axis + 1]), axis)


class RandAxialSliced(Randomizable, _SliceBase):
    """``num_samples`` random slices of a volume for training, biased to foreground (a list of 2D items).

    Each draw is a slice containing foreground (``label_key`` nonzero) with probability ``pos_fraction``,
    otherwise a uniformly random slice. 2D items pass as ``[item]``.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        label_key: str = "label",
        num_samples: int = 1,
        pos_fraction: float = 0.8,
        ref_key: str = "image",
        axis: int | str = 2,
        transpose: bool = True,
        seed: int | None = None,
        allow_missing_keys: bool = True,
    ) -> None:
        _SliceBase.__init__(self, keys, ref_key, axis, transpose, allow_missing_keys)
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
        self.label_key = label_key
        self.num_samples = int(num_samples)
        self.pos_fraction = float(pos_fraction)
        self.set_random_state(seed)
        self._indices: list[int] = []

    def randomize(self, num_slices: int, foreground: Sequence[int]) -> None:
        self._indices = sample_slice_indices(num_slices, foreground, self.num_samples, self.pos_fraction, self.R)

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        axis = self._volume_axis(d)
        if axis is None:
            return [d]
        label = d.get(self.label_key)
        foreground = foreground_slices(label, axis) if label is not None else []
        self.randomize(d[self.ref_key].shape[axis + 1], foreground)
        return self._slices(d, self._indices, axis)


def restack_slices(slices: Sequence[torch.Tensor], metas: Sequence[Mapping[str, Any]] | None = None,
                   fill: float = 0) -> MetaTensor:
    """Per-slice ``(C, rows, cols)`` predictions -> ``(C, X, Y, Z)`` MetaTensor with the volume's affine.

    ``metas`` (default: each slice's own meta) must carry the slice keys written by :func:`extract_slice`;
    slices never given are filled with ``fill``.
    """
    if not slices:
        raise ValueError("no slices to restack")
    metas = list(metas) if metas is not None else [s.meta for s in slices]  # type: ignore[attr-defined]
    missing = [k for k in SLICE_META_KEYS if k not in metas[0]]
    if missing:
        raise ValueError(f"slice meta lacks {missing}: restack needs slices made by AxialSlicesd/RandAxialSliced")
    shape = tuple(int(s) for s in np.asarray(metas[0]["volume_shape"]).tolist())
    first = plain_tensor(slices[0])
    volume = torch.full((first.shape[0], *shape), fill, dtype=first.dtype)
    for plane, meta in zip(slices, metas):
        plane = plain_tensor(plane)
        if meta["slice_transposed"]:
            plane = plane.transpose(1, 2)
        target = volume.select(int(meta["slice_axis"]) + 1, int(meta["slice_index"]))
        if tuple(plane.shape) != tuple(target.shape):
            raise ValueError(f"slice {int(meta['slice_index'])} has shape {tuple(plane.shape)} but the volume needs "
                             f"{tuple(target.shape)}: invert slice-space transforms (Invertd) before restacking")
        target.copy_(plane.to(volume.dtype))
    out_meta = {k: v for k, v in metas[0].items() if k not in SLICE_META_KEYS and k not in ("affine", "spatial_shape")}
    out_meta.update(spatial_shape=np.asarray(shape), is_volume=True)
    return MetaTensor(volume, affine=torch.as_tensor(metas[0]["volume_affine"]).clone(), meta=out_meta)


class RestackSlicesd(Transform):
    """A list of slice items (from :class:`AxialSlicesd`, after per-slice inference and ``Invertd``; in the
    inference bundle after each slice's merge, so ``keys`` are its label slices) -> one item whose ``keys`` are
    ``(C, X, Y, Z)`` volumes with the input volume's affine.

    The slice geometry is read from each ``key``'s own meta when it has it, else from ``ref_key``'s.
    Other entries are taken from the first slice. A 2D item, alone or as a one-item list, passes through.
    """

    def __init__(self, keys: KeysCollection = ("pred",), ref_key: str = "image", fill: float = 0) -> None:
        self.keys = (keys,) if isinstance(keys, str) else tuple(keys)
        self.ref_key = ref_key
        self.fill = fill

    def __call__(self, items: Sequence[Mapping[Hashable, Any]]) -> dict[Hashable, Any]:
        if isinstance(items, Mapping):
            return dict(items)  # a 2D item: nothing to restack
        items = list(items)
        if len(items) == 1 and "slice_index" not in getattr(items[0].get(self.ref_key), "meta", {}):
            return dict(items[0])  # a 2D item as a one-item case ([item], as AxialSlicesd returns it)
        out = dict(items[0])
        for key in self.keys:
            metas = []
            for item in items:
                meta = getattr(item[key], "meta", {})
                metas.append(meta if "slice_index" in meta else item[self.ref_key].meta)
            out[key] = restack_slices([item[key] for item in items], metas, self.fill)
        return out


# ------------------------------------------------------------------------------------------------ 2D, in tiles
def bilinear_weights(in_size: int, out_size: int, start: int = 0, stop: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear interpolation (``align_corners=False``) along one axis, output indices ``start:stop``: the two
    source indices and their float32 weights, computed as ``torch.nn.functional.interpolate`` computes them
    (``out[o] = w0[o] * x[i0[o]] + w1[o] * x[i1[o]]``; the identity when the sizes are equal)."""
    out = torch.arange(start, out_size if stop is None else stop, dtype=torch.float32)
    if in_size == out_size:
        first = out.long()
        return first, first, torch.ones(out.shape), torch.zeros(out.shape)
    scale = torch.tensor(float(in_size), dtype=torch.float32) / torch.tensor(float(out_size), dtype=torch.float32)
    # scale * (o + 0.5) - 0.5 rounded once (a fused multiply-add), as the CPU kernel computes it
    source = (scale.double() * (out.double() + 0.5) - 0.5).float().clamp_min(0.0)
    first = source.floor().long().clamp_max(in_size - 1)
    second_weight = (source - first.float()).clamp(0.0, 1.0)
    second = torch.where(first < in_size - 1, first + 1, first)
    return first, second, 1.0 - second_weight, second_weight


def upsample_rows(maps: torch.Tensor, size: Sequence[int], start: int, stop: int,
                  columns: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of ``maps`` ``(C, h, w)`` resized bilinearly to ``size`` = (H, W) (``align_corners=False``):
    ``(C, stop - start, W)`` float32, what ``interpolate(maps[None], size, mode="bilinear")[0, :, start:stop]``
    gives (equal up to float rounding), with memory for those rows only, on ``maps``' device. ``columns``:
    ``bilinear_weights(w, W)``, to reuse across tiles."""
    maps = maps.float()
    rows = bilinear_weights(maps.shape[-2], int(size[0]), start, stop)
    low, high = int(rows[0].min()), int(rows[1].max())
    first, second, first_weight, second_weight = (t.to(maps.device) for t in rows)
    c_first, c_second, c_first_weight, c_second_weight = (
        t.to(maps.device) for t in (columns or bilinear_weights(maps.shape[-1], int(size[1]))))
    return bilinear_two_pass(maps[:, low:high + 1], (first - low, second - low, first_weight, second_weight),
                             (c_first, c_second, c_first_weight, c_second_weight))


def bilinear_two_pass(band: torch.Tensor, rows: Sequence[torch.Tensor], columns: Sequence[torch.Tensor]
                      ) -> torch.Tensor:
    """Bilinear values of ``band`` (C, h, w) at R output rows and Q output columns, (C, R, Q) float32, with the CPU
    interpolation kernel's arithmetic: along the columns, then along the rows, each ``w0 * x0 + (w1 * x1)`` (the
    first product fused with the sum). ``rows`` and ``columns``: (first tap, second tap, first weight, second
    weight) per output, as :func:`bilinear_weights` gives them, the taps indexing ``band``'s last two dimensions."""
    first, second, first_weight, second_weight = rows
    c_first, c_second, c_first_weight, c_second_weight = columns
    along_columns = torch.addcmul(band[:, :, c_second] * c_second_weight, band[:, :, c_first], c_first_weight)
    return torch.addcmul(along_columns[:, second] * second_weight[:, None], along_columns[:, first],
                         first_weight[:, None])


def resize_operator(in_size: int, out_size: int, sigma: float | None = None) -> torch.Tensor:
    """The 1D linear map of MONAI ``Resize`` along one axis as an ``(out_size, in_size)`` float64 matrix: a
    Gaussian of ``sigma`` (MONAI ``GaussianSmooth``'s kernel: ``erf``, truncated at 4 sigma, zero padding; None:
    no smoothing), then bilinear interpolation with ``align_corners=False`` (``torch.nn.functional.interpolate``).

    Each row has at most ``len(kernel) + 1`` non-zero entries (a band: :func:`resize_band`), so
    ``A_h @ X @ A_w.T`` resizes a picture ``X`` one row tile at a time. Equal to MONAI's result up to float rounding
    (MONAI computes in float32).
    """
    return _dense(*resize_band(in_size, out_size, sigma), in_size)


def resize_band(in_size: int, out_size: int, sigma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`resize_operator` without its zeros: ``band`` ``(out_size, width)`` float64 and ``low`` ``(out_size,)``
    long, ``matrix[o, low[o] + k] = band[o, k]`` (``low`` may be negative; entries outside ``[0, in_size)`` are
    zero). Each entry is summed tap by tap in the order of the dense construction (the same float64 values),
    in ``O(out_size * width)`` instead of passes over the whole matrix."""
    from monai.networks.layers.convutils import gaussian_1d

    first, second, first_weight, second_weight = bilinear_weights(in_size, out_size)
    if sigma is None:
        kernel, radius = torch.ones(1, dtype=torch.float64), 0
    else:
        kernel = gaussian_1d(torch.tensor(float(sigma), dtype=torch.float32), truncated=4.0, approx="erf").double()
        radius = (kernel.numel() - 1) // 2
    low = first - radius
    band = torch.zeros(out_size, int((second - first).max()) + 2 * radius + 1, dtype=torch.float64)
    rows = torch.arange(out_size)
    for tap, weight in enumerate(kernel.tolist()):
        for centre, share in ((first, first_weight.double()), (second, second_weight.double())):
            column = centre + tap - radius
            valid = (column >= 0) & (column < in_size)  # zero padding: taps outside the picture add nothing
            band.index_put_((rows[valid], (column - low)[valid]), share[valid] * weight, accumulate=True)
    return band, low


def _dense(band: torch.Tensor, low: torch.Tensor, in_size: int) -> torch.Tensor:
    """:func:`resize_band` as its ``(out, in)`` matrix."""
    rows, columns, values = _entries(band, low)
    matrix = torch.zeros(band.shape[0], in_size, dtype=torch.float64)
    matrix[rows, columns] = values
    return matrix


def _entries(band: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zero entries of :func:`resize_band`'s matrix: output row, input column, value (``(E,)`` each)."""
    rows, offsets = band.nonzero(as_tuple=True)
    return rows, low[rows] + offsets, band[rows, offsets]


def band_limits(rows: torch.Tensor, columns: torch.Tensor, num_rows: int, num_columns: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and one past the last column of each row's non-zero entries (``rows[k]``, ``columns[k]``):
    ``(num_rows,)`` each; a row without entries gets ``num_columns`` and 0. (Swap the arguments for the rows each
    column reaches.)"""
    first = torch.full((num_rows,), num_columns, dtype=torch.long).scatter_reduce_(0, rows, columns, "amin")
    stop = torch.zeros(num_rows, dtype=torch.long).scatter_reduce_(0, rows, columns + 1, "amax")
    return first, stop


def _column_blocks(band: torch.Tensor, low: torch.Tensor, in_size: int, block: int = 16
                   ) -> list[tuple[int, int, int, int, torch.Tensor]]:
    """:func:`resize_band`'s matrix (out, in) as ``(out_start, out_stop, in_start, in_stop, block.T)`` pieces of
    ``block`` output columns each, keeping only the input columns their band touches (``x @ matrix.T`` piece by
    piece), made from the band's entries without the dense matrix; ``RESIZE_DTYPE``."""
    rows, columns, values = _entries(band, low)
    out_size = band.shape[0]
    first, last = band_limits(rows, columns, out_size, in_size)
    count = -(-out_size // block)
    pad = count * block - out_size  # the last block's missing rows: no reach
    in_starts = torch.cat([first, first.new_full((pad,), in_size)]).view(count, block).amin(1)
    in_stops = torch.cat([last, last.new_zeros(pad)]).view(count, block).amax(1)
    empty = in_stops <= in_starts  # blocks of zero rows: one input column of zeros
    in_starts, in_stops = in_starts.masked_fill(empty, 0), in_stops.masked_fill(empty, 1)
    # every piece in one zero buffer (block, widest band, block outputs), filled in one pass, then cut
    buffer = torch.zeros(count, int((in_stops - in_starts).max()), block, dtype=RESIZE_DTYPE)
    owner = rows // block
    buffer[owner, columns - in_starts[owner], rows - owner * block] = values.to(RESIZE_DTYPE)
    pieces = []
    for index, (in_start, in_stop) in enumerate(zip(in_starts.tolist(), in_stops.tolist())):
        out_start, out_stop = index * block, min(index * block + block, out_size)
        pieces.append((out_start, out_stop, in_start, in_stop,
                       buffer[index, : in_stop - in_start, : out_stop - out_start].contiguous()))
    return pieces


@functools.lru_cache(maxsize=32)
def _resize_blocks(in_size: int, out_size: int,
                   sigma: float | None) -> tuple[tuple[int, int, int, int, torch.Tensor], ...]:
    """:func:`_column_blocks` of :func:`resize_band` for one axis, kept for the next picture of that size (a
    dataset's pictures mostly share a few sizes). The blocks are read, never written."""
    return tuple(_column_blocks(*resize_band(in_size, out_size, sigma), in_size))


def _row_groups(blocks: Sequence[tuple[int, int, int, int, torch.Tensor]], rows: int
                ) -> list[tuple[int, int, list[tuple[int, int, int, int, torch.Tensor]]]]:
    """Consecutive output row blocks (:func:`_resize_blocks`) grouped so that the input rows a group reads span at
    most ``rows`` (a block reading more is a group alone): ``(first, one past the last input row, blocks)`` per
    group; one column pass per group, and every output row made from its whole band at once (neighbouring groups
    share the few rows their bands overlap)."""
    groups: list[tuple[int, int, list[tuple[int, int, int, int, torch.Tensor]]]] = []
    for block in blocks:
        if groups and max(groups[-1][1], block[3]) - min(groups[-1][0], block[2]) <= rows:
            low, high, members = groups[-1]
            members.append(block)
            groups[-1] = (min(low, block[2]), max(high, block[3]), members)
        else:
            groups.append((block[2], block[3], [block]))
    return groups


def _along_columns(source: torch.Tensor, spec: Mapping[str, Any] | None, start: int, stop: int,
                   columns: Sequence[tuple[int, int, int, int, torch.Tensor]], channels: int, width: int
                   ) -> torch.Tensor:
    """Rows ``start:stop`` of a picture ``(C, H, W)`` (its pending intensity applied) resized along the columns by
    the band blocks ``columns`` (:func:`_resize_blocks`): ``(channels, stop - start, width)``, ``RESIZE_DTYPE``."""
    values = _intensities(source[:, start:stop], spec).to(RESIZE_DTYPE).reshape(-1, source.shape[-1])
    tile = torch.empty(values.shape[0], width, dtype=RESIZE_DTYPE)
    for out_start, out_stop, in_start, in_stop, block in columns:
        tile[:, out_start:out_stop] = values[:, in_start:in_stop] @ block
    return tile.reshape(channels, stop - start, width)


def _intensities(tile: torch.Tensor, spec: Mapping[str, Any] | None) -> torch.Tensor:
    """Rows of a picture ``(C, rows, W)`` -> the values to resize: its pending intensity ``spec`` applied without
    the recorded repeat (:func:`~medsam3_monai.transforms.intensity.apply_intensity`), or the rows themselves when
    none is pending (intensities applied already)."""
    return tile if spec is None else apply_intensity(tile, spec, repeat=False)


@functools.cache
def _sam3_resize():
    """torchvision's ``resize`` with SAM3's settings but ``antialias`` (``Sam3Processor``'s ``v2.Resize``: bilinear,
    anti-aliased); imported on first use (torchvision takes about a second to import)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional

    return functools.partial(functional.resize, interpolation=InterpolationMode.BILINEAR)


@functools.cache
def _uint8_resize_in_passes() -> bool:
    """Whether torchvision resizes a uint8 picture in its own integer arithmetic on this CPU, one axis after the
    other, each pass rounded to uint8 (AVX2, AVX-512 and ARM machines): then resizing the rows tile by tile and the
    columns after gives its levels. Elsewhere it resizes floats in one go and rounds once; a picture is then resized
    in one call (``False`` also when torchvision does not say)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2.functional import _geometry

    rule = getattr(_geometry, "_do_native_uint8_resize_on_cpu", None)
    return bool(rule(InterpolationMode.BILINEAR)) if rule is not None else False


def _intensity_channels(source: torch.Tensor, spec: Mapping[str, Any] | None) -> int:
    """Channels of :func:`_intensities`' (and :func:`_levels`') output for a picture ``source`` with pending intensity
    ``spec``: before the recorded repeat."""
    return source.shape[0] if spec is None else output_channels({**spec, "repeat": 1})


def _own_levels(source: torch.Tensor, spec: Mapping[str, Any] | None) -> bool:
    """Whether a picture's pixels are its 8-bit levels already: levels (uint8 with no pending intensity), or an
    8-bit picture whose pending intensity divides by 255 (``x / 255`` rounds back to ``x``)."""
    if source.dtype != torch.uint8:
        return False
    return spec is None or (spec["op"] == "div" and float(spec["value"]) == 255.0 and spec["grey"] == "none")


def _levels(tile: torch.Tensor, spec: Mapping[str, Any] | None) -> torch.Tensor:
    """Rows of a picture ``(C, rows, W)`` -> the 8-bit levels of their intensities (:func:`_intensities`,
    :func:`~medsam3_monai.transforms.intensity.sam3_levels`), uint8; the rows themselves (a view) when they are those
    levels already (:func:`_own_levels`)."""
    if _own_levels(tile, spec):
        return tile if spec is None else tile[: int(spec["channels"])]
    return sam3_levels(_intensities(tile, spec))


def _picture_levels(source: torch.Tensor, spec: Mapping[str, Any] | None) -> torch.Tensor:
    """:func:`_levels` of a whole picture, made one row tile at a time (no native-size float image)."""
    if _own_levels(source, spec):
        return _levels(source, spec)
    out = torch.empty(_intensity_channels(source, spec), *source.shape[1:], dtype=torch.uint8)
    for start, stop in row_tiles(source.shape[1], source.shape[2], source.shape[0]):
        out[:, start:stop] = _levels(source[:, start:stop], spec)
    return out


def tile_progress(total: int, desc: str, show: bool):
    """A tqdm bar (stderr, cleared when done) over ``total`` rows of tiled passes; inert unless ``show``."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", file=sys.stderr, leave=False, disable=not show,
                dynamic_ncols=True)


class TiledResizeToSliced(ResizeToSliced):
    """:class:`~medsam3_monai.transforms.ResizeToSliced` with SAM3's own resize (default), faster, and the same on
    any number of threads.

    It takes ``(C, H, W)`` MetaTensor images, float, or 2D pictures whose intensity is pending
    (``ScaleIntensityByModalityd(defer_2d=True)``, then ``GreyToRGBd``: still the file's ``uint8`` pixels, the
    intensity mapped tile by tile, :func:`~medsam3_monai.transforms.intensity.apply_intensity`).

    ``kernel="sam3"``: the image as SAM3's image processor resizes a picture (``Sam3Processor``: ``v2.Resize`` on the
    uint8 image). Its intensities are rounded to 8-bit levels first (:func:`~medsam3_monai.transforms.intensity.
    sam3_levels`: an RGB picture's own bytes), then resized with torchvision's bilinear ``resize``, anti-aliased
    (a triangle filter as wide as the shrink), in its integer arithmetic: a picture of more than
    ``INTERPOLATE_MAX_PIXELS`` first along the rows, one row tile at a time into a ``(C, H, S)`` uint8 buffer, then
    along the columns (the same levels as one call on the whole picture), where torchvision resizes uint8 in its own
    integer passes (AVX2, AVX-512, ARM CPUs); elsewhere, and for smaller pictures, in one call.
    The output is those levels in ``[0, 1]`` (levels / 255, ``(C, S, S)`` float32 or ``dtype``), as MONAI transforms
    after a resize expect them (an augmentation); ``Sam3Normalized`` rounds them back to the same levels. Memory of the
    passes: the picture, one tile and the buffer, whatever the picture's size.

    ``kernel="monai"``: MONAI ``Resize``'s arithmetic on the float intensities, in float32:

    * only interpolate (no anti-aliasing shrink), an image of up to ``INTERPOLATE_MAX_PIXELS``: whole, channel by
      channel with ``F.interpolate`` (:meth:`_by_channel`), MONAI's values as ATen computes them on more than one
      thread, whatever the threads (ATen's one-thread 3-channel kernel rounds differently in the last bit);
    * anything else bilinear on more than ``EAGER_MAX_PIXELS``: one row tile at a time through the banded resize
      matrices of :func:`resize_operator` (MONAI ``Resize``'s anti-aliasing and bilinear interpolation), in float32
      (``RESIZE_DTYPE``), each group of output rows made from the tile that holds its whole band
      (:func:`_row_groups`), values equal up to float rounding; memory the picture, one tile and the float32 output,
      whatever its size;
    * otherwise (small shrinks, S x S already): ``ResizeToSliced`` itself.

    Other modes, ``align_corners=True``, an ``anti_aliasing_sigma``, lazy resampling and tensors that are not
    MetaTensors go to ``ResizeToSliced`` itself, whatever the kernel. The recorded operation is ``ResizeToSliced``'s
    (so ``Invertd`` inverts it).

    Args:
        kernel: ``"sam3"`` or ``"monai"`` (:data:`RESIZE_KERNELS`).
        progress: a progress bar (stderr) over the tiles of pictures of at least ``PROGRESS_MIN_PIXELS``.
        (others: as ``ResizeToSliced``.)
    """

    def __init__(self, *args: Any, kernel: str = "sam3", progress: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if kernel not in RESIZE_KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(map(repr, RESIZE_KERNELS))}, got {kernel!r}")
        self.kernel = kernel
        self.progress = progress

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        if any(getattr(d[key], "ndim", 0) != 3 for key in self.key_iterator(d)):
            return super().__call__(d, lazy=lazy)  # (a volume: ResizeToSliced's error)
        lazy_ = self.lazy if lazy is None else lazy
        for key, mode, align_corners, anti_aliasing, sigma, dtype in self.key_iterator(
            d, self.mode, self.align_corners, self.anti_aliasing, self.anti_aliasing_sigma, self.dtype
        ):
            img = d[key]
            kwargs = {"mode": mode, "align_corners": align_corners, "anti_aliasing": anti_aliasing,
                      "anti_aliasing_sigma": sigma, "dtype": dtype, "lazy": lazy_}
            pixels = img.shape[1] * img.shape[2]
            # MONAI's own Resize for anything else, and for what is not a MetaTensor (nothing to record on)
            plain_bilinear = (mode == "bilinear" and not align_corners and sigma is None and not lazy_
                              and isinstance(img, MetaTensor))
            interpolates = plain_bilinear and not self._smooths(img, bool(anti_aliasing))
            if plain_bilinear and self.kernel == "sam3":
                d[key] = self._sam3(img, bool(anti_aliasing), align_corners, dtype, source_name(img, d, key))
            elif interpolates and pixels <= INTERPOLATE_MAX_PIXELS:
                d[key] = self._by_channel(img, align_corners, dtype)
            elif plain_bilinear and pixels > EAGER_MAX_PIXELS:
                d[key] = self._tiled(img, bool(anti_aliasing), align_corners, dtype, source_name(img, d, key))
            else:
                d[key] = self.resizer(materialize_intensity(img), **kwargs)
        return d

    def _smooths(self, img: Any, anti_aliasing: bool) -> bool:
        """Whether MONAI's ``Resize`` does more than interpolate ``img``: smooth it first (anti-aliasing, when a side
        shrinks) or keep it as it is (already S x S)."""
        height, width = (int(v) for v in img.shape[1:])
        if (height, width) == (self.spatial_size, self.spatial_size):
            return True
        return anti_aliasing and max(height, width) > self.spatial_size

    def _by_channel(self, img: MetaTensor, align_corners: bool | None, dtype: Any) -> MetaTensor:
        """An image of at most ``INTERPOLATE_MAX_PIXELS`` whose resize is plain bilinear interpolation: its
        intensities (when pending), then ``F.interpolate`` with the channels as the batch (a grey picture once, then
        repeated). These are MONAI
        ``Resize``'s values as ATen computes them on more than one thread; on one thread (DataLoader workers) ATen
        resizes 3 channels with a second kernel that rounds differently in the last float bit and takes 3-4x the
        time, so this keeps a picture's input the same whatever the threads."""
        spec = pending_intensity(img)
        source = plain_tensor(img)
        height, width = (int(v) for v in source.shape[1:])
        values = _intensities(source, spec).float()
        out = torch.nn.functional.interpolate(values[:, None], size=(self.spatial_size, self.spatial_size),
                                              mode="bilinear", align_corners=False)[:, 0]
        return self._recorded(img, out, (height, width), align_corners, dtype)

    def _torch_dtype(self, dtype: Any) -> torch.dtype:
        """The torch dtype of a resize to ``dtype`` (None: the resizer's own, float32 by default)."""
        return get_equivalent_dtype(dtype or self.resizer.dtype or torch.float32, torch.Tensor)

    def _tile_bar(self, path: str | None, height: int, width: int):
        """:func:`tile_progress` over the rows of a ``height`` x ``width`` picture's tiled passes (shown from
        ``PROGRESS_MIN_PIXELS``, unless ``progress`` is off)."""
        size = self.spatial_size
        desc = f"{Path(path).name if path else 'image'}: {width}x{height} -> {size}x{size}"
        return tile_progress(height, desc, self.progress and height * width >= PROGRESS_MIN_PIXELS)

    def _recorded(self, img: Any, out: torch.Tensor, hw: tuple[int, int], align_corners: bool | None,
                  dtype: Any) -> MetaTensor:
        """The resized intensities ``out`` of ``img`` (its pending intensity's channels) repeated as that intensity
        records (``GreyToRGBd``), with the record MONAI's ``Resize`` would make (``functional.resize``), so that
        ``Invertd`` inverts it, and without the pending intensity."""
        repeat = int((pending_intensity(img) or {}).get("repeat", 1))
        if repeat > 1:
            out = out.repeat(repeat, 1, 1)
        size = (self.spatial_size, self.spatial_size)
        orig_size = img.peek_pending_shape() if isinstance(img, MetaTensor) else hw
        extra_info = {"mode": "bilinear", "align_corners": TraceKeys.NONE if align_corners is None else align_corners,
                      "dtype": str(self._torch_dtype(dtype))[6:], "new_dim": 0}
        meta_info = TraceableTransform.track_transform_meta(
            img, sp_size=size, affine=scale_affine(orig_size, size, align_corners=False), extra_info=extra_info,
            orig_size=orig_size, transform_info=self.resizer.get_transform_info(), lazy=False,
        )
        out = MetaTensor(out).copy_meta_from(meta_info)
        out.meta.pop(PENDING_INTENSITY, None)
        return out

    def _sam3(self, img: MetaTensor, antialias: bool, align_corners: bool | None, dtype: Any,
              path: str | None) -> MetaTensor:
        """The ``"sam3"`` kernel (class docstring): ``(C, S, S)`` levels / 255 in ``dtype`` (float32 by default),
        recorded as MONAI's ``Resize`` to ``dtype`` records it (the dtype ``Invertd`` resizes a prediction back in)."""
        spec = pending_intensity(img)
        source = plain_tensor(img)
        height, width = (int(v) for v in source.shape[1:])
        size = self.spatial_size
        resize = functools.partial(_sam3_resize(), antialias=antialias)
        if height * width <= INTERPOLATE_MAX_PIXELS or not _uint8_resize_in_passes():
            out = resize(_picture_levels(source, spec), [size, size])  # SAM3's one call
        else:  # along the rows tile by tile, then along the columns: the one call's levels (its own two passes)
            along_rows = torch.empty(_intensity_channels(source, spec), height, size, dtype=torch.uint8)
            with self._tile_bar(path, height, width) as bar:
                for start, stop in row_tiles(height, width, source.shape[0]):
                    along_rows[:, start:stop] = resize(_levels(source[:, start:stop], spec), [stop - start, size])
                    bar.update(stop - start)
            out = resize(along_rows, [size, size])
        return self._recorded(img, out.to(self._torch_dtype(dtype)).div_(255.0), (height, width), align_corners, dtype)

    def _tiled(self, img: MetaTensor, anti_aliasing: bool, align_corners: bool | None, dtype: Any,
               path: str | None) -> MetaTensor:
        spec = pending_intensity(img)
        source = plain_tensor(img)
        height, width = (int(v) for v in source.shape[1:])
        size = (self.spatial_size, self.spatial_size)
        sigmas: list[float | None] = [None, None]
        if anti_aliasing and any(out < orig for out, orig in zip(size, (height, width))):
            factors = torch.div(torch.Tensor([height, width]), torch.Tensor(list(size)))  # MONAI's float32 sigma
            sigmas = torch.maximum(torch.zeros(factors.shape), (factors - 1) / 2).tolist()
        row_blocks = _resize_blocks(height, size[0], sigmas[0])
        columns = _resize_blocks(width, size[1], sigmas[1])
        channels = _intensity_channels(source, spec)
        out = torch.empty(channels, *size, dtype=torch.float32)
        tile_rows = max(1, RESIZE_TILE_ELEMENTS // (width * source.shape[0]))
        with self._tile_bar(path, height, width) as bar:
            done = 0
            for start, stop, group in _row_groups(row_blocks, tile_rows):  # output row blocks whose bands fit a tile
                if stop - start <= tile_rows:
                    tile = _along_columns(source, spec, start, stop, columns, channels, size[1])
                    for out_start, out_stop, in_start, in_stop, block in group:  # each block's whole band at once
                        out[:, out_start:out_stop] = block.T @ tile[:, in_start - start:in_stop - start]
                else:  # one block whose band is taller than a tile (a strong shrink): summed tile by tile
                    (out_start, out_stop, in_start, in_stop, block), = group
                    acc = torch.zeros(channels, out_stop - out_start, size[1], dtype=RESIZE_DTYPE)
                    for low in range(in_start, in_stop, tile_rows):
                        high = min(low + tile_rows, in_stop)
                        tile = _along_columns(source, spec, low, high, columns, channels, size[1])
                        acc += block[low - in_start:high - in_start].T @ tile
                    out[:, out_start:out_stop] = acc
                bar.update(max(0, stop - done))
                done = max(done, stop)
        return self._recorded(img, out, (height, width), align_corners, dtype)
