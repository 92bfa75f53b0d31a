"""Boxes, the bottom layer every package uses: conversions, (generalised) IoU pairwise and element-wise, SAM3's
box-prompt padding label, and the box of a mask's largest connected component (MedSAM3's T+I box prompt).

Boxes are normalised to [0, 1]: ``cxcywh`` (cx, cy, w, h; SAM3's box prompts and targets) or ``xyxy``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

#: label of a padded box-prompt slot (transformers' SAM3 convention; 1 positive, 0 negative)
BOX_PADDING_LABEL = -10


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) cx, cy, w, h -> x1, y1, x2, y2."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) x1, y1, x2, y2 -> cx, cy, w, h."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and union of every pair: a (..., N, 4), b (..., M, 4) xyxy -> (..., N, M) each."""
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = _area(a)[..., :, None] + _area(b)[..., None, :] - inter
    return inter / union, union


def pairwise_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of every pair: a (..., N, 4), b (..., M, 4) xyxy -> (..., N, M)."""
    iou, union = pairwise_iou(a, b)
    lt = torch.minimum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull


def elementwise_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and union of matched pairs: a, b (K, 4) xyxy -> (K,) each."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = _area(a) + _area(b) - inter
    return inter / union, union


def elementwise_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of matched pairs: a, b (K, 4) xyxy -> (K,)."""
    iou, union = elementwise_iou(a, b)
    lt = torch.minimum(a[:, :2], b[:, :2])
    rb = torch.maximum(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[:, 0] * wh[:, 1]
    return iou - (hull - union) / hull


def largest_component_box(mask: torch.Tensor) -> torch.Tensor | None:
    """cx, cy, w, h in [0, 1] of the largest 8-connected component of a (H, W) mask, or None when empty.

    This is MedSAM3's text + box prompt (the T+I protocol of both papers).
    """
    array = mask.detach().cpu().numpy().astype(bool)
    if not array.any():
        return None
    labels, count = ndimage.label(array, structure=np.ones((3, 3), dtype=bool))
    sizes = ndimage.sum_labels(array, labels, index=np.arange(1, count + 1))
    rows, cols = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    height, width = array.shape
    xyxy = torch.tensor([cols.min() / width, rows.min() / height, (cols.max() + 1) / width, (rows.max() + 1) / height])
    return xyxy_to_cxcywh(xyxy.float())


def largest_component_box_prompts(masks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One box prompt per (H, W) mask: boxes (P, 1, 4) cxcywh of its largest component and box_labels (P, 1),
    1, or :data:`BOX_PADDING_LABEL` for an empty mask (that prompt stays text-only)."""
    boxes = torch.zeros(len(masks), 1, 4)
    labels = torch.full((len(masks), 1), BOX_PADDING_LABEL, dtype=torch.long)
    for i, mask in enumerate(masks):
        box = largest_component_box(mask)
        if box is not None:
            boxes[i, 0], labels[i, 0] = box, 1
    return boxes, labels
