"""Slice space: every 2D image or slice resized to S x S (aspect ratio not kept, as SAM3 does), invertibly
(``bundles/medsam3/docs/conventions.md``, Slice space).

Inversion is MONAI's: ``Invertd(keys="pred", transform=<the Compose holding ResizeToSliced>,
orig_keys="image", nearest_interp=False)`` maps ``(N, S, S)`` predictions back to the image's own size,
spacing and affine (bilinear for probabilities; ``nearest_interp=True`` for hard masks). The prediction must
be a MetaTensor (``MetaTensor(pred)``): ``Invertd`` skips plain tensors with a warning. Slices of volumes are
then put back with :class:`~medsam3_monai.transforms.slices.RestackSlicesd`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import Resized

from .errors import DataError, source_name

__all__ = ["ResizeToSliced"]


class ResizeToSliced(Resized):
    """Resize ``(C, H, W)`` images (and optionally masks) to ``(C, S, S)`` with MONAI's ``Resize``; records the op
    for ``Invertd``. The bundles use :class:`~medsam3_monai.transforms.slices.TiledResizeToSliced`, whose default
    kernel is SAM3's own resize instead (``kernel="monai"``: this one's arithmetic).

    Args:
        keys: keys to resize (default the image only; targets are resized by :class:`BuildTargetsd`).
        spatial_size: S (1008 for the released weights, 112 or 224 for the tiny preset).
        mode: interpolation per key (``bilinear`` for images, ``nearest`` for label maps).
        anti_aliasing: Gaussian pre-smoothing when shrinking (per key).
        align_corners: for the linear modes (False: pixel-edge aligned, as SAM3's resize).
        dtype: output dtype per key (float32 default; keeps masks integer-valued with ``nearest``).
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        spatial_size: int = 1008,
        mode: str | Sequence[str] = "bilinear",
        anti_aliasing: bool | Sequence[bool] = True,
        align_corners: bool | None = False,
        dtype: Any = None,
        allow_missing_keys: bool = False,
    ) -> None:
        size = int(spatial_size)
        if size <= 0:
            raise ValueError(f"spatial_size must be positive, got {spatial_size}")
        self.spatial_size = size
        modes = [mode] if isinstance(mode, str) else list(mode)
        # align_corners only means something for the linear modes; MONAI wants None for the others
        corners = [None if m in ("nearest", "nearest-exact", "area") else align_corners for m in modes]
        super().__init__(
            keys,
            spatial_size=(size, size),
            mode=modes if len(modes) > 1 else modes[0],
            align_corners=corners if len(corners) > 1 else corners[0],
            anti_aliasing=anti_aliasing,
            dtype=dtype if dtype is not None else np.float32,
            allow_missing_keys=allow_missing_keys,
        )

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        for key in self.key_iterator(dict(data)):
            value = data[key]
            if getattr(value, "ndim", 0) != 3:
                raise DataError(source_name(value, data, key),
                                f"'{key}' has shape {tuple(getattr(value, 'shape', ()))}; slice space needs a "
                                "2D (C, H, W) image", "slice volumes first (AxialSlicesd / RandAxialSliced)")
        return super().__call__(data, lazy=lazy)
