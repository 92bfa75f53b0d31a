"""Query-to-target matchers of SAM3 training: one-to-one Hungarian and one-to-many (DAC-DETR style).

Matches are triples (find-query b, object query q, packed target t), the layout of SAM3's training code; both
matchers also take several decoder layers at once, find-query b of layer l then being row ``l * B + b``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from ..boxes import cxcywh_to_xyxy, pairwise_giou, pairwise_iou
from ..bundle import number_in, whole_number
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

    @classmethod
    def stacked(cls, parts: "list[Matches]", rows: list[int]) -> "Matches":
        """The matches of row blocks one after the other: part k's ``batch_idx`` moved past the ``rows`` of the
        parts before it (e.g. the auxiliary layers' matches, then the last layer's)."""
        starts = [sum(rows[:k]) for k in range(len(parts))]
        return cls(torch.cat([part.batch_idx + start for part, start in zip(parts, starts)]),
                   torch.cat([part.query_idx for part in parts]), torch.cat([part.target_idx for part in parts]))

    def tail(self, count: int, first_row: int) -> "Matches":
        """The last ``count`` pairs, their rows counted from ``first_row`` (e.g. the last layer's Hungarian matches
        of a several-layer call, whose pairs come in row order)."""
        start = len(self) - count
        return Matches(self.batch_idx[start:] - first_row, self.query_idx[start:], self.target_idx[start:])


class HungarianMatcher:
    """One-to-one matching per find-query by scipy's ``linear_sum_assignment``.

    cost = cost_bbox * L1(cxcywh) + cost_class * focal_class - cost_giou * GIoU(xyxy), with
    focal_class = alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p)), p = sigmoid(logit).
    Find-queries without targets are skipped.
    """

    def __init__(
        self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0, alpha: float = 0.25, gamma: float = 2.0
    ) -> None:
        for name, value in (("cost_class", cost_class), ("cost_bbox", cost_bbox), ("cost_giou", cost_giou),
                            ("gamma", gamma)):
            if not number_in(value, 0.0):
                raise ValueError(f"the Hungarian matcher's {name} must be a number >= 0, got {value!r}")
        if not number_in(alpha, 0.0, 1.0):
            raise ValueError(f"the Hungarian matcher's alpha must be a number in [0, 1], got {alpha!r}")
        self.cost_class, self.cost_bbox, self.cost_giou = float(cost_class), float(cost_bbox), float(cost_giou)
        self.alpha, self.gamma = float(alpha), float(gamma)

    def settings(self) -> dict[str, float]:
        """The costs and the focal term's alpha and gamma (the constructor's arguments)."""
        return {"cost_class": self.cost_class, "cost_bbox": self.cost_bbox, "cost_giou": self.cost_giou,
                "alpha": self.alpha, "gamma": self.gamma}

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
        """Match logits (B, Q) and boxes (B, Q, 4) cxcywh to ``targets``; or several decoder layers' at once,
        (L, B, Q) and (L, B, Q, 4): one cost matrix and one copy to the host for all of them, find-query b of
        layer l being row ``l * B + b`` of the matches' ``batch_idx``. The pairs come in row order, min(n, Q) for
        a row whose find-query has n targets (:func:`pairs_per_row`)."""
        device = logits.device
        rows, row_boxes, repeats = _rows(logits, boxes, targets)
        if targets.boxes.shape[0] == 0:
            return Matches.empty(device)
        padded, _ = targets.padded()
        cost = self.cost_matrix(rows, row_boxes, padded.to(device).repeat(repeats, 1, 1)).cpu().numpy()
        counts = targets.num_boxes.tolist() * repeats
        offsets = targets.offsets().tolist() * repeats
        batch, queries, target = [], [], []
        for row, n in enumerate(counts):
            if n == 0:
                continue
            matched_queries, cols = linear_sum_assignment(cost[row, :, :n])
            batch.append(np.full(len(matched_queries), row))
            queries.append(matched_queries)
            target.append(cols + offsets[row])
        if not batch:
            return Matches.empty(device)
        as_long = lambda parts: torch.as_tensor(np.concatenate(parts), dtype=torch.long, device=device)  # noqa: E731
        return Matches(as_long(batch), as_long(queries), as_long(target))


def pairs_per_row(targets: FindTargets, num_queries: int) -> list[int]:
    """The number of Hungarian pairs of each find-query: min(n, Q) for n targets and Q queries."""
    return [min(n, num_queries) for n in targets.num_boxes.tolist()]


def _rows(logits: torch.Tensor, boxes: torch.Tensor, targets: FindTargets) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(..., B, Q) logits and (..., B, Q, 4) boxes -> (R, Q) and (R, Q, 4) rows, R = repeats x B find-queries."""
    num_queries, batch = logits.shape[-1], targets.batch_size
    rows, row_boxes = logits.reshape(-1, num_queries), boxes.reshape(-1, num_queries, 4)
    if logits.shape[-2] != batch or row_boxes.shape[0] != rows.shape[0]:
        raise ValueError(f"predictions {tuple(logits.shape)} and boxes {tuple(boxes.shape)} do not fit "
                         f"{batch} find-queries")
    return rows, row_boxes, rows.shape[0] // batch


class OneToManyMatcher:
    """One-to-many matching: a (query, target) pair matches when its score alpha * p + (1 - alpha) * IoU
    exceeds both the (1 - topk / Q) quantile over queries and ``threshold``. A query may match several targets."""

    def __init__(self, alpha: float = 0.3, threshold: float = 0.4, topk: int = 4) -> None:
        if not whole_number(topk, 1):
            raise ValueError(f"the one-to-many matcher's topk must be a whole number >= 1, got {topk!r}")
        for name, value in (("alpha", alpha), ("threshold", threshold)):
            if not number_in(value, 0.0, 1.0):
                raise ValueError(f"the one-to-many matcher's {name} must be a number in [0, 1], got {value!r}")
        self.alpha, self.threshold, self.topk = float(alpha), float(threshold), topk

    def settings(self) -> dict[str, float]:
        """alpha, threshold and topk (the constructor's arguments)."""
        return {"alpha": self.alpha, "threshold": self.threshold, "topk": self.topk}

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, boxes: torch.Tensor, targets: FindTargets) -> Matches:
        """Match logits (B, Q) and boxes (B, Q, 4) cxcywh, or (L, B, Q) and (L, B, Q, 4) of several layers at once
        (find-query b of layer l: row ``l * B + b``), to ``targets``."""
        device = logits.device
        rows, row_boxes, repeats = _rows(logits, boxes, targets)
        padded, valid = targets.padded()
        if padded.shape[1] == 0:
            return Matches.empty(device)
        padded, valid = padded.to(device).repeat(repeats, 1, 1), valid.to(device).repeat(repeats, 1)
        num_queries = rows.shape[1]
        iou, _ = pairwise_iou(cxcywh_to_xyxy(row_boxes.float()), cxcywh_to_xyxy(padded.float()))
        score = self.alpha * rows.float().sigmoid()[..., None] + (1 - self.alpha) * iou
        score = torch.where(valid[:, None, :], score, torch.full_like(score, -1e9))
        level = max(0.0, 1 - self.topk / num_queries)  # fewer queries than topk: every query is a candidate
        quantile = torch.quantile(score, level, dim=1, keepdim=True)
        matched = (score > quantile) & (score > self.threshold) & valid[:, None, :]
        batch, query, slot = torch.nonzero(matched, as_tuple=True)
        return Matches(batch, query, slot + targets.offsets().to(device).repeat(repeats)[batch])
