"""The native-size label map computed only near the masks' boundaries (``inferers.boundary_merge``) against the
dense inverse it replaces (MONAI ``Invertd``'s: every pixel of the bilinear resize, thresholded, merged by
confidence), equal up to float rounding at the threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _merge_helpers import assert_same_labels, dense_label_index, smooth_maps
from medsam3_monai.inferers import boundary_merge
from medsam3_monai.inferers.boundary_merge import boundary_label_index


def test_equals_the_dense_resize_for_random_maps_sizes_and_prompt_counts():
    generator = torch.Generator().manual_seed(0)
    upscaled = 0
    for trial in range(120):
        prompts = 1 + trial % 3
        h, w = (int(v) for v in torch.randint(3, 40, (2,), generator=generator))
        size = tuple(int(v) for v in torch.randint(1, 150, (2,), generator=generator))  # up- and downsampling
        maps = smooth_maps(generator, prompts, h, w, offset=3.0 if trial % 4 == 0 else 0.0)  # wide overlaps too
        if trial % 5 == 0:
            maps = torch.randn(prompts, h, w, generator=generator)  # noise: boundaries everywhere
        if trial % 7 == 0:
            maps[:, : h // 2] = 0.0  # logits exactly at the threshold
        scores = torch.rand(prompts, generator=generator)
        ours = boundary_label_index(maps, size, scores=scores)
        assert ours.shape == size and ours.dtype == np.uint8
        assert_same_labels(ours, dense_label_index(maps, size, scores=scores), f"trial {trial}")
        upscaled += size[0] * size[1] >= boundary_merge.BLOCK_MIN_UPSCALE * h * w
    assert 30 < upscaled < 110, "both the block method and the dense resize of small outputs are exercised"


def test_a_single_prompt_gives_the_mask_of_torch_interpolate():
    generator = torch.Generator().manual_seed(1)
    for size in ((529, 622), (1070, 1348), (50, 40)):
        maps = smooth_maps(generator, 1, 112, 112)
        expected = (F.interpolate(maps[None], size, mode="bilinear", align_corners=False)[0, 0] > 0).numpy()
        np.testing.assert_array_equal(boundary_label_index(maps, size), expected.astype(np.uint8))


@pytest.mark.parametrize("threshold", [0.3, 0.5, 1.7])
def test_taps_one_float_step_above_the_threshold_give_the_dense_mask(threshold):
    """Taps within rounding of the threshold: deciding blocks by their taps' sign alone (no margin) would call the
    interpolated pixels above it, which the dense resize's rounding puts at or below it on a few pixels."""
    just_above = float(np.nextafter(np.float32(threshold), np.float32(np.inf)))
    maps = torch.full((1, 7, 9), just_above)
    maps[0, :, :2] = -5.0
    dense = F.interpolate(maps[None], size=(23, 31), mode="bilinear", align_corners=False)[0, 0] > threshold
    assert np.array_equal(boundary_label_index(maps, (23, 31), threshold), dense.numpy().view(np.uint8))


def test_both_ways_of_resolving_open_pixels_are_used_and_agree(monkeypatch):
    """Open pixels are interpolated where few (the column segments that cross the threshold); a tile where most are
    open is resized densely."""
    generator = torch.Generator().manual_seed(2)
    rows, columns = torch.meshgrid(torch.arange(60.0), torch.arange(60.0), indexing="ij")
    sparse = torch.stack([15 - ((rows - 20) ** 2 + (columns - 25) ** 2).sqrt(),  # two discs, overlapping a little
                          12 - ((rows - 40) ** 2 + (columns - 38) ** 2).sqrt()])
    overlapping = smooth_maps(generator, 2, 60, 60, offset=20.0)  # both prompts claim everything: all open
    calls = {"dense": 0, "pixels": 0}
    dense, pixels = boundary_merge._resized_rows, boundary_merge._Segments.pixels

    def count(name, function):
        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return counted

    monkeypatch.setattr(boundary_merge, "_resized_rows", count("dense", dense))
    monkeypatch.setattr(boundary_merge._Segments, "pixels", count("pixels", pixels))
    for maps in (sparse, overlapping):
        scores = torch.tensor([0.6, 0.4])
        assert_same_labels(boundary_label_index(maps, (300, 250), scores=scores),
                           dense_label_index(maps, (300, 250), scores=scores))
    assert calls["dense"] > 0 and calls["pixels"] > 0


def test_grouped_maps_unite_each_prompts_masks_at_the_output_size():
    """Several maps per prompt (``groups``: the kept queries of ``threshold``): each map resized on its own, a prompt's
    mask the union of its maps' masks and its logit the largest of theirs -- the dense reference, by the block
    method, the column segments, the dense fallback and the accelerator path alike."""
    generator = torch.Generator().manual_seed(11)
    paths = set()
    for trial in range(60):
        groups = [int(v) for v in torch.randint(1, 4, (1 + trial % 3,), generator=generator)]
        h, w = (int(v) for v in torch.randint(4, 36, (2,), generator=generator))
        size = tuple(int(v) for v in torch.randint(2, 160, (2,), generator=generator))
        maps = smooth_maps(generator, sum(groups), h, w, offset=2.0 if trial % 4 == 0 else 0.0)
        if trial % 5 == 0:
            maps = torch.randn(sum(groups), h, w, generator=generator)
        scores = torch.rand(len(groups), generator=generator)
        reference = dense_label_index(maps, size, scores=scores, groups=groups)
        ours = boundary_label_index(maps, size, scores=scores, groups=groups)
        assert_same_labels(ours, reference, f"trial {trial}, groups {groups}")
        paths.add(size[0] * size[1] >= boundary_merge.BLOCK_MIN_UPSCALE * h * w)
        confidence = boundary_merge._Confidence(scores, None, size, tuple(maps.shape), maps.device)
        device_path = boundary_merge._dense_index(maps, size, 0.0, confidence, None, 1000, boundary_merge._Groups(groups))
        assert_same_labels(device_path.numpy(), reference, f"trial {trial}, accelerator path")
    assert paths == {True, False}
    # one prompt of three overlapping maps: the union, not the label of whichever map is most confident
    maps = smooth_maps(generator, 3, 30, 30, offset=1.0)
    united = F.interpolate(maps[None], (200, 170), mode="bilinear", align_corners=False)[0].amax(0) > 0
    assert_same_labels(boundary_label_index(maps, (200, 170), groups=[3]),
                       (united.numpy().view(np.uint8), np.zeros(united.shape, bool)))
    # maps that claim nothing (a low-scoring query's empty mask) are left out, a group keeping at least one
    empty = torch.full((1, 30, 30), -5.0)
    for groups, stack in (([3, 2], [maps, empty, empty]), ([1, 2, 1], [empty, empty, maps[:1], maps[1:2]])):
        stacked, scores = torch.cat(stack), torch.tensor([0.9, 0.5, 0.7][:len(groups)])
        assert_same_labels(boundary_label_index(stacked, (200, 170), scores=scores, groups=groups),
                           dense_label_index(stacked, (200, 170), scores=scores, groups=groups), str(groups))
    assert boundary_merge._claiming_maps(torch.cat([empty, maps[:1], empty]), [2, 1], 0.0)[1] == [1, 1]
    with pytest.raises(ValueError, match=r"groups \[2, 2\] must add up to the 3 maps"):
        boundary_label_index(maps, (50, 50), groups=[2, 2])
    with pytest.raises(ValueError, match="each prompt at least one map"):
        boundary_label_index(maps, (50, 50), groups=[3, 0])


def test_confidence_maps_a_threshold_and_non_finite_logits():
    generator = torch.Generator().manual_seed(3)
    maps = smooth_maps(generator, 3, 30, 30, offset=2.0)
    size = (97, 83)
    slice_confidence = torch.rand(3, 30, 30, generator=generator)
    native_confidence = torch.rand(3, *size, generator=generator)
    for confidence in (slice_confidence, native_confidence):
        assert_same_labels(boundary_label_index(maps, size, confidence=confidence),
                           dense_label_index(maps, size, confidence=confidence))
    assert_same_labels(boundary_label_index(maps, size, threshold=1.5), dense_label_index(maps, size, threshold=1.5))
    broken = maps.clone()
    broken[0, 3, 4], broken[1, 10, 10], broken[2, 20, 5] = float("nan"), float("inf"), -float("inf")
    finite = torch.nan_to_num(broken, nan=0.0, posinf=0.0, neginf=0.0)
    ours, (labels, _) = boundary_label_index(broken, size), dense_label_index(broken, size)
    np.testing.assert_array_equal(ours, labels)  # every pixel resized densely, as MONAI does
    assert not np.array_equal(ours, dense_label_index(finite, size)[0])
    with pytest.raises(ValueError, match="confidence maps"):
        boundary_label_index(maps, size, confidence=torch.rand(3, 7, 7))


def test_more_than_254_prompts_give_an_int32_index():
    generator = torch.Generator().manual_seed(4)
    maps = torch.randn(300, 4, 5, generator=generator)
    ours = boundary_label_index(maps, (9, 7))
    assert ours.dtype == np.int32
    assert_same_labels(ours, dense_label_index(maps, (9, 7)))


def test_the_accelerator_path_resizes_every_pixel_where_the_maps_are():
    """Maps on an accelerator take ``_dense_index`` (run here on the CPU): the dense resize in row tiles, whole
    pictures with ``F.interpolate``, a tiled one with ``upsample_rows`` -- the reference labels either way."""
    generator = torch.Generator().manual_seed(5)
    size = (210, 170)
    for prompts in (1, 3):
        maps = smooth_maps(generator, prompts, 40, 40)
        scores = torch.rand(prompts, generator=generator)
        reference = dense_label_index(maps, size, scores=scores)
        for tile_elements in (boundary_merge.DEVICE_TILE_ELEMENTS, 1000):  # one tile; many row tiles
            confidence = boundary_merge._Confidence(scores, None, size, tuple(maps.shape), maps.device)
            rows = []
            ours = boundary_merge._dense_index(maps, size, 0.0, confidence, rows.append, tile_elements)
            assert ours.dtype == torch.uint8 and ours.device == maps.device
            assert_same_labels(ours.numpy(), reference, f"{prompts} prompts, tiles of {tile_elements}")
            assert sum(rows) == size[0] and (len(rows) > 1) == (tile_elements == 1000)
    slice_confidence = torch.rand(3, 40, 40, generator=generator)
    confidence = boundary_merge._Confidence(None, slice_confidence, size, (3, 40, 40), maps.device)
    assert_same_labels(boundary_merge._dense_index(maps, size, 0.0, confidence, None, 1000).numpy(),
                       dense_label_index(maps, size, confidence=slice_confidence))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_maps_on_a_gpu_give_the_host_labels():
    generator = torch.Generator().manual_seed(6)
    maps, scores = smooth_maps(generator, 3, 112, 112), torch.rand(3, generator=generator)
    for size in ((529, 622), (1070, 1348), (50, 40)):
        ours = boundary_label_index(maps.cuda(), size, scores=scores)
        assert isinstance(ours, np.ndarray) and ours.dtype == np.uint8
        assert_same_labels(ours, dense_label_index(maps, size, scores=scores), f"{size}")


def test_a_picture_resized_densely_breaks_confidence_ties_as_the_dense_inverse():
    # binary masks with one score each (a volume slice's maps): confidences tie exactly wherever both prompts claim
    # a pixel; resized densely (an output below BLOCK_MIN_UPSCALE x the slice space), the confidence maps are
    # resized as the logits are, so every tie goes where MONAI's dense inverse sends it
    for seed in (0, 15):  # seeds where row-by-row arithmetic (upsample_rows) would break a tie the other way
        masks = torch.rand(2, 56, 56, generator=torch.Generator().manual_seed(seed)) > 0.5
        maps, confidence = torch.where(masks, 1e4, -1e4), masks.float() * 0.7
        for size in ((33, 47), (70, 61)):
            expected, _ = dense_label_index(maps, size, confidence=confidence)
            np.testing.assert_array_equal(boundary_label_index(maps, size, confidence=confidence), expected)
