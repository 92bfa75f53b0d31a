"""Loading every format the real data comes in: 2D pictures (PIL), NIfTI (nibabel), DICOM series (ITK).

Conventions (the whole ``transforms`` package relies on them):

* 2D images come out as ``(C, H, W)``: rows first, as ``numpy.asarray(PIL.Image)`` and as SAM3 sees them
  (MONAI's ``PILReader`` default would give ``(C, W, H)``; we read with ``reverse_indexing=False``).
  Their affine is the identity (pixel units).
* Volumes come out as ``(1, X, Y, Z)`` in the file's voxel order with the file's affine (RAS, as MONAI's
  NIfTI/ITK readers give it); a 2D NIfTI becomes a one-slice volume ``(1, X, Y, 1)``.
* Images are ``float32`` (the file's dtype is kept in ``meta['source_dtype']`` for the intensity step), or,
  with ``keep_uint8`` (both bundles), 8-bit pictures stay ``uint8`` (a quarter of the memory; the
  intensity step maps them to ``[0, 1]`` tile by tile); labels are integers (``uint8`` when every value fits,
  else ``int32``), one channel.
* Picture size limit: the header is read before decoding; a picture larger than PIL's decompression-bomb limit
  (twice ``PIL.Image.MAX_IMAGE_PIXELS``, 179 Mpx) or than ``max_pixels`` is refused with a :class:`DataError`
  that says how to allow it (``max_pixels``: the ``--max-pixels`` option of ``medsam3 segment``, the
  ``MEDSAM3_MAX_PIXELS`` environment variable); ``max_pixels="auto"`` also refuses what would not fit in the
  available memory at :data:`SEGMENT_BYTES_PER_PIXEL` (the 2D segment path's peak, ``scripts/bench_memory.py``).
* Pictures are read as viewers show them: an EXIF Orientation tag (a phone or camera photo stored sideways) is
  applied (PIL's ``ImageOps.exif_transpose``), so the mask, the size checks and ``--box`` pixels follow the picture
  as displayed and as annotation tools draw on it (:func:`exif_orientation`).
* One picture per file: a multi-frame picture (multi-page TIFF, animated GIF / PNG) is refused from its header
  (:func:`picture_size`), on every path, instead of reading its first frame only.
* Masks are decoded to one integer per pixel: 1-bit -> 0/255, palette -> the palette *index*, RGB/RGBA ->
  the largest colour channel (the alpha channel when the colours are all zero; a colour-coded mask, regions of
  different colours, is refused: its classes would merge), 16-bit kept as is. The
  meaning of the values (binary, label map, instance ids, JPEG threshold) is :class:`DecodeLabeld`'s job.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ImageReader, ITKReader, MetaTensor, NibabelReader, PILReader
from monai.transforms.io.array import switch_endianness
from monai.transforms import EnsureChannelFirst, MapTransform
from PIL import Image, ImageChops, ImageOps

from ..data.checks import nifti_channels
from ..tensors import all_finite, all_near_integers, plain_tensor, voxel_spacing
from .errors import ChannelError, DataError

__all__ = [
    "IMAGE_2D_SUFFIXES",
    "MAX_PIXELS_ENV",
    "SEGMENT_BYTES_PER_PIXEL",
    "CHANNEL_HINT",
    "check_channel",
    "check_dicom_series",
    "nifti_channels",
    "VOLUME_SUFFIXES",
    "Image2DReader",
    "LoadMedicalImaged",
    "available_memory",
    "check_nifti_data",
    "check_picture_size",
    "load_medical_image",
    "picture_size",
    "pil_pixel_limit",
]

IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".ppm")  # PPM: STARE's images
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".dcm", ".mha", ".mhd", ".nrrd", ".nhdr")
DICOM_SUFFIXES = ("", ".dcm", ".ima")  # DICOM files often have no extension
#: a single DICOM file given as an input (a file without an extension is taken only inside a series folder)
DICOM_FILE_SUFFIXES = (".dcm", ".ima")


def dicom_picture_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) of a single-frame DICOM file (``.dcm`` / ``.ima``: an X-ray, a mammogram, an ultrasound or
    endoscopy capture, one CT slice), read from its header (pydicom; no pixel data), or None: another file, a folder,
    a multi-frame DICOM (a volume or cine in one file) or a header pydicom cannot read."""
    path = Path(path)
    if _suffix(path) not in DICOM_FILE_SUFFIXES or not path.is_file():
        return None
    stat = path.stat()
    return _dicom_picture_header(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _dicom_picture_header(path: str, _mtime_ns: int, _size: int) -> tuple[int, int] | None:
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                                 specific_tags=["NumberOfFrames", "Rows", "Columns"])
        frames = int(header.get("NumberOfFrames", 1) or 1)
        rows, columns = header.get("Rows"), header.get("Columns")
    except Exception:  # noqa: BLE001 - not a DICOM header pydicom reads: the volume path's reader says why
        return None
    if frames > 1 or not rows or not columns:
        return None
    return int(columns), int(rows)


def is_picture_path(path: str | Path) -> bool:
    """Whether an input is a 2D picture -- a PNG/JPEG/BMP/TIFF/GIF/PPM file, or a single-frame DICOM file
    (:func:`dicom_picture_size`) -- rather than a volume (NIfTI, MetaImage, NRRD, a multi-frame DICOM file, a DICOM
    series folder). The one rule every path (commands, bundles, datalists, caching) decides an input's kind by."""
    path = Path(path)
    if path.is_dir():
        return False
    return _suffix(path) in IMAGE_2D_SUFFIXES or dicom_picture_size(path) is not None


def has_dicom_files(folder: str | Path) -> bool:
    """Whether ``folder`` holds a file that may be DICOM (by :data:`DICOM_SUFFIXES`; hidden files aside)."""
    return any(p.is_file() and not p.name.startswith(".") and p.suffix.lower() in DICOM_SUFFIXES
               for p in Path(folder).iterdir())
JPEG_SUFFIXES = (".jpg", ".jpeg")

#: environment variable with the largest 2D picture (in pixels) to accept; it also lifts PIL's limit
MAX_PIXELS_ENV = "MEDSAM3_MAX_PIXELS"
#: estimated peak memory of ``medsam3 segment`` on a 2D picture, bytes per input pixel: measured ~7 for an RGB
#: picture with one prompt (decoding: PIL's 4 bytes/pixel copy and the uint8 array), ~9 with five prompts
#: (``scripts/bench_memory.py``); with a margin
SEGMENT_BYTES_PER_PIXEL = 12
#: share of the available memory ``max_pixels="auto"`` lets one picture take
MEMORY_SHARE = 0.8
_PIL_LIMIT_LOCK = threading.Lock()
#: what a 4D volume's error says to do: ``--channel N`` is the option of ``medsam3 segment`` and ``medsam3 agent``
#: and the ``channel`` setting of the inference bundle (``--channel N`` there too)
CHANNEL_HINT = ("use a 3D volume, or pick one channel / time point: --channel N (medsam3 segment and agent, the "
                "inference bundle), a datalist item's 'channel' (medsam3 datalist ... --channel N writes it), "
                "channel=N in Python")


def check_channel(path: str | Path, is_volume: bool, channels: int, channel: int | None,
                  shape: tuple[int, ...] | None = None) -> None:
    """:class:`ChannelError` (a DataError) when ``channel`` (``--channel``; None: not given) does not fit the
    input: a 4D volume (``channels`` > 1) needs one in range; a 2D picture or a 3D volume takes none (or 0 for a
    3D volume). ``shape``: the file's, for the message."""
    if is_volume and channels > 1:
        if channel is None:
            described = f" (shape {shape})" if shape else ""
            raise ChannelError(path, f"is a 4D volume with {channels} channels/time points{described}", CHANNEL_HINT)
        if not 0 <= channel < channels:
            raise ChannelError(path, f"channel {channel} requested but the volume has {channels}",
                               f"choose a channel from 0 to {channels - 1}")
    elif channel is not None:  # a channel asked of a file that has one: said, not ignored
        if not is_volume:
            raise ChannelError(path, f"is a 2D picture: channel {channel} picks a channel / time point of a 4D volume",
                               "leave the channel (--channel) out for 2D pictures")
        if channel != 0:
            raise ChannelError(path, f"channel {channel} requested but the volume has 1 channel (a 3D volume)",
                               "leave the channel (--channel) out for 3D volumes, or give 0")


def _suffix(path: str | Path) -> str:
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def available_memory() -> int | None:
    """Bytes of memory this process can still take: ``MemAvailable`` of ``/proc/meminfo``, capped by the cgroup
    (v2) limit when there is one; None when unknown (no memory check then)."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            available = min(available, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return available


@contextmanager
def pil_size_check_off():
    """PIL's own decompression-bomb check off while opening (the header is checked by :func:`check_picture_size`
    instead, with a message that says how to allow a large picture)."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def pil_pixel_limit() -> int | None:
    """The largest picture PIL opens: twice ``PIL.Image.MAX_IMAGE_PIXELS`` (above that it raises
    ``DecompressionBombError``; between the two it only warns); None when the check is off."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


#: EXIF Orientation values whose picture is shown turned a quarter (width and height swapped)
QUARTER_TURNS = (5, 6, 7, 8)


def exif_orientation(img: Image.Image) -> int:
    """The picture's EXIF Orientation (1: as stored, the default; 2-8: mirrored and / or turned as viewers show it)."""
    try:
        value = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the picture as stored
        return 1
    return value if 1 <= value <= 8 else 1


def _stored_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as the file stores the pixels: a TIFF's own tags (Pillow >= 11 reports a TIFF's size already
    turned by its Orientation, other formats' as stored)."""
    if img.format == "TIFF":
        try:
            return int(img.tag_v2[256]), int(img.tag_v2[257])  # ImageWidth, ImageLength
        except (KeyError, TypeError, ValueError):
            pass
    return img.size


def _turned_mask_hint(image_path: Any, mask_shape: Sequence[int], image_shape: Sequence[int]) -> str | None:
    """What to do with a mask of a picture's stored orientation (its shape the picture's transposed) when the
    picture's EXIF Orientation turns it a quarter for display, as it is read; None otherwise."""
    if len(image_shape) != 2 or tuple(mask_shape) != tuple(image_shape)[::-1] or not image_path:
        return None
    try:
        with pil_size_check_off(), Image.open(str(image_path)) as img:
            orientation = exif_orientation(img)
    except (OSError, ValueError):
        return None
    if orientation not in QUARTER_TURNS:
        return None
    return (f"the picture's EXIF Orientation ({orientation}) turns it a quarter, and it is read as viewers show it; "
            "the mask has the stored orientation (saved by a tool that ignores EXIF): turn the mask as the picture is "
            "shown (PIL: ImageOps.exif_transpose on the picture, the same turn on the mask), or save the picture "
            "without the Orientation tag")


def as_displayed(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF Orientation says viewers show it (the same picture when it says nothing)."""
    return img if exif_orientation(img) == 1 else ImageOps.exif_transpose(img)


def picture_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of a 2D picture from its header, without decoding it (PIL's decompression-bomb limit off:
    :func:`check_picture_size` applies the limit), as displayed (:func:`exif_orientation`: a quarter turn swaps them);
    a single-frame DICOM file's Columns and Rows.

    Raises:
        DataError: a multi-frame picture (multi-page TIFF, animated GIF / PNG): only its first frame would be
            read, so it is refused on every path (``medsam3 segment`` / ``agent`` / ``serve``, the bundles). A
            JPEG's extra MPO pictures (a camera's previews or second view) are not frames of a stack: frame 0 is
            the picture.
    """
    dicom = dicom_picture_size(path)
    if dicom is not None:
        return dicom
    with pil_size_check_off(), Image.open(path) as img:
        frames = 1 if img.format == "MPO" else int(getattr(img, "n_frames", 1) or 1)
        size = _stored_size(img)
        size = size[::-1] if exif_orientation(img) in QUARTER_TURNS else size
        samples = _unread_tiff_samples(img)
    if samples:
        raise DataError(path, f"is a TIFF of {samples} channels that are not an alpha channel, and only its first "
                              "would be read (as grey)", "save the channel to segment as a grey picture, or three "
                                                          "channels as an RGB one")
    if frames > 1:
        raise DataError(path, f"is a multi-frame picture ({frames} frames / pages) but one 2D picture is segmented "
                              "at a time", "save the frame / page you want as its own file (e.g. one PNG)")
    return size


def _unread_tiff_samples(img: Image.Image) -> int:
    """The number of channels of a grey TIFF (PIL mode L, I;16, F, ...) whose extra samples are data, not alpha
    (ExtraSamples 0, "unspecified": a two-channel fluorescence picture), which PIL reads as its first channel
    alone; 0 for any other picture."""
    tags = getattr(img, "tag_v2", None) if img.format == "TIFF" else None
    extra = tags.get(338) if tags is not None else None
    if extra is None or img.mode not in ("L", "I", "F") and not img.mode.startswith("I;16"):
        return 0
    extra = tuple(extra) if isinstance(extra, (tuple, list)) else (extra,)
    return int(tags.get(277, 1 + len(extra))) if 0 in extra else 0


def _gb(n_bytes: float) -> str:
    """A memory size for a message: GB, or MB below 1 GB (``0.0 GB`` says nothing)."""
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.0f} MB"


def _env_max_pixels() -> int | None:
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return None
    try:
        pixels = int(float(value))
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV}={value!r}: give a number of pixels, e.g. 200000000") from None
    if pixels <= 0:
        raise ValueError(f"{MAX_PIXELS_ENV}={value!r}: give a positive number of pixels")
    return pixels


def check_picture_size(path: str | Path, size: tuple[int, int], max_pixels: int | str | None = None,
                       bytes_per_pixel: float = SEGMENT_BYTES_PER_PIXEL) -> None:
    """Refuse a 2D picture of ``size`` = (width, height) that is too large, before it is decoded.

    Args:
        max_pixels: an int: accept up to that many pixels (PIL's decompression-bomb limit does not apply);
            ``"auto"``: PIL's limit (:func:`pil_pixel_limit`, 179 Mpx by default), and what fits in
            ``MEMORY_SHARE`` of the available memory at ``bytes_per_pixel``; None: PIL's limit only. The
            ``MEDSAM3_MAX_PIXELS`` environment variable, when set, takes the place of ``"auto"`` and None.

    Raises:
        DataError: one line with the size, the estimated memory, the limit and how to raise it.
    """
    width, height = (int(v) for v in size)
    pixels = width * height
    described = f"{width}x{height} picture ({pixels / 1e6:.1f} Mpx, about {_gb(pixels * bytes_per_pixel)} to segment)"
    raise_it = (f"raise the limit with --max-pixels {pixels} (medsam3 segment), {MAX_PIXELS_ENV}={pixels} or "
                f"max_pixels={pixels}")
    if max_pixels in (None, "auto"):
        max_pixels = _env_max_pixels() or max_pixels
    if isinstance(max_pixels, str) and max_pixels != "auto":
        raise ValueError(f"max_pixels must be a number of pixels, 'auto' or None, got {max_pixels!r}")
    if max_pixels is not None and not isinstance(max_pixels, str):
        if pixels > int(max_pixels):
            raise DataError(path, f"{described} exceeds the limit of {int(max_pixels)} pixels", raise_it)
        return
    pil_limit = pil_pixel_limit()
    if pil_limit is not None and pixels > pil_limit:
        raise DataError(path, f"{described} is larger than PIL's decompression-bomb limit of {pil_limit} "
                              "pixels (the file is not corrupt)", f"if you trust the file, {raise_it}")
    if max_pixels == "auto":
        available = available_memory()
        if available is not None and pixels * bytes_per_pixel > MEMORY_SHARE * available:
            allowed = int(MEMORY_SHARE * available / bytes_per_pixel)
            raise DataError(path, f"{described} does not fit in {_gb(MEMORY_SHARE * available)} "
                                  f"({MEMORY_SHARE:.0%} of the {_gb(available)} of memory available; limit "
                                  f"{allowed} pixels at {bytes_per_pixel:g} bytes/pixel)",
                            f"free memory, or {raise_it} at your own risk")


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


#: a mask pixel whose brightest and darkest colour channels differ by more than this is coloured (a grey mask's
#: channels are equal, up to a JPEG's few levels of chroma noise)
COLOUR_SPREAD = 96
_CHANNEL_NAMES = ("red", "green", "blue")
_COLOURED = [255 if level > COLOUR_SPREAD else 0 for level in range(256)]  # the channel spread's lookup table


class ColourCodedMask(ValueError):
    """An RGB mask whose classes are told apart by colour (``colours``: the channels that dominate its regions)."""

    def __init__(self, colours: list[str]) -> None:
        self.colours = colours
        super().__init__(f"colour-coded RGB mask ({' and '.join(colours)} regions)")


def _brightest_of_one_colour(red: Image.Image, green: Image.Image, blue: Image.Image) -> Image.Image:
    """The brightest channel of an RGB mask, refusing (:class:`ColourCodedMask`) a mask whose coloured pixels are
    dominated by different channels (red for one class, green for another), whose classes the brightest channel
    would merge into one. A grey mask, or one drawn in a single colour, passes; the check is a few PIL passes unless
    coloured pixels exist."""
    brightest = ImageChops.lighter(ImageChops.lighter(red, green), blue)
    darkest = ImageChops.darker(ImageChops.darker(red, green), blue)
    if ImageChops.difference(brightest, darkest).point(_COLOURED).getbbox() is None:
        return brightest
    channels = np.stack([np.asarray(c) for c in (red, green, blue)], axis=-1).astype(np.int16)
    coloured = (channels.max(-1) - channels.min(-1)) > COLOUR_SPREAD
    dominant = np.bincount(channels[coloured].argmax(-1), minlength=3)
    found = [name for name, count in zip(_CHANNEL_NAMES, dominant) if count]
    if len(found) > 1:
        raise ColourCodedMask(found)
    return brightest


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
    if mode == "RGB":  # the brightest channel, in PIL (no alpha to look at): half the time of the RGBA path
        return _brightest_of_one_colour(*img.split())
    _brightest_of_one_colour(*img.convert("RGB").split())
    rgba = np.asarray(img.convert("RGBA"))
    colour = np.maximum(np.maximum(rgba[..., 0], rgba[..., 1]), rgba[..., 2])  # 10x a max over the last axis
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


class ReaderSet(Mapping[str, ImageReader]):
    """The readers of images or of masks by kind (``"2d"``, ``"nifti"``, ``"itk"``), each built at its first use.

    ITK comes in only with an input that needs it (a DICOM series, MetaImage, NRRD): a run over pictures and
    NIfTI files neither imports it nor needs it installed.
    """

    #: kind -> the reader for masks (True) or images (False)
    FACTORIES: dict[str, Callable[[bool], ImageReader]] = {
        "2d": lambda mask: Image2DReader(mask=mask),
        "nifti": lambda mask: NibabelReader(),
        "itk": lambda mask: ITKReader(),
    }

    def __init__(self, mask: bool) -> None:
        self.mask = mask
        self._built: dict[str, ImageReader] = {}

    def __getitem__(self, kind: str) -> ImageReader:
        if kind not in self._built:
            self._built[kind] = self.FACTORIES[kind](self.mask)
        return self._built[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self.FACTORIES)

    def __len__(self) -> int:
        return len(self.FACTORIES)


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
    if array.dtype == torch.uint8:  # an 8-bit mask: in range by construction
        return array
    if array.dtype == torch.bool:
        return array.to(torch.uint8)
    if array.is_floating_point():  # (MONAI's NibabelReader gives every NIfTI mask as float32)
        if not all_finite(array):
            raise DataError(path, "mask holds NaN or Inf values", "a mask must hold integer label values")
        if not all_near_integers(array):
            raise DataError(path, "mask holds non-integer values (is it an image, not a mask?)",
                            "point 'label' at the segmentation file")
        array = torch.round(array)
    # Python integers: a 0-dim int16 tensor compared with 2**31 - 1 casts the bound to int16 (-1)
    values = plain_tensor(array)
    if values.dtype in (torch.uint16, torch.uint32, torch.uint64):  # no CPU min / max in torch for these
        values = values.to(torch.int64)
    low, high = (int(values.min()), int(values.max())) if values.numel() else (0, 0)
    if low < 0 or high > np.iinfo(np.int32).max:
        raise DataError(path, f"mask values out of range [{low}, {high}]", "label values must be non-negative integers")
    return array.to(torch.uint8 if high <= 255 else torch.int32)


def _read(path: str, reader: ImageReader, size: tuple[int, int] | None = None) -> MetaTensor:
    """What ``monai.transforms.LoadImage(image_only=True, dtype=None, ensure_channel_first=True)`` does with a
    given reader (without instantiating every registered reader on construction). ``size``: a 2D picture's
    (width, height) when its header was read already."""
    if isinstance(reader, Image2DReader):
        return _read_picture(path, reader, size)
    array, meta = reader.get_data(reader.read(path))
    array = c_order(array)
    meta = switch_endianness(meta, "<")
    meta["filename_or_obj"] = path
    img = MetaTensor.ensure_torch_and_prune_meta(array, meta)
    return EnsureChannelFirst()(img, meta_dict=meta)


#: rows of the (Z, X) planes :func:`c_order` copies at a time
C_ORDER_ROWS = 8


def c_order(array: Any) -> Any:
    """``array`` rows first (C order), as ``np.ascontiguousarray`` makes it, faster for a volume stored columns first.

    NIfTI volumes come out of nibabel in Fortran order, and MONAI's ``convert_to_tensor`` copies them to C order
    element by element along the output, reading the input with a stride of a whole slice. Copied here a few
    (Z, X) planes at a time (each read and written within the CPU's caches): the same array, sooner (the whole
    loading is timed by ``scripts/bench_eval.py``'s ``volume_loading``). Anything but a 3D Fortran-ordered array
    is returned as it is (MONAI then makes it contiguous when it must)."""
    if not isinstance(array, np.ndarray) or array.ndim != 3 or array.flags.c_contiguous or not array.flags.f_contiguous:
        return array
    out = np.empty(array.shape, dtype=array.dtype)
    columns_first = array.T  # (Z, Y, X), C-contiguous: out[x, y, z] = columns_first[z, y, x]
    for start in range(0, array.shape[1], C_ORDER_ROWS):
        out[:, start:start + C_ORDER_ROWS] = columns_first[:, start:start + C_ORDER_ROWS].transpose(2, 1, 0)
    return out


#: pixels per strip when a decoded picture is copied out of PIL (a picture of up to this many is copied whole):
#: a strip's bytes are the extra memory of the copy
STRIP_PIXELS = 1 << 22


def _read_picture(path: str, reader: Image2DReader, size: tuple[int, int] | None = None) -> MetaTensor:
    """The same result as :func:`_read` for a 2D picture -- ``(C, H, W)`` rows first, the reader's metadata --
    with two copies of the pixels alive at once (PIL's decoded picture and the numpy array, filled strip by strip)
    plus one strip of ``STRIP_PIXELS`` in transit. :func:`check_picture_size` ran on the header before: a picture
    over PIL's limit here was allowed (``max_pixels``), so PIL's own check is off while it is opened and decoded."""
    width, height = picture_size(path) if size is None else size
    limit = Image.MAX_IMAGE_PIXELS  # PIL warns above it and refuses above twice it
    allowed_over_pil = limit is not None and width * height > limit  # allowed by max_pixels: PIL's check off
    with ExitStack() as stack:  # the file is closed once read (PIL keeps a GIF's, a multi-frame format's, open)
        with pil_size_check_off() if allowed_over_pil else nullcontext():
            img = stack.enter_context(Image.open(path, **reader.kwargs))  # (the header only, so far)
            if img.format == "TIFF" and exif_orientation(img) in QUARTER_TURNS:
                # Pillow (11 to 13 at least) memory-maps an uncompressed TIFF turned a quarter at the turned size and
                # scrambles a one-channel or RGBA picture; read from an open file, it decodes it right
                img = stack.enter_context(Image.open(stack.enter_context(open(path, "rb")), **reader.kwargs))
            img = as_displayed(img)
            if callable(reader.converter):
                try:
                    img = reader.converter(img)  # decodes (some plugins check the size again while decoding)
                except ColourCodedMask as err:
                    raise DataError(path, f"{err}: its classes would merge into one (a mask is read as one value "
                                          "per pixel, the brightest channel)",
                                    "save it as a label map (one grey value per class) or a palette PNG, and name "
                                    "each value in the item's prompts") from None
        header = reader._get_meta_dict(img)
        header["spatial_shape"] = reader._get_spatial_shape(img)
        meta = {key: "none" if value is None else value for key, value in header.items()}  # as PILReader's
        width, height = img.size
        array = None
        rows = max(1, STRIP_PIXELS // max(width, 1))
        for top in range(0, height, rows):  # strip by strip: np.asarray(img) would hold two more whole copies
            # one strip (rows >= height): the picture itself, without a cropped copy
            strip = np.asarray(img if rows >= height else img.crop((0, top, width, min(top + rows, height))))
            if array is None:
                channels = strip.shape[2] if strip.ndim == 3 else 1
                meta["original_channel_dim"] = -1 if strip.ndim == 3 else float("nan")
                # native byte order (a big-endian 16-bit TIFF's ">u2" strips: torch takes native arrays only)
                array = np.empty((channels, height, width), dtype=strip.dtype.newbyteorder("="))
            array[:, top:top + strip.shape[0]] = np.moveaxis(strip, -1, 0) if strip.ndim == 3 else strip[None]
        if array is None:  # an empty picture
            pixels = np.asarray(img)
            meta["original_channel_dim"] = -1 if pixels.ndim == 3 else float("nan")
            array = np.moveaxis(pixels, -1, 0).copy() if pixels.ndim == 3 else np.array(pixels)[None]
            array = array.astype(array.dtype.newbyteorder("="), copy=False)
        del img
    meta = switch_endianness(meta, "<")
    meta["filename_or_obj"] = path
    return MetaTensor.ensure_torch_and_prune_meta(array, meta)


def _dicom_picture(img: MetaTensor, path: str) -> MetaTensor:
    """A single-frame DICOM file as ITK reads it -- ``(C, X, Y)`` or ``(C, X, Y, 1)``, columns first, C = 1 (grey,
    MONOCHROME1 already inverted, rescale slope / intercept applied) or 3 (RGB) -- as a 2D picture is held:
    ``(C, H, W)`` rows first, no geometry (a picture's PNG mask has none)."""
    array = img.as_tensor()
    if array.ndim == 4:
        if array.shape[-1] != 1:
            raise DataError(path, f"holds {array.shape[-1]} frames", "give one frame as its own file")
        array = array[..., 0]
    array = array.transpose(1, 2).contiguous()
    meta = {"filename_or_obj": path, "spatial_shape": np.asarray(array.shape[1:]),
            "original_channel_dim": -1 if array.shape[0] > 1 else float("nan")}
    return MetaTensor(array, meta=meta)


def _unreadable(path: str, mask: bool, err: BaseException) -> DataError:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if Path(path).is_dir():  # a folder input is a DICOM series
        names = sorted(p.name for p in Path(path).iterdir() if p.is_file())
        shown = ", ".join(names[:3]) + (f", ... ({len(names)} files)" if len(names) > 3 else "")
        return DataError(path, f"is a folder but not a readable DICOM series ({type(err).__name__}: {detail}; it "
                               f"holds {shown or 'no files'})",
                         "give a folder of one DICOM series' .dcm files, or the image files themselves")
    if str(path).lower().endswith(".gz") and _is_plain_nifti(path):
        return DataError(path, "is a plain (uncompressed) NIfTI named .gz",
                         "rename it to .nii (or compress it with gzip)")
    tiff = _tiff_layout(path) if _suffix(path) in (".tif", ".tiff") else None
    if tiff is not None:  # a valid TIFF in a layout PIL does not decode (float RGB, ...)
        return DataError(path, f"is a TIFF of {tiff} that PIL cannot decode",
                         "save it as 8-bit RGB, or 8- / 16-bit / float grey (PNG or TIFF)")
    return DataError(path, f"cannot be read as {'a mask' if mask else 'an image'} ({type(err).__name__}: {detail})",
                     "the file is corrupt, truncated or not an image: re-download or re-export it")


def _tiff_layout(path: str) -> str | None:
    """A readable TIFF's first page as ``dtype shape (photometric)``, by tifffile when it is installed (it comes
    with scikit-image); None when it is not a TIFF tifffile reads."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages[0]
            page.asarray()  # the data is there (a truncated file is corrupt, as said otherwise)
            return f"{page.dtype} {' x '.join(map(str, page.shape))} ({page.photometric.name.lower()})"
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads, or no tifffile
        return None


def gzip_data_size(path: str | Path, limit: int | None = None) -> int:
    """The number of bytes a gzip file inflates to, its whole stream read in 4 MB pieces (nothing kept) and so
    checked by gzip itself (its CRC-32 and length at the end); raises gzip's own errors: EOFError for a stream cut
    short, ``BadGzipFile`` (an OSError), ``zlib.error``. ``limit``: stop once that many bytes are counted (the
    answer is then ``limit``): what a file must hold, without inflating a gzip bomb's gigabytes beyond it."""
    import gzip

    size = 0
    with gzip.open(path, "rb") as stream:
        while limit is None or size < limit:
            chunk = stream.read(1 << 22 if limit is None else min(1 << 22, limit - size))
            if not chunk:
                break
            size += len(chunk)
    return size


def check_gzip_stream(path: str | Path) -> None:
    """DataError when a ``.gz`` file's data fails gzip's own checks (its CRC-32 and length at the end of the
    stream), which a reader stopping after the bytes it needs never reaches: corrupted bytes inside a stream that
    still inflates would be read as voxels. The whole file is inflated once, nothing kept (``medsam3 datalist
    --check``); other files pass."""
    import zlib

    if not str(path).lower().endswith(".gz") or not Path(path).is_file():
        return
    try:
        gzip_data_size(path)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(path, f"is corrupt: its gzip data fails gzip's own check ({type(err).__name__}: {detail})",
                        "re-download or re-export it") from None


def _is_plain_nifti(path: str) -> bool:
    """Whether the file starts with an uncompressed NIfTI-1 or -2 header (its size, 348 or 540, in either byte
    order, and the magic at its end)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(548)
    except OSError:
        return False
    for size, magic_at, magics in ((348, 344, (b"n+1\0", b"ni1\0")), (540, 4, (b"n+2\0", b"ni2\0"))):
        sized = size in (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big"))
        if sized and head[magic_at:magic_at + 4] in magics:
            return True
    return False


def load_medical_image(
    path: str | Path,
    mask: bool = False,
    channel: int | None = None,
    check_finite: bool = True,
    readers: Mapping[str, ImageReader] | None = None,
    keep_uint8: bool = False,
    max_pixels: int | str | None = None,
) -> MetaTensor:
    """Load one image or mask file (or DICOM series folder) with the package's conventions.

    Args:
        readers: the readers by kind (default a new :class:`ReaderSet`; a transform keeps its own across calls).
        keep_uint8: an 8-bit 2D picture stays ``uint8`` instead of becoming ``float32`` (images only).
        max_pixels: size limit of 2D pictures, checked on the header before decoding (see
            :func:`check_picture_size`: a number of pixels, ``"auto"`` or None = PIL's limit).

    Returns:
        ``(C, H, W)`` for 2D pictures (C = 1 or 3), ``(1, X, Y, Z)`` for volumes; masks have C = 1.

    Raises:
        DataError: missing, corrupt or truncated file; a picture over the size limit; a multi-frame picture; a
            4D volume (more than one channel) unless ``channel`` picks one; NaN/Inf intensities; a mask with
            non-integer values.
    """
    path = str(path)
    if readers is None:
        readers = ReaderSet(mask)
    if not Path(path).exists():
        if "::" in path and Path(path.replace("::", "#")).exists():  # MONAI's bundle configs changed its '#'
            raise DataError(path, "file not found", f"it is {path.replace('::', '#')}, whose '#' MONAI's bundle "
                                                    "configs read as a key separator: rename it without '#'")
        raise DataError(path, "file not found", "check the path (a datalist's relative paths are read from the "
                                                "datalist's own folder)")
    if Path(path).is_dir():
        if not has_dicom_files(path):  # said before ITK prints its warning
            raise _unreadable(path, mask, ValueError("no DICOM files (.dcm, .ima or without extension)"))
        check_dicom_series(path)
    reader = _pick_reader(path, readers)
    size = dicom_picture_size(path)  # a single-frame DICOM file is a picture, its pixels read by ITK
    if isinstance(reader, Image2DReader):
        try:
            size = picture_size(path)
        except DataError:  # a multi-frame picture
            raise
        except Exception as err:  # not a picture PIL knows
            raise _unreadable(path, mask, err) from err
    nifti_header = None  # read once: checked before the reader, its affine and units after
    if size is not None:
        check_picture_size(path, size, max_pixels)
    elif _suffix(path) in (".nii", ".nii.gz"):
        nifti_header = check_nifti_data(path)
    try:
        img = _read(path, reader, size)
    except Exception as err:  # any reader failure: corrupt, truncated, not an image
        raise _unreadable(path, mask, err) from err
    if size is not None and not isinstance(reader, Image2DReader):
        img = _dicom_picture(img, path)
    if not isinstance(img, MetaTensor):
        img = MetaTensor(img)
    if img.numel() == 0:
        header = nifti_channels(path)  # (channels, the header's shape); None for other formats
        stored = header[1] if header is not None else tuple(img.shape)
        raise DataError(path, f"holds no pixels: a dimension of its shape {stored} is 0",
                        "re-export the image or volume with its data")
    source_dtype = str(img.dtype).replace("torch.", "")
    is_volume = size is None
    spatial = tuple(img.shape[1:])
    if is_volume and len(spatial) == 2:  # 2D NIfTI / single DICOM image: a one-slice volume
        img = img.unsqueeze(-1)
        spatial = tuple(img.shape[1:])
    expected = 3 if is_volume else 2
    if is_volume:
        _check_affine(path, img.affine)
        if _suffix(path) in (".nii", ".nii.gz"):  # the file's own (MONAI may have put another in its place)
            import nibabel as nib

            header = nifti_header if nifti_header is not None else nib.load(path).header
            _check_affine(path, header.get_best_affine())
            img.affine = in_millimetres(img.affine, header.get_xyzt_units()[0])
    if len(spatial) != expected:
        stored = tuple(img.shape[1:]) + (img.shape[0],) if is_volume else tuple(img.shape)  # the file's axis order
        raise DataError(path, f"has {img.ndim} dimensions (shape {stored}); expected a 2D image or a 3D "
                              "volume", "split the file into 2D images or 3D volumes")
    if is_volume or not mask:  # a label volume takes no channel: a 4D one is refused (a 2D mask's colours merge)
        check_channel(path, is_volume, int(img.shape[0]), None if mask else channel,
                      tuple(img.shape[1:]) + (img.shape[0],))
    if is_volume and img.shape[0] > 1 and not mask:
        img = img[channel : channel + 1]
    if mask and img.shape[0] > 1:
        img = img.amax(dim=0, keepdim=True)
    if mask:
        img = _integer_label(img, path)
    elif keep_uint8 and not is_volume and img.dtype == torch.uint8:
        pass  # finite by construction
    else:
        from_floats = img.is_floating_point()  # integer pixels stay finite in float32
        img = img.float()
        if check_finite and from_floats and not all_finite(img):
            n_bad = int((~torch.isfinite(img)).sum())
            raise DataError(path, f"holds {n_bad} NaN/Inf intensities",
                            "repair the file (e.g. replace NaN with the background value) before using it")
    img.meta["spatial_shape"] = np.asarray(spatial)
    img.meta["source_dtype"] = source_dtype
    img.meta["is_volume"] = is_volume
    img.meta["is_jpeg"] = _suffix(path) in JPEG_SUFFIXES
    return img


def check_nifti_data(path: str | Path) -> Any:
    """DataError for a NIfTI whose header describes more voxel data than the file holds (an uncompressed ``.nii``
    shorter than its header's offset + voxels: a truncated copy) or than fits in ``MEMORY_SHARE`` of the available
    memory (the voxels in the file's data type and as float32), said from the header before a reader allocates what
    it asks for: a 77-byte ``.nii.gz`` declaring 1100 x 1100 x 1000 voxels took 1.2 GB before failing as truncated,
    and one declaring more than the machine has made it swap. A header that does not read is left to the reader.

    Returns:
        the file's nibabel header (for the caller to reuse: reading it costs about as much as a small volume's
        voxels), None when it does not read."""
    import math

    import nibabel as nib

    try:
        volume = nib.load(str(path))
        shape, dtype = volume.header.get_data_shape(), volume.header.get_data_dtype()
        offset = int(volume.dataobj.offset)  # (a loaded image's header says 0)
    except Exception:  # noqa: BLE001 - the reader says why it cannot read it
        return None
    voxels = math.prod(int(s) for s in shape)
    if _suffix(path) == ".nii":
        held = Path(path).stat().st_size
        if held < offset + voxels * dtype.itemsize:
            raise DataError(path, f"is truncated: its header describes {'x'.join(map(str, shape))} voxels of "
                                  f"{dtype} ({offset + voxels * dtype.itemsize} bytes), the file holds {held}",
                            "re-download or re-export it")
    needed = voxels * (dtype.itemsize + 4)
    available = available_memory()
    if available is not None and needed > MEMORY_SHARE * available:
        raise DataError(path, f"declares {'x'.join(map(str, shape))} voxels of {dtype} (about {_gb(needed)} to "
                              f"read), more than {_gb(MEMORY_SHARE * available)} ({MEMORY_SHARE:.0%} of the "
                              f"{_gb(available)} of memory available)",
                        "check its header (a damaged one declares sizes the file does not hold), or free memory")
    return volume.header


#: millimetres per unit of a NIfTI header's spatial units (``xyzt_units``; "unknown" is read as mm, as MONAI does)
NIFTI_UNIT_MM = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3}


def in_millimetres(affine: Any, unit: str | None) -> torch.Tensor:
    """A voxel-to-world ``affine`` whose world is in NIfTI spatial ``unit`` (``header.get_xyzt_units()[0]``: meter,
    mm, micron or unknown) -> the same geometry in millimetres, the package's unit (spacings, HD95, NSD tolerance)."""
    affine = torch.as_tensor(affine, dtype=torch.float64).clone()
    factor = NIFTI_UNIT_MM.get(str(unit), 1.0)
    if factor != 1.0:
        affine[:-1] *= factor
    return affine


def _check_affine(path: str, affine: Any) -> None:
    """DataError for a volume whose voxel-to-world matrix is not finite or not invertible (a zero or NaN affine):
    its segmentation could not be placed, nor its spacing measured."""
    matrix = None if affine is None else np.asarray(affine, dtype=np.float64)
    if matrix is None or not np.isfinite(matrix).all() or abs(float(np.linalg.det(matrix[:3, :3]))) < 1e-12:
        raise DataError(path, "has no usable voxel-to-world matrix (its affine is zero, singular or not finite), so "
                              "its segmentation cannot be placed", "repair the header (for NIfTI: set the qform / "
                                                                   "sform and pixdim) and try again")


#: how far a DICOM series' slice spacing may stray from its median (a share of it) before a slice counts as missing
SLICE_SPACING_TOLERANCE = 0.05


def _dicom_tags(file: str, tags: Sequence[str]) -> dict[str, str]:
    """The text of ``tags`` (``"0020|0032"``, ...) in one DICOM file's header (absent ones left out), by ITK's GDCM;
    RuntimeError when GDCM cannot read the file."""
    import itk

    reader = itk.GDCMImageIO.New()
    if not reader.CanReadFile(file):
        raise RuntimeError(f"{file} is not a DICOM file GDCM reads")
    reader.SetFileName(file)
    reader.ReadImageInformation()
    values = {}
    for tag in tags:
        found, value = reader.GetValueFromTag(tag, "")
        if found:
            values[tag] = str(value).strip()
    return values


def check_dicom_series(folder: str | Path) -> None:
    """DataError when a DICOM folder is not one complete series, as ITK's reader (MONAI's ``ITKReader``) would read
    it otherwise without a word: several series (it takes one of them, by UID order), or slices not evenly spaced
    along the slice normal (a missing slice: it spreads the slices evenly and misplaces them; two at one position).
    Reads the headers only; a series without positions (ImagePositionPatient) is not checked for spacing."""
    import itk

    names = itk.GDCMSeriesFileNames.New()  # as MONAI's ITKReader lists a folder's series
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")
    names.SetGlobalWarningDisplay(False)
    names.SetDirectory(str(folder))
    series = list(names.GetSeriesUIDs())
    if len(series) > 1:
        described = []
        for uid in series:
            files = list(names.GetFileNames(uid))
            tags = _dicom_tags(files[0], ("0008|0060", "0008|103e"))
            described.append(f"{len(files)} file(s) {tags.get('0008|0060', '?')} "
                             f"{tags.get('0008|103e', '') or '(no description)'}".strip())
        pattern = str(Path(folder) / "*.dcm")
        raise DataError(folder, f"holds {len(series)} DICOM series ({'; '.join(described)}), and one folder is read "
                                "as one series", "move each series into its own folder and give that folder, or, "
                                f"for single-frame pictures (X-rays, captures), a quoted pattern '{pattern}' to "
                                "segment each file as a 2D picture")
    if not series:
        return  # no series ITK can list: the reader says why
    files = list(names.GetFileNames(series[0]))
    if len(files) < 2:
        return
    headers = [_dicom_tags(f, ("0020|0032", "0020|0037")) for f in files]
    try:
        positions = np.array([[float(v) for v in h["0020|0032"].split("\\")] for h in headers])
        orientation = np.array([float(v) for v in headers[0]["0020|0037"].split("\\")])
        if positions.shape[1] != 3 or orientation.size != 6:
            raise ValueError("not 3 / 6 numbers")
    except (KeyError, ValueError, IndexError):
        lacking = next((Path(f).name for f, h in zip(files, headers)
                        if "0020|0032" not in h or "0020|0037" not in h), Path(files[0]).name)
        raise DataError(folder, f"is a DICOM series of {len(files)} slices whose files do not all state a usable "
                                f"ImagePositionPatient (0020,0032) and ImageOrientationPatient (0020,0037) (e.g. "
                                f"{lacking}): its slices cannot be placed in space, and the reader would make up "
                                "their geometry", "export the series with its geometry tags, or convert it to a "
                                "NIfTI volume with a tool that knows its slice order and spacing") from None
    normal = np.cross(orientation[:3], orientation[3:])
    order = np.argsort(positions @ normal)
    along = (positions @ normal)[order]
    shifts = np.diff(positions[order], axis=0)
    in_plane = np.linalg.norm(shifts - np.outer(shifts @ normal, normal), axis=1)
    if in_plane.size and float(in_plane.max()) > max(0.01 * float(np.median(np.abs(np.diff(along)))), 1e-3):
        raise DataError(folder, f"is a gantry-tilted (sheared) DICOM series: each slice is shifted up to "
                                f"{float(in_plane.max()):.3g} mm within its plane from the one before, and the reader "
                                "would stack the slices straight, misplacing its segmentation",
                        "resample it to a NIfTI volume first (dcm2niix, for one, corrects gantry tilt) and give "
                        "that")
    if len(files) < 3:
        return
    steps = np.diff(along)
    spacing = float(np.median(steps))
    off = np.flatnonzero(np.abs(steps - spacing) > max(SLICE_SPACING_TOLERANCE * spacing, 1e-3))
    if spacing <= 1e-3 or off.size:
        where = int(off[0]) if off.size else int(np.argmin(steps))
        raise DataError(folder, f"is a DICOM series of {len(files)} slices not evenly spaced: "
                                f"{steps[where]:.3g} mm between slices {where} and {where + 1} (at "
                                f"{along[where]:.4g} and {along[where + 1]:.4g} mm along the slice normal), "
                                f"{spacing:.3g} mm elsewhere: a slice is missing or repeated, and the series would be "
                                "read as evenly spaced and its segmentation misplaced",
                        "export the complete series (or resample it to a NIfTI volume with even spacing)")


#: DICOM Modality (0008,0060) -> our modality name (its intensity rule); other codes give no modality
DICOM_MODALITIES = {"CT": "CT", "MR": "MRI", "US": "ultrasound", "CR": "X-ray", "DX": "X-ray", "XA": "X-ray",
                    "RF": "X-ray", "MG": "X-ray", "ES": "endoscopy", "OP": "fundus", "OPT": "OCT"}


def dicom_modality(path: str | Path) -> str | None:
    """The modality a DICOM series folder's own header states (tag (0008,0060) of its first readable file, mapped by
    :data:`DICOM_MODALITIES`: ``CT`` -> ``"CT"``, ``MR`` -> ``"MRI"``, ...), or a single ``.dcm`` file's; None for
    anything else (another file, a folder without DICOM files, another code). Reads one header, no pixels."""
    path = Path(path)
    if path.is_file() and _suffix(path) in (".dcm", ".ima"):  # a single DICOM image states it too
        candidates = [path]
    elif path.is_dir():
        candidates = [c for c in sorted(path.iterdir())[:32] if c.is_file() and not c.name.startswith(".")]
    else:
        return None
    for candidate in candidates:
        try:
            tags = _dicom_tags(str(candidate), ("0008|0060",))
        except RuntimeError:  # not DICOM, or its header does not read: the next file
            continue
        return DICOM_MODALITIES.get(tags.get("0008|0060", "").upper())
    return None


def input_modality(path: str | Path, given: str | None) -> str | None:
    """The modality an input is scaled by: ``given`` (``--modality``, the datalist's), else a DICOM series' own."""
    return given if given is not None else dicom_modality(path)


def grid_order(image_affine: Any, image_shape: Sequence[int], label_affine: Any, label_shape: Sequence[int]
               ) -> tuple[list[int], list[int]] | None:
    """How a volume's mask lies on its image's own world grid, from the two (4, 4) affines and (X, Y, Z) shapes:
    ``(order, reversed_axes)``, the mask's array axis along each of the image's (a transposed copy) and the image's
    axes along which it runs the other way (a series saved bottom-up), so that
    ``flip(permute(mask, order), reversed_axes)`` is the mask on the image's grid; None when it lies elsewhere (another
    origin, spacing or angle)."""
    if len(image_shape) < 3 or len(label_shape) < 3:
        return None  # a 2D array (a 2D NIfTI mask of a volume): no volume grid to match
    ours, theirs = torch.as_tensor(image_affine).double(), torch.as_tensor(label_affine).double()
    spacing = voxel_spacing(ours[:3])
    # cosines[i, j]: between the world directions of the image's array axis i and the mask's array axis j
    cosines = (ours[:3, :3] / spacing.clamp_min(1e-12)).T @ (theirs[:3, :3] / voxel_spacing(theirs[:3]).clamp_min(
        1e-12))
    order = cosines.abs().argmax(1).tolist()  # the mask's axis along each of the image's
    if sorted(order) != [0, 1, 2] or bool((cosines.abs().amax(1) < 0.99).any()):
        return None  # axes at an angle
    reversed_axes = [axis for axis in range(3) if float(cosines[axis, order[axis]]) < 0]
    shape = [int(label_shape[axis]) for axis in order]
    moved = theirs[:, [*order, 3]].clone()  # the mask's header with its axes in the image's order
    for axis in reversed_axes:  # index i of the axis becomes n - 1 - i: the origin moves to the other end
        moved[:3, 3] += moved[:3, axis] * (shape[axis] - 1)
        moved[:3, axis] *= -1
    same = shape == [int(n) for n in image_shape[:3]] and torch.allclose(moved[:3, :3], ours[:3, :3], rtol=1e-3,
                                                                          atol=1e-6)
    if not (same and bool(((moved[:3, 3] - ours[:3, 3]).abs() <= 0.5 * spacing.min()).all())):
        return None
    return order, reversed_axes


def _on_image_grid(image: MetaTensor, label: MetaTensor) -> MetaTensor:
    """A volume's mask stored on its image's own world grid with array axes reversed or in another order (a DICOM
    series read top-down and its mask saved bottom-up, as other tools save them; an array saved transposed with its
    header's axes in the same order): put onto the image's grid exactly (:func:`grid_order`: the same voxels, paired
    as they lie in the world). Any other mask is returned as it is (the caller warns)."""
    found = grid_order(image.affine, image.shape[1:], label.affine, label.shape[1:])
    if found is None or found == ([0, 1, 2], []):
        return label
    order, reversed_axes = found
    voxels = label.as_tensor().permute(0, *(axis + 1 for axis in order))
    on_grid = MetaTensor(torch.flip(voxels, [axis + 1 for axis in reversed_axes]).contiguous(), meta=dict(label.meta))
    on_grid.affine = image.affine.clone().to(label.affine.dtype)
    return on_grid


def _warn_if_geometry_differs(image: MetaTensor, label: MetaTensor) -> None:
    """Warn when a volume's mask has the image's size but not its orientation, voxel spacing or position (a mask
    saved from another volume, in another orientation, or with a broken header): the voxels are paired as they are,
    and the surface metrics (NSD, HD95) use the spacing of the mask's header. (A mask stored mirrored on the image's
    own grid was put on that grid first: :func:`_on_image_grid`.)"""
    import warnings

    ours, theirs = image.affine.double()[:3], label.affine.double()[:3]
    spacing, label_spacing = voxel_spacing(ours), voxel_spacing(theirs)
    # per array axis, the cosine between the image's and the mask's world direction of that axis
    cosines = ((ours[:, :3] / spacing.clamp_min(1e-12)) * (theirs[:, :3] / label_spacing.clamp_min(1e-12))).sum(0)
    if bool((cosines < 0.99).any()):
        flipped = [axis for axis, cosine in enumerate(cosines.tolist()) if cosine < -0.99]
        how = (f"array axis {', '.join(map(str, flipped))} points the opposite way" if flipped and
               len(flipped) == int((cosines < 0.99).sum()) else "its axes point in other directions")
        warnings.warn(f"{label.meta.get('filename_or_obj')}: its orientation differs from its image's "
                      f"({image.meta.get('filename_or_obj')}): {how}, so the mask, paired voxel by voxel as stored, "
                      "is mirrored or rotated against the image: save it on the image's grid (e.g. with MONAI's "
                      "ResampleToMatch) or check that it belongs to this image", stacklevel=2)
        return
    scaled = not torch.allclose(spacing, label_spacing, rtol=1e-3, atol=1e-6)
    moved = bool(((ours[:, 3] - theirs[:, 3]).abs() > 0.5 * spacing.min()).any())
    if scaled or moved:
        what = "voxel spacing" if scaled else "position"
        warnings.warn(f"{label.meta.get('filename_or_obj')}: its {what} differs from its image's "
                      f"({image.meta.get('filename_or_obj')}: spacing {spacing.tolist()} vs {label_spacing.tolist()}, "
                      f"origin {ours[:, 3].tolist()} vs {theirs[:, 3].tolist()}); voxels are paired as stored and "
                      "NSD / HD95 use the mask's spacing: check that the mask belongs to this image", stacklevel=2)


class LoadMedicalImaged(MapTransform):
    """Load images and masks of a datalist item as MetaTensors, with the checks a training run needs.

    Reader by suffix: PNG/JPEG/BMP/TIFF/GIF/PPM -> :class:`Image2DReader` (rows first); ``.nii``/``.nii.gz`` ->
    ``NibabelReader``; a folder -> ``ITKReader`` (DICOM series); anything else -> ``ITKReader``.

    Args:
        keys: keys holding a path (image keys and label keys).
        label_keys: which of ``keys`` are masks. A mask key may hold a list of paths: the masks of one
            image (BUSI ``_mask_1``) are merged by their pixel-wise maximum (the union for binary masks).
        image_key: the key the masks must match in size.
        channel: for a multi-channel (4D) image volume, the channel to keep; None takes the item's own
            ``channel`` (a datalist written with ``medsam3 datalist --channel N``), and a 4D volume without one is
            an error.
        check_finite: raise on NaN/Inf intensities.
        keep_uint8: 8-bit 2D pictures stay ``uint8`` (both bundles: the intensity step and the slice-space
            resize then work tile by tile, see ``ScaleIntensityByModalityd(defer_2d=True)``).
        max_pixels: size limit of 2D pictures, checked on the file header before decoding: a number of pixels
            (it also lifts PIL's decompression-bomb limit), ``"auto"`` (PIL's limit and the available memory)
            or None (PIL's limit); the ``MEDSAM3_MAX_PIXELS`` environment variable replaces ``"auto"``/None.

    Output: ``d[image_key]`` float32 (or, with ``keep_uint8``, uint8 for 8-bit pictures) ``(C, H, W)`` or
    ``(1, X, Y, Z)``; ``d[label]`` integer ``(1, ...)`` of the same spatial shape. ``meta['filename_or_obj']``
    names the file, ``meta['affine']`` its geometry.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        label_keys: KeysCollection = ("label",),
        image_key: str = "image",
        channel: int | None = None,
        check_finite: bool = True,
        keep_uint8: bool = False,
        max_pixels: int | str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = {label_keys} if isinstance(label_keys, str) else set(label_keys)
        self.image_key = image_key
        self.channel = channel
        self.check_finite = check_finite
        self.keep_uint8 = bool(keep_uint8)
        self.max_pixels = max_pixels
        self._readers = {False: ReaderSet(mask=False), True: ReaderSet(mask=True)}

    def _load(self, path: str | Path, mask: bool, channel: int | None = None) -> MetaTensor:
        return load_medical_image(path, mask=mask, channel=channel, check_finite=self.check_finite,
                                  readers=self._readers[mask], keep_uint8=self.keep_uint8 and not mask,
                                  max_pixels=self.max_pixels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        channel = self.channel if self.channel is not None else d.get("channel")
        for key in self.key_iterator(d):
            mask = key in self.label_keys
            value = d[key]
            if isinstance(value, (list, tuple)):
                if not mask:
                    raise DataError(", ".join(map(str, value)), f"'{key}' holds {len(value)} paths",
                                    "give one image path (a DICOM series is one folder)")
                parts = [self._load(p, mask=True) for p in value]
                image = d.get(self.image_key)
                if isinstance(image, MetaTensor) and image.ndim == 4:
                    # each part on the image's own grid, and warned about, before the voxels are merged: a part
                    # stored flipped (or of another geometry) must not be merged as stored
                    parts = [_on_image_grid(image, part) if isinstance(part, MetaTensor) else part for part in parts]
                    for part in parts:
                        if isinstance(part, MetaTensor) and tuple(part.shape[1:]) == tuple(image.shape[1:]):
                            _warn_if_geometry_differs(image, part)
                merged = parts[0]
                for other, path in zip(parts[1:], value[1:]):
                    if other.shape != merged.shape:
                        raise DataError(path, f"mask size {tuple(other.shape[1:])} does not match the other mask "
                                              f"of the same image {tuple(merged.shape[1:])} ({value[0]})",
                                        "drop or fix the mismatched mask")
                    merged = torch.maximum(merged.to(torch.int32), other.to(torch.int32))
                d[key] = _integer_label(merged, str(value[0]))
            else:
                d[key] = self._load(value, mask=mask, channel=None if mask else channel)
        self._check_sizes(d, data)
        return d

    def _check_sizes(self, d: dict[Hashable, Any], data_paths: Mapping[Hashable, Any] = {}) -> None:
        image = d.get(self.image_key)
        if not isinstance(image, torch.Tensor):
            return
        for key in self.label_keys:
            label = d.get(key)
            aligned = (isinstance(label, MetaTensor) and isinstance(image, MetaTensor) and image.ndim == 4
                       and label.ndim == 4 and not isinstance(data_paths.get(key), (list, tuple)))
            if aligned:  # (a list's parts were aligned one by one); before the sizes: a transposed mask's differ
                d[key] = label = _on_image_grid(image, label)  # type: ignore[index]
            if isinstance(label, torch.Tensor) and tuple(label.shape[1:]) != tuple(image.shape[1:]):
                name = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
                raise DataError(
                    label.meta.get("filename_or_obj") if isinstance(label, MetaTensor) else None,
                    f"mask size {tuple(label.shape[1:])} does not match the image size {tuple(image.shape[1:])} "
                    f"of {name or 'the image'}", _turned_mask_hint(name, label.shape[1:], image.shape[1:])
                    or "pair each image with its own mask, or drop the pair",
                )
            if aligned:
                _warn_if_geometry_differs(image, label)
