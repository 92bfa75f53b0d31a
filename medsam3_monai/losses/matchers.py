"""Query-to-target matchers of SAM3 training: one-to-one Hungarian and one-to-many (DAC-DETR style).

Matches are triples (find-query b, object query q, packed target t), the layout of SAM3's training code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from ..boxes import cxcywh_to_xyxy, pairwise_giou, pairwise_iou
from .targets import FindTargets


@dataclass
class Matches:
    """Matched pairs: ``batch_idx``, ``query_idx`` index the predictions, ``target_idx`` the packed targets (all (K,))."""

    batch_idx: torch.Tensor
    query_idx: torch.Tensor
    target_idx: torch.Tensor

    def __len__(self) -> int:
        return int(self.batch_idx.numel())

    @classmethod
    def empty(cls, device: torch.device) -> "Matches":
        none = torch.zeros(0, dtype=torch.long, device=device)
        return cls(none, none.clone(), none.clone())


class HungarianMatcher:
    """One-to-one matching per find-query by scipy's ``linear_sum_assignment``.

    cost = cost_bbox * L1(cxcywh) + cost_class * focal_class - cost_giou * GIoU(xyxy), with
    focal_class = alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p)), p = sigmoid(logit).
    Find-queries without targets are skipped.
    """

    def __init__(
        self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0, alpha: float = 0.25, gamma: float = 2.0
    ) -> None:
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
        """(B, Q, M) matching cost of logits (B, Q), boxes (B, Q, 4) and padded targets (B, M, 4), all cxcywh."""
        cost_bbox = torch.cdist(boxes.float(), target_boxes.float(), p=1)
        cost_giou = -pairwise_giou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(target_boxes.float()))
        logits = logits.float()
        prob = logits.sigmoid()
        cost_class = (
            -self.alpha * (1 - prob) ** self.gamma * F.logsigmoid(logits)
            + (1 - self.alpha) * prob**self.gamma * F.logsigmoid(-logits)
        )
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class[..., None] + self.cost_giou * cost_giou

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, boxes: torch.Tensor, targets: FindTargets) -> Matches:
        """Match logits (B, Q) and boxes (B, Q, 4) cxcywh to ``targets``."""
        device = logits.device
        if targets.boxes.shape[0] == 0:
            return Matches.empty(device)
        padded, _ = targets.padded()
        cost = self.cost_matrix(logits, boxes, padded.to(device)).cpu().numpy()
        counts = targets.num_boxes.tolist()
        offsets = targets.offsets().tolist()
        batch, queries, target = [], [], []
        for b, n in enumerate(counts):
            if n == 0:
                continue
            rows, cols = linear_sum_assignment(cost[b, :, :n])
            batch.append(np.full(len(rows), b))
            queries.append(rows)
            target.append(cols + offsets[b])
        as_long = lambda parts: torch.as_tensor(np.concatenate(parts), dtype=torch.long, device=device)  # noqa: E731
        return Matches(as_long(batch), as_long(queries), as_long(target))


class OneToManyMatcher:
    """One-to-many matching: a (query, target) pair matches when its score alpha * p + (1 - alpha) * IoU
    exceeds both the (1 - topk / Q) quantile over queries and ``threshold``. A query may match several targets."""

    def __init__(self, alpha: float = 0.3, threshold: float = 0.4, topk: int = 4) -> None:
        self.alpha, self.threshold, self.topk = alpha, threshold, topk

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, boxes: torch.Tensor, targets: FindTargets) -> Matches:
        device = logits.device
        padded, valid = targets.padded()
        if padded.shape[1] == 0:
            return Matches.empty(device)
        padded, valid = padded.to(device), valid.to(device)
        num_queries = logits.shape[1]
        iou, _ = pairwise_iou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(padded.float()))
        score = self.alpha * logits.float().sigmoid()[..., None] + (1 - self.alpha) * iou
        score = torch.where(valid[:, None, :], score, torch.full_like(score, -1e9))
        level = max(0.0, 1 - self.topk / num_queries)  # fewer queries than topk: every query is a candidate
        quantile = torch.quantile(score, level, dim=1, keepdim=True)
        matched = (score > quantile) & (score > self.threshold) & valid[:, None, :]
        batch, query, slot = torch.nonzero(matched, as_tuple=True)
        return Matches(batch, query, slot + targets.offsets().to(device)[batch])
