"""Turning detector outputs into one mask per prompt: the papers' protocols."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..networks.outputs import MedSAM3Output


def upsample_logits(logits: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of (B, K, h, w) mask logits to ``size``, in float32."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(logits.shape[-2:]) == size:
        return logits.float()
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def top_query_logits(outputs: MedSAM3Output, size: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's protocol: mask logits (B, H, W) of each prompt's highest-scoring query, and its score (B,)."""
    scores = outputs.scores
    best = scores.argmax(dim=1)
    rows = torch.arange(scores.shape[0], device=scores.device)
    logits = outputs.pred_masks[rows, best][:, None]
    return upsample_logits(logits, size)[:, 0], scores[rows, best]


def dice_per_prompt(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Dice (B,) of boolean masks (B, H, W); 1 when both are empty."""
    pred, truth = pred.flatten(1).float(), truth.flatten(1).float()
    inter = (pred * truth).sum(1)
    total = pred.sum(1) + truth.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp(min=1e-9), torch.ones_like(total))
