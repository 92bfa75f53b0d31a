"""Loading every format the real data comes in: 2D pictures (PIL), NIfTI (nibabel), DICOM series (ITK).

Conventions (the whole ``transforms`` package relies on them):

* 2D images come out as ``(C, H, W)``: rows first, as ``numpy.asarray(PIL.Image)`` and as SAM3 sees them
  (MONAI's ``PILReader`` default would give ``(C, W, H)``; we read with ``reverse_indexing=False``).
  Their affine is the identity (pixel units).
* Volumes come out as ``(1, X, Y, Z)`` in the file's voxel order with the file's affine (RAS, as MONAI's
  NIfTI/ITK readers give it); a 2D NIfTI becomes a one-slice volume ``(1, X, Y, 1)``.
* Images are ``float32`` (the file's dtype is kept in ``meta['source_dtype']`` for the intensity step);
  labels are integers (``uint8`` when every value fits, else ``int32``), one channel.
* Masks are decoded to one integer per pixel: 1-bit -> 0/255, palette -> the palette *index*, RGB/RGBA ->
  the largest colour channel (the alpha channel when the colours are all zero), 16-bit kept as is. The
  meaning of the values (binary, label map, instance ids, JPEG threshold) is :class:`DecodeLabeld`'s job.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ImageReader, ITKReader, MetaTensor, NibabelReader, PILReader
from monai.transforms.io.array import switch_endianness
from monai.transforms import EnsureChannelFirst, MapTransform
from PIL import Image

from .errors import DataError

__all__ = ["IMAGE_2D_SUFFIXES", "VOLUME_SUFFIXES", "Image2DReader", "LoadMedicalImaged", "load_medical_image"]

IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".dcm", ".mha", ".mhd", ".nrrd", ".nhdr")
JPEG_SUFFIXES = (".jpg", ".jpeg")


def _suffix(path: str | Path) -> str:
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _as_image(img: Image.Image) -> Image.Image:
    """Picture modes the intensity step understands: L, RGB, 16/32-bit integer, float."""
    img.load()  # decode now: a truncated file fails here, inside the loader's error handling
    if img.mode in ("L", "RGB", "I", "F") or img.mode.startswith("I;16"):
        return img
    if img.mode == "1":
        return img.convert("L")
    if img.mode in ("LA", "La"):
        return img.getchannel("L")
    if img.mode == "P" and _grey_palette(img):
        return img.convert("L")
    return img.convert("RGB")  # RGBA (alpha dropped), P (palette colours), CMYK, YCbCr, ...


def _grey_palette(img: Image.Image) -> bool:
    palette = img.getpalette() or []
    return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))


def _as_mask(img: Image.Image) -> Image.Image:
    """One integer per pixel; see the module docstring for the rule per mode."""
    img.load()
    mode = img.mode
    if mode in ("L", "I", "F", "P") or mode.startswith("I;16"):
        return img  # P: numpy reads the palette index
    if mode == "1":
        return img.convert("L")
    if mode in ("LA", "La", "PA"):
        return img.getchannel(0) if mode == "PA" else img.getchannel("L")
    rgba = np.asarray(img.convert("RGBA"))
    colour = rgba[..., :3].max(axis=-1)
    if not colour.any() and rgba[..., 3].min() != rgba[..., 3].max():
        colour = rgba[..., 3]  # mask drawn in the alpha channel only
    return Image.fromarray(np.ascontiguousarray(colour))


class Image2DReader(PILReader):
    """MONAI ``PILReader`` for PNG, JPEG, BMP, TIFF and GIF, rows first, masks decoded robustly.

    Args:
        mask: decode as a mask (palette index, max colour channel) instead of as a picture (L or RGB).

    Output of ``get_data``: ``(H, W)`` or ``(H, W, 3)`` array, ``spatial_shape`` ``(H, W)``.
    """

    def __init__(self, mask: bool = False, **kwargs: Any) -> None:
        super().__init__(converter=_as_mask if mask else _as_image, reverse_indexing=False, **kwargs)
        self.mask = mask

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return all(_suffix(n) in IMAGE_2D_SUFFIXES for n in names)

    def _get_spatial_shape(self, img: Image.Image) -> np.ndarray:
        return np.asarray((img.height, img.width))

    def get_data(self, img: Image.Image | Sequence[Image.Image]) -> tuple[np.ndarray, dict]:
        data, meta = super().get_data(img)
        return np.array(data), meta  # a writable copy (PIL buffers are read-only)


def _pick_reader(path: str, readers: Mapping[str, ImageReader]) -> ImageReader:
    if Path(path).is_dir():
        return readers["itk"]  # DICOM series folder
    suffix = _suffix(path)
    if suffix in IMAGE_2D_SUFFIXES:
        return readers["2d"]
    if suffix in (".nii", ".nii.gz"):
        return readers["nifti"]
    return readers["itk"]  # single DICOM, MetaImage, NRRD, anything else ITK can read


def _integer_label(array: torch.Tensor, path: str) -> torch.Tensor:
    """Labels as uint8 when every value fits, else int32; non-integer values are an error."""
    if array.is_floating_point():
        if not torch.isfinite(array).all():
            raise DataError(path, "mask holds NaN or Inf values", "a mask must hold integer label values")
        rounded = torch.round(array)
        if not torch.allclose(rounded, array, atol=1e-3):
            raise DataError(path, "mask holds non-integer values (is it an image, not a mask?)",
                            "point 'label' at the segmentation file")
        array = rounded
    if array.numel() and (array.min() < 0 or array.max() > np.iinfo(np.int32).max):
        raise DataError(path, f"mask values out of range [{int(array.min())}, {int(array.max())}]",
                        "label values must be non-negative integers")
    dtype = torch.uint8 if (array.numel() == 0 or array.max() <= 255) else torch.int32
    return array.to(dtype)


def _read(path: str, reader: ImageReader) -> MetaTensor:
    """What ``monai.transforms.LoadImage(image_only=True, dtype=None, ensure_channel_first=True)`` does with a
    given reader (without instantiating every registered reader on construction)."""
    array, meta = reader.get_data(reader.read(path))
    meta = switch_endianness(meta, "<")
    meta["filename_or_obj"] = path
    img = MetaTensor.ensure_torch_and_prune_meta(array, meta)
    return EnsureChannelFirst()(img, meta_dict=meta)


def load_medical_image(
    path: str | Path,
    mask: bool = False,
    channel: int | None = None,
    check_finite: bool = True,
    readers: Mapping[str, ImageReader] | None = None,
) -> MetaTensor:
    """Load one image or mask file (or DICOM series folder) with the package's conventions.

    Returns:
        ``(C, H, W)`` for 2D pictures (C = 1 or 3), ``(1, X, Y, Z)`` for volumes; masks have C = 1.

    Raises:
        DataError: missing, corrupt or truncated file; a 4D volume (more than one channel) unless ``channel``
            picks one; NaN/Inf intensities; a mask with non-integer values.
    """
    path = str(path)
    if readers is None:
        readers = {"2d": Image2DReader(mask=mask), "nifti": NibabelReader(), "itk": ITKReader()}
    if not Path(path).exists():
        raise DataError(path, "file not found", "check the datalist paths (relative paths need base_dir)")
    reader = _pick_reader(path, readers)
    try:
        img = _read(path, reader)
    except Exception as err:  # any reader failure: corrupt, truncated, not an image
        raise DataError(path, f"cannot be read as {'a mask' if mask else 'an image'} "
                              f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})",
                        "the file is corrupt, truncated or not an image: re-download or re-export it") from err
    if not isinstance(img, MetaTensor):
        img = MetaTensor(img)
    source_dtype = str(img.dtype).replace("torch.", "")
    is_volume = not isinstance(reader, Image2DReader)
    spatial = tuple(img.shape[1:])
    if is_volume and len(spatial) == 2:  # 2D NIfTI / single DICOM image: a one-slice volume
        img = img.unsqueeze(-1)
        spatial = tuple(img.shape[1:])
    expected = 3 if is_volume else 2
    if len(spatial) != expected:
        raise DataError(path, f"has {img.ndim} dimensions (shape {tuple(img.shape)}); expected a 2D image or a 3D "
                              "volume", "split the file into 2D images or 3D volumes")
    if is_volume and img.shape[0] > 1:
        if channel is None or mask:
            raise DataError(path, f"is a 4D volume with {img.shape[0]} channels/time points (shape "
                                  f"{tuple(img.shape[1:]) + (img.shape[0],)})",
                            "use 3D volumes, or pick one channel with LoadMedicalImaged(channel=...)")
        if not 0 <= channel < img.shape[0]:
            raise DataError(path, f"channel {channel} requested but the volume has {img.shape[0]}",
                            "choose a channel index in range")
        img = img[channel : channel + 1]
    if mask and img.shape[0] > 1:
        img = img.amax(dim=0, keepdim=True)
    if mask:
        img = _integer_label(img, path)
    else:
        img = img.float()
        if check_finite and not torch.isfinite(img).all():
            n_bad = int((~torch.isfinite(img)).sum())
            raise DataError(path, f"holds {n_bad} NaN/Inf intensities",
                            "repair the file (e.g. replace NaN with the background value) before training")
    img.meta["spatial_shape"] = np.asarray(spatial)
    img.meta["source_dtype"] = source_dtype
    img.meta["is_volume"] = is_volume
    img.meta["is_jpeg"] = _suffix(path) in JPEG_SUFFIXES
    return img


class LoadMedicalImaged(MapTransform):
    """Load images and masks of a datalist item as MetaTensors, with the checks a training run needs.

    Reader by suffix: PNG/JPEG/BMP/TIFF/GIF -> :class:`Image2DReader` (rows first); ``.nii``/``.nii.gz`` ->
    ``NibabelReader``; a folder -> ``ITKReader`` (DICOM series); anything else -> ``ITKReader``.

    Args:
        keys: keys holding a path (image keys and label keys).
        label_keys: which of ``keys`` are masks. A mask key may hold a list of paths: the masks of one
            image (BUSI ``_mask_1``) are merged by their pixel-wise maximum (the union for binary masks).
        image_key: the key the masks must match in size.
        channel: for a multi-channel (4D) image volume, the channel to keep; None makes a 4D volume an error.
        check_finite: raise on NaN/Inf intensities.

    Output: ``d[image_key]`` float32 ``(C, H, W)`` or ``(1, X, Y, Z)``; ``d[label]`` integer ``(1, ...)`` of
    the same spatial shape. ``meta['filename_or_obj']`` names the file, ``meta['affine']`` its geometry.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        label_keys: KeysCollection = ("label",),
        image_key: str = "image",
        channel: int | None = None,
        check_finite: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = {label_keys} if isinstance(label_keys, str) else set(label_keys)
        self.image_key = image_key
        self.channel = channel
        self.check_finite = check_finite
        self._readers = {
            False: {"2d": Image2DReader(mask=False), "nifti": NibabelReader(), "itk": ITKReader()},
            True: {"2d": Image2DReader(mask=True), "nifti": NibabelReader(), "itk": ITKReader()},
        }

    def _load(self, path: str | Path, mask: bool) -> MetaTensor:
        return load_medical_image(path, mask=mask, channel=self.channel, check_finite=self.check_finite,
                                  readers=self._readers[mask])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = key in self.label_keys
            value = d[key]
            if isinstance(value, (list, tuple)):
                if not mask:
                    raise DataError(", ".join(map(str, value)), f"'{key}' holds {len(value)} paths",
                                    "give one image path (a DICOM series is one folder)")
                parts = [self._load(p, mask=True) for p in value]
                merged = parts[0]
                for other, path in zip(parts[1:], value[1:]):
                    if other.shape != merged.shape:
                        raise DataError(path, f"mask size {tuple(other.shape[1:])} does not match the other mask "
                                              f"of the same image {tuple(merged.shape[1:])} ({value[0]})",
                                        "drop or fix the mismatched mask")
                    merged = torch.maximum(merged.to(torch.int32), other.to(torch.int32))
                d[key] = _integer_label(merged, str(value[0]))
            else:
                d[key] = self._load(value, mask=mask)
        self._check_sizes(d)
        return d

    def _check_sizes(self, d: Mapping[Hashable, Any]) -> None:
        image = d.get(self.image_key)
        if not isinstance(image, torch.Tensor):
            return
        for key in self.label_keys:
            label = d.get(key)
            if isinstance(label, torch.Tensor) and tuple(label.shape[1:]) != tuple(image.shape[1:]):
                raise DataError(
                    label.meta.get("filename_or_obj") if isinstance(label, MetaTensor) else None,
                    f"mask size {tuple(label.shape[1:])} does not match the image size {tuple(image.shape[1:])} "
                    f"of {image.meta.get('filename_or_obj') if isinstance(image, MetaTensor) else 'the image'}",
                    "pair each image with its own mask, or drop the pair",
                )
