"""Intensity by modality (CT window, MRI percentile clip, grey min-max, RGB /255), grey -> 3 channels,
and SAM3's pixel normalisation.

Every function here maps a float image to ``[0, 1]`` and keeps MetaTensor metadata; shapes are unchanged
(``(C, *spatial)``) except where a docstring says otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .errors import DataError, source_name

__all__ = [
    "CT_WINDOWS",
    "MODALITY_HANDLERS",
    "GreyToRGBd",
    "ScaleIntensityByModalityd",
    "Sam3Normalized",
    "ct_window",
    "handler_for_modality",
    "min_max",
    "percentile_min_max",
    "rgb_scale",
    "sam3_normalize",
    "to_grey",
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


def _like(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``out`` carrying ``ref``'s metadata and applied operations when ``ref`` is a MetaTensor."""
    if isinstance(ref, MetaTensor):
        return MetaTensor(out, meta=dict(ref.meta), applied_operations=list(ref.applied_operations))
    return out


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def handler_for_modality(modality: str | None, handlers: Mapping[str, str] | None = None) -> str:
    """The intensity handler for a modality name; spelling-insensitive ('X-ray', 'xray', 'XRay')."""
    table = {**MODALITY_HANDLERS, **{_norm(k): v for k, v in (handlers or {}).items()}}
    if modality is None:
        return "auto"
    key = _norm(modality)
    if key not in table:
        raise KeyError(modality)
    return table[key]


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def ct_window(x: torch.Tensor, width: float, level: float) -> torch.Tensor:
    """Clip HU to ``[level - width/2, level + width/2]`` and scale to ``[0, 1]``."""
    lo, hi = level - width / 2.0, level + width / 2.0
    return ((_plain(x).float().clamp(lo, hi) - lo) / (hi - lo)).to(torch.float32)


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Scale to ``[0, 1]`` by the image's own min and max (a constant image becomes zeros)."""
    x = _plain(x).float()
    lo, hi = x.min(), x.max()
    if hi <= lo:
        return torch.zeros_like(x)
    return (x - lo) / (hi - lo)


def percentile_min_max(x: torch.Tensor, lower: float = 0.5, upper: float = 99.5) -> torch.Tensor:
    """Clip to the ``lower``/``upper`` percentiles (of all voxels) and scale to ``[0, 1]`` (MRI)."""
    x = _plain(x).float()
    lo, hi = np.percentile(x.numpy().ravel(), [lower, upper])
    if hi <= lo:
        return min_max(x)
    return ((x.clamp(float(lo), float(hi)) - float(lo)) / float(hi - lo)).to(torch.float32)


def rgb_scale(x: torch.Tensor, source_dtype: str | None = None) -> torch.Tensor:
    """Optical pictures: divide by the file dtype's maximum (uint8 -> /255, uint16 -> /65535).

    Float data already in ``[0, 1]`` is kept; other float or signed data falls back to :func:`min_max`.
    """
    x = _plain(x).float()
    if source_dtype in ("uint8", "uint16"):
        return x / float(np.iinfo(source_dtype).max)
    if x.numel() and x.min() >= 0 and x.max() <= 1:
        return x
    if x.numel() and x.min() >= 0 and x.max() <= 255 and torch.equal(x, torch.round(x)):
        return x / 255.0
    return min_max(x)


def to_grey(x: torch.Tensor) -> torch.Tensor:
    """``(C, ...)`` -> ``(1, ...)``: identical channels are kept exactly, colour uses ITU-R 601 luma."""
    x = _plain(x)
    if x.shape[0] == 1:
        return x
    rgb = x[:3].float()
    if x.shape[0] >= 3 and torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[0], rgb[2]):
        return rgb[:1]
    if x.shape[0] < 3:
        return rgb[:1]
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(3, *([1] * (x.ndim - 1)))
    return (rgb * weights).sum(0, keepdim=True)


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

    Shapes: ``(C, *spatial)`` -> ``(C', *spatial)`` with C' = 1 for grey handlers, C (<= 3) for RGB.
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
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
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
            try:
                handler = handler_for_modality(modality, self.handlers)
            except KeyError:
                raise DataError(path, f"unknown modality {modality!r}",
                                f"use one of {sorted(set(MODALITY_HANDLERS))} or pass handlers={{...}}") from None
            x = _plain(img)
            if not torch.isfinite(x).all():
                raise DataError(path, "holds NaN/Inf intensities", "repair the file before training")
            if x.shape[0] == 4:
                x = x[:3]  # alpha
            if handler == "auto":
                handler = "rgb" if x.shape[0] == 3 else "minmax"
            source_dtype = img.meta.get("source_dtype") if isinstance(img, MetaTensor) else None
            if handler == "ct_window":
                width, level = _window(d.get(self.window_key) or self.ct_window)
                out, note = ct_window(to_grey(x), width, level), f"ct_window(W={width:g}, L={level:g})"
            elif handler == "percentile":
                out, note = percentile_min_max(to_grey(x), *self.mri_percentiles), f"percentile{self.mri_percentiles}"
            elif handler == "minmax":
                out, note = min_max(to_grey(x)), "minmax"
            else:
                out, note = rgb_scale(x, source_dtype), "rgb"
            out = _like(out.to(torch.float32), img)
            if isinstance(out, MetaTensor):
                out.meta["intensity"] = note
            d[key] = out
        return d


def _window(window: str | Sequence[float]) -> tuple[float, float]:
    if isinstance(window, str):
        name = window.lower().replace(" ", "_").replace("-", "_")
        if name not in CT_WINDOWS:
            raise ValueError(f"unknown CT window {window!r}; presets: {sorted(CT_WINDOWS)} or (width, level)")
        return CT_WINDOWS[name]
    width, level = (float(v) for v in window)
    if width <= 0:
        raise ValueError(f"CT window width must be positive, got {width}")
    return width, level


class GreyToRGBd(MapTransform):
    """``(1, ...)`` -> ``(3, ...)`` by repetition; 3 channels pass; RGBA loses alpha; other counts are errors."""

    def __init__(self, keys: KeysCollection = ("image",), allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            channels = img.shape[0]
            if channels == 3:
                continue
            if channels == 1:
                out = _plain(img).repeat(3, *([1] * (img.ndim - 1)))
            elif channels == 4:
                out = _plain(img)[:3]
            else:
                raise DataError(source_name(img, d, key), f"has {channels} channels",
                                "expected a grey (1), RGB (3) or RGBA (4) picture")
            d[key] = _like(out, img)
        return d


def sam3_normalize(x: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """SAM3's pixels: ``((uint8 * (1/255)) - 0.5) / 0.5``, float32.

    ``x``: uint8 in ``[0, 255]``, or float in ``[0, 1]`` (quantised to uint8 first when ``quantize``, as
    the reference pipeline sees 8-bit pictures). Multiplying by ``1/255`` (torchvision ``ToDtype(scale=True)``,
    transformers' ``rescale_factor``) and dividing by 255 differ in the last bit for some values; this is
    the multiply.
    """
    x = _plain(x)
    if x.dtype == torch.uint8:
        u8 = x
    elif quantize:
        u8 = torch.round(x.float().clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    else:
        return ((x.float() - 0.5) / 0.5).to(torch.float32)
    return (u8.to(torch.float32) * (1.0 / 255.0) - 0.5) / 0.5


class Sam3Normalized(MapTransform):
    """SAM3 normalisation (mean = std = 0.5 on ``[0, 1]``) of float ``[0, 1]`` or uint8 images.

    Args:
        quantize: round float input to 8 bits first, exactly as SAM3 sees 8-bit pictures (default).

    Shape unchanged; output float32 in ``[-1, 1]``.
    """

    def __init__(self, keys: KeysCollection = ("image",), quantize: bool = True,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.quantize = quantize

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _like(sam3_normalize(d[key], self.quantize), d[key])
        return d
