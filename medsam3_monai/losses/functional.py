"""Element-wise losses shared by the criterion terms (semantics of SAM3's training code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """RetinaNet focal loss per element (no reduction); ``alpha < 0`` disables the class balance."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def dice_loss_per_row(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - (2|P∩T| + 1) / (|P| + |T| + 1) per row of (K, P) logits and targets -> (K,)."""
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


