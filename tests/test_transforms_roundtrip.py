"""Every ../shared/data folder through the transforms to slice space and back (Invertd, restack), 3D slicing,
and a pipeline composed from bundle-style JSON."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from _transforms_helpers import SAMPLES, dice, item, requires_data
from medsam3_monai.transforms import (
    AxialSlicesd,
    LabelToInstancesd,
    RandAxialSliced,
    RestackSlicesd,
    extract_slice,
    foreground_slices,
    slice_space_transforms,
)

# S for the 2D round trip: the released weights' 1008. Every 2D sample here is at most 770 px wide, so this
# upsamples and Dice >= 0.98 holds for every target above 1 % of the image. At S = 224 thin vessels (DRIVE)
# do not survive (Dice ~0.8), which is the resolution, not the inverse.
S_2D = 1008
S_3D = 112  # hippocampus slices are ~35 x 50 px; TotalSegmentator ~100 x 120 uses 224 below


def invert(slice_item: dict, transform, pred: torch.Tensor, nearest: bool = False) -> MetaTensor:
    """(N, S, S) slice-space predictions -> (N, H, W) in the slice's own geometry."""
    data = dict(slice_item) | {"pred": MetaTensor(pred)}
    return Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=nearest)(data)["pred"]


def check_2d_round_trip(entry: dict, nearest: bool = False) -> int:
    """Targets of every prompt -> Invertd -> compared with the native instance masks; returns #checked."""
    transform = slice_space_transforms(S_2D, max_instances=None)
    (out,) = transform(entry)
    assert out["image"].shape == (3, S_2D, S_2D) and out["image"].dtype == torch.uint8  # SAM3's 8-bit levels
    native = LabelToInstancesd(max_instances=None)(out)["instances"].to_dense()
    masks = torch.cat([t["masks"].to_dense() for t in out["targets"]])
    assert masks.shape[0] == native.shape[0]  # upsampling: no instance vanishes
    share = native.flatten(1).float().mean(1)
    big = torch.nonzero(share > 0.01).flatten()[:8]  # largest first per prompt; 8 keep the test quick
    small = torch.nonzero(share <= 0.01).flatten()[:3]  # instances are largest first per prompt
    checked = torch.cat([big, small])
    if checked.numel():
        inverted = invert(out, transform, masks[checked].float(), nearest)
        assert inverted.shape == (checked.numel(), *out["label"].shape[1:])
        torch.testing.assert_close(inverted.affine, out["label"].affine)  # the original geometry again
        for row, index in enumerate(checked.tolist()):
            assert dice(inverted[row] > 0.5, native[index]) >= (0.98 if index in big else 0.95)
    return int(big.numel())


@requires_data
@pytest.mark.parametrize("dataset, index", [(name, i) for name in SAMPLES if name not in (
    "MSD_Task04_Hippocampus_cropped", "TotalSegmentator_example_CT_MR") for i in range(len(SAMPLES[name]))])
def test_2d_folders_go_to_slice_space_and_back(dataset, index):
    image, label = SAMPLES[dataset][index]
    checked = check_2d_round_trip(item(dataset, image, label))
    if dataset != "GBM40_HE_nuclei" and (dataset, index) != ("BUSI", 1):  # only targets below 1 % there
        assert checked >= 1


@requires_data
def test_hard_mask_inverse_with_nearest_interpolation():
    image, label = SAMPLES["Kvasir-SEG_sample"][0]
    assert check_2d_round_trip(item("Kvasir-SEG_sample", image, label), nearest=True) == 1


@requires_data
@pytest.mark.parametrize("index", [0, 1])
def test_hippocampus_keeps_affine_through_slice_and_restack(index):
    image, label = SAMPLES["MSD_Task04_Hippocampus_cropped"][index]
    entry = item("MSD_Task04_Hippocampus_cropped", image, label)
    transform = slice_space_transforms(S_3D, max_instances=None)
    slices = transform(entry)
    volume = transform.transforms[0](entry)  # the loaded volume, for reference
    _, x, y, z = volume["image"].shape
    assert len(slices) == z and [s["image"].meta["slice_index"] for s in slices] == list(range(z))
    assert all(s["image"].shape == (3, S_3D, S_3D) for s in slices)
    for s in slices:  # per slice: one (S, S) prediction per prompt, from the targets
        planes = [t["masks"].union() if t["masks"].shape[0] else torch.zeros(S_3D, S_3D, dtype=torch.bool)
                  for t in s["targets"]]
        s["pred"] = invert(s, transform, torch.stack(planes).float()) > 0.5
    restacked = RestackSlicesd(keys="pred")(slices)["pred"]
    assert restacked.shape == (2, x, y, z)
    torch.testing.assert_close(restacked.affine, volume["image"].affine)
    torch.testing.assert_close(restacked.affine, volume["label"].affine)
    for channel, value in enumerate((1, 2)):
        assert dice(restacked[channel], volume["label"][0] == value) >= 0.98
    # the image itself goes back too: its 8-bit levels, resized back and restacked, are the intensity-scaled volume
    # up to the two resizes and the levels' rounding (mean |difference| 0.007-0.010; a slice flipped left-right: 0.26)
    scaled = Compose(transform.transforms[:3])(entry)["image"]  # load, decode the label, scale the intensity
    for s in slices:
        s["image_back"] = invert(s, transform, s["image"][:1].as_tensor().float() / 255)
    image_back = RestackSlicesd(keys="image_back")(slices)["image_back"]
    assert image_back.shape == (1, x, y, z) == scaled.shape
    torch.testing.assert_close(image_back.affine, volume["image"].affine)
    assert float((image_back.as_tensor() - scaled.as_tensor()).abs().mean()) < 0.03


def _volume(shape=(1, 6, 7, 20), foreground=(5, 6)) -> dict:
    affine = torch.tensor([[-0.7, 0.0, 0.0, 5.0], [0.0, -0.8, 0.0, 6.0], [0.0, 0.0, 2.5, -30.0], [0, 0, 0, 1.0]])
    label = torch.zeros(shape, dtype=torch.uint8)
    for k in foreground:
        label[0, 2, 3, k] = 1
    image = MetaTensor(torch.rand(shape), affine=affine, meta={"filename_or_obj": "/d/vol.nii.gz"})
    return {"image": image, "label": MetaTensor(label, affine=affine), "prompts": {"1": "x"}}


def test_slice_affine_maps_pixels_to_the_same_world_points():
    d = _volume()
    for transpose in (True, False):
        plane = extract_slice(d["image"], 4, axis=2, transpose=transpose)
        assert plane.shape == ((1, 7, 6) if transpose else (1, 6, 7))
        for r, c in ((0, 0), (3, 5), (6, 2) if transpose else (5, 6)):
            i, j = (c, r) if transpose else (r, c)
            world_slice = plane.affine.double() @ torch.tensor([r, c, 0, 1.0], dtype=torch.float64)
            world_volume = d["image"].affine.double() @ torch.tensor([i, j, 4, 1.0], dtype=torch.float64)
            torch.testing.assert_close(world_slice, world_volume)
            assert float(plane[0, r, c]) == float(d["image"][0, i, j, 4])
        assert plane.applied_operations == []


def test_axial_slices_in_order_and_2d_items_pass_through():
    d = _volume()
    slices = AxialSlicesd(keys=("image", "label"))(d)
    assert [s["label"].meta["slice_index"] for s in slices] == list(range(20))
    assert all(s["prompts"] == {"1": "x"} for s in slices)
    flat = {"image": torch.zeros(3, 8, 8)}
    assert AxialSlicesd()(flat) == [flat]


def test_foreground_biased_slice_sampling():
    d = _volume()
    assert foreground_slices(d["label"]) == [5, 6]
    only_fg = RandAxialSliced(num_samples=50, pos_fraction=1.0, seed=0)(d)
    assert {s["image"].meta["slice_index"] for s in only_fg} <= {5, 6}
    biased = RandAxialSliced(num_samples=400, pos_fraction=0.5, seed=1)(d)
    share = np.mean([s["image"].meta["slice_index"] in (5, 6) for s in biased])
    assert share == pytest.approx(0.5 + 0.5 * 2 / 20, abs=0.07)
    uniform = RandAxialSliced(num_samples=400, pos_fraction=0.0, seed=2)(d)
    assert len({s["image"].meta["slice_index"] for s in uniform}) == 20
    again = RandAxialSliced(num_samples=10, pos_fraction=0.5, seed=1)(d)
    assert [s["image"].meta["slice_index"] for s in again] == [s["image"].meta["slice_index"] for s in biased[:10]]


BUNDLE_CONFIG = {
    "spatial_size": 224,
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "medsam3_monai.transforms.LoadMedicalImaged", "keys": ["image", "label"]},
            {"_target_": "medsam3_monai.transforms.DecodeLabeld", "keys": "label", "unknown_labels": "background"},
            {"_target_": "medsam3_monai.transforms.ScaleIntensityByModalityd", "keys": "image", "ct_window": "abdomen"},
            {"_target_": "medsam3_monai.transforms.AxialSlicesd", "keys": ["image", "label"]},
            {"_target_": "medsam3_monai.transforms.LabelToInstancesd", "keys": "label", "max_instances": 16},
            {"_target_": "medsam3_monai.transforms.GreyToRGBd", "keys": "image"},
            {"_target_": "medsam3_monai.transforms.ResizeToSliced", "keys": "image", "spatial_size": "@spatial_size"},
            {"_target_": "medsam3_monai.transforms.Sam3Normalized", "keys": "image"},
            {"_target_": "medsam3_monai.transforms.BuildTargetsd"},
            {"_target_": "medsam3_monai.transforms.RandNegativePromptsd", "concepts": ["kidney", "liver", "lung"],
             "num_negatives": 1, "seed": 0},
        ],
    },
    "invert": {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
               "nearest_interp": False},
    "restack": {"_target_": "medsam3_monai.transforms.RestackSlicesd", "keys": "pred"},
}


@requires_data
def test_bundle_json_pipeline_on_totalsegmentator_ct():
    parser = ConfigParser(BUNDLE_CONFIG)
    preprocessing, inverse, restack = (parser.get_parsed_content(k) for k in ("preprocessing", "invert", "restack"))
    image, label = SAMPLES["TotalSegmentator_example_CT_MR"][0]
    slices = preprocessing(item("TotalSegmentator_example_CT_MR", image, label))
    volume = preprocessing.transforms[0](item("TotalSegmentator_example_CT_MR", image, label))
    assert len(slices) == volume["image"].shape[-1]
    for s in slices:
        texts = [t["text"] for t in s["targets"]]
        assert texts[:2] == ["spleen", "liver"] and texts[2] in ("kidney", "lung")  # liver is present: not sampled
        assert s["targets"][2]["is_negative"]
        planes = [t["masks"].union() if t["masks"].shape[0] else torch.zeros(224, 224, dtype=torch.bool)
                  for t in s["targets"][:2]]
        s["pred"] = inverse(dict(s) | {"pred": MetaTensor(torch.stack(planes).float())})["pred"] > 0.5
    restacked = restack(slices)["pred"]
    torch.testing.assert_close(restacked.affine, volume["image"].affine)
    assert restacked.shape == (2, *volume["image"].shape[1:])
    for channel, value in enumerate((1, 5)):
        assert dice(restacked[channel], volume["label"][0] == value) >= 0.98


@requires_data
def test_training_chain_caches_the_volume_and_samples_foreground_slices():
    from monai.data import CacheDataset

    image, label = SAMPLES["MSD_Task04_Hippocampus_cropped"][0]
    transform = slice_space_transforms(S_3D, train=True, slices_per_volume=4, pos_fraction=1.0,
                                       negative_concepts=["liver", "anterior hippocampus", "polyp"], seed=0)
    dataset = CacheDataset([item("MSD_Task04_Hippocampus_cropped", image, label)], transform=transform,
                           cache_rate=1.0, progress=False)
    cached = dataset._cache[0]  # the deterministic head: load, decode, intensity (the whole volume)
    assert cached["image"].ndim == 4 and float(cached["image"].max()) == 1.0
    samples = dataset[0]
    assert len(samples) == 4
    for s in samples:
        assert s["image"].shape == (3, S_3D, S_3D)
        texts = [t["text"] for t in s["targets"]]
        assert texts[:2] == ["anterior hippocampus", "posterior hippocampus"]
        assert any(not t["is_negative"] for t in s["targets"][:2])  # foreground slices only
        assert texts[2] in ("liver", "polyp") and s["targets"][2]["is_negative"]  # sampled, absent concept


def with_kernel(chain: Compose, kernel: str) -> Compose:
    """``chain`` with its slice-space resize (``TiledResizeToSliced``) set to ``kernel``."""
    from medsam3_monai.transforms import TiledResizeToSliced, transforms_of

    resizes = [t for t in transforms_of(chain) if isinstance(t, TiledResizeToSliced)]
    assert resizes
    for resize in resizes:
        resize.kernel = kernel
    return chain


def sam3_resized(image: torch.Tensor, size: int) -> torch.Tensor:
    """SAM3's image processor's way with a float [0, 1] picture ``(C, H, W)``: its 8-bit levels, then torchvision's
    ``v2.Resize((size, size))`` (``Sam3Processor``), uint8."""
    from torchvision.transforms import v2

    from medsam3_monai.transforms.intensity import sam3_levels

    return v2.Resize((size, size))(sam3_levels(image))


@requires_data
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kernel", ["sam3", "monai"])
def test_inference_keeps_volume_slices_as_the_float_chains_8bit_levels(kernel, threads):
    """The inference bundle's volume slices: grey, resized one slice at a time (``EachItem``) and kept as uint8
    levels (1, S, S), the same on one thread and on two.

    * ``kernel="sam3"`` (the default): the 8-bit levels of each float slice, resized by torchvision as SAM3's image
      processor resizes a picture, level for level.
    * ``kernel="monai"``: the network's normalisation of them (``network_pixels``) is the float RGB chain's input
      (``GreyToRGBd`` -> ``ResizeToSliced`` -> ``Sam3Normalized``), exactly on more than one thread. On one thread
      ATen's CPU resize rounds a 3-channel picture differently in the last float bit (a grey one rounds the same on
      any number of threads), which moves a few pixels per million by one 8-bit level."""
    from medsam3_monai.networks import network_pixels
    from medsam3_monai.transforms import GreyToRGBd, ResizeToSliced, Sam3Normalized

    size = 1008
    entry = item("TotalSegmentator_example_CT_MR", *SAMPLES["TotalSegmentator_example_CT_MR"][0])
    del entry["label"]  # inference: the image only
    chain = with_kernel(slice_space_transforms(size, with_label=False), kernel)
    float_slices = Compose(chain.transforms[:4])  # load, decode, intensity, AxialSlicesd: float slices
    float_chain = Compose([*chain.transforms[:4], GreyToRGBd(keys="image"),
                           ResizeToSliced(keys="image", spatial_size=size), Sam3Normalized(keys="image")])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        items = chain(entry)[::8]
        reference = float_chain(entry)[::8] if kernel == "monai" else [
            {"image": sam3_resized(s["image"], size)} for s in float_slices(entry)[::8]]
    finally:
        torch.set_num_threads(previous)
    assert len(items) == len(reference) > 1
    changed = 0
    for ours, theirs in zip(items, reference):
        assert ours["image"].dtype == torch.uint8 and ours["image"].shape == (1, size, size)
        if kernel == "sam3":
            assert torch.equal(ours["image"].as_tensor(), theirs["image"])
        else:
            pixels = network_pixels(ours["image"].as_tensor()[None], "cpu")[0]
            step = (pixels - theirs["image"].as_tensor()).abs()
            if threads > 1:
                assert torch.equal(pixels, theirs["image"].as_tensor())
            assert float(step.max()) <= 2 / 255 + 1e-6  # at most one level
            changed += int(step.count_nonzero())
        # the resize record is MONAI's, so Invertd takes a slice's maps back to its own size through the chain
        back = invert(ours, chain, torch.zeros(2, size, size))
        assert back.shape == (2, *ours["image"].meta["spatial_shape"])
    assert changed <= 1e-5 * len(items) * size * size


@requires_data
@pytest.mark.parametrize("dataset", ["GBM40_HE_nuclei", "ChestXray_lung_sample", "Kvasir-SEG_sample"])
def test_small_pictures_are_sam3s_resize_whatever_the_threads(dataset):
    """A 2D picture of at most ``INTERPOLATE_MAX_PIXELS`` (GBM40 RGB and a chest X-ray, grey, 512 x 512; a Kvasir
    JPEG, 529 x 622 RGB) upsampled to 1008 px: the inference chain's 8-bit levels are torchvision's resize of the
    picture's 8-bit levels (SAM3's image processor's), on one thread (DataLoader workers) and on two."""
    from medsam3_monai.transforms import GreyToRGBd, LoadMedicalImaged, ScaleIntensityByModalityd

    size = 1008
    entry = item(dataset, *SAMPLES[dataset][0])
    del entry["label"]
    chain = slice_space_transforms(size, with_label=False)
    float_chain = Compose([LoadMedicalImaged(keys="image", label_keys=()), ScaleIntensityByModalityd(keys="image"),
                           GreyToRGBd(keys="image")])
    previous, out = torch.get_num_threads(), {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = chain(entry)[0]["image"]
    finally:
        torch.set_num_threads(previous)
    assert out[1].dtype == torch.uint8 and out[1].shape == (3, size, size)
    assert torch.equal(out[1].as_tensor(), out[2].as_tensor())
    assert torch.equal(out[1].as_tensor(), sam3_resized(float_chain(entry)["image"], size))


@requires_data
@pytest.mark.parametrize("dataset", ["GBM40_HE_nuclei", "ChestXray_lung_sample", "Kvasir-SEG_sample"])
def test_small_pictures_get_monais_interpolation_whatever_the_threads(dataset):
    """``kernel="monai"``: a 2D picture of at most ``INTERPOLATE_MAX_PIXELS`` (GBM40 RGB and a chest X-ray, grey,
    512 x 512; a Kvasir JPEG, 529 x 622 RGB, more than ``EAGER_MAX_PIXELS``) upsampled to 1008 px: the inference
    chain resizes it channel by channel, so its 8-bit levels are the same on one thread
    (DataLoader workers) and on two, and equal MONAI's ``Resize`` chain on two threads, with MONAI's record. MONAI's
    own 3-channel resize on one thread rounds differently in the last float bit (it moves some levels: asserted, so
    this test notices when ATen stops doing so)."""
    from medsam3_monai.transforms import (
        GreyToRGBd,
        LoadMedicalImaged,
        ResizeToSliced,
        Sam3Normalized,
        ScaleIntensityByModalityd,
    )
    from medsam3_monai.transforms import slices as slices_module

    size = 1008
    entry = item(dataset, *SAMPLES[dataset][0])
    del entry["label"]
    chain = with_kernel(slice_space_transforms(size, with_label=False), "monai")
    monai_chain = Compose([LoadMedicalImaged(keys="image", label_keys=()), ScaleIntensityByModalityd(keys="image"),
                           GreyToRGBd(keys="image"), ResizeToSliced(keys="image", spatial_size=size),
                           Sam3Normalized(keys="image", levels=True)])
    previous, out = torch.get_num_threads(), {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = (chain(entry)[0]["image"], monai_chain(entry)["image"])
    finally:
        torch.set_num_threads(previous)
    (ours_1, monai_1), (ours_2, monai_2) = out[1], out[2]
    assert int(np.prod(ours_1.meta["spatial_shape"])) <= slices_module.INTERPOLATE_MAX_PIXELS  # resized whole
    assert ours_1.dtype == torch.uint8 and ours_1.shape == (3, size, size)
    assert torch.equal(ours_1.as_tensor(), ours_2.as_tensor())
    assert torch.equal(ours_2.as_tensor(), monai_2.as_tensor())
    assert not torch.equal(monai_1.as_tensor(), monai_2.as_tensor())
    ops = [[{k: v for k, v in op.items() if k != "id"} for op in image.applied_operations]
           for image in (ours_1, monai_1)]
    assert ops[0] == ops[1]
    back = invert({"image": ours_1}, chain, torch.zeros(1, size, size))
    assert back.shape == (1, *ours_1.meta["spatial_shape"])
