"""Intensity by modality (CT window, MRI percentile clip, grey min-max, RGB /255), grey -> 3 channels,
and SAM3's pixel normalisation.

Every function here maps a float image to ``[0, 1]`` and keeps MetaTensor metadata; shapes are unchanged
(``(C, *spatial)``) except where a docstring says otherwise.

2D pictures in both bundles (``ScaleIntensityByModalityd(defer_2d=True)``): the native-size float image is never
built. The intensity step computes only what needs the whole image (min, max, percentiles,
whether the channels are equal) and records the per-pixel mapping in ``meta["pending_intensity"]``
(:func:`pending_intensity`); :class:`GreyToRGBd` records its repeat there too, and the slice-space resize
(:class:`~medsam3_monai.transforms.slices.TiledResizeToSliced`) applies it tile by tile with
:func:`apply_intensity` -- the same float32 operations, element by element, as the eager functions below.

Both bundles keep slice-space images as the 8-bit levels SAM3 sees, uint8, until the network's device
(``Sam3Normalized(levels=True)``): ``(3, S, S)``, and for the inference bundle's volumes a grey slice also stays one
channel through the resize (``GreyToRGBd(repeat_volume_slices=False)``), ``(1, S, S)``: 1 MB at 1008 px, against
12 MB as normalised RGB float32. The network input is made from them a batch at a time on the device
(``MedSAM3Net`` normalises uint8 images; :func:`~medsam3_monai.networks.network_pixels` also repeats grey slices:
``normalize_pixels``, the arithmetic of :func:`sam3_normalize`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ..tensors import all_finite, plain_tensor
from .errors import DataError, source_name

__all__ = [
    "CT_WINDOWS",
    "MODALITY_HANDLERS",
    "PENDING_INTENSITY",
    "GreyToRGBd",
    "ScaleIntensityByModalityd",
    "Sam3Normalized",
    "apply_intensity",
    "ct_window",
    "materialize_intensity",
    "pending_intensity",
    "row_tiles",
    "handler_for_modality",
    "is_ct_windowed",
    "is_volume_slice",
    "min_max",
    "percentile_min_max",
    "rgb_scale",
    "sam3_levels",
    "sam3_normalize",
    "to_grey",
    "unit_pixels",
]

#: CT window presets, name -> (width, level) in HU.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
    "soft_tissue": (350.0, 50.0),
    "mediastinum": (350.0, 50.0),
    "liver": (150.0, 30.0),
}

#: modality (normalised spelling, see :func:`handler_for_modality`) -> intensity handler.
MODALITY_HANDLERS: dict[str, str] = {
    "ct": "ct_window",
    "mri": "percentile",
    "mr": "percentile",
    "xray": "minmax",
    "xr": "minmax",  # X-ray's short name (DICOM's own codes, CR, DX, ..., are read through DICOM_MODALITIES)
    "ultrasound": "minmax",
    "us": "minmax",
    "oct": "minmax",
    "em": "minmax",
    "endoscopy": "rgb",
    "colonoscopy": "rgb",
    "dermoscopy": "rgb",
    "fundus": "rgb",
    "pathology": "rgb",
    "histopathology": "rgb",
    "microscopy": "auto",  # RGB stains or grey fluorescence: decided by the channel count
}
_HANDLERS = ("ct_window", "percentile", "minmax", "rgb", "auto")
#: meta key of a 2D picture whose intensity mapping is still to be applied (see the module docstring)
PENDING_INTENSITY = "pending_intensity"
#: elements per tile of the tile-by-tile passes over a native-size picture: at least this many ...
TILE_ELEMENTS = 1 << 18
#: ... and up to a sixteenth of the picture, at most this many (larger tiles: fewer, faster matrix products)
MAX_TILE_ELEMENTS = 1 << 21
#: elements quantised at a time by :func:`sam3_levels` on the CPU (a 256 KB float32 buffer)
LEVELS_CHUNK = 1 << 16


def _like(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``out`` carrying ``ref``'s metadata and applied operations when ``ref`` is a MetaTensor."""
    if isinstance(ref, MetaTensor):
        return MetaTensor(out, meta=dict(ref.meta), applied_operations=list(ref.applied_operations))
    return out


def handler_for_modality(modality: str | None, handlers: Mapping[str, str] | None = None) -> str:
    """The intensity handler for a modality name; spelling-insensitive ('X-ray', 'xray', 'XRay'); a DICOM
    Modality code (CR, DX, MG, OP, ...: :data:`~medsam3_monai.transforms.io.DICOM_MODALITIES`) names its modality."""
    from .io import DICOM_MODALITIES

    table = {**MODALITY_HANDLERS, **{_norm(k): v for k, v in (handlers or {}).items()}}
    if modality is None:
        return "auto"
    key = _norm(modality)
    if key not in table:
        key = _norm(DICOM_MODALITIES.get(str(modality).strip().upper(), ""))
    if key not in table:
        raise KeyError(modality)
    return table[key]


#: meta entry of a volume scaled without a modality: what to say about it (:func:`unscaled_volume_note`)
INTENSITY_NOTE = "intensity_note"
#: a volume whose values reach this low (air is -1000 HU) looks like CT in Hounsfield units
HU_LIKE_MINIMUM = -500.0
#: ... and one reaching below this (beyond any CT's -1024, with room for odd pads) is not one
HU_PLAUSIBLE_MINIMUM = -1e5


def unscaled_volume_note(values: torch.Tensor) -> str:
    """The note on a volume that had no modality and was min-max scaled, from its values (C, X, Y, Z): when they
    reach :data:`HU_LIKE_MINIMUM` (Hounsfield units: air is -1000), that it looks like a CT to window; below
    :data:`HU_PLAUSIBLE_MINIMUM`, that no modality has such values (a corrupt file's garbage)."""
    low, high = float(values.min()), float(values.max())
    if low < HU_PLAUSIBLE_MINIMUM:
        return (f"no modality was given, so the volume was min-max scaled; its values ({low:g} to {high:g}) are "
                "beyond any modality's range: check the file (`medsam3 datalist --check` tests a .gz file's whole "
                "stream) and give its modality")
    if low <= HU_LIKE_MINIMUM:
        return (f"no modality was given, so the volume was min-max scaled, but its values ({low:g} to {high:g}) look "
                "like CT Hounsfield units: give its modality (CT) for the CT window the papers' CT inputs get")
    return ("no modality was given, so the volume was min-max scaled: give its modality (CT: the CT window; MRI: a "
            "0.5-99.5 percentile clip) for the scaling the papers' inputs get")


def is_ct_windowed(modality: str | None) -> bool:
    """Whether inputs of ``modality`` are scaled by the CT window (an unknown or absent modality: no)."""
    try:
        return modality is not None and handler_for_modality(modality) == "ct_window"
    except KeyError:
        return False


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def ct_window(x: torch.Tensor, width: float, level: float) -> torch.Tensor:
    """Clip HU to ``[level - width/2, level + width/2]`` and scale to ``[0, 1]``."""
    lo, hi = level - width / 2.0, level + width / 2.0
    return plain_tensor(x).float().clamp(lo, hi).sub_(lo).div_(hi - lo)  # in place on clamp's new float32 buffer


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Scale to ``[0, 1]`` by the image's own min and max (a constant image becomes zeros)."""
    x = plain_tensor(x).float()
    lo, hi = x.min(), x.max()
    if hi <= lo:
        return torch.zeros_like(x)
    return (x - lo).div_(hi - lo)


def percentile_min_max(x: torch.Tensor, lower: float = 0.5, upper: float = 99.5) -> torch.Tensor:
    """Clip to the ``lower``/``upper`` percentiles (of all voxels) and scale to ``[0, 1]`` (MRI)."""
    x = plain_tensor(x).float()
    lo, hi = np.percentile(x.numpy().ravel(), [lower, upper])
    if hi <= lo:
        return min_max(x)
    return x.clamp(float(lo), float(hi)).sub_(float(lo)).div_(float(hi - lo))


def rgb_scale(x: torch.Tensor, source_dtype: str | None = None) -> torch.Tensor:
    """Optical pictures: divide by the file dtype's maximum (uint8 -> /255, uint16 -> /65535).

    Float data already in ``[0, 1]`` is kept; other float or signed data falls back to :func:`min_max`.
    """
    x = plain_tensor(x)
    if source_dtype in ("uint8", "uint16"):  # one new float buffer, divided in place
        return x.to(torch.float32, copy=True).div_(float(np.iinfo(source_dtype).max))
    x = x.float()
    if x.numel() and x.min() >= 0 and x.max() <= 1:
        return x
    if x.numel() and x.min() >= 0 and x.max() <= 255 and torch.equal(x, torch.round(x)):
        return x / 255.0
    return min_max(x)


def to_grey(x: torch.Tensor) -> torch.Tensor:
    """``(C, ...)`` -> ``(1, ...)``: identical channels are kept exactly, colour uses ITU-R 601 luma."""
    x = plain_tensor(x)
    if x.shape[0] == 1:
        return x
    rgb = x[:3].float()
    if x.shape[0] >= 3 and torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[0], rgb[2]):
        return rgb[:1]
    if x.shape[0] < 3:
        return rgb[:1]
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(3, *([1] * (x.ndim - 1)))
    return (rgb * weights).sum(0, keepdim=True)


_LUMA = (0.299, 0.587, 0.114)


def row_tiles(height: int, width: int, channels: int = 1, elements: int | None = None) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` row ranges of a ``(channels, height, width)`` array, about ``elements`` each
    (default: ``TILE_ELEMENTS``, or a sixteenth of the array up to ``MAX_TILE_ELEMENTS``: a tile's float
    temporaries stay a small share of the picture's own memory)."""
    total = int(height) * int(width) * int(channels)
    if elements is None:
        elements = max(TILE_ELEMENTS, min(MAX_TILE_ELEMENTS, total // 16))
    rows = max(1, int(elements) // max(1, int(width) * int(channels)))
    return [(start, min(start + rows, int(height))) for start in range(0, int(height), rows)]


def pending_intensity(img: Any) -> dict[str, Any] | None:
    """The intensity mapping still to be applied to a 2D picture (``ScaleIntensityByModalityd(defer_2d=True)``),
    or None when ``img`` holds intensities already."""
    meta = getattr(img, "meta", None)
    spec = meta.get(PENDING_INTENSITY) if isinstance(meta, Mapping) else None
    return dict(spec) if isinstance(spec, Mapping) else None


def is_volume_slice(img: Any) -> bool:
    """Whether ``img`` is a slice of a volume (``AxialSlicesd`` / ``RandAxialSliced`` record ``volume_shape``)."""
    meta = getattr(img, "meta", None)
    return isinstance(meta, Mapping) and "volume_shape" in meta


def _grey_of(x: torch.Tensor, grey: str) -> torch.Tensor:
    """:func:`to_grey`'s arithmetic with its whole-image decision (``first`` channel or ``luma``) made already."""
    if grey == "first":
        return x if x.shape[0] == 1 else x[:1].float()
    if grey == "luma":
        rgb = x[:3].float()
        weights = torch.tensor(_LUMA, dtype=torch.float32).view(3, *([1] * (x.ndim - 1)))
        return (rgb * weights).sum(0, keepdim=True)
    return x


def apply_intensity(tile: torch.Tensor, spec: Mapping[str, Any], repeat: bool = True) -> torch.Tensor:
    """A tile ``(C, rows, cols)`` of the source picture -> its ``[0, 1]`` float32 intensities, exactly (element by
    element) what ``ScaleIntensityByModalityd`` (and :class:`GreyToRGBd` when ``repeat``) give for those pixels."""
    x = _grey_of(plain_tensor(tile)[: int(spec["channels"])], spec["grey"])
    op = spec["op"]
    if op == "div":
        out = x.float() / float(spec["value"])
    elif op == "keep":
        out = x.float()
    elif op == "zeros":
        out = torch.zeros(x.shape, dtype=torch.float32)
    elif op == "minmax":
        lo, hi = torch.tensor(spec["lo"], dtype=torch.float32), torch.tensor(spec["hi"], dtype=torch.float32)
        out = (x.float() - lo) / (hi - lo)
    elif op == "clip":
        lo, hi = float(spec["lo"]), float(spec["hi"])
        out = (x.float().clamp(lo, hi) - lo) / float(spec["den"])
    else:
        raise ValueError(f"unknown pending intensity operation {op!r}")
    out = out.to(torch.float32)
    if repeat and int(spec.get("repeat", 1)) > 1:
        out = out.repeat(int(spec["repeat"]), *([1] * (out.ndim - 1)))
    return out


def output_channels(spec: Mapping[str, Any]) -> int:
    """Channels of :func:`apply_intensity`'s output (after the recorded repeat)."""
    return (1 if spec["grey"] != "none" else int(spec["channels"])) * int(spec.get("repeat", 1))


def materialize_intensity(img: torch.Tensor) -> torch.Tensor:
    """A picture with a pending intensity -> the float32 ``[0, 1]`` image the eager transforms would have made
    (native size: for code that needs the whole image; the slice-space resize does not)."""
    spec = pending_intensity(img)
    if spec is None:
        return img
    source = plain_tensor(img)
    out = torch.empty((output_channels(spec), *source.shape[1:]), dtype=torch.float32)
    for start, stop in row_tiles(source.shape[1], source.shape[2], source.shape[0]):
        out[:, start:stop] = apply_intensity(source[:, start:stop], spec)
    out = _like(out, img)
    if isinstance(out, MetaTensor):
        out.meta.pop(PENDING_INTENSITY, None)
    return out


def _tile_values(x: torch.Tensor, grey: str):
    """The grey (or all-channel) float values of ``x``, one row tile at a time."""
    for start, stop in row_tiles(x.shape[1], x.shape[2], x.shape[0]):
        yield _grey_of(x[:, start:stop], grey).float()


def _min_max_of(x: torch.Tensor, grey: str) -> tuple[float, float]:
    if grey == "first" or (grey == "none" and not x.is_floating_point()):
        part = x[:1] if grey == "first" else x
        return float(part.min()), float(part.max())
    lo, hi = float("inf"), float("-inf")
    for values in _tile_values(x, grey):
        lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    return lo, hi


def _minmax_spec(x: torch.Tensor, grey: str) -> dict[str, Any]:
    lo, hi = _min_max_of(x, grey)
    return {"op": "zeros"} if hi <= lo else {"op": "minmax", "lo": lo, "hi": hi}


def _deferred_spec(x: torch.Tensor, handler: str, source_dtype: str | None, window: tuple[float, float],
                   percentiles: tuple[float, float]) -> dict[str, Any]:
    """What a 2D picture ``x`` (``(C, H, W)``, alpha dropped) needs from the whole image, for ``handler``."""
    grey = "none"
    if handler in ("ct_window", "percentile", "minmax"):
        same = x.shape[0] >= 3 and torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
        grey = "luma" if x.shape[0] >= 3 and not same else "first"
    spec: dict[str, Any] = {"channels": int(x.shape[0]), "grey": grey, "repeat": 1}
    if handler == "ct_window":
        width, level = window
        lo, hi = level - width / 2.0, level + width / 2.0
        spec.update(op="clip", lo=lo, hi=hi, den=hi - lo)
    elif handler == "minmax":
        spec.update(_minmax_spec(x, grey))
    elif handler == "percentile":
        values = np.empty(x.shape[1] * x.shape[2], dtype=np.float32)
        offset = 0
        for tile in _tile_values(x, grey):
            values[offset:offset + tile.numel()] = tile.numpy().ravel()
            offset += tile.numel()
        lo, hi = np.percentile(values, list(percentiles), overwrite_input=True)
        del values
        if hi <= lo:
            spec.update(_minmax_spec(x, grey))
        else:
            spec.update(op="clip", lo=float(lo), hi=float(hi), den=float(hi - lo))
    elif source_dtype in ("uint8", "uint16"):
        spec.update(op="div", value=float(np.iinfo(source_dtype).max))
    else:  # rgb_scale's rules for float or signed data
        lo, hi = _min_max_of(x, "none")
        if lo >= 0 and hi <= 1:
            spec.update(op="keep")
        elif lo >= 0 and hi <= 255 and all(torch.equal(v, torch.round(v)) for v in _tile_values(x, "none")):
            spec.update(op="div", value=255.0)
        else:
            spec.update(_minmax_spec(x, "none"))
    return spec


class ScaleIntensityByModalityd(MapTransform):
    """Map intensities to ``[0, 1]`` by the item's modality.

    Handlers: CT -> window (preset name or ``(width, level)``; the item's ``window_key`` overrides);
    MRI -> percentile clip (0.5-99.5 by default) then min-max; grey modalities (X-ray, ultrasound, OCT, EM)
    -> converted to one grey channel, then min-max; optical RGB modalities (endoscopy, dermoscopy, fundus,
    pathology) -> /255 for uint8 files; microscopy -> RGB rule for 3 channels, else min-max. An RGBA
    picture loses its alpha channel first.

    Args:
        keys: image keys.
        modality_key: item key with the modality (``"modality"`` of the datalist).
        modality: fixed modality, overriding the item's.
        ct_window: preset name in :data:`CT_WINDOWS` or ``(width, level)``.
        window_key: item key that may override ``ct_window`` per item.
        mri_percentiles: ``(lower, upper)`` percentiles for MRI.
        handlers: extra modality -> handler entries (handlers: ``ct_window``, ``percentile``, ``minmax``,
            ``rgb``, ``auto``).
        defer_2d: for 2D pictures (not volumes), compute only the whole-image statistics and record the
            per-pixel mapping in ``meta["pending_intensity"]``, leaving the pixels (uint8) as they are; the
            slice-space resize (``TiledResizeToSliced``) applies it tile by tile, so no native-size float image
            is made (both bundles; see the module docstring).

    Shapes: ``(C, *spatial)`` -> ``(C', *spatial)`` with C' = 1 for grey handlers, C (<= 3) for RGB (deferred:
    unchanged, C' is recorded).
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        modality_key: str = "modality",
        modality: str | None = None,
        ct_window: str | Sequence[float] = "abdomen",
        window_key: str = "ct_window",
        mri_percentiles: Sequence[float] = (0.5, 99.5),
        handlers: Mapping[str, str] | None = None,
        defer_2d: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.defer_2d = bool(defer_2d)
        self.modality_key = modality_key
        self.modality = modality
        self.ct_window = ct_window
        self.window_key = window_key
        self.mri_percentiles = tuple(float(p) for p in mri_percentiles)
        self.handlers = dict(handlers or {})
        bad = {v for v in self.handlers.values() if v not in _HANDLERS}
        if bad:
            raise ValueError(f"unknown intensity handler(s) {sorted(bad)}; choose from {_HANDLERS}")
        _window(ct_window)  # fail early on a bad preset

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        modality = self.modality or d.get(self.modality_key)
        for key in self.key_iterator(d):
            img = d[key]
            path = source_name(img, d, key)
            if modality is None and path is not None:  # a DICOM series says its own modality
                from .io import dicom_modality

                modality = dicom_modality(path)
            try:
                handler = handler_for_modality(modality, self.handlers)
            except KeyError:
                raise DataError(path, f"unknown modality {modality!r}",
                                f"use one of {sorted(set(MODALITY_HANDLERS))} or pass handlers={{...}}") from None
            x, handler, source_dtype = self._checked(img, plain_tensor(img), handler, path)
            window = _window(d.get(self.window_key) or self.ct_window) if handler == "ct_window" else (1.0, 0.0)
            picture = x.ndim == 3 and not (isinstance(img, MetaTensor) and img.meta.get("is_volume"))
            if self.defer_2d and picture:
                d[key] = self._defer(img, x, handler, source_dtype, window)
                continue
            if handler == "ct_window":
                out = ct_window(to_grey(x), *window)
            elif handler == "percentile":
                out = percentile_min_max(to_grey(x), *self.mri_percentiles)
            elif handler == "minmax":
                out = min_max(to_grey(x))
            else:
                out = rgb_scale(x, source_dtype)
            out = _like(out.to(torch.float32), img)
            if isinstance(out, MetaTensor):
                out.meta["intensity"] = self._note(handler, window)
                if modality is None and out.meta.get("is_volume"):
                    out.meta[INTENSITY_NOTE] = unscaled_volume_note(x)
            d[key] = out
        return d

    @staticmethod
    def _checked(img: Any, x: torch.Tensor, handler: str, path: str | None
                 ) -> tuple[torch.Tensor, str, Any]:
        """``(pixels, handler, source dtype)``: the pixels checked finite and without alpha, ``auto`` resolved (RGB
        for three channels, else min-max)."""
        if not all_finite(x):  # integer pixels are finite: nothing to read
            raise DataError(path, "holds NaN/Inf intensities",
                            "repair the file (e.g. replace NaN with the background value) before using it")
        if x.shape[0] == 4:
            x = x[:3]  # alpha
        if handler == "auto":
            handler = "rgb" if x.shape[0] == 3 else "minmax"
        return x, handler, img.meta.get("source_dtype") if isinstance(img, MetaTensor) else None

    def _note(self, handler: str, window: tuple[float, float]) -> str:
        """The ``meta["intensity"]`` note of ``handler`` (``window``: the CT window's width and level)."""
        if handler == "ct_window":
            return f"ct_window(W={window[0]:g}, L={window[1]:g})"
        return {"percentile": f"percentile{self.mri_percentiles}", "minmax": "minmax"}.get(handler, "rgb")

    def _defer(self, img: Any, x: torch.Tensor, handler: str, source_dtype: Any, window: tuple[float, float]) -> Any:
        """The deferred form of :meth:`__call__` for one 2D picture (checked by :meth:`_checked`): the same note, no
        float image."""
        out = _like(plain_tensor(img), img)
        if not isinstance(out, MetaTensor):
            out = MetaTensor(out)
        out.meta[PENDING_INTENSITY] = _deferred_spec(x, handler, source_dtype, window, self.mri_percentiles)
        out.meta["intensity"] = self._note(handler, window)
        return out


def check_ct_window(window: str | Sequence[float]) -> None:
    """Refuse a CT window that is neither a preset of :data:`CT_WINDOWS` nor (width > 0, level) (ValueError)."""
    _window(window)


def _window(window: str | Sequence[float]) -> tuple[float, float]:
    if isinstance(window, str):
        name = window.lower().replace(" ", "_").replace("-", "_")
        if name not in CT_WINDOWS:
            raise ValueError(f"unknown CT window {window!r}; presets: {sorted(CT_WINDOWS)}, or a width and level "
                             "in HU (400,40: W,L)")
        return CT_WINDOWS[name]
    width, level = (float(v) for v in window)
    if not (math.isfinite(width) and math.isfinite(level)):
        raise ValueError(f"CT window width and level must be finite numbers (HU), got {width:g},{level:g}")
    if width <= 0:
        raise ValueError(f"CT window width must be positive, got {width}")
    return width, level


class GreyToRGBd(MapTransform):
    """``(1, ...)`` -> ``(3, ...)`` by repetition; 3 channels pass; RGBA loses alpha; other counts are errors.

    Both bundles run it after the slice-space resize and ``Sam3Normalized(levels=True)``, on the uint8 levels: the
    resize and the levels of a grey picture are then a single channel's, and the repeat copies bytes, not floats.
    Every step before is per channel and per element, so the result is that of repeating first. Placed before the
    resize, it repeats the float picture, or records the repeat for the resize to apply when the picture's
    intensity is pending (``ScaleIntensityByModalityd(defer_2d=True)``).

    Args:
        repeat_volume_slices: False keeps a grey slice of a volume ``(1, H, W)``: the volume inferer repeats each
            detector batch on the network's device (a view), so the stacked slices are a third. The inference
            bundle's choice.
    """

    def __init__(self, keys: KeysCollection = ("image",), repeat_volume_slices: bool = True,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.repeat_volume_slices = repeat_volume_slices

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            spec = pending_intensity(img)
            if spec is not None:  # a deferred 2D picture: record the repeat, the resize applies it
                channels = output_channels(spec)
                if channels == 1:
                    out = _like(plain_tensor(img), img)
                    out.meta[PENDING_INTENSITY] = {**spec, "repeat": 3 * int(spec.get("repeat", 1))}
                    d[key] = out
                elif channels != 3:
                    raise DataError(source_name(img, d, key), f"has {channels} channels",
                                    "expected a grey (1), RGB (3) or RGBA (4) picture")
                continue
            channels = img.shape[0]
            if channels == 3 or (channels == 1 and not self.repeat_volume_slices and is_volume_slice(img)):
                continue
            if channels == 1:
                out = plain_tensor(img).repeat(3, *([1] * (img.ndim - 1)))
            elif channels == 4:
                out = plain_tensor(img)[:3]
            else:
                raise DataError(source_name(img, d, key), f"has {channels} channels",
                                "expected a grey (1), RGB (3) or RGBA (4) picture")
            d[key] = _like(out, img)
        return d


def _exact_levels(x: torch.Tensor, quantize: bool) -> torch.Tensor | None:
    """The 8-bit levels of ``x`` as exact float32 integers in a new buffer, or None for float input that is not
    quantised (see :func:`sam3_normalize`)."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32)
    if quantize:  # one buffer, in place (a 1008-px RGB slice is 12 MB): clamp, scale, round half to even
        return x.to(torch.float32, copy=True).clamp_(0.0, 1.0).mul_(255.0).round_()
    return None


def sam3_normalize(x: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """SAM3's pixels: ``((uint8 * (1/255)) - 0.5) / 0.5``, float32.

    ``x``: uint8 in ``[0, 255]``, or float in ``[0, 1]`` (quantised to uint8 first when ``quantize``, as
    the reference pipeline sees 8-bit pictures). Multiplying by ``1/255`` (torchvision ``ToDtype(scale=True)``,
    transformers' ``rescale_factor``) and dividing by 255 differ in the last bit for some values; this is
    the multiply.
    """
    x = plain_tensor(x)
    levels = _exact_levels(x, quantize)
    if levels is None:
        return ((x.float() - 0.5) / 0.5).to(torch.float32)
    return levels.mul_(1.0 / 255.0).sub_(0.5).div_(0.5)


def sam3_levels(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit picture SAM3 sees: float ``[0, 1]`` (or uint8) -> uint8 levels, :func:`sam3_normalize`'s
    quantisation; ``normalize_pixels`` of the network turns them into :func:`sam3_normalize`'s values exactly.

    On the CPU, float input is quantised ``LEVELS_CHUNK`` elements at a time through one small float32 buffer
    with numpy's ufuncs (the steps of :func:`_exact_levels`, element by element the same: clip, scale by 255, round
    half to even): the buffer stays in cache, where four passes over a 12 MB float picture would each go to memory,
    and numpy's calls cost less than torch's per chunk."""
    x = plain_tensor(x)
    if x.dtype == torch.uint8:
        return x
    if x.device.type != "cpu":  # one kernel launch per step beats a loop of small ones
        return _exact_levels(x, True).to(torch.uint8)
    flat = x.detach().reshape(-1)
    if flat.dtype not in (torch.float16, torch.float32, torch.float64):  # (bfloat16: no numpy dtype)
        flat = flat.float()
    values = flat.numpy()
    levels = np.empty(values.size, dtype=np.uint8)
    buffer = np.empty(min(LEVELS_CHUNK, values.size), dtype=np.float32)
    for start in range(0, values.size, LEVELS_CHUNK):
        stop = min(start + LEVELS_CHUNK, values.size)
        chunk = buffer[: stop - start]
        np.clip(values[start:stop], 0.0, 1.0, out=chunk)  # clipped in the input's precision, then to float32:
        np.multiply(chunk, np.float32(255.0), out=chunk)  # the same as converting first (0 and 1 are exact)
        np.rint(chunk, out=chunk)
        levels[start:stop] = chunk
    return torch.from_numpy(levels).view(x.shape)


def unit_pixels(x: torch.Tensor) -> torch.Tensor:
    """A slice-space image back in ``[0, 1]`` float32 for display: uint8 levels / 255, or SAM3-normalised float
    ``(x + 1) / 2``."""
    x = plain_tensor(x)
    return x.float() * (1.0 / 255.0) if x.dtype == torch.uint8 else (x.float() + 1.0) / 2.0


class Sam3Normalized(MapTransform):
    """SAM3 normalisation (mean = std = 0.5 on ``[0, 1]``) of float ``[0, 1]`` or uint8 images.

    Args:
        quantize: round float input to 8 bits first, exactly as SAM3 sees 8-bit pictures (default).
        levels: keep those uint8 8-bit levels (:func:`sam3_levels`) instead, as both bundles do: a quarter of
            float32's bytes in caches, loader workers, pinned memory and host-to-device copies. The network makes
            its input from them on its device (``MedSAM3Net`` normalises uint8 images; ``networks.network_pixels``
            also repeats grey volume slices to RGB), with this normalisation's arithmetic: the same values.

    Shape unchanged; output float32 in ``[-1, 1]``, or uint8 levels with ``levels``.
    """

    def __init__(self, keys: KeysCollection = ("image",), quantize: bool = True, levels: bool = False,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if levels and not quantize:
            raise ValueError("levels=True keeps 8-bit levels: it needs quantize=True")
        self.quantize = quantize
        self.levels = levels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            d[key] = _like(sam3_levels(img) if self.levels else sam3_normalize(img, self.quantize), img)
        return d
