"""Targets as crops (InstanceMasks): the same masks as dense tensors, and the same loss on a real batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medsam3_monai.instance_masks import InstanceMasks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_crops_round_trip_and_select():
    dense = torch.zeros(3, 20, 30, dtype=torch.bool)
    dense[0, 2:5, 3:9] = True
    dense[1, 10, 29] = True  # a single pixel at the border
    masks = InstanceMasks.from_dense(dense)  # instance 2 is empty
    assert masks.shape == (3, 20, 30) and len(masks) == 3
    assert torch.equal(masks.to_dense(), dense) and torch.equal(masks[1], dense[1])
    assert torch.equal(masks.union(), dense.any(0))
    subset = masks[torch.tensor([True, False, True])]
    assert torch.equal(subset.to_dense(), dense[[0, 2]])
    assert torch.equal(InstanceMasks.cat([masks, subset]).to_dense(), torch.cat([dense, dense[[0, 2]]]))
    assert sum(c.numel() for c in masks.crops) == 3 * 6 + 1  # crops of the bounding boxes only


def test_resized_crops_equal_full_image_interpolation():
    import torch.nn.functional as F

    from medsam3_monai.transforms.targets import resize_instances

    generator = torch.Generator().manual_seed(0)
    native = torch.zeros(6, 97, 131, dtype=torch.bool)
    for k in range(6):
        top, left = torch.randint(0, 80, (1,), generator=generator), torch.randint(0, 110, (1,), generator=generator)
        native[k, top:top + 3 + 2 * k, left:left + 4 + k] = True
    for size in ((224, 224), (56, 56)):  # up- and down-sampling (antialiased)
        crops, boxes = resize_instances(native, size)
        reference = F.interpolate(native[None].float(), size=size, mode="bilinear", align_corners=False,
                                  antialias=size[0] < 97)[0] >= 0.5
        assert torch.equal(crops.to_dense(), reference), size
        assert boxes.shape == (6, 4)


def test_small_instance_ids_number_the_instances_as_relabelled_ids_do():
    """An id map's small ids number its instances directly (no relabelling pass); large, sparse or uint64 ids are
    relabelled first. Both give the same instances, largest first, ties in id order."""
    from medsam3_monai.transforms.instances import DIRECT_ID_SPAN, instance_regions

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 7, (40, 50)).astype(np.uint16)
    ids[ids == 3] = 0  # a missing id
    classes = (ids > 0).astype(np.uint8)
    classes[:5] = 0  # ids outside the class are not its instances
    direct = instance_regions(classes, 1, "instance_ids", ids, max_instances=4, min_area=3)
    assert len(direct) == 4 and all(crop.any() for _, crop in direct)
    for relabelled in (ids.astype(np.int64) * (DIRECT_ID_SPAN + 1), ids.astype(np.uint64)):
        found = instance_regions(classes, 1, "instance_ids", relabelled, max_instances=4, min_area=3)
        assert [box for box, _ in found] == [box for box, _ in direct]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(found, direct))


@pytest.mark.parametrize("block", [8, 64])
def test_large_masks_resized_band_by_band_equal_full_image_interpolation(monkeypatch, block):
    """Masks reaching more than ``2 * PRODUCT_BLOCK`` output rows or columns are resized block by block over the
    weights' band only: the same masks as interpolating the whole image (up to a float tie at exactly 0.5)."""
    import torch.nn.functional as F

    from medsam3_monai.transforms import targets

    monkeypatch.setattr(targets, "PRODUCT_BLOCK", block)
    rows, columns = torch.meshgrid(torch.arange(301.0), torch.arange(403.0), indexing="ij")
    native = torch.stack([((rows - 150) / 120) ** 2 + ((columns - 190) / 170) ** 2 < 1,  # a polyp-sized blob
                          (rows + columns) % 37 < 18,  # stripes: edges everywhere
                          torch.rand(301, 403, generator=torch.Generator().manual_seed(0)) > 0.5])
    for size in ((1008, 1008), (450, 700), (150, 170)):  # up, mixed, down (antialiased)
        crops, boxes = targets.resize_instances(native, size)
        full = F.interpolate(native[None].float(), size=size, mode="bilinear", align_corners=False,
                             antialias=size[0] < 301)[0] >= 0.5
        if (size[0] < 301) == (size[1] < 403):  # torch antialiases both axes or neither
            assert int((crops.to_dense() != full).sum()) <= 2, size
        assert torch.equal(boxes, targets.masks_to_boxes_cxcywh(crops.to_dense()))


@pytest.mark.slow
def test_the_loss_of_a_real_batch_is_the_same_with_crops(shared_data: Path):
    from medsam3_monai.data import build_datalist
    from medsam3_monai.engines.batch import collate_find_queries
    from medsam3_monai.losses import SetCriterion
    from medsam3_monai.losses.targets import FindTargets
    from medsam3_monai.networks import MedSAM3Net
    from medsam3_monai.transforms.pipelines import slice_space_transforms

    items = build_datalist("GBM40_HE_nuclei", shared_data / "GBM40_HE_nuclei").datalist["training"][:2]
    chain = slice_space_transforms(112, train=True, negative_concepts=["polyp"], seed=0)
    batch = collate_find_queries([chain(item) for item in items])
    assert isinstance(batch["targets"].masks, InstanceMasks) and len(batch["targets"].masks) > 10
    dense = FindTargets(batch["targets"].boxes, batch["targets"].num_boxes, batch["targets"].masks.to_dense())
    net = MedSAM3Net("tiny").train()
    criterion = SetCriterion()
    torch.manual_seed(0)
    outputs = net(batch["images"], batch["prompts"], image_ids=batch["image_ids"], pixels_normalized=True)
    with_crops = criterion(outputs, batch["targets"])
    with_dense = criterion(outputs, dense)
    assert with_crops.keys() == with_dense.keys() and "loss_mask" in with_crops
    for name, value in with_dense.items():
        assert torch.equal(torch.as_tensor(with_crops[name]), torch.as_tensor(value)), name


def test_pictures_are_cached_in_slice_space_and_give_the_generic_chains_items(shared_data: Path):
    from monai.data import CacheDataset

    from medsam3_monai.data import build_datalist
    from medsam3_monai.data.caching import build_training_dataset
    from medsam3_monai.transforms.pipelines import slice_space_transforms

    pictures = build_datalist("Kvasir-SEG_sample", shared_data / "Kvasir-SEG_sample").datalist["training"][:2]
    volumes = build_datalist("MSD_Task04_Hippocampus_cropped", shared_data / "MSD_Task04_Hippocampus_cropped",
                             check_values=False).datalist["training"][:1]

    def chain(pictures_only: bool):
        return slice_space_transforms(112, train=True, negative_concepts=["liver", "lung"], seed=3,
                                      pictures_only=pictures_only).set_random_state(seed=5)

    dataset = build_training_dataset(pictures + volumes, chain(True), chain(False), cache="memory", progress=False)
    assert [len(d) for d in dataset.datasets] == [2, 1]
    cached_pictures = dataset.datasets[0]
    assert isinstance(cached_pictures, CacheDataset)
    first_random = cached_pictures.transform.get_index_of_first(lambda t: type(t).__name__ == "RandNegativePromptsd")
    assert cached_pictures.transform.get_index_of_first(lambda t: type(t).__name__ == "BuildTargetsd") < first_random
    generic = chain(False)
    for index, item in enumerate(pictures):
        got, expected = dataset[index], generic(item)
        got, expected = (x[0] if isinstance(x, list) else x for x in (got, expected))
        assert torch.equal(got["image"].as_tensor(), expected["image"].as_tensor())
        positives = [[t for t in x["targets"] if t["label"] != -1] for x in (got, expected)]  # negatives: sampled
        assert [t["text"] for t in positives[0]] == [t["text"] for t in positives[1]] == ["polyp"]
        for a, b in zip(*positives):
            assert a["masks"] == b["masks"] and torch.equal(a["boxes"], b["boxes"])


def test_label_to_instances_gives_tight_crops_equal_to_dense_masks():
    import numpy as np
    from monai.data import MetaTensor

    from medsam3_monai.transforms import DataError, LabelToInstancesd, instance_masks

    generator = np.random.default_rng(0)
    classes = (generator.random((64, 80)) > 0.7).astype(np.uint8)  # many small components
    classes[40:60, 5:30] = 2
    d = {"label": MetaTensor(torch.from_numpy(classes)[None]), "prompts": {"1": "speck", "2": "block"},
         "instance_rule": "components"}
    out = LabelToInstancesd(max_instances=None)(d)
    masks = out["instances"]
    assert isinstance(masks, InstanceMasks) and masks.size == (64, 80)
    dense = torch.from_numpy(np.stack(instance_masks(classes, 1, "components") + instance_masks(classes, 2, "components")))
    assert torch.equal(masks.to_dense(), dense)
    assert out["instance_labels"].tolist() == [1] * (len(masks) - 1) + [2]
    for crop in masks.crops:  # tight: every border row and column holds the instance
        assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
    assert torch.equal(masks.boxes_cxcywh(), InstanceMasks.from_dense(dense).boxes_cxcywh())
    volume = {"label": MetaTensor(torch.zeros(1, 4, 4, 4, dtype=torch.uint8)), "prompts": {"1": "x"}}
    with pytest.raises(DataError, match="slice volumes first"):
        LabelToInstancesd()(volume)


def test_blas_runs_on_one_thread_inside_the_data_path_block_and_freed_buffers_are_kept():
    import sys

    from threadpoolctl import threadpool_info

    from medsam3_monai.allocator import keep_freed_buffers
    from medsam3_monai.threads import one_blas_thread

    with one_blas_thread():
        assert all(lib["num_threads"] == 1 for lib in threadpool_info() if lib["user_api"] == "blas")
    if sys.platform.startswith("linux"):
        import platform

        assert keep_freed_buffers() is (platform.libc_ver()[0] == "glibc")


def test_the_packed_scatter_for_accelerators_equals_the_crop_by_crop_copy():
    generator = torch.Generator().manual_seed(1)
    dense = torch.rand(7, 40, 50, generator=generator) > 0.8
    dense[3] = False  # an empty mask: a 0 x 0 crop
    dense[5, 0, 49] = True
    masks = InstanceMasks.from_dense(dense)
    assert torch.equal(masks._scatter_packed(torch.device("cpu")), dense)
    assert torch.equal(masks.to_dense(), dense)
    assert InstanceMasks((4, 5))._scatter_packed(torch.device("cpu")).shape == (0, 4, 5)
    empty_only = InstanceMasks.from_dense(torch.zeros(2, 4, 5, dtype=torch.bool))
    assert torch.equal(empty_only._scatter_packed(torch.device("cpu")), torch.zeros(2, 4, 5, dtype=torch.bool))


def _labelled_regions(classes, label, rule):
    """The general way of ``instance_regions`` (label or take the mask as id 1, count, box every id)."""
    import numpy as np
    from scipy import ndimage

    binary = classes == label
    if rule == "semantic":
        ids, count = binary.astype(np.int32), 1
    else:
        ids, count = ndimage.label(binary, structure=np.ones((3,) * classes.ndim, dtype=bool))
    areas = np.bincount(ids.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-areas, kind="stable")
    boxes = ndimage.find_objects(ids, max_label=count)
    return [(boxes[i], ids[boxes[i]] == i + 1) for i in order if areas[i] > 0]


@pytest.mark.parametrize("rule", ["semantic", "components"])
def test_a_mask_of_one_instance_gives_the_box_and_crop_of_labelling_it(rule):
    """One polyp, one organ, a semantic class: box and crop come from the mask itself, without labelling it; they
    are what labelling and ``find_objects`` give, in 2D and 3D, at the borders, and with ``min_area`` and caps."""
    import numpy as np
    from scipy import ndimage

    from medsam3_monai.transforms import instance_regions

    generator = np.random.default_rng(1)
    checked = 0
    for shape in [(1, 1), (7, 1), (40, 50), (9, 12, 11)]:
        for _ in range(20):
            blob = ndimage.binary_dilation(generator.random(shape) > 0.97, iterations=int(generator.integers(1, 6)))
            classes = blob.astype(np.uint8) * 3
            if rule == "components" and ndimage.label(blob, structure=np.ones((3,) * blob.ndim, bool))[1] != 1:
                continue  # several components: the labelling path
            found = instance_regions(classes, 3, rule)
            expected = _labelled_regions(classes, 3, rule) if blob.any() else []
            assert len(found) == len(expected) <= 1
            for (box, crop), (box_expected, crop_expected) in zip(found, expected):
                assert box == box_expected and crop.dtype == bool and np.array_equal(crop, crop_expected)
                assert crop.flags.c_contiguous and not np.shares_memory(crop, classes)
                area = int(crop.sum())
                assert len(instance_regions(classes, 3, rule, min_area=area)) == 1
                assert instance_regions(classes, 3, rule, min_area=area + 1) == []
                assert instance_regions(classes, 3, rule, max_instances=0) == []
                checked += 1
    assert checked > 20
    edge = np.zeros((6, 5), np.uint8)
    edge[5, 4] = 1  # the last pixel
    assert [(box, crop.tolist()) for box, crop in instance_regions(edge, 1, rule)] == [
        ((slice(5, 6), slice(4, 5)), [[True]])]
