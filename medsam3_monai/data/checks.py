"""Cheap checks on image/mask files: spatial size from headers, label values of label maps."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..distinct import distinct_values

__all__ = ["is_nifti", "label_values", "nifti_channels", "spatial_shape", "unknown_label_values"]


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def nifti_channels(path: str | Path) -> tuple[int, tuple[int, ...]] | None:
    """(channels, shape) of a NIfTI volume from its header (channels: the product of the axes after the third), or
    None for another format or an unreadable header (the loader reports those in its turn)."""
    if not is_nifti(Path(path)):
        return None
    import math

    import nibabel as nib

    try:
        shape = tuple(int(n) for n in nib.load(str(path)).header.get_data_shape())
    except Exception:  # noqa: BLE001 - unreadable: the loader says why
        return None
    return math.prod(shape[3:]), shape


def spatial_shape(path: Path) -> tuple[int, ...]:
    """(H, W) of a 2D image or the first three axes of a NIfTI volume, read from the header only."""
    if is_nifti(path):
        import nibabel as nib

        return tuple(int(n) for n in nib.load(str(path)).header.get_data_shape()[:3])
    from ..transforms.io import picture_size

    width, height = picture_size(path)  # as displayed (an EXIF-turned photo), as the loader reads it
    return (height, width)


def label_values(path: Path) -> set[int]:
    """Distinct values of a label map (reads the whole file); non-integer values raise ``ValueError``."""
    if is_nifti(path):
        import nibabel as nib

        data = np.asanyarray(nib.load(str(path)).dataobj)
    else:
        from PIL import Image

        with Image.open(path) as image:
            data = np.asarray(image)
    values = distinct_values(data)
    if values.dtype.kind == "f" and not np.all(np.mod(values, 1) == 0):
        raise ValueError(f"non-integer label values, e.g. {values[np.mod(values, 1) != 0][:3].tolist()}")
    return {int(v) for v in values}


def unknown_label_values(path: Path, known: Iterable[str]) -> list[int]:
    """Values in the label map ``path`` that are neither background (0) nor one of ``known``."""
    allowed = {0} | {int(v) for v in known}
    return sorted(label_values(path) - allowed)
