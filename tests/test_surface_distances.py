"""Edge-to-edge surface distances (``metrics.surface``) against MONAI's own, which they replace for speed: the same
edges as MONAI's ``get_mask_edges`` (scipy's erosion), the same distances bit for bit as
``get_edge_surface_distance``, and so the same NSD and HD95 as ``compute_surface_dice`` /
``compute_hausdorff_distance`` -- on the TotalSegmentator example segmentation and on random boxes at the borders."""

from __future__ import annotations

import math
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from test_metrics import _boxes_at_random
from medsam3_monai.metrics import case_metrics, hd95, label_map_metrics, surface_dice
from medsam3_monai.metrics.surface import edge_distances, mask_edges

SEGMENTATION = "TotalSegmentator_example_CT_MR/masks/example_seg.nii.gz"


def _monai_distances(pred: np.ndarray, truth: np.ndarray, spacing) -> tuple[torch.Tensor, torch.Tensor]:
    from monai.metrics.utils import get_edge_surface_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, (to_truth, to_pred), _ = get_edge_surface_distance(torch.from_numpy(pred), torch.from_numpy(truth),
                                                              distance_metric="euclidean", spacing=spacing,
                                                              symmetric=True)
    return to_truth, to_pred


def _random_mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Three boxes (some touching the borders) with holes: edges inside and out."""
    return _boxes_at_random(rng, shape, 3) & (rng.random(shape) > 0.05)


def test_mask_edges_are_scipy_erosion_edges_at_the_borders_too():
    from scipy.ndimage import binary_erosion

    rng = np.random.default_rng(0)
    for shape in ((17, 23), (9, 14, 11), (1, 5, 6), (4, 1)):
        for _ in range(5):
            mask = _random_mask(rng, shape) if min(shape) > 1 else rng.random(shape) > 0.3
            np.testing.assert_array_equal(mask_edges(mask), binary_erosion(mask) ^ mask)
    assert mask_edges(np.ones((3, 3), dtype=bool)).sum() == 8  # every voxel but the centre touches the border


def test_edge_distances_equal_monai_bit_for_bit_on_random_masks(monkeypatch):
    import medsam3_monai.metrics.surface as surface

    monkeypatch.setattr(surface, "PARALLEL_MIN_POINTS", 1)  # two workers on every lookup of the odd trials
    rng = np.random.default_rng(3)
    for trial in range(12):
        shape = (31, 26) if trial % 2 else (13, 21, 17)
        pred, truth = _random_mask(rng, shape), _random_mask(rng, shape)
        if trial == 5:
            pred = truth.copy()  # every edge voxel shared: no tree lookup at all
        spacing = [float(s) for s in rng.choice([0.3, 1.0, 2.5], len(shape))] if trial % 3 else None
        ours = edge_distances(pred, truth, spacing, workers=1 + trial % 2)
        for mine, theirs in zip(ours, _monai_distances(pred, truth, spacing)):
            assert mine.dtype == theirs.dtype == torch.float32
            assert torch.equal(mine, theirs), trial
    same = _random_mask(rng, (12, 15))
    assert all(not d.any() for d in edge_distances(same, same))  # one mask against itself: zeros both ways


def test_edge_distances_reject_empty_and_mismatched_masks():
    mask = np.zeros((4, 4), dtype=bool)
    mask[1, 1] = True
    with pytest.raises(ValueError, match="non-empty"):
        edge_distances(mask, np.zeros_like(mask))
    with pytest.raises(ValueError, match="same shape"):
        edge_distances(mask, mask[:3])
    with pytest.raises(ValueError, match="one value per mask axis"):
        edge_distances(mask, mask, spacing=(1.0, 2.0, 3.0))


def test_surface_metrics_of_a_real_ct_segmentation_equal_monai(shared_data):
    # the TotalSegmentator example (122 x 101 x 30 at 1.5 mm) against itself shifted, eroded and with a spurious
    # blob: every class's edge distances are MONAI's, and so NSD and HD95 are those of MONAI's metric functions
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice
    from scipy.ndimage import binary_erosion

    image = nib.load(str(shared_data / SEGMENTATION))
    truth = np.asarray(image.dataobj).astype(np.uint8)
    spacing = [float(s) for s in image.header.get_zooms()[:3]]
    pred = np.roll(truth, shift=(2, -1, 1), axis=(0, 1, 2))
    values = [int(v) for v in np.unique(truth) if v > 0]
    assert len(values) > 30
    for value in values[::6]:  # a few classes eroded (smaller surfaces) and one with a far-away blob
        eroded = binary_erosion(pred == value)
        pred[(pred == value) & ~eroded] = 0
    pred[5:8, 5:8, 2:4] = values[0]
    checked = 0
    for value in values:
        p, t = pred == value, truth == value
        if not (p.any() and t.any()):
            continue
        for mine, theirs in zip(edge_distances(p, t, spacing), _monai_distances(p, t, spacing)):
            assert torch.equal(mine, theirs), value
        checked += 1
    assert checked > 30
    metrics = label_map_metrics(torch.from_numpy(pred), torch.from_numpy(truth), values[:4], spacing)
    for value, (found, _, _) in zip(values[:4], metrics):
        whole = [torch.from_numpy(x == value)[None, None].float() for x in (pred, truth)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nsd = compute_surface_dice(*whole, class_thresholds=[2.0], include_background=True, spacing=spacing)
            hd = compute_hausdorff_distance(*whole, include_background=True, percentile=95, spacing=spacing)
        assert (found["nsd"], found["hd95"]) == (nsd.item(), hd.item()), value
        p, t = pred == value, truth == value
        assert (surface_dice(p, t, spacing), hd95(p, t, spacing)) == (nsd.item(), hd.item())
        assert case_metrics(p, t, spacing)["hd95"] == hd.item()


def test_label_map_metrics_on_several_threads_are_the_serial_ones(shared_data):
    # the classes' surface metrics run on torch.get_num_threads() threads at once: the same numbers, in order
    image = nib.load(str(shared_data / SEGMENTATION))
    truth = torch.from_numpy(np.asarray(image.dataobj).astype(np.uint8))
    pred = torch.roll(truth, shifts=(1, 2), dims=(0, 2))
    values = [int(v) for v in torch.unique(truth) if v > 0][:12] + [250]  # one class in neither map
    spacing = [float(s) for s in image.header.get_zooms()[:3]]
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            results.append(label_map_metrics(pred, truth, values, spacing))
    finally:
        torch.set_num_threads(previous)
    assert results[0] == results[1]
    absent, _, _ = results[0][-1]
    assert (absent["dice"], absent["nsd"]) == (1.0, 1.0) and math.isnan(absent["hd95"])
    assert len({found["nsd"] for found, _, _ in results[0][:-1]}) > 3  # the classes' own numbers, not one repeated
    assert all(math.isfinite(found["hd95"]) for found, _, _ in results[0][:-1])
