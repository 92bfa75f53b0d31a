"""Intensity by modality, grey -> 3 channels, SAM3 normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from _transforms_helpers import SHARED_DATA, item, requires_data
from medsam3_monai.transforms import (
    CT_WINDOWS,
    DataError,
    GreyToRGBd,
    LoadMedicalImaged,
    Sam3Normalized,
    ScaleIntensityByModalityd,
    sam3_normalize,
)
from medsam3_monai.tensors import CHECK_CHUNK, all_finite, all_near_integers
from medsam3_monai.transforms.intensity import ct_window, handler_for_modality, min_max, percentile_min_max


def scale(image: torch.Tensor, modality: str, source_dtype: str = "float32", **kwargs) -> torch.Tensor:
    img = MetaTensor(image, meta={"source_dtype": source_dtype, "filename_or_obj": "/data/x"})
    return ScaleIntensityByModalityd(**kwargs)({"image": img, "modality": modality})["image"]


@pytest.mark.parametrize("name, width, level", [("abdomen", 400, 40), ("lung", 1500, -600), ("bone", 1800, 400),
                                                ("brain", 80, 40), ("soft_tissue", 350, 50)])
def test_ct_window_presets(name, width, level):
    assert CT_WINDOWS[name] == (width, level)
    hu = torch.tensor([[[-3000.0, level - width / 2, level, level + width / 4, level + width / 2, 3000.0]]])
    out = scale(hu, "CT", ct_window=name)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.0, 0.5, 0.75, 1.0, 1.0]]]))


def test_ct_window_by_tuple_and_item_override():
    hu = torch.tensor([[[-100.0, 0.0, 100.0]]])
    torch.testing.assert_close(scale(hu, "CT", ct_window=(200, 0)), torch.tensor([[[0.0, 0.5, 1.0]]]))
    img = MetaTensor(hu, meta={"source_dtype": "int16"})
    out = ScaleIntensityByModalityd()({"image": img, "modality": "CT", "ct_window": "lung"})["image"]
    torch.testing.assert_close(out, (hu.clamp(-1350, 150) + 1350) / 1500)
    with pytest.raises(ValueError, match="unknown CT window"):
        ScaleIntensityByModalityd(ct_window="liverish")
    for window in ((float("nan"), 40), (400, float("inf"))):  # NaN pixels would reach the network
        with pytest.raises(ValueError, match="must be finite"):
            ScaleIntensityByModalityd(ct_window=window)


def test_mri_percentile_clip_then_min_max():
    rng = np.random.default_rng(0)
    volume = torch.from_numpy(rng.normal(100, 10, size=(1, 20, 20, 20)).astype(np.float32))
    volume[0, 0, 0, 0] = 1e6  # outlier
    out = scale(volume, "MRI")
    lo, hi = np.percentile(volume.numpy(), [0.5, 99.5])
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert float(out[0, 0, 0, 0]) == 1.0
    inside = (volume > lo) & (volume < hi)
    torch.testing.assert_close(out[inside], ((volume[inside] - lo) / (hi - lo)).float(), rtol=1e-5, atol=1e-6)
    assert float((out == 1.0).float().mean()) == pytest.approx(0.005, abs=0.002)


def test_grey_modalities_min_max_and_collapse_identical_rgb_channels():
    grey = torch.tensor([[[10.0, 20.0], [30.0, 50.0]]])
    as_rgb = grey.repeat(3, 1, 1)  # an X-ray saved as RGB (BUSI, some JPEGs)
    for modality in ("X-ray", "xray", "ultrasound", "OCT", "EM"):
        out = scale(as_rgb, modality, "uint8")
        assert out.shape == (1, 2, 2)
        torch.testing.assert_close(out, (grey - 10) / 40)


def test_colour_to_grey_is_itu_r_601_luma_in_both_paths():
    from medsam3_monai.transforms.intensity import apply_intensity, to_grey

    rgb = torch.eye(3).reshape(3, 1, 3)  # one row: a red, a green and a blue pixel
    luma = torch.tensor([[[0.299, 0.587, 0.114]]])
    torch.testing.assert_close(to_grey(rgb), luma)
    torch.testing.assert_close(apply_intensity(rgb, {"channels": 3, "grey": "luma", "op": "keep"}, repeat=False), luma)


def test_optical_rgb_divides_by_255_and_keeps_colour():
    rgb = torch.randint(0, 256, (3, 5, 7)).float()
    for modality in ("endoscopy", "dermoscopy", "fundus", "pathology", "microscopy"):
        out = scale(rgb, modality, "uint8")
        torch.testing.assert_close(out, rgb / 255)
    torch.testing.assert_close(scale(rgb * 257, "fundus", "uint16"), rgb * 257 / 65535)
    rgba = torch.cat([rgb, torch.full((1, 5, 7), 255.0)])
    assert scale(rgba, "dermoscopy", "uint8").shape == (3, 5, 7)


def test_unknown_modality_and_nan_are_data_errors():
    with pytest.raises(DataError, match="/data/x: unknown modality 'sonar'"):
        scale(torch.zeros(1, 2, 2), "sonar")
    with pytest.raises(DataError, match="NaN/Inf"):
        scale(torch.tensor([[[0.0, float("nan")]]]), "X-ray")


def test_dicom_modality_codes_and_xr_name_their_modality():
    """--modality XR (X-ray's short name) or a DICOM Modality code (CR, DX, MG, OP, ...) as a DICOM header says it."""
    from medsam3_monai.transforms.io import DICOM_MODALITIES

    assert handler_for_modality("XR") == handler_for_modality("X-ray") == "minmax"
    for code, name in DICOM_MODALITIES.items():
        assert handler_for_modality(code) == handler_for_modality(code.lower()) == handler_for_modality(name)
    with pytest.raises(KeyError):
        handler_for_modality("")


def test_catalogue_modalities_all_have_a_handler():
    schema = Path(__file__).resolve().parents[1] / "datasets_meta" / "schema" / "dataset.schema.json"
    if not schema.is_file():
        pytest.skip(f"catalogue schema not found at {schema}")
    modalities = json.loads(schema.read_text())["$defs"]["modality"]["enum"]
    for modality in modalities:
        assert handler_for_modality(modality) in ("ct_window", "percentile", "minmax", "rgb", "auto")


def test_grey_to_rgb_repeats_and_keeps_meta():
    img = MetaTensor(torch.rand(1, 4, 6), affine=torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0])))
    out = GreyToRGBd(keys="image")({"image": img})["image"]
    assert out.shape == (3, 4, 6) and isinstance(out, MetaTensor)
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], img[0])
    torch.testing.assert_close(out.affine, img.affine)
    with pytest.raises(DataError, match="has 2 channels"):
        GreyToRGBd(keys="image")({"image": torch.zeros(2, 4, 4)})


def test_sam3_normalisation_multiplies_by_one_over_255():
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 16, 16)
    expected = (u8.float() * (1.0 / 255.0) - 0.5) / 0.5
    assert torch.equal(sam3_normalize(u8), expected)
    divided = (u8.float() / 255.0 - 0.5) / 0.5
    assert not torch.equal(expected, divided)  # the documented one-bit difference exists
    assert float((expected - divided).abs().max()) < 1e-6
    # float [0, 1] input is quantised to the same 8-bit values first
    assert torch.equal(sam3_normalize(u8.float() / 255.0), expected)
    out = Sam3Normalized(keys="image")({"image": MetaTensor(u8.float() / 255.0)})["image"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    assert float(out.min()) == -1.0 and float(out.max()) == 1.0


def test_slices_can_stay_8bit_levels_and_grey_volume_slices_grey():
    """The bundles' settings: images become uint8 levels; a grey volume slice (its meta has ``volume_shape``) stays
    one channel while a 2D picture is repeated; the network's normalisation of the levels is ``sam3_normalize``'s."""
    from medsam3_monai.networks.medsam3_net import normalize_pixels
    from medsam3_monai.transforms import is_volume_slice, sam3_levels, unit_pixels

    values = torch.rand(1, 5, 7)
    volume_slice = MetaTensor(values.clone(), meta={"volume_shape": np.array([5, 7, 3]), "slice_index": 1})
    picture = MetaTensor(values.clone())
    assert is_volume_slice(volume_slice) and not is_volume_slice(picture) and not is_volume_slice(values)
    grey = GreyToRGBd(keys="image", repeat_volume_slices=False)
    levels = Sam3Normalized(keys="image", levels=True)
    kept = levels(grey({"image": volume_slice}))["image"]
    assert kept.shape == (1, 5, 7) and kept.dtype == torch.uint8 and isinstance(kept, MetaTensor)
    assert kept.meta["slice_index"] == 1
    normalised = sam3_normalize(values.repeat(3, 1, 1))
    assert torch.equal(normalize_pixels(kept.as_tensor()[None].expand(-1, 3, -1, -1))[0], normalised)
    assert torch.equal(sam3_levels(values), kept.as_tensor()) and torch.equal(sam3_levels(kept), kept.as_tensor())
    assert torch.equal(unit_pixels(kept), kept.as_tensor().float() * (1.0 / 255.0))
    torch.testing.assert_close(unit_pixels(normalised), kept.as_tensor().float().repeat(3, 1, 1) / 255.0)
    made = levels(grey({"image": picture}))["image"]  # a 2D picture: repeated to RGB
    assert made.shape == (3, 5, 7) and made.dtype == torch.uint8
    assert torch.equal(normalize_pixels(made.as_tensor()[None])[0], normalised)
    assert GreyToRGBd(keys="image")({"image": volume_slice})["image"].shape == (3, 5, 7)  # default: repeated
    with pytest.raises(ValueError, match="quantize"):
        Sam3Normalized(keys="image", quantize=False, levels=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_agrees_with_torch_wherever_the_bad_value_is(dtype):
    """``tensors.all_finite`` (numpy, chunk by chunk) against ``torch.isfinite(x).all()``: a NaN or an infinity in
    the first, a middle or the last chunk, in a strided view; integer tensors are finite."""
    size = 2 * CHECK_CHUNK + 7
    for position in (0, CHECK_CHUNK, size - 1):
        for bad in (float("nan"), float("inf"), float("-inf")):
            x = torch.zeros(size, dtype=dtype)
            assert all_finite(x)
            x[position] = bad
            assert not all_finite(x) and not bool(torch.isfinite(x).all())
            assert all_finite(x.view(-1, 1).expand(-1, 2).t()[:, :position]) == bool(torch.isfinite(x[:position]).all())
    assert all_finite(torch.full((3, 4), 7, dtype=torch.int16)) and all_finite(torch.ones(2, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_near_integers_is_torch_allclose_to_the_rounded_values(dtype):
    """``tensors.all_near_integers`` (a float mask's check) against ``torch.allclose(torch.round(x), x, atol=1e-3)``,
    with ``rtol`` of the value's size: off by 0.0005 or 0.002 from 2, by 0.005 from 1000, in the last chunk."""
    for offset, value in ((0.0005, 2.0), (0.002, 2.0), (0.005, 1000.0), (0.02, 1000.0), (0.0, 7.0)):
        x = torch.full((CHECK_CHUNK + 5,), 3.0, dtype=dtype)
        x[-1] = torch.tensor(value + offset, dtype=torch.float64).to(dtype)
        assert all_near_integers(x) == bool(torch.allclose(torch.round(x), x, atol=1e-3)), (offset, value)
    assert all_near_integers(torch.tensor([2.0004, 5.0])) and not all_near_integers(torch.tensor([2.4, 5.0]))


def test_intensity_maps_give_the_values_of_their_formulas():
    """``ct_window``, ``min_max`` and ``percentile_min_max`` scale in place on their own new buffer: bit for bit the
    values of the written-out formulas, and the input is untouched."""
    hu = torch.from_numpy(np.random.default_rng(0).normal(0, 700, (1, 33, 47, 5)).astype(np.float32))
    before = hu.clone()
    assert torch.equal(ct_window(hu, 400, 40), (hu.clamp(-160.0, 240.0) - -160.0) / 400.0)
    assert torch.equal(min_max(hu), (hu - hu.min()) / (hu.max() - hu.min()))
    lo, hi = np.percentile(hu.numpy().ravel(), [0.5, 99.5])
    assert torch.equal(percentile_min_max(hu), (hu.clamp(float(lo), float(hi)) - float(lo)) / float(hi - lo))
    assert torch.equal(hu, before)
    grey = torch.arange(12, dtype=torch.int16).view(1, 3, 4)
    assert torch.equal(ct_window(grey, 10, 5), (grey.float().clamp(0.0, 10.0) - 0.0) / 10.0)


@requires_data
def test_totalsegmentator_ct_window_on_real_hu():
    d = LoadMedicalImaged()(item("TotalSegmentator_example_CT_MR", "images/example_ct_sm.nii.gz",
                                 "masks/example_seg.nii.gz"))
    hu = d["image"].clone()
    assert float(hu.min()) < -900 and float(hu.max()) > 1000  # Hounsfield units
    abdomen = ScaleIntensityByModalityd()(d)["image"]
    lung = ScaleIntensityByModalityd(ct_window="lung")(d)["image"]
    torch.testing.assert_close(abdomen.as_tensor(), ((hu.clamp(-160, 240) + 160) / 400).as_tensor())
    assert abdomen.meta["intensity"] == "ct_window(W=400, L=40)"
    assert float(abdomen.min()) == 0.0 and float(abdomen.max()) == 1.0
    assert not torch.allclose(abdomen, lung)
    torch.testing.assert_close(abdomen.affine, d["image"].affine)


@requires_data
def test_totalsegmentator_mr_percentiles_on_real_data():
    root = SHARED_DATA / "TotalSegmentator_example_CT_MR"
    d = LoadMedicalImaged(keys="image", label_keys=())({"image": str(root / "images/example_mr_sm.nii.gz")})
    out = ScaleIntensityByModalityd(modality="MRI")(d)["image"]
    assert out.shape == d["image"].shape
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert 0.001 < float((out == 1.0).float().mean()) < 0.02  # the top 0.5 % saturate


def test_levels_made_in_chunks_are_the_whole_picture_steps(monkeypatch):
    """``sam3_levels`` quantises float pictures a chunk at a time with numpy: the same levels as torch's clamp, scale
    and round over the whole picture, for sizes around the chunk, any float dtype (bfloat16 has no numpy twin),
    strided views, values off [0, 1] and rounding ties."""
    from medsam3_monai.transforms import intensity
    from medsam3_monai.transforms.intensity import sam3_levels

    monkeypatch.setattr(intensity, "LEVELS_CHUNK", 64)
    generator = torch.Generator().manual_seed(0)
    halves = torch.tensor([0.5, 1.5, 127.5, 254.5]) / 255.0  # rounding ties
    for shape in [(1, 1, 1), (1, 8, 8), (1, 8, 9), (3, 13, 11), (2, 40, 7)]:
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            x = (torch.rand(shape, generator=generator) * 1.4 - 0.2).to(dtype)
            flat = x.view(-1)
            flat[: halves.numel()] = halves[: flat.numel()].to(dtype)
            for picture in (x, x.transpose(1, 2)):
                whole = picture.to(torch.float32, copy=True).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
                levels = sam3_levels(picture)
                assert levels.dtype == torch.uint8 and levels.shape == picture.shape
                assert torch.equal(levels.contiguous(), whole), (shape, dtype)
