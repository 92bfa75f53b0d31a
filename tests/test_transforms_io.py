"""Loading: every format of the real data, rows-first orientation, DICOM series, and bad input errors."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from _transforms_helpers import SHARED_DATA, requires_data
from medsam3_monai.transforms import (
    DataError,
    DecodeLabeld,
    LoadMedicalImaged,
    ResizeToSliced,
    ScaleIntensityByModalityd,
    load_medical_image,
)
from medsam3_monai.transforms.io import C_ORDER_ROWS, c_order


def load(image, label=None, **kwargs):
    keys = ("image", "label") if label is not None else ("image",)
    data = {"image": str(image)} | ({"label": label if isinstance(label, list) else str(label)} if label else {})
    return LoadMedicalImaged(keys=keys, **kwargs)(data)


# ---------------------------------------------------------------- real formats


@requires_data
@pytest.mark.parametrize(
    "image, label, mode",
    [
        ("BUSI/images/benign (1).png", "BUSI/masks/benign (1)_mask.png", "RGB"),
        ("BUSI/images/benign (15).png", "BUSI/masks/benign (15)_mask.png", "1"),
        ("DRIVE/images/01_test.tif", "DRIVE/masks/01_manual1.gif", "L"),
        ("GBM40_HE_nuclei/images/01.tif", "GBM40_HE_nuclei/masks/01_instances.png", "I;16"),
        ("Kvasir-SEG_sample/images/cju0qkwl35piu0993l0dewei2.jpg",
         "Kvasir-SEG_sample/masks/cju0qkwl35piu0993l0dewei2.jpg", "RGB"),
        ("ChestXray_lung_sample/images/1.jpg", "ChestXray_lung_sample/masks/1-mask.png", "L"),
        ("ISBI2012_EM_membrane/images/0.png", "ISBI2012_EM_membrane/masks/0.png", "L"),
    ],
)
def test_2d_files_load_rows_first_and_match_pil(image, label, mode):
    """Image and mask arrays equal PIL's own (H, W[, C]) arrays, channel first: the overlay lines up."""
    image_path, label_path = SHARED_DATA / image, SHARED_DATA / label
    assert Image.open(label_path).mode == mode  # the sample covers the mask mode it claims to
    d = load(image_path, label_path)
    reference = np.asarray(Image.open(image_path))
    reference = reference[None] if reference.ndim == 2 else reference.transpose(2, 0, 1)
    assert tuple(d["image"].shape) == reference.shape
    assert torch.equal(d["image"], torch.from_numpy(reference.astype(np.float32)))
    assert d["image"].dtype == torch.float32 and d["image"].meta["source_dtype"] == "uint8"
    mask = np.asarray(Image.open(label_path).convert("L" if mode in ("1", "RGB") else Image.open(label_path).mode))
    assert d["label"].shape == (1, *reference.shape[1:])
    assert torch.equal(d["label"][0] > 0, torch.from_numpy(mask > 0))
    assert not d["label"].is_floating_point()
    assert d["image"].meta["filename_or_obj"] == str(image_path)
    assert not d["image"].meta["is_volume"]


@requires_data
def test_nifti_volume_keeps_affine_and_voxel_order():
    path = SHARED_DATA / "TotalSegmentator_example_CT_MR/images/example_mr_sm.nii.gz"
    d = load(path, SHARED_DATA / "TotalSegmentator_example_CT_MR/masks/example_seg_mr.nii.gz")
    reference = nib.load(str(path))
    assert tuple(d["image"].shape) == (1, *reference.shape)
    np.testing.assert_allclose(d["image"].affine.numpy(), reference.affine, atol=1e-4)  # LPS file, RAS affine
    np.testing.assert_array_equal(d["image"][0].numpy(), np.asanyarray(reference.dataobj).astype(np.float32))
    assert d["image"].meta["source_dtype"] == "int16" and d["image"].meta["is_volume"]
    assert d["label"].dtype == torch.uint8 and d["label"].shape == d["image"].shape


@requires_data
def test_busi_second_mask_is_merged_by_union():
    root = SHARED_DATA / "BUSI/masks"
    d = load(SHARED_DATA / "BUSI/images/benign (25).png",
             [str(root / "benign (25)_mask.png"), str(root / "benign (25)_mask_1.png")])
    first = np.asarray(Image.open(root / "benign (25)_mask.png").convert("L")) > 0
    second = np.asarray(Image.open(root / "benign (25)_mask_1.png").convert("L")) > 0
    assert first.sum() and second.sum() and (first & ~second).sum()
    assert torch.equal(d["label"][0] > 0, torch.from_numpy(first | second))


# ---------------------------------------------------------------- synthetic mask modes


def _save(tmp_path: Path, name: str, img: Image.Image) -> Path:
    path = tmp_path / name
    img.save(path)
    return path


def _blob(height=24, width=40) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[3:9, 20:35] = True  # top right: a transposed read would move it
    return mask


def test_palette_mask_reads_the_index_not_the_colour(tmp_path):
    mask = _blob()
    img = Image.fromarray(mask.astype(np.uint8)).convert("P")
    img.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 white, index 1 black
    path = _save(tmp_path, "palette.png", img)
    assert Image.open(path).mode == "P"
    label = load(_save(tmp_path, "img.png", Image.new("L", (40, 24))), path)["label"]
    assert torch.equal(label[0], torch.from_numpy(mask.astype(np.uint8)))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "1", "LA"])
def test_colour_alpha_and_1bit_masks_become_one_channel(tmp_path, mode):
    mask = _blob()
    if mode == "RGB":
        rgb = np.zeros((*mask.shape, 3), np.uint8)
        rgb[mask, 0] = 200  # a red mask: any channel counts
        img = Image.fromarray(rgb)
    elif mode == "RGBA":
        rgba = np.zeros((*mask.shape, 4), np.uint8)
        rgba[..., 3][mask] = 255  # drawn in alpha only
        img = Image.fromarray(rgba)
    elif mode == "1":
        img = Image.fromarray(mask)
    else:
        img = Image.fromarray(mask.astype(np.uint8) * 255).convert("LA")
    assert img.mode == mode
    path = _save(tmp_path, f"mask_{mode}.png", img)
    label = load(_save(tmp_path, "img.png", Image.new("RGB", (40, 24))), path)["label"]
    assert label.shape == (1, 24, 40)
    assert torch.equal(label[0] > 0, torch.from_numpy(mask))


@pytest.mark.parametrize("suffix", [".bmp", ".gif", ".tif", ".jpg", ".png"])
def test_every_2d_suffix_loads_rows_first(tmp_path, suffix):
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 255, size=(24, 40, 3), dtype=np.uint8)
    img = Image.fromarray(picture)
    if suffix == ".gif":
        img = img.convert("L")
    path = _save(tmp_path, f"img{suffix}", img)
    loaded = load(path)["image"]
    expected = np.asarray(Image.open(path).convert(img.mode))
    expected = expected[None] if expected.ndim == 2 else expected.transpose(2, 0, 1)
    assert torch.equal(loaded, torch.from_numpy(expected.astype(np.float32)))


def test_16bit_picture_keeps_its_range(tmp_path):
    array = (np.arange(24 * 40, dtype=np.uint16).reshape(24, 40) * 60).astype(np.uint16)
    path = _save(tmp_path, "xray16.png", Image.fromarray(array))
    d = load(path)
    assert d["image"].meta["source_dtype"] in ("uint16", "int32")
    assert float(d["image"].max()) == float(array.max())


def test_jpeg_mask_threshold_is_127(tmp_path):
    mask = np.zeros((24, 40), np.uint8)
    mask[5:15, 5:30] = 255
    mask[0, 0:5] = 100  # compression-like noise below the threshold
    path = tmp_path / "mask.jpg"
    Image.fromarray(mask).save(path, quality=95)
    d = load(_save(tmp_path, "img.png", Image.new("L", (40, 24))), path)
    d.update(prompts={"1": "polyp"}, mask_encoding="binary")
    decoded = DecodeLabeld()(d)["label"]
    assert set(decoded.unique().tolist()) == {0, 1}
    assert int(decoded[0, 0, 0:5].sum()) == 0  # noise gone
    assert int(decoded.sum()) == pytest.approx(10 * 25, abs=12)


def test_a_photo_stored_sideways_is_read_as_viewers_show_it(tmp_path):
    """A JPEG whose EXIF Orientation turns it a quarter (6: stored 120 wide, shown 60 wide and 120 high): read,
    sized and size-checked as displayed, so a mask drawn on the displayed picture (as annotation tools draw it)
    fits it, and the stored-orientation pixels are the displayed ones turned back."""
    from medsam3_monai.data.checks import spatial_shape
    from medsam3_monai.transforms.io import picture_size

    stored = np.zeros((60, 120, 3), np.uint8)
    stored[:, :30] = 255  # a band along the stored left edge
    picture = Image.fromarray(stored)
    exif = picture.getexif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    picture.save(path, exif=exif.tobytes(), quality=100)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    assert shown.shape[:2] == (120, 60)
    label = _save(tmp_path, "photo_mask.png", Image.fromarray(((shown[..., 0] > 127) * 255).astype(np.uint8)))
    assert picture_size(path) == (60, 120) and spatial_shape(path) == spatial_shape(label) == (120, 60)
    d = load(path, label)
    assert tuple(d["image"].shape) == (3, 120, 60) and tuple(d["label"].shape) == (1, 120, 60)
    assert np.array_equal(d["image"].numpy().transpose(1, 2, 0).astype(np.uint8), shown)
    band = DecodeLabeld()(d | {"prompts": {"1": "band"}})["label"][0].numpy()
    assert np.array_equal(band, (shown[..., 0] > 127).astype(np.uint8))  # the band, where the viewer shows it
    plain = _save(tmp_path, "plain.png", Image.fromarray(stored))  # no tag: as stored
    assert picture_size(plain) == (120, 60) and tuple(load(plain)["image"].shape) == (3, 60, 120)
    # a mask saved in the stored orientation (by a tool that ignores EXIF): refused, saying why
    stored_mask = _save(tmp_path, "stored_mask.png", Image.fromarray(((stored[..., 0] > 127) * 255).astype(np.uint8)))
    with pytest.raises(DataError, match=r"EXIF Orientation \(6\) turns it a quarter.*the mask has the stored "
                                        r"orientation"):
        load(path, stored_mask)


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "RGBA"])
@pytest.mark.parametrize("orientation", [6, 8, 5, 7])
def test_a_tiff_stored_turned_is_read_and_sized_as_viewers_show_it(tmp_path, orientation, mode, compression):
    """A TIFF whose Orientation tag turns it a quarter: sized as displayed (Pillow >= 11 reports a TIFF's size
    already turned: it must not be swapped twice, or the datalist's pair check refuses its mask) and read as
    displayed, uncompressed too (Pillow's memory-mapped read scrambles an uncompressed grey or RGBA one)."""
    from medsam3_monai.data.checks import spatial_shape
    from medsam3_monai.transforms.io import picture_size

    values = (np.arange(60 * 100).reshape(60, 100) * 7 % 251).astype(np.uint8)  # stored 100 wide, 60 high
    stored = {"L": values, "I;16": values.astype(np.uint16) * 200, "RGB": np.stack([values, 255 - values, values // 2],
              -1), "RGBA": np.stack([values, 255 - values, values // 2, np.full_like(values, 255)], -1)}[mode]
    picture = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "turned.tif"
    picture.save(path, exif=exif, compression=compression)
    turn = {6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90, 5: Image.Transpose.TRANSPOSE,
            7: Image.Transpose.TRANSVERSE}[orientation]
    shown = np.asarray(picture.transpose(turn))
    assert shown.shape[:2] == (100, 60)
    assert picture_size(path) == (60, 100) and spatial_shape(path) == (100, 60)
    image = load(path)["image"].numpy()
    channels = shown[..., :3].transpose(2, 0, 1) if shown.ndim == 3 else shown[None]  # alpha dropped
    assert image.shape == channels.shape and np.array_equal(image, channels)


def test_a_colour_coded_rgb_mask_is_refused_and_a_one_colour_mask_read(tmp_path):
    """Regions told apart by colour (red for one class, green for another) would merge under the brightest-channel
    rule: refused, naming the colours; a mask drawn in one colour, or grey saved as RGB, is read as before."""
    from medsam3_monai.transforms import DataError

    image = _save(tmp_path, "img.png", Image.new("L", (40, 30), 90))
    colours = np.zeros((30, 40, 3), np.uint8)
    colours[5:15, 5:15] = (255, 0, 0)
    colours[18:25, 20:35] = (0, 255, 0)
    with pytest.raises(DataError, match=r"two.png: colour-coded RGB mask \(red and green regions\): its classes "
                                        r"would merge.*save it as a label map"):
        load(image, _save(tmp_path, "two.png", Image.fromarray(colours)))
    colours[18:25, 20:35] = (255, 0, 0)
    one = load(image, _save(tmp_path, "one.png", Image.fromarray(colours)))["label"]
    assert int((one > 0).sum()) == 100 + 7 * 15
    grey = np.repeat((colours[..., :1] > 0).astype(np.uint8) * 255, 3, axis=-1)
    assert torch.equal(load(image, _save(tmp_path, "grey.png", Image.fromarray(grey)))["label"], one)


def test_a_soft_edged_png_mask_is_told_to_be_binarised_at_its_middle(tmp_path):
    """An anti-aliased binary PNG mask (a disc blurred at its edge): refused as such, with the remedy of binarising
    it at its middle (``mask_encoding: binary`` would take the whole soft edge); an instance-id map of as many
    values keeps its own message."""
    from PIL import ImageFilter

    from medsam3_monai.transforms import DataError

    y, x = np.mgrid[0:60, 0:90]
    disc = ((x - 45) ** 2 + (y - 30) ** 2 < 15 ** 2).astype(np.uint8) * 255
    image = _save(tmp_path, "img.png", Image.new("L", (90, 60), 90))
    soft = _save(tmp_path, "soft.png", Image.fromarray(disc).filter(ImageFilter.GaussianBlur(2)))
    d = load(image, soft) | {"prompts": {"1": "disc"}}
    with pytest.raises(DataError, match=r"soft.png: mask of \d+ grey levels \(1-255\): a soft-edged .*binarise it "
                                        r"at its middle"):
        DecodeLabeld()(d)
    ids = np.zeros((60, 90), np.uint8)
    ids.flat[::50] = np.arange(1, 109)  # 108 instance ids, one pixel each
    d = load(image, _save(tmp_path, "ids.png", Image.fromarray(ids))) | {"prompts": {"1": "cell"}}
    with pytest.raises(DataError, match="instance_rule"):
        DecodeLabeld()(d)


def test_datalist_check_notes_a_soft_edge_that_an_explicit_binary_encoding_takes_as_mask(tmp_path, capsys):
    """``"mask_encoding": "binary"`` (what every converter writes) takes a soft edge as mask without a word from the
    loader; ``datalist --check`` says so with the pixels above 0 and above 127. A hard-edged mask gets no note."""
    import json

    from PIL import ImageFilter

    from medsam3_monai.data.cli import check_datalist_file

    y, x = np.mgrid[0:60, 0:90]
    disc = ((x - 45) ** 2 + (y - 30) ** 2 < 15 ** 2).astype(np.uint8) * 255
    _save(tmp_path, "img.png", Image.new("L", (90, 60), 90))
    soft = np.asarray(Image.fromarray(disc).filter(ImageFilter.GaussianBlur(2)))
    _save(tmp_path, "soft.png", Image.fromarray(soft))
    _save(tmp_path, "hard.png", Image.fromarray(disc))
    said = {}
    for mask in ("soft.png", "hard.png"):
        item = {"image": "img.png", "label": mask, "prompts": {"1": "disc"}, "mask_encoding": "binary"}
        (tmp_path / "list.json").write_text(json.dumps({"test": [item]}))
        assert check_datalist_file(tmp_path / "list.json", progress=False) == 0
        said[mask] = capsys.readouterr().err
    assert "1 binary mask(s) have a soft (anti-aliased or resized) edge" in said["soft.png"]
    assert f"({int((soft > 0).sum())} pixels, {int((soft > 127).sum())} above 127" in said["soft.png"]
    assert "soft" not in said["hard.png"] and "every image and mask decodes" in said["hard.png"]


# ---------------------------------------------------------------- DICOM series (ITK)


def _save_dicom(ds, path) -> None:
    """``ds`` written as a DICOM Part 10 file (preamble, file meta) under pydicom 3 and 2.4 alike: pyproject.toml
    allows both, and pydicom 3 renamed 2.x's ``write_like_original=False`` to ``enforce_file_format=True``."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, write_like_original=False)


def _write_dicom_series(folder: Path, volume: np.ndarray, spacing=(0.8, 0.7), thickness=2.5) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k, plane in enumerate(volume):  # volume (Z, rows, cols)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "anonymous", k + 1
        ds.ImagePositionPatient = [-5.0, -6.0, thickness * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = list(spacing), thickness
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = plane.astype(np.int16).tobytes()
        _save_dicom(ds, folder / f"slice_{k:03d}.dcm")
    assert pydicom


def test_dicom_series_folder_loads_as_hu_volume_with_geometry(tmp_path):
    volume = np.arange(4 * 12 * 10, dtype=np.int16).reshape(4, 12, 10) + 1000  # Z, rows, cols; HU = value - 1024
    _write_dicom_series(tmp_path / "series", volume)
    d = load(tmp_path / "series")
    img = d["image"]
    assert tuple(img.shape) == (1, 10, 12, 4)  # (C, X=cols, Y=rows, Z)
    np.testing.assert_array_equal(img[0].numpy(), volume.transpose(2, 1, 0).astype(np.float32) - 1024)
    np.testing.assert_allclose(np.diag(img.affine.numpy())[:3], [-0.7, -0.8, 2.5], atol=1e-5)  # RAS
    out = ScaleIntensityByModalityd(modality="CT")(d)["image"]
    hu = volume.transpose(2, 1, 0).astype(np.float32) - 1024
    np.testing.assert_allclose(out[0].numpy(), np.clip((hu + 160) / 400, 0, 1), atol=1e-6)  # abdomen W400/L40


def test_a_dicom_series_is_scaled_by_the_modality_its_header_states(tmp_path, capsys):
    """A CT series without --modality gets the CT window (its (0008,0060) says CT), and --ct-window applies to it;
    files other than DICOM folders state none."""
    import json

    from medsam3_monai.deploy.cli import main
    from medsam3_monai.transforms.io import dicom_modality

    volume = np.arange(4 * 12 * 10, dtype=np.int16).reshape(4, 12, 10) + 1000
    _write_dicom_series(tmp_path / "series", volume)
    assert dicom_modality(tmp_path / "series") == dicom_modality(tmp_path / "series" / "slice_000.dcm") == "CT"
    assert dicom_modality(tmp_path / "seg.png") is None
    as_stated = ScaleIntensityByModalityd()(load(tmp_path / "series"))["image"]
    as_ct = ScaleIntensityByModalityd(modality="CT")(load(tmp_path / "series"))["image"]
    assert torch.equal(as_stated, as_ct)
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(tmp_path / "series"), "--prompt", "liver", "--ct-window", "lung", "--tracker", "none",
                 "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["modality"] == "CT" and sidecar["ct_window"] is not None


def test_a_dicom_folder_that_is_not_one_complete_series_is_refused(tmp_path):
    """ITK's series reader would take one of two series by UID order, and read a series with a missing slice as
    evenly spaced (its slices misplaced): both refused, naming what is wrong; the complete series loads."""
    volume = np.full((5, 6, 4), 1000, dtype=np.int16)
    _write_dicom_series(tmp_path / "series", volume)
    assert tuple(load(tmp_path / "series")["image"].shape) == (1, 4, 6, 5)
    (tmp_path / "series" / "slice_002.dcm").unlink()
    with pytest.raises(DataError, match=r"series of 4 slices not evenly spaced: 5 mm between slices 1 and 2 .*, 2.5 "
                                        r"mm elsewhere: a slice is missing"):
        load(tmp_path / "series")
    _write_dicom_series(tmp_path / "other", volume[:3])
    for path in (tmp_path / "other").iterdir():
        path.rename(tmp_path / "series" / f"other_{path.name}")
    with pytest.raises(DataError, match=r"holds 2 DICOM series \(.*\), and one folder is read as one series; move "
                                        "each series into its own folder"):
        load(tmp_path / "series")


def _write_dicom_picture(path: Path, pixels: np.ndarray, modality: str = "DX", photometric: str | None = None,
                         frames: int | None = None, intercept: float | None = None) -> Path:
    """One DICOM file of ``pixels`` ((rows, cols) grey, (rows, cols, 3) RGB, or (frames, rows, cols) with ``frames``),
    as a capture device writes it (no patient geometry)."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID = generate_uid(), generate_uid(), modality, "x"
    rgb = pixels.ndim == 3 and frames is None
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3, "RGB") if rgb else (1, photometric or "MONOCHROME2")
    if rgb:
        ds.PlanarConfiguration = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelSpacing = [0.5, 0.5]
    if intercept is not None:
        ds.RescaleIntercept, ds.RescaleSlope = intercept, 1
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    _save_dicom(ds, path)
    return path


@requires_data
def test_a_single_frame_dicom_file_is_a_2d_picture_with_its_pngs_pixels(tmp_path):
    """An X-ray / capture in one DICOM file is a picture (C, H, W), rows first, whatever it is written as: 8-bit grey
    (not square), MONOCHROME1 (GDCM inverts it), RGB -- the PNG of the same pixels loads the same; every kind rule
    says picture; a multi-frame file stays a volume."""
    from medsam3_monai.data.caching import is_picture_item
    from medsam3_monai.data.selection import is_volume_item
    from medsam3_monai.inferers.inputs import input_kind
    from medsam3_monai.transforms.io import is_picture_path, load_medical_image

    grey = np.asarray(Image.open(SHARED_DATA / "ChestXray_lung_sample" / "images" / "1.jpg").convert("L"))[:, :400]
    rgb = np.asarray(Image.open(sorted((SHARED_DATA / "Kvasir-SEG_sample" / "images").glob("*.jpg"))[0]))
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    files = {"grey": _write_dicom_picture(tmp_path / "grey.dcm", grey),
             "inverted": _write_dicom_picture(tmp_path / "inverted.dcm", 255 - grey, photometric="MONOCHROME1"),
             "rgb": _write_dicom_picture(tmp_path / "rgb.dcm", rgb, modality="ES")}
    for name, path in files.items():
        img = load_medical_image(path, keep_uint8=True)
        png = load_medical_image(tmp_path / ("rgb.png" if name == "rgb" else "grey.png"), keep_uint8=True)
        assert img.meta["is_volume"] is False and img.dtype == torch.uint8, name
        assert torch.equal(img.as_tensor(), png.as_tensor()), name
        assert is_picture_path(path) and input_kind(path) == "image", name
        assert is_picture_item({"image": str(path)}) and not is_volume_item({"image": str(path)}), name
    frames = _write_dicom_picture(tmp_path / "cine.dcm", np.stack([grey] * 3), frames=3)
    assert not is_picture_path(frames) and input_kind(frames) == "volume"
    assert tuple(load_medical_image(frames).shape) == (1, 400, 512, 3)


@requires_data
def test_segment_takes_a_dicom_picture_as_its_png_and_a_ct_slice_in_hounsfield_units(tmp_path, capsys):
    """`medsam3 segment x.dcm` writes the PNG mask `segment x.png` writes (box and protocol too); a CT slice's
    pixels are HU (rescale applied), windowed without the note that pictures hold display values."""
    import json

    from medsam3_monai.deploy.cli import main

    grey = np.asarray(Image.open(SHARED_DATA / "ChestXray_lung_sample" / "images" / "1.jpg").convert("L"))[:, :400]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    _write_dicom_picture(tmp_path / "grey.dcm", grey)
    options = ["--prompt", "lung", "--box", "10", "10", "300", "300", "--protocol", "threshold", "--score-threshold",
               "0.1", "--no-progress"]
    for name in ("grey.png", "grey.dcm"):
        assert main(["segment", str(tmp_path / name), *options, "--out", str(tmp_path / f"{name}.png")]) == 0
    masks = [np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("grey.png", "grey.dcm")]
    assert masks[0].shape == (512, 400) and np.array_equal(masks[0], masks[1])
    hu = grey.astype(np.int16) * 4 - 1024  # stored values; intercept 0: HU as stored
    _write_dicom_picture(tmp_path / "ct.dcm", hu + 1024, modality="CT", intercept=-1024)
    from medsam3_monai.transforms.io import load_medical_image

    assert torch.equal(load_medical_image(tmp_path / "ct.dcm")[0], torch.from_numpy(hu).float())
    capsys.readouterr()
    assert main(["segment", str(tmp_path / "ct.dcm"), "--prompt", "lung", "--out", str(tmp_path / "ct.png"),
                 "--no-progress"]) == 0
    assert "display values" not in capsys.readouterr().err
    assert json.loads((tmp_path / "ct.png.json").read_text())["modality"] == "CT"  # the header's, windowed


def test_a_dicom_series_it_cannot_place_is_refused_not_given_a_made_up_geometry(tmp_path):
    """ITK's reader stacks a gantry-tilted series straight (each slice shifted in its plane) and gives a series
    without ImagePositionPatient 1 mm slices at the origin: both refused, naming why (a missing slice whose one file
    lost its position was let through by the spacing check); an oblique series, slices along its normal, loads."""
    import pydicom

    volume = np.full((5, 6, 4), 1000, dtype=np.int16)

    def edited(name: str, edit) -> Path:
        folder = tmp_path / name
        _write_dicom_series(folder, volume)
        for k, path in enumerate(sorted(folder.iterdir())):
            ds = pydicom.dcmread(path)
            edit(ds, k)
            ds.save_as(path)
        return folder

    def tilt(ds, k):
        ds.ImagePositionPatient = [-5.0, -6.0 + 1.5 * k, 2.5 * k]

    with pytest.raises(DataError, match=r"is a gantry-tilted \(sheared\) DICOM series: each slice is shifted up to "
                                        r"1.5 mm within its plane .* resample it to a NIfTI volume first"):
        load(edited("tilt", tilt))

    def no_position(ds, k):
        if k == 2:
            del ds.ImagePositionPatient

    with pytest.raises(DataError, match=r"files do not all state a usable ImagePositionPatient \(0020,0032\) and "
                                        r"ImageOrientationPatient \(0020,0037\) \(e.g. slice_002.dcm\): its slices "
                                        "cannot be placed"):
        load(edited("no_position", no_position))
    oblique = np.array([[1, 0, 0], [0, np.cos(0.3), np.sin(0.3)]])

    def turned(ds, k):
        normal = np.cross(*oblique)
        ds.ImageOrientationPatient = [float(v) for v in oblique.ravel()]
        ds.ImagePositionPatient = [float(v) for v in np.array([-5.0, -6.0, 0.0]) + 2.5 * k * normal]

    assert tuple(load(edited("oblique", turned))["image"].shape) == (1, 4, 6, 5)


@pytest.mark.parametrize("affine", [np.zeros((4, 4)), np.diag([np.nan, 1.0, 1.0, 1.0])])
def test_a_volume_without_a_usable_affine_is_refused(tmp_path, affine):
    path = tmp_path / "v.nii.gz"
    image = nib.Nifti1Image(np.ones((4, 5, 3), dtype=np.float32), None)
    image.header.set_sform(affine, code=1)  # the header's matrix as stored (nibabel would not build such an image)
    image.to_filename(path)
    with pytest.raises(DataError, match="has no usable voxel-to-world matrix"):
        load(path)


# ---------------------------------------------------------------- bad input: errors name the file


def _noise_png(path: Path, size=(40, 24)) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), np.uint8)).save(path)
    return path


def test_a_big_endian_16_bit_tiff_loads_as_its_little_endian_twin(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    levels = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50)
    tifffile.imwrite(tmp_path / "big.tif", levels.astype(">u2"), byteorder=">")
    tifffile.imwrite(tmp_path / "little.tif", levels, byteorder="<")
    big, little = load(tmp_path / "big.tif")["image"], load(tmp_path / "little.tif")["image"]
    assert torch.equal(big.as_tensor(), little.as_tensor()) and big.meta["source_dtype"] == little.meta["source_dtype"]
    assert torch.equal(big[0], torch.from_numpy(levels.astype(np.float32)))


def test_a_two_channel_tiff_is_refused_not_read_as_its_first_channel(tmp_path):
    """PIL reads a grey TIFF with an extra channel of data (ExtraSamples "unspecified") as its first channel alone:
    refused; the same picture with an alpha channel reads as grey (alpha dropped, as an RGBA picture's is)."""
    tifffile = pytest.importorskip("tifffile")
    pixels = np.random.default_rng(0).integers(0, 255, (20, 30, 2), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "two.tif", pixels, photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(tmp_path / "alpha.tif", pixels, photometric="minisblack", planarconfig="contig",
                     extrasamples=["unassalpha"])
    # Pillow >= 13 opens it (and the reader refuses it by its ExtraSamples tag); Pillow < 13 cannot decode it
    with pytest.raises(DataError, match="is a TIFF of (2 channels that are not an alpha channel, and only its first "
                                        r"would be read|uint8 20 x 30 x 2 \(minisblack\) that PIL cannot decode)"):
        load(tmp_path / "two.tif")
    assert torch.equal(load(tmp_path / "alpha.tif")["image"][0], torch.from_numpy(pixels[..., 0]).float())


def test_a_tiff_pil_cannot_decode_is_named_with_its_layout_not_called_corrupt(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "float_rgb.tif"
    tifffile.imwrite(path, np.random.default_rng(0).random((12, 10, 3), dtype=np.float32), photometric="rgb")
    with pytest.raises(DataError, match=r"is a TIFF of float32 12 x 10 x 3 \(rgb\) that PIL cannot decode; save it "
                                        "as 8-bit RGB") as err:
        load(path)
    assert "corrupt" not in str(err.value)
    path.write_bytes(path.read_bytes()[:200])  # truncated: corrupt it is
    with pytest.raises(DataError, match="corrupt, truncated or not an image"):
        load(path)


@pytest.mark.parametrize("shape", [(35, 51, 0), (35, 0, 10)])
def test_a_volume_with_an_empty_dimension_is_named_with_its_own_shape(tmp_path, shape):
    path = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), np.eye(4)), path)
    with pytest.raises(DataError, match=re.escape(f"holds no pixels: a dimension of its shape {shape} is 0")):
        load(path)


def test_pictures_and_nifti_files_load_without_building_an_itk_reader(tmp_path, monkeypatch):
    """ITK is built only for the inputs that need it: a machine without ITK (a bare GPU image) reads these."""
    import medsam3_monai.transforms.io as io

    def no_itk():
        raise AssertionError("an ITKReader was built for a picture or a NIfTI file")

    monkeypatch.setattr(io, "ITKReader", no_itk)
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8)).save(tmp_path / "picture.png")
    Image.fromarray((np.arange(48) % 2).astype(np.uint8).reshape(6, 8)).save(tmp_path / "mask.png")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 3), np.float32), np.eye(4)), tmp_path / "volume.nii.gz")
    loader = LoadMedicalImaged(keys=("image", "label"), allow_missing_keys=True)
    picture = loader({"image": str(tmp_path / "picture.png"), "label": str(tmp_path / "mask.png")})
    volume = loader({"image": str(tmp_path / "volume.nii.gz")})
    assert picture["image"].shape == (1, 6, 8) and picture["label"].shape == (1, 6, 8)
    assert volume["image"].shape == (1, 4, 5, 3)
    with pytest.raises(DataError, match="no DICOM files"):  # a folder of pictures: refused before ITK is asked
        loader({"image": str(tmp_path)})
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "IM0001").write_bytes(b"\0" * 132)  # DICOM files often have no extension
    with pytest.raises(AssertionError, match="ITKReader was built"):  # a DICOM folder does ask for one
        loader({"image": str(tmp_path / "series")})


def test_truncated_png_is_a_data_error_naming_the_file(tmp_path):
    path = _noise_png(tmp_path / "cut.png", size=(200, 200))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.png.*corrupt, truncated"):
        load(path)


def test_truncated_nifti_is_a_data_error(tmp_path):
    path = tmp_path / "cut.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20), dtype=np.float32), np.eye(4)), path)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(DataError, match="cut.nii.gz"):
        load(path)


def test_a_nifti_header_declaring_more_than_the_file_or_the_memory_is_refused_before_reading(tmp_path, monkeypatch):
    """A damaged (or hostile) header declaring a huge volume is refused from the header, not read by allocating
    what it declares (a MemoryError called 'corrupt', or the machine swapping)."""
    import medsam3_monai.transforms.io as io_module

    monkeypatch.setattr(io_module, "available_memory", lambda: 8 * 10**9)
    header = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)).header
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_offset(352)
    plain, packed = tmp_path / "big.nii", tmp_path / "big.nii.gz"
    plain.write_bytes(header.binaryblock + bytes(4 + 64))
    packed.write_bytes(gzip.compress(header.binaryblock + bytes(4 + 64)))
    with pytest.raises(DataError, match=r"big.nii: is truncated: its header describes 30000x30000x30000 voxels of "
                                        r"uint8 \(27000000000352 bytes\), the file holds 416"):
        load(plain)
    with pytest.raises(DataError, match=r"big.nii.gz: declares 30000x30000x30000 voxels of uint8 \(about "
                                        r"135000.0 GB to read\), more than 6.4 GB \(80% of the 8.0 GB"):
        load(packed)


def test_a_nifti_header_is_read_once_by_the_package(tmp_path, monkeypatch):
    """The size check's header is the one the affine and units are read from: each nibabel load of a small volume
    costs about a quarter of its whole load (0.5 of 2.1 ms for a hippocampus volume), paid by every training
    item. Two loads: the package's and MONAI's reader's."""
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), np.eye(4)), str(path))
    calls = []
    original = nib.load
    monkeypatch.setattr(nib, "load", lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs))
    assert tuple(load_medical_image(path).shape) == (1, 6, 5, 4)
    assert len(calls) == 2


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.png: file not found"):
        load(tmp_path / "nope.png")


def test_mask_size_mismatch_names_both_files(tmp_path):
    image = _noise_png(tmp_path / "img.png", size=(40, 24))
    mask = _save(tmp_path, "mask.png", Image.new("L", (39, 24)))
    with pytest.raises(DataError, match=r"mask.png: mask size \(24, 39\) does not match the image size \(24, 40\)"
                                        r" of .*img.png"):
        load(image, mask)


def test_4d_volume_is_an_error_unless_a_channel_is_picked(tmp_path):
    path = tmp_path / "four_d.nii.gz"
    array = np.random.default_rng(0).random((8, 9, 10, 3), dtype=np.float32)
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    with pytest.raises(DataError, match="four_d.nii.gz: is a 4D volume with 3 channels"):
        load(path)
    picked = load(path, channel=1)["image"]
    np.testing.assert_array_equal(picked[0].numpy(), array[..., 1])


def test_nan_or_inf_intensities_are_an_error(tmp_path):
    array = np.ones((8, 9, 10), dtype=np.float32)
    array[2, 3, 4] = np.nan
    array[1, 1, 1] = np.inf
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    with pytest.raises(DataError, match="nan.nii.gz: holds 2 NaN/Inf intensities"):
        load(path)


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64])
def test_a_fortran_ordered_volume_is_copied_to_c_order_unchanged(dtype):
    """``c_order`` (NIfTI volumes come out of nibabel columns first): the array ``np.ascontiguousarray`` makes, the
    sides not multiples of the rows copied at a time; anything else comes back as it is."""
    array = np.asfortranarray(np.random.default_rng(0).normal(0, 100, (7, 2 * C_ORDER_ROWS + 3, 5)).astype(dtype))
    out = c_order(array)
    assert out.flags.c_contiguous and out.dtype == array.dtype
    np.testing.assert_array_equal(out, np.ascontiguousarray(array))
    rows_first, plane, four_d = np.ascontiguousarray(array), np.asfortranarray(array[:, :, 0]), np.asfortranarray(
        np.zeros((2, 3, 4, 2), dtype))
    for kept in (rows_first, plane, four_d, array[:, ::2]):  # C order, 2D, 4D, strided: MONAI's own path
        assert c_order(kept) is kept


def test_float_files_are_checked_after_their_float32_conversion_integer_files_are_not_read(tmp_path):
    """NaN and inf, and a float64 value beyond float32's range (inf once converted), are errors; an integer file is
    finite by construction."""
    overflow, nan = np.ones((4, 5, 6)), np.ones((4, 5, 6))  # float64 files
    overflow[1, 2, 3] = 1e300
    nan[0, 0, 0], nan[3, 4, 5] = np.nan, -np.inf
    for name, array, bad in (("overflow.nii.gz", overflow, 1), ("nan.nii.gz", nan, 2)):
        nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / name)
        with pytest.raises(DataError, match=f"{name}: holds {bad} NaN/Inf intensities"):
            load(tmp_path / name)
    nib.save(nib.Nifti1Image(np.full((4, 5, 6), -1000, np.int16), np.eye(4)), tmp_path / "ct.nii.gz")
    assert float(load(tmp_path / "ct.nii.gz")["image"].min()) == -1000.0


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_int16_masks_load_with_their_label_values(tmp_path, suffix):
    """int16 is a common label dtype (NIfTI, NRRD): its values come through (uint8 up to 255, else int32), and only a
    negative value is out of range (the range check compares Python integers, not an int16 tensor with 2**31 - 1)."""
    import itk

    def save(array, name):
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".nrrd":
            itk.imwrite(itk.image_from_array(np.ascontiguousarray(array.transpose(2, 1, 0))), str(path))
        else:
            nib.save(nib.Nifti1Image(array, np.eye(4)), path)
        return path

    image = save(np.random.default_rng(0).random((6, 7, 8)).astype(np.float32), "image")
    labels = np.zeros((6, 7, 8), np.int16)
    labels[1:3, 2:5, 3:6], labels[4, 5, 6] = 2, 7
    d = load(image, save(labels, "small"))
    assert d["label"].dtype == torch.uint8
    np.testing.assert_array_equal(d["label"][0].numpy(), labels)
    labels[0, 0, 0] = 300
    assert load(image, save(labels, "large"))["label"].dtype == torch.int32
    labels[0, 0, 0] = -1
    with pytest.raises(DataError, match=re.escape(f"negative{suffix}: mask values out of range [-1, 7]")):
        load(image, save(labels, "negative"))


def test_non_integer_mask_is_an_error(tmp_path):
    image, mask = tmp_path / "img.nii.gz", tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), image)
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 0.5, np.float32), np.eye(4)), mask)
    with pytest.raises(DataError, match="mask.nii.gz: mask holds non-integer values"):
        load(image, mask)


def test_label_value_missing_from_the_prompts_names_the_mask(tmp_path):
    image, mask = tmp_path / "img.nii.gz", tmp_path / "mask.nii.gz"
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1, 1, 1], labels[2, 2, 2], labels[3, 3, 3] = 1, 2, 7
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6), np.float32), np.eye(4)), image)
    nib.save(nib.Nifti1Image(labels, np.eye(4)), mask)
    d = load(image, mask) | {"prompts": {"1": "liver", "2": "spleen"}, "mask_encoding": "label_map"}
    with pytest.raises(DataError, match=r"mask.nii.gz: label value\(s\) \[7\] are not in the prompts"):
        DecodeLabeld()(d)
    ignored = DecodeLabeld(unknown_labels="background")(d)["label"]
    assert sorted(ignored.unique().tolist()) == [0, 1, 2]
    with pytest.raises(DataError, match="give the item \"unknown_labels\": \"background\""):
        DecodeLabeld()(d)
    item_says = DecodeLabeld()(d | {"unknown_labels": "background"})["label"]  # the datalist item's own choice
    assert torch.equal(item_says, ignored)
    with pytest.raises(DataError, match="the item's \"unknown_labels\" is 'ignore'"):
        DecodeLabeld()(d | {"unknown_labels": "ignore"})
    # without "mask_encoding" (read from the mask, as the README's TotalSegmentator example writes it): the item's
    # "unknown_labels": "background" makes it a label map too, with one prompt as with several
    auto = {k: v for k, v in d.items() if k != "mask_encoding"} | {"unknown_labels": "background"}
    assert torch.equal(DecodeLabeld()(auto)["label"], ignored)
    liver = DecodeLabeld()(auto | {"prompts": {"1": "liver"}})["label"]
    assert sorted(liver.unique().tolist()) == [0, 1] and int(liver.sum()) == 1
    with pytest.raises(DataError, match=r"do not match the prompt labels \[1, 2\]"):
        DecodeLabeld()({k: v for k, v in auto.items() if k != "unknown_labels"})
    # one foreground value no prompt names (255 for label 1) stays a binary mask
    from monai.data import MetaTensor

    binary = d | {"label": MetaTensor(torch.from_numpy((labels > 0).astype(np.uint8) * 255)[None]),
                  "prompts": {"1": "liver"}, "unknown_labels": "background"}
    binary.pop("mask_encoding")
    assert int(DecodeLabeld()(binary)["label"].sum()) == 3


def test_volume_in_slice_space_resize_is_an_error(tmp_path):
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), path)
    with pytest.raises(DataError, match="vol.nii.gz.*slice volumes first"):
        ResizeToSliced(spatial_size=28)(load(path))


def test_data_error_is_a_value_error_with_parts():
    err = DataError("/x/y.png", "is broken", "fix it")
    assert isinstance(err, ValueError)
    assert str(err) == "/x/y.png: is broken; fix it"
    assert (err.path, err.problem, err.hint) == ("/x/y.png", "is broken", "fix it")


def test_an_rgb_mask_reads_its_brightest_channel_per_pixel(tmp_path):
    rng = np.random.default_rng(0)  # grey levels with up to 80 levels of colour noise (not colour-coded)
    grey = rng.integers(0, 176, (24, 40, 1))
    rgb = (grey + rng.integers(0, 81, (24, 40, 3))).astype(np.uint8)
    path = _save(tmp_path, "mask_rgb.png", Image.fromarray(rgb))
    label = load_medical_image(path, mask=True)
    assert label.shape == (1, 24, 40) and label.dtype == torch.uint8
    assert np.array_equal(label[0].numpy(), rgb.max(axis=-1))


@requires_data
@pytest.mark.parametrize("change, words", [("spacing", "voxel spacing differs"), ("origin", "position differs"),
                                           ("mirrored", "array axis 0 points the opposite way"),
                                           ("flipped", None), ("flipped twice", None),
                                           ("transposed", None), ("transposed and flipped", None),
                                           ("swapped", "its axes point in other directions"), (None, None)])
def test_a_volume_mask_of_another_geometry_is_warned_about(change, words, tmp_path):
    """A mask with its image's size but another spacing, origin or orientation (its header says it belongs elsewhere,
    or the same origin with axis 0 reversed: the image's mirror image): loaded as stored, with a warning naming what
    differs. The image's own mask loads silently, and so does one stored mirrored on the image's own world grid
    (axes reversed, origin at the other end, as other tools save it) or transposed (its array and its header's axes
    in another order): it is put onto the image's grid, exactly."""
    folder = SHARED_DATA / "MSD_Task04_Hippocampus_cropped"
    image, mask = folder / "images" / "hippocampus_023.nii.gz", nib.load(folder / "masks" / "hippocampus_023.nii.gz")
    affine = mask.affine.copy()
    if change == "spacing":
        affine[:3, :3] *= 2
    elif change == "origin":
        affine[:3, 3] += 50
    data = np.asarray(mask.dataobj)
    if change == "mirrored":  # same origin, axis 0 reversed: the voxels pair with the image's mirror image
        affine[:3, 0] *= -1
    elif change in ("flipped", "flipped twice"):  # the same world grid stored with axes reversed (origin moved)
        for axis in (0,) if change == "flipped" else (0, 2):
            affine[:3, 3] += affine[:3, axis] * (data.shape[axis] - 1)
            affine[:3, axis] *= -1
            data = np.flip(data, axis)
        data = data.copy()
    elif change in ("transposed", "transposed and flipped"):  # the same world grid, array axes in another order
        order = (2, 0, 1)
        data, affine[:, :3] = np.transpose(data, order), affine[:, list(order)]
        if change == "transposed and flipped":  # and its new axis 1 reversed
            affine[:3, 3] += affine[:3, 1] * (data.shape[1] - 1)
            affine[:3, 1] *= -1
            data = np.flip(data, 1)
        data = data.copy()
    elif change == "swapped":
        affine[:3, [0, 1]] = affine[:3, [1, 0]]
    path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = LoadMedicalImaged()({"image": str(image), "label": str(path)})
    found = [str(w.message) for w in caught if "differs from its image" in str(w.message)]
    assert out["label"].shape == out["image"].shape
    assert (len(found) == 1 and words in found[0]) if words else not found
    if change in ("flipped", "flipped twice", "transposed", "transposed and flipped", None):  # the image's own mask
        assert np.array_equal(out["label"][0].numpy(), np.asarray(mask.dataobj))
        assert np.allclose(out["label"].affine.numpy(), out["image"].affine.numpy())


@requires_data
@pytest.mark.parametrize("flipped_part", [0, 1])
def test_the_parts_of_a_merged_volume_mask_are_each_put_on_the_image_grid(flipped_part, tmp_path):
    """A mask given as a list of files (merged voxel by voxel): a part stored mirrored on the image's own grid is
    flipped onto it before the merge, whichever its place in the list, so the merged mask is the image's own."""
    folder = SHARED_DATA / "MSD_Task04_Hippocampus_cropped"
    image, mask = folder / "images" / "hippocampus_023.nii.gz", nib.load(folder / "masks" / "hippocampus_023.nii.gz")
    data = np.asarray(mask.dataobj)
    paths = []
    for index, value in enumerate((1, 2)):
        part, affine = (data == value).astype(np.uint8) * value, mask.affine.copy()
        if index == flipped_part:  # the same world grid, stored with axis 0 reversed
            affine[:3, 3] += affine[:3, 0] * (part.shape[0] - 1)
            affine[:3, 0] *= -1
            part = part[::-1].copy()
        paths.append(str(tmp_path / f"part{index}.nii.gz"))
        nib.save(nib.Nifti1Image(part, affine), paths[-1])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: both parts are on the image's grid once flipped
        out = LoadMedicalImaged()({"image": str(image), "label": paths})
    assert np.array_equal(out["label"][0].numpy(), data)
