"""3D volumes into the 2D path: axial slices (all, in order, for inference; foreground-biased samples for
training) and the restack of per-slice predictions into a volume with the input's affine.

Geometry: a volume is ``(C, X, Y, Z)`` (MONAI loading); the axial axis is the last spatial one by default
(``axis=2``; ``"auto"`` picks the voxel axis closest to world superior-inferior). A slice is
``(C, rows, cols)`` with ``rows = Y``, ``cols = X`` (``transpose=True``: the usual radiological picture, as a
SimpleITK array slice), or ``(C, X, Y)`` with ``transpose=False``. Its meta carries ``slice_index``,
``slice_axis``, ``slice_transposed``, ``volume_shape`` and ``volume_affine``, and a 4x4 ``affine`` that maps
its ``(row, col, 0)`` to world coordinates. A slice starts with no applied operations of its own: invert
slice-space transforms per slice, restack, then invert volume-level transforms (if any) on the volume.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform

from .errors import DataError, source_name

__all__ = [
    "AxialSlicesd",
    "RandAxialSliced",
    "RestackSlicesd",
    "axial_axis",
    "extract_slice",
    "foreground_slices",
    "restack_slices",
    "sample_slice_indices",
]

SLICE_META_KEYS = ("slice_index", "slice_axis", "slice_transposed", "volume_shape", "volume_affine")


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


def _plane_axes(axis: int, transpose: bool) -> tuple[int, int]:
    """(row axis, column axis) of a slice, as spatial axes of the volume."""
    p, q = [i for i in range(3) if i != axis]
    return (q, p) if transpose else (p, q)


def extract_slice(volume: torch.Tensor, index: int, axis: int = 2, transpose: bool = True) -> torch.Tensor:
    """``(C, X, Y, Z)`` -> ``(C, rows, cols)`` slice ``index`` along spatial ``axis``, with slice geometry meta."""
    plane = volume.select(axis + 1, int(index))
    if transpose:
        plane = plane.transpose(1, 2)
    plane = (plane.as_tensor() if isinstance(plane, MetaTensor) else plane).contiguous().clone()
    if not isinstance(volume, MetaTensor):
        return plane
    affine = volume.affine.to(torch.float64)
    row_axis, col_axis = _plane_axes(axis, transpose)
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
    label = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
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
    first = slices[0].as_tensor() if isinstance(slices[0], MetaTensor) else torch.as_tensor(slices[0])
    volume = torch.full((first.shape[0], *shape), fill, dtype=first.dtype)
    for plane, meta in zip(slices, metas):
        plane = plane.as_tensor() if isinstance(plane, MetaTensor) else torch.as_tensor(plane)
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
    """A list of slice items (from :class:`AxialSlicesd`, after per-slice inference and ``Invertd``) -> one
    item whose ``keys`` are ``(C, X, Y, Z)`` volumes with the input volume's affine.

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
