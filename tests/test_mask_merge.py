"""A volume slice's binary masks resized back inside their boxes (``inferers.mask_merge``) against MONAI ``Invertd``'s
dense inverse of their mask logits and confidences, merged by confidence: the same label map, up to the pixels whose
bilinear logit is a tie (mathematically 0) that float rounding decides either way."""

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
from medsam3_monai.inferers.mask_merge import mask_label_index
from medsam3_monai.inferers.postprocess import mask_maps

SHARED_SEGMENTATION = "TotalSegmentator_example_CT_MR/masks/example_seg.nii.gz"


def invertd_reference(masks: torch.Tensor, scores: torch.Tensor, size: tuple[int, int]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """MONAI ``Invertd``'s way back of ``MaskLogitsd``'s float maps (``F.interpolate``, then the merge), and the
    pixels float rounding may decide."""
    logits, confidence = mask_maps(masks, scores)
    return dense_label_index(logits, size, confidence=confidence)


def assert_ties_only(ours: np.ndarray, reference: tuple[np.ndarray, np.ndarray], message: str = "") -> None:
    """Equal to the reference but at its ties, which are few."""
    labels, ties = reference
    assert ours.shape == labels.shape and ours.dtype == labels.dtype, message
    differ = ours != labels
    assert not (differ & ~ties).any(), f"{message}: {int((differ & ~ties).sum())} pixels differ"
    assert ties.mean() < 0.03, message


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
    assert_ties_only(ours, invertd_reference(masks, scores, size), f"{side} -> {size}, {prompts} prompts")
    assert np.array_equal(ours, mask_label_index(masks, scores, size)), "bool masks: the same"
    if prompts > 1:
        assert len(np.unique(ours)) > 2, "several prompts win pixels"


def test_equals_invertd_for_noisy_masks_where_ties_are_many():
    # pixel noise: nearly every output reads taps on both sides of a mask; ties (logit exactly 0) are common at
    # this scale and float rounding decides them (F.interpolate's own rounding depends on the output's shape)
    generator = torch.Generator().manual_seed(3)
    masks = torch.rand(3, 112, 112, generator=generator) > 0.6
    scores = torch.rand(3, generator=generator)
    for size in ((40, 30), (200, 170), (112, 112)):
        labels, near = invertd_reference(masks, scores, size)
        differ = mask_label_index(BitMasks.pack(masks), scores, size) != labels
        assert not (differ & ~near).any(), size


def test_a_mask_outside_every_outputs_taps_claims_nothing_and_ties_go_to_the_earlier_prompt():
    masks = torch.zeros(3, 112, 112, dtype=torch.bool)
    masks[0, 40:70, 30:90] = True
    masks[1] = masks[0]  # the same mask and score as prompt 0: every pixel is a tie, prompt 0 keeps it
    masks[2, 4, 4] = True  # one slice-space pixel, read by no output of a 4x smaller picture
    scores = torch.tensor([0.5, 0.5, 0.9])
    size = (28, 28)
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
