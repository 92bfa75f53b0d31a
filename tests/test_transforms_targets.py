"""Mask decoding, instance rules, targets per prompt (boxes + masks, cap, negatives) on synthetic and real data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from _transforms_helpers import SHARED_DATA, item, requires_data
from medsam3_monai.transforms import (
    BuildTargetsd,
    DataError,
    DecodeLabeld,
    LabelToInstancesd,
    LoadMedicalImaged,
    RandBoxPromptsd,
    RandNegativePromptsd,
    instance_masks,
    masks_to_boxes_cxcywh,
    resize_masks,
)


def two_class_map() -> np.ndarray:
    """(40, 60) label map: class 1 = a big and a small blob, class 2 = one blob touching class 1 diagonally."""
    classes = np.zeros((40, 60), np.uint8)
    classes[2:12, 2:22] = 1  # 200 px
    classes[30:34, 50:55] = 1  # 20 px
    classes[12:20, 22:30] = 2  # touches the big blob at a corner only
    return classes


def targets_for(classes: np.ndarray, prompts: dict, rule, size=None, ids=None, **kwargs) -> list[dict]:
    label = MetaTensor(torch.from_numpy(classes)[None], meta={"filename_or_obj": "/data/mask.png"})
    d = {"label": label, "prompts": prompts, "instance_rule": rule, "image": torch.zeros(3, *(size or classes.shape))}
    if ids is not None:
        d["instance_ids"] = torch.from_numpy(ids)[None]
    d = LabelToInstancesd(**kwargs)(d)
    return BuildTargetsd()(d)["targets"]


# ---------------------------------------------------------------- rules on synthetic masks


def test_components_rule_splits_blobs_8_connected_largest_first():
    targets = targets_for(two_class_map(), {"1": "blob", "2": "other"}, "components")
    assert [t["text"] for t in targets] == ["blob", "other"]
    assert [t["masks"].shape[0] for t in targets] == [2, 1]
    assert targets[0]["masks"][0].sum() == 200 and targets[0]["masks"][1].sum() == 20
    diagonal = np.zeros((5, 5), np.uint8)
    diagonal[0, 0] = diagonal[1, 1] = 1
    assert len(instance_masks(diagonal, 1, "components")) == 1  # 8-connectivity


def test_semantic_rule_gives_one_target_per_label():
    targets = targets_for(two_class_map(), {"1": "blob", "2": "other"}, "semantic")
    assert [t["masks"].shape[0] for t in targets] == [1, 1]
    assert int(targets[0]["masks"][0].sum()) == 220


def test_per_label_rule_mapping():
    classes = two_class_map()
    classes[36:39, 2:5] = 2  # class 2 in two blobs too: each rule gives each class another count
    prompts = {"1": "blob", "2": "other"}
    targets = targets_for(classes, prompts, {"1": "semantic", "2": "components"})
    assert [t["masks"].shape[0] for t in targets] == [1, 2]
    targets = targets_for(classes, prompts, {"1": "components", "2": "semantic"})
    assert [t["masks"].shape[0] for t in targets] == [2, 1]


def test_instance_ids_rule_keeps_split_ids_as_one_instance():
    ids = np.zeros((40, 60), np.int32)
    ids[2:6, 2:6] = 7
    ids[20:24, 40:44] = 7  # one annotated nucleus in two pieces
    ids[10:14, 10:20] = 300
    targets = targets_for((ids > 0).astype(np.uint8), {"1": "nucleus"}, "instance_ids", ids=ids)
    assert targets[0]["masks"].shape[0] == 2
    assert sorted(int(m.sum()) for m in targets[0]["masks"]) == [32, 40]


def test_cap_keeps_the_largest_and_none_disables_it():
    classes = np.zeros((50, 50), np.uint8)
    for k in range(6):
        classes[k * 8 : k * 8 + 1 + k, 0 : 1 + k] = 1  # areas 1, 4, 9, ...
    capped = targets_for(classes, {"1": "x"}, "components", max_instances=2)
    assert [int(m.sum()) for m in capped[0]["masks"]] == [36, 25]
    assert targets_for(classes, {"1": "x"}, "components", max_instances=None)[0]["masks"].shape[0] == 6
    assert targets_for(classes, {"1": "x"}, "components", max_instances=None, min_area=5)[0]["masks"].shape[0] == 4


def test_boxes_are_normalised_cxcywh_in_slice_space():
    classes = np.zeros((100, 200), np.uint8)
    classes[10:20, 40:60] = 1  # rows 10-19, cols 40-59: top left quadrant
    same = targets_for(classes, {"1": "x"}, "components")[0]
    resized = targets_for(classes, {"1": "x"}, "components", size=(56, 56))[0]
    expected = torch.tensor([[50 / 200, 15 / 100, 20 / 200, 10 / 100]])
    torch.testing.assert_close(same["boxes"], expected)
    torch.testing.assert_close(resized["boxes"], expected, atol=1 / 56, rtol=0)
    assert resized["masks"].shape == (1, 56, 56) and resized["masks"].dtype == torch.bool
    torch.testing.assert_close(masks_to_boxes_cxcywh(torch.ones(1, 4, 8, dtype=torch.bool)),
                               torch.tensor([[0.5, 0.5, 1.0, 1.0]]))


def test_empty_label_is_a_negative_prompt():
    targets = targets_for(np.zeros((20, 30), np.uint8), {"1": "tumor"}, "components", size=(28, 28))
    assert targets[0]["is_negative"] and targets[0]["boxes"].shape == (0, 4)
    assert targets[0]["masks"].shape == (0, 28, 28)


def test_instance_vanishing_on_shrink_is_dropped_not_kept_empty():
    classes = np.zeros((200, 200), np.uint8)
    classes[0, 0] = 1
    targets = targets_for(classes, {"1": "speck"}, "components", size=(20, 20))
    assert targets[0]["is_negative"]


def test_resize_masks_matches_full_bilinear_interpolation():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 50, 70, generator=generator) > 0.6
    for size in ((25, 35), (112, 112), (200, 90)):
        ours = resize_masks(masks, size)
        full = torch.nn.functional.interpolate(masks.float()[:, None], size=size, mode="bilinear",
                                               align_corners=False, antialias=size[0] < 50)[:, 0] >= 0.5
        if (size[0] < 50) == (size[1] < 70):  # torch antialiases both axes or neither
            assert int((ours != full).sum()) <= 2  # float rounding at exactly 0.5 only


def test_interpolation_weights_from_combs_are_torchs_weights_of_the_identity():
    """The weights come from a few interpolated combs instead of the whole identity: the same float32 values, up-
    and down-sampling (antialiased), small inputs included; the band read from them is the dense matrix's."""
    from medsam3_monai.transforms.targets import _axis_weights, interpolation_weights

    for source, target in [(1, 5), (7, 3), (9, 9), (12, 40), (40, 12), (97, 1008), (529, 1008), (1348, 1008),
                           (3001, 112), (112, 3001), (1008, 1007)]:
        eye = torch.eye(source).view(1, source, 1, source)
        reference = torch.nn.functional.interpolate(eye, size=(1, target), mode="bilinear", align_corners=False,
                                                    antialias=target < source)[0, :, 0, :].T
        assert torch.equal(interpolation_weights(source, target), reference), (source, target)
        axis, reach = _axis_weights(source, target), reference.numpy() > 0
        for o in (0, target // 2, target - 1):
            inputs = np.flatnonzero(reach[o])
            assert (axis.reads_from[o], axis.reads_to[o]) == (inputs[0], inputs[-1] + 1)
        for i in (0, source // 2, source - 1):
            outputs = np.flatnonzero(reach[:, i])
            assert (axis.first[i], axis.last[i]) == ((outputs[0], outputs[-1]) if outputs.size else (target, -1))


# ---------------------------------------------------------------- decoding and the catalogue


def test_binary_mask_needs_a_class_one_prompt():
    label = MetaTensor(torch.tensor([[[0, 255]]], dtype=torch.uint8), meta={"filename_or_obj": "/d/m.png"})
    with pytest.raises(DataError, match="/d/m.png: a binary mask has one class"):
        DecodeLabeld(mask_encoding="binary")({"label": label, "prompts": {"2": "a", "3": "b"}})
    out = DecodeLabeld()({"label": label, "prompts": {"1": "tumor"}})["label"]
    assert out.tolist() == [[[0, 1]]] and out.meta["mask_encoding"] == "binary"


def test_a_label_map_with_one_named_value_is_refused_not_merged():
    """One prompt for a mask that holds its value beside others (hippocampus 1 and 2 with only "1" named, or
    instance ids without their rule): an error naming the values, never every value taken as that concept."""
    label = MetaTensor(torch.tensor([[[0, 1, 2, 2]]], dtype=torch.uint8), meta={"filename_or_obj": "/d/hippo.nii.gz"})
    with pytest.raises(DataError, match=r"/d/hippo.nii.gz: mask values \[1, 2\] but the prompts name only 1 "
                                        r"\('anterior hippocampus'\): no prompt for \[2\].*instance_ids.*binary"):
        DecodeLabeld()({"label": label, "prompts": {"1": "anterior hippocampus"}})
    taken = DecodeLabeld(mask_encoding="binary")({"label": label, "prompts": {"1": "hippocampus"}})["label"]
    assert taken.tolist() == [[[0, 1, 1, 1]]]  # asked for: every nonzero value
    ids = DecodeLabeld()({"label": label, "prompts": {"1": "nucleus"}, "instance_rule": "instance_ids"})
    assert ids["label"].meta["mask_encoding"] == "instance_map"
    noisy = MetaTensor(torch.tensor([[[0, 1, 200, 255]]], dtype=torch.uint8),
                       meta={"filename_or_obj": "/d/m.jpg", "is_jpeg": True})  # a JPEG's levels: binary above 127
    assert DecodeLabeld()({"label": noisy, "prompts": {"1": "polyp"}})["label"].tolist() == [[[0, 0, 1, 1]]]
    # instance ids that do not start at 1 (2, 3, 5; a crop of a PanNuke map): refused too, never one binary mask
    # that merges touching instances (it was read as binary)
    crop = MetaTensor(torch.tensor([[[0, 2, 3, 5]]], dtype=torch.uint8), meta={"filename_or_obj": "/d/ids.png"})
    with pytest.raises(DataError, match=r"/d/ids.png: mask values \[2, 3, 5\] but the prompts name only 1 "
                                        r"\('gland'\): no prompt for \[2, 3, 5\].*instance_ids"):
        DecodeLabeld()({"label": crop, "prompts": {"1": "gland"}})
    # instance ids asked for with an encoding that does not keep them: said here, not when training starts
    with pytest.raises(DataError, match=r"\"instance_rule\": \"instance_ids\" with \"mask_encoding\": 'binary'"):
        DecodeLabeld()({"label": crop, "prompts": {"1": "gland"}, "instance_rule": "instance_ids",
                        "mask_encoding": "binary"})


def test_outline_encoding_is_filled():
    ring = np.zeros((9, 9), np.uint8)
    ring[2, 2:7] = ring[6, 2:7] = ring[2:7, 2] = ring[2:7, 6] = 255
    out = DecodeLabeld(mask_encoding="outline")({"label": torch.from_numpy(ring)[None], "prompts": {"1": "head"}})
    assert int(out["label"].sum()) == 25


def test_prompt_keys_are_validated():
    label = torch.zeros(1, 2, 2, dtype=torch.uint8)
    with pytest.raises(DataError, match="label 0 is background"):
        DecodeLabeld()({"label": label, "prompts": {"0": "background"}})
    with pytest.raises(DataError, match="has no 'prompts'"):
        DecodeLabeld()({"label": label})


# ---------------------------------------------------------------- negative prompts


def test_negatives_are_sampled_from_absent_concepts_with_a_seed():
    targets = targets_for(two_class_map(), {"1": "blob", "2": "other"}, "components")
    d = {"targets": targets, "image": torch.zeros(3, 40, 60)}
    pool = ["Blob", "liver", "spleen", "kidney", "polyp", "other"]
    first = RandNegativePromptsd(concepts=pool, num_negatives=2, seed=3)(d)["targets"]
    again = RandNegativePromptsd(concepts=pool, num_negatives=2, seed=3)(d)["targets"]
    added = [t["text"] for t in first[2:]]
    assert added == [t["text"] for t in again[2:]] and len(added) == 2
    assert set(added) <= {"liver", "spleen", "kidney", "polyp"}  # present concepts are never negatives
    assert all(t["is_negative"] and t["masks"].shape == (0, 40, 60) and t["label"] == -1 for t in first[2:])
    everything = RandNegativePromptsd(concepts=pool, num_negatives=10, seed=0)(d)["targets"]
    assert len(everything) == 2 + 4
    seen = set()
    for seed in range(20):
        seen |= {t["text"] for t in RandNegativePromptsd(concepts=pool, num_negatives=1, seed=seed)(d)["targets"][2:]}
    assert seen == {"liver", "spleen", "kidney", "polyp"}


def test_a_synonym_of_a_present_concept_is_never_a_negative():
    """"nuclei" present: "cell nucleus" (its synonym group's canonical text) is as present (DESIGN: negatives are
    absent concepts); 108 of 300 draws gave it before."""
    targets = targets_for(two_class_map(), {"1": "nuclei", "2": "Breast Ultrasound Lesion"}, "components")
    d = {"targets": targets, "image": torch.zeros(3, 40, 60)}
    pool = ["cell nucleus", "Nucleus", "breast tumor", "polyp", "liver", "tumor", "liver tumor"]
    drawn = set()
    for seed in range(40):
        drawn |= {t["text"] for t in RandNegativePromptsd(concepts=pool, num_negatives=2, seed=seed)(d)["targets"][2:]}
    assert drawn == {"polyp", "liver", "liver tumor"}  # "tumor": the breast lesion is one
    # a part present: the whole is not absent ("left lung" present, "lung" never a negative), and the other way
    d = {"targets": targets_for(two_class_map(), {"1": "left lung", "2": "kidney"}, "components"),
         "image": torch.zeros(3, 40, 60)}
    drawn = set()
    for seed in range(40):
        pool = ["lung", "left kidney", "spleen"]
        drawn |= {t["text"] for t in RandNegativePromptsd(concepts=pool, num_negatives=2, seed=seed)(d)["targets"][2:]}
    assert drawn == {"spleen"}


# ---------------------------------------------------------------- real data


def real_targets(entry: dict, size: int | None = None, **kwargs) -> dict:
    d = DecodeLabeld()(LoadMedicalImaged()(entry))
    d = LabelToInstancesd(**kwargs)(d)
    if size is not None:
        d["image"] = torch.zeros(3, size, size)
    return BuildTargetsd(remove_instances=False)(d)


@requires_data
@pytest.mark.parametrize("number", ["01", "07", "23"])
def test_gbm40_instance_counts_equal_its_instance_ids(number):
    path = SHARED_DATA / "GBM40_HE_nuclei/masks" / f"{number}_instances.png"
    ids = np.asarray(Image.open(path))
    expected = len(np.unique(ids[ids > 0]))
    d = real_targets(item("GBM40_HE_nuclei", f"images/{number}.tif", f"masks/{number}_instances.png"),
                     max_instances=None)
    assert d["instances"].shape[0] == expected
    assert d["targets"][0]["masks"].shape[0] == expected  # native size: nothing vanishes
    upsampled = BuildTargetsd(spatial_size=1008)(dict(d))["targets"][0]
    assert upsampled["masks"].shape[0] == expected and upsampled["boxes"].shape == (expected, 4)
    assert bool(((upsampled["boxes"] >= 0) & (upsampled["boxes"] <= 1)).all())


@requires_data
def test_gbm40_cap_keeps_the_largest_nuclei():
    entry = item("GBM40_HE_nuclei", "images/01.tif", "masks/01_instances.png")
    every = real_targets(entry, max_instances=None)["instances"].to_dense().flatten(1).sum(1)
    capped = real_targets(entry, max_instances=10)["instances"].to_dense().flatten(1).sum(1)
    assert capped.shape[0] == 10 and every.shape[0] > 10
    assert torch.equal(capped, every.sort(descending=True).values[:10])


@requires_data
@pytest.mark.parametrize("number", [1, 17, 50])
def test_busi_normal_cases_become_negatives(number):
    entry = item("BUSI", f"images/normal ({number}).png", f"masks/normal ({number})_mask.png")
    targets = real_targets(entry, size=112)["targets"]
    assert len(targets) == 1 and targets[0]["is_negative"] and targets[0]["text"] == "breast tumor"


@requires_data
def test_busi_tumour_with_two_masks_gives_two_components():
    entry = item("BUSI", "images/benign (25).png", ["masks/benign (25)_mask.png", "masks/benign (25)_mask_1.png"])
    targets = real_targets(entry)["targets"]
    assert targets[0]["masks"].shape[0] == 2 and not targets[0]["is_negative"]


@requires_data
@pytest.mark.parametrize("name", ["01_test", "22_training"])
def test_drive_vessels_are_one_semantic_target(name):
    number = name.split("_")[0]
    entry = item("DRIVE", f"images/{name}.tif", f"masks/{number}_manual1.gif")
    d = real_targets(entry)
    vessels = np.asarray(Image.open(SHARED_DATA / "DRIVE/masks" / f"{number}_manual1.gif")) > 0
    assert len(d["targets"]) == 1 and d["targets"][0]["masks"].shape[0] == 1
    assert torch.equal(d["targets"][0]["masks"][0], torch.from_numpy(vessels))
    components = real_targets(entry | {"instance_rule": "components"}, max_instances=None)["targets"][0]
    assert components["masks"].shape[0] > 1  # the tree is not one component: the semantic rule matters


@requires_data
def test_kvasir_jpeg_masks_are_binarised_above_127():
    entry = item("Kvasir-SEG_sample", "images/cju0roawvklrq0799vmjorwfv.jpg", "masks/cju0roawvklrq0799vmjorwfv.jpg")
    d = DecodeLabeld()(LoadMedicalImaged()(entry))
    raw = np.asarray(Image.open(SHARED_DATA / "Kvasir-SEG_sample/masks/cju0roawvklrq0799vmjorwfv.jpg")).max(-1)
    assert len(np.unique(raw)) > 2  # compression noise in the file
    assert torch.equal(d["label"][0].bool(), torch.from_numpy(raw > 127))
    assert real_targets(entry)["targets"][0]["masks"].shape[0] == 3
    targets = real_targets(entry, min_area=2)["targets"]
    assert targets[0]["masks"].shape[0] == 2  # two regions; the 1-pixel JPEG speck is dropped by min_area


@requires_data
def test_isbi_em_cells_are_components_capped():
    entry = item("ISBI2012_EM_membrane", "images/0.png", "masks/0.png")
    every = real_targets(entry, max_instances=None)["targets"][0]["masks"].shape[0]
    assert every > 20  # many cells between membranes
    assert real_targets(entry, max_instances=20)["targets"][0]["masks"].shape[0] == 20


@requires_data
def test_chest_xray_lungs_are_one_semantic_target():
    entry = item("ChestXray_lung_sample", "images/1.jpg", "masks/1-mask.png")
    targets = real_targets(entry)["targets"]
    assert targets[0]["masks"].shape[0] == 1
    assert len(instance_masks(targets[0]["masks"][0].numpy().astype(np.uint8), 1, "components")) >= 2  # 2 lungs


def _present_and_absent(index: int) -> dict:
    """An item with one present concept (a square at a place of its own) and one absent (a negative prompt)."""
    from medsam3_monai.transforms.targets import empty_target

    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, index % 8: index % 8 + 4, 2:9] = True
    present = {"label": 1, "text": "polyp", "boxes": masks_to_boxes_cxcywh(mask), "masks": mask,
               "is_negative": False}
    return {"image": torch.zeros(3, 16, 16, dtype=torch.uint8), "targets": [present, empty_target("liver", (16, 16))]}


def test_box_prompts_go_to_a_share_of_the_present_concepts_and_never_to_absent_ones():
    """``box_prompts`` training: having a box must not mean "present" (the presence head would read the box, not the
    text), so only a ``box_prompt_probability`` share of the present concepts carries one, drawn per prompt from the
    transform's seed; the collated batch boxes exactly those, each with its largest component's box."""
    from medsam3_monai.boxes import BOX_PADDING_LABEL, largest_component_box
    from medsam3_monai.engines import collate_find_queries

    items = [_present_and_absent(i) for i in range(200)]
    choose = RandBoxPromptsd(prob=0.5, seed=3)
    chosen = [choose(item) for item in items]
    present = [item["targets"][0]["box_prompt"] for item in chosen]
    assert 70 < sum(present) < 130 and not any(item["targets"][1]["box_prompt"] for item in chosen)
    choose.set_random_state(3)
    assert [choose(item)["targets"][0]["box_prompt"] for item in items] == present  # a function of the seed
    assert all(RandBoxPromptsd(prob=1.0)(item)["targets"][0]["box_prompt"] for item in items[:20])
    assert not any(RandBoxPromptsd(prob=0.0)(item)["targets"][0]["box_prompt"] for item in items[:20])
    assert "box_prompt" not in items[0]["targets"][0]  # the input item is left as it was

    batch = collate_find_queries(chosen[:8], box_prompts=True)
    assert batch["prompts"] == ["polyp", "liver"] * 8
    wanted = [flag for item in chosen[:8] for flag in (item["targets"][0]["box_prompt"], False)]
    assert batch["box_labels"][:, 0].tolist() == [1 if flag else BOX_PADDING_LABEL for flag in wanted]
    for row, (flag, item) in enumerate(zip(wanted, [i for i in chosen[:8] for _ in range(2)])):
        expected = largest_component_box(item["targets"][0]["masks"][0]) if flag else torch.zeros(4)
        assert torch.equal(batch["boxes"][row, 0], expected)
    unchosen = collate_find_queries(items[:2], box_prompts=True)  # no choice made: every present concept
    assert unchosen["box_labels"][:, 0].tolist() == [1, BOX_PADDING_LABEL, 1, BOX_PADDING_LABEL]
    with pytest.raises(ValueError, match=r"box_prompt_probability must be a number in \[0, 1\], got 1.5"):
        RandBoxPromptsd(prob=1.5)


def test_the_training_bundle_chooses_box_prompts_in_both_chains_after_the_negatives():
    from medsam3_monai.bundle import config_parser

    parser = config_parser("train.json", **{"train#concepts": ["polyp"], "box_prompts": True})
    choice = parser.get_parsed_content("train#box_choice")
    assert isinstance(choice, RandBoxPromptsd) and choice.prob == 0.5
    for chain in ("train#picture_preprocessing", "train#preprocessing"):
        transforms = parser.get_parsed_content(chain).transforms
        assert transforms[-2:] == (parser.get_parsed_content("train#negatives"), choice)
