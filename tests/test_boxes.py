"""The bottom-level box module: MedSAM3's T+I box prompt (largest connected component) and its padding."""

from __future__ import annotations

import torch

from medsam3_monai.boxes import BOX_PADDING_LABEL, cxcywh_to_xyxy, largest_component_box, largest_component_box_prompts


def test_largest_component_box_known_answer():
    mask = torch.zeros(10, 20, dtype=torch.bool)
    mask[1:3, 1:3] = True  # small component
    mask[4:9, 10:18] = True  # the largest: rows 4..8, cols 10..17
    box = largest_component_box(mask)
    assert torch.allclose(cxcywh_to_xyxy(box), torch.tensor([10 / 20, 4 / 10, 18 / 20, 9 / 10]))
    assert largest_component_box(torch.zeros(4, 4, dtype=torch.bool)) is None


def test_box_prompts_pad_empty_masks():
    full = torch.ones(8, 8, dtype=torch.bool)
    boxes, labels = largest_component_box_prompts([full, torch.zeros(8, 8, dtype=torch.bool)])
    assert boxes.shape == (2, 1, 4) and labels.tolist() == [[1], [BOX_PADDING_LABEL]]
    assert torch.allclose(boxes[0, 0], torch.tensor([0.5, 0.5, 1.0, 1.0])) and (boxes[1] == 0).all()


def test_largest_component_is_8_connected():
    """A diagonal chain of 4 pixels is one 8-connected component (size 4), larger than a 3-pixel bar; with
    4-connectivity the chain would split into 4 single pixels and the bar would win."""
    mask = torch.zeros(8, 8, dtype=torch.bool)
    for i in range(4):
        mask[i, i] = True  # diagonal chain: rows/cols 0..3
    mask[6, 5:8] = True  # 4-connected bar of 3 pixels
    # chain's xyxy = (0, 0, 4/8, 4/8) -> cxcywh (0.25, 0.25, 0.5, 0.5)
    torch.testing.assert_close(largest_component_box(mask), torch.tensor([0.25, 0.25, 0.5, 0.5]))
    boxes, labels = largest_component_box_prompts([mask])
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.25, 0.25, 0.5, 0.5]))
    assert labels.tolist() == [[1]]
