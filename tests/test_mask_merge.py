"""A volume slice's binary masks resized back inside their boxes (``inferers.mask_merge``) against MONAI ``Invertd``'s
dense inverse of their mask logits and confidences, merged by confidence: the same label map, pixel for pixel, ties
(bilinear logits that are 0 but for rounding) included."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _merge_helpers import dense_label_index, smooth_maps
from medsam3_monai.inferers import mask_merge
from medsam3_monai.inferers.bitmasks import BitMasks
from medsam3_monai.inferers.boundary_merge import merged_index
from medsam3_monai.inferers.mask_merge import mask_label_index, mask_maps

SHARED_SEGMENTATION = "TotalSegmentator_example_CT_MR/masks/example_seg.nii.gz"


def invertd_reference(masks: torch.Tensor, scores: torch.Tensor, size: tuple[int, int]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """MONAI ``Invertd``'s way back of ``MaskLogitsd``'s float maps (``F.interpolate``, then the merge), and the
    pixels float rounding may decide."""
    logits, confidence = mask_maps(masks, scores)
    return dense_label_index(logits, size, confidence=confidence)


def blob_masks(generator: torch.Generator, prompts: int, side: int) -> torch.Tensor:
    """(P, side, side) masks of a few blobs each, some overlapping (as the detector's masks of nearby organs)."""
    return smooth_maps(generator, prompts, side, side, offset=-4.0) > 0


@pytest.mark.parametrize("side, size", [(112, (40, 30)), (112, (303, 366)), (64, (64, 64)), (96, (50, 200)),
                                        (1008, (512, 512))])
@pytest.mark.parametrize("prompts", [1, 4])
def test_equals_invertd_for_blob_masks_at_any_scale(side, size, prompts):
    generator = torch.Generator().manual_seed(side + 7 * prompts + size[0])
    masks = blob_masks(generator, prompts, side)
    assert masks.any() and not masks.all()
    scores = torch.rand(prompts, generator=generator)
    ours = mask_label_index(BitMasks.pack(masks), scores, size)
    assert ours.dtype == np.uint8 and ours.shape == size
    assert np.array_equal(ours, invertd_reference(masks, scores, size)[0]), f"{side} -> {size}, {prompts} prompts"
    assert np.array_equal(ours, mask_label_index(masks, scores, size)), "bool masks: the same"
    if prompts > 1:
        assert len(np.unique(ours)) > 2, "several prompts win pixels"


@pytest.mark.parametrize("threads", [1, 2])
def test_ties_fall_as_in_invertd_for_noisy_masks(threads):
    # pixel noise: nearly every output reads taps on both sides of a mask, and ties (logit 0 but for rounding) are
    # common. ATen's CPU resize rounds them one way for small outputs (H + W <= 128) and for 3 channels on one
    # thread, another way elsewhere: the box resize follows the second, the first is left to F.interpolate itself
    generator = torch.Generator().manual_seed(3)
    masks = torch.rand(3, 112, 112, generator=generator) > 0.6
    scores = torch.rand(3, generator=generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for prompts in (3, 2):
            for size in ((40, 30), (200, 170), (112, 112), (70, 59)):
                labels, ties = invertd_reference(masks[:prompts], scores[:prompts], size)
                ours = mask_label_index(BitMasks.pack(masks[:prompts]), scores[:prompts], size)
                assert np.array_equal(ours, labels), (prompts, size, int((ours != labels).sum()), int(ties.sum()))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("side, size", [(1008, (512, 512)), (400, (200, 200)), (112, (303, 366))])
def test_masks_that_fill_the_slice_and_exact_halves_go_back_as_with_invertd(side, size):
    # a mask over the whole slice (the random-weight CT of scripts/bench_gpu.py): every output's taps lie inside it,
    # nothing is interpolated; a 2x smaller picture: every tap weight is 0.5, so outputs on a mask edge have a logit
    # of exactly 0 and overlapping prompts' confidences tie
    generator = torch.Generator().manual_seed(side)
    full = torch.ones(1, side, side, dtype=torch.bool)
    noisy = torch.rand(3, side, side, generator=generator) > 0.5
    blobs = blob_masks(generator, 3, side)
    for masks, scores in ((full, torch.tensor([0.7])), (noisy, torch.tensor([0.6, 0.6, 0.8])),
                          (blobs, torch.tensor([0.5, 0.9, 0.5])), (torch.cat([full, blobs]), torch.full((4,), 0.5))):
        labels, _ = invertd_reference(masks, scores, size)
        ours = mask_label_index(BitMasks.pack(masks), scores, size)
        assert np.array_equal(ours, labels), (side, size, masks.shape[0], int((ours != labels).sum()))


@pytest.mark.parametrize("threshold", [5000.0, -9000.0, 1.0e4])
def test_any_threshold_above_the_empty_logit_goes_back_as_with_invertd(threshold):
    # between the two logits the outputs inside and outside a mask are decided without arithmetic; at MASK_LOGIT
    # itself the ones inside are computed too (their logit is 1e4 but for rounding)
    generator = torch.Generator().manual_seed(11)
    masks = blob_masks(generator, 2, 112)
    scores = torch.tensor([0.4, 0.7])
    size = (303, 366)
    logits, confidence = mask_maps(masks, scores)
    labels, _ = dense_label_index(logits, size, threshold=threshold, confidence=confidence)
    assert np.array_equal(mask_label_index(masks, scores, size, threshold=threshold), labels)
    for any_size in (size, (40, 30)):  # the boxes' way and F.interpolate's (a small picture) alike
        with pytest.raises(ValueError, match="must lie above EMPTY_LOGIT"):
            mask_label_index(masks, scores, any_size, threshold=-1.0e4)


def test_a_mask_outside_every_outputs_taps_claims_nothing_and_ties_go_to_the_earlier_prompt():
    masks = torch.zeros(3, 112, 112, dtype=torch.bool)
    masks[0, 40:70, 30:90] = True
    masks[1] = masks[0]  # the same mask and score as prompt 0: every pixel is a tie, prompt 0 keeps it
    masks[2, 4, 4] = True  # one slice-space pixel, read by no output of a 4x smaller picture
    scores = torch.tensor([0.5, 0.5, 0.9])
    size = (28, 300)  # H + W > 128: the boxes' resize (see below)
    rows = mask_merge._axis(112, 28)
    assert 4 not in set(rows.first.tolist()) | set(rows.second.tolist())
    ours = mask_label_index(masks, scores, size)
    assert set(np.unique(ours)) == {0, 1}
    assert np.array_equal(ours, invertd_reference(masks, scores, size)[0])
    empty = mask_label_index(torch.zeros(2, 112, 112, dtype=torch.bool), torch.ones(2), (300, 200))
    assert not empty.any() and empty.shape == (300, 200)
    with pytest.raises(ValueError, match="3 scores for 2 masks"):
        mask_label_index(masks[:2], scores, size)


def test_beyond_254_prompts_the_index_is_int32():
    masks = torch.zeros(300, 16, 16, dtype=torch.bool)
    masks[299, 4:12, 4:12] = True
    ours = mask_label_index(masks, torch.ones(300), (40, 40))
    assert ours.dtype == np.int32 and set(np.unique(ours)) == {0, 300}


def test_the_totalsegmentator_example_goes_back_as_with_invertd(shared_data):
    """Real organ masks: the example CT's 41 classes, each slice's masks at SAM3's slice space, back to 122 x 101 --
    the label maps of ``Invertd``'s dense inverse, pixel for pixel."""
    path = shared_data / SHARED_SEGMENTATION
    if not path.is_file():
        pytest.skip(f"{SHARED_SEGMENTATION} is not in ../shared/data")
    labels = torch.from_numpy(np.asarray(nib.load(str(path)).dataobj).astype(np.uint8))
    values = torch.unique(labels)[1:]
    generator = torch.Generator().manual_seed(0)
    for side in (112, 1008):
        for z in range(0, labels.shape[2], 6):
            plane = labels[:, :, z]
            masks = F.interpolate((plane[None] == values[:, None, None]).float()[None], size=(side, side))[0] > 0.5
            masks = masks[masks.flatten(1).any(1)]
            scores = 0.5 + 0.4 * torch.rand(masks.shape[0], generator=generator)
            logits, confidence = (F.interpolate(m[None], tuple(plane.shape), mode="bilinear")[0]
                                  for m in mask_maps(masks, scores))
            reference = merged_index(logits, lambda c=confidence: c, 0.0).numpy()
            assert np.array_equal(mask_label_index(masks, scores, tuple(plane.shape)), reference), (side, z)


def test_overlaps_inside_both_masks_are_decided_by_the_scores_as_invertd_decides_them(monkeypatch):
    # masks overlapping over most of the slice (a random-weight network's classes): inside both masks the two
    # confidences are the scores interpolated alike, so the scores decide -- unless they are within rounding of
    # each other: 0.03 and the next float32 tie on 366 outputs of 303 x 366, 0 and the smallest subnormal on every
    # output (a tie stays with the earlier prompt); those are computed, as everywhere on the masks' boundaries
    computed = []
    values_at = mask_merge._values_at
    monkeypatch.setattr(mask_merge, "_values_at", lambda *args: computed.append(args[2].size) or values_at(*args))
    generator = torch.Generator().manual_seed(5)
    base = torch.rand(1, 112, 112, generator=generator) > 0.02  # nearly full, with holes: boundaries everywhere
    masks = torch.cat([base, base, torch.ones(1, 112, 112, dtype=torch.bool), blob_masks(generator, 1, 112) | base])
    after = [float(np.nextafter(np.float32(x), np.float32(1))) for x in (0.03, 0.0)]
    for scores, decided in (([0.03, after[0]], False), ([0.0, after[1]], False), ([0.2, 0.9, 0.7, 0.7], True),
                            ([0.9, 0.5, 0.0, 0.95], True)):
        scores, chosen = torch.tensor(scores), masks[:len(scores)]
        for size in ((303, 366), (171, 259), (500, 420)):
            computed.clear()
            ours = mask_label_index(chosen, scores, size)
            reference = invertd_reference(chosen, scores, size)[0]
            assert np.array_equal(ours, reference), (scores.tolist(), size, int((ours != reference).sum()))
            if decided:  # about every pixel is contested by each later prompt; the scores settle all but the edges
                assert sum(computed) < size[0] * size[1] * (len(scores) - 1) / 4, (scores.tolist(), size)
            else:  # a near tie: the earlier prompt keeps the pixels where the two values round alike
                assert (ours == 1).any() and (ours == 2).any(), (scores.tolist(), size)
