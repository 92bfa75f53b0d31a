"""The reference of the way back's label maps (``inferers.boundary_merge``, ``inferers.mask_merge``): MONAI
``Invertd``'s dense inverse, and which of its pixels float rounding may decide."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medsam3_monai.metrics.merge import merge_classes


def dense_label_index(maps: torch.Tensor, size: tuple[int, int], threshold: float = 0.0,
                      scores: torch.Tensor | None = None, confidence: torch.Tensor | None = None,
                      groups: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The reference, MONAI ``Invertd``'s dense inverse: every pixel resized by ``F.interpolate``, thresholded,
    merged by ``scores * sigmoid`` (or the given maps). Also returns the pixels float rounding may decide: logit
    within 1e-5 x the largest |logit| of the threshold, or two claimants' confidences that close. ``groups``: the
    maps come in consecutive groups, one per prompt, and a prompt's logit is the largest of its resized maps'."""
    logits = F.interpolate(maps[None], size, mode="bilinear", align_corners=False)[0]
    if groups is not None:
        logits = torch.stack([part.amax(dim=0) for part in logits.split(groups)])
        maps = logits  # (for the tolerance below: the same largest |logit| scale)
    masks = logits > threshold
    tolerance = 1e-5 * max(float(maps.abs().max()), abs(threshold))
    near = ((logits - threshold).abs() <= tolerance).any(0)
    if maps.shape[0] == 1:
        return masks[0].numpy().astype(np.uint8), near.numpy()
    if confidence is None:
        confidence = logits.sigmoid() if scores is None else scores[:, None, None] * logits.sigmoid()
    elif tuple(confidence.shape[-2:]) != tuple(size):
        confidence = F.interpolate(confidence[None], size, mode="bilinear", align_corners=False)[0]
    best = torch.where(masks, confidence, -torch.inf).topk(2, dim=0).values
    near |= (best[1] > -torch.inf) & (best[0] - best[1] <= 1e-5)
    return merge_classes(confidence, masks).numpy(), near.numpy()


def assert_same_labels(ours: np.ndarray, reference: tuple[np.ndarray, np.ndarray], message: str = "") -> None:
    """Equal wherever float rounding cannot decide (and such pixels are rare)."""
    labels, near = reference
    assert ours.shape == labels.shape, message
    differ = ours != labels
    assert not (differ & ~near).any(), f"{message}: {int((differ & ~near).sum())} pixels differ"
    assert differ.sum() <= max(2, near.size // 1000), message


def smooth_maps(generator: torch.Generator, prompts: int, h: int, w: int, offset: float = 0.0) -> torch.Tensor:
    """Logit maps with blob-like masks (coarse noise resized up), as a mask head gives them."""
    coarse = torch.randn(prompts, 1, max(2, h // 5), max(2, w // 5), generator=generator)
    return F.interpolate(coarse, (h, w), mode="bilinear")[:, 0] * 6 + offset
