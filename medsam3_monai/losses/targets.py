"""Targets of a batch of find-queries, packed image-major and padded (the layout of SAM3's training code)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..boxes import cxcywh_to_xyxy
from ..instance_masks import InstanceMasks


def _binary_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) 0/1 or 0/255 masks (what PIL gives) -> bool; soft masks refused rather than thresholded here."""
    if masks.is_floating_point() and bool(((masks > 0) & (masks < 1)).any()):
        raise ValueError("instance masks hold values between 0 and 1 (soft masks): the mask losses need binary "
                         "targets; threshold them first (e.g. masks > 0.5)")
    return masks > 0


@dataclass
class FindTargets:
    """Ground truth for B find-queries with N instances in all.

    Attributes:
        boxes: (N, 4) normalised cx, cy, w, h, packed image-major (query 0's instances first).
        num_boxes: (B,) instances per find-query; 0 marks a negative prompt (concept absent).
        masks: (N, H, W) bool instance masks in slice space (0/1 or 0/255 integer or float masks are made bool;
            soft masks, with values between 0 and 1, are refused) -- a tensor, or
            :class:`~medsam3_monai.instance_masks.InstanceMasks` crops (what training batches carry) made dense on
            the targets' device by :meth:`dense_masks` -- or None when the data has no masks.
        is_valid_mask: (N,) bool; invalid masks are skipped by the mask loss but still count in N.
    """

    boxes: torch.Tensor
    num_boxes: torch.Tensor
    masks: torch.Tensor | InstanceMasks | None = None
    is_valid_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.boxes, self.num_boxes = torch.as_tensor(self.boxes), torch.as_tensor(self.num_boxes)
        if isinstance(self.masks, torch.Tensor) and self.masks.dtype != torch.bool:
            self.masks = _binary_masks(self.masks)
        if self.boxes.ndim != 2 or self.boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be (N, 4) cxcywh; got {tuple(self.boxes.shape)}")
        if int(self.num_boxes.sum()) != self.boxes.shape[0]:
            raise ValueError(f"num_boxes sums to {int(self.num_boxes.sum())} but {self.boxes.shape[0]} boxes given")
        if self.masks is not None and self.masks.shape[0] != self.boxes.shape[0]:
            raise ValueError(f"{self.masks.shape[0]} masks for {self.boxes.shape[0]} boxes")
        if self.is_valid_mask is None:
            self.is_valid_mask = torch.ones(self.boxes.shape[0], dtype=torch.bool, device=self.boxes.device)
        self._dense: torch.Tensor | None = None
        self._padded: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_instances(
        cls,
        boxes: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor] | None = None,
        is_valid_mask: Sequence[torch.Tensor] | None = None,
    ) -> "FindTargets":
        """Pack per-query lists: boxes[i] (n_i, 4) cxcywh, masks[i] (n_i, H, W)."""
        device = boxes[0].device if len(boxes) else torch.device("cpu")
        packed = torch.cat([b.reshape(-1, 4).float() for b in boxes]) if len(boxes) else torch.zeros(0, 4)
        num = torch.tensor([b.reshape(-1, 4).shape[0] for b in boxes], dtype=torch.long, device=device)
        if masks is None:
            packed_masks = None
        elif all(isinstance(m, InstanceMasks) for m in masks):
            packed_masks = InstanceMasks.cat(list(masks))
        else:
            packed_masks = torch.cat([m.to_dense() if isinstance(m, InstanceMasks) else m.bool() for m in masks])
        valid = torch.cat([v.bool() for v in is_valid_mask]) if is_valid_mask is not None else None
        return cls(packed.to(device), num, packed_masks, valid)

    @property
    def batch_size(self) -> int:
        return int(self.num_boxes.shape[0])

    @property
    def boxes_xyxy(self) -> torch.Tensor:
        """(N, 4) x1, y1, x2, y2."""
        return cxcywh_to_xyxy(self.boxes)

    @property
    def image_index(self) -> torch.Tensor:
        """(N,) find-query of each packed instance (its size given: no host-device synchronisation)."""
        return torch.repeat_interleave(torch.arange(self.batch_size, device=self.boxes.device), self.num_boxes,
                                       output_size=self.boxes.shape[0])

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes (B, M, 4) with zero rows and validity (B, M), M = max instances per query (>= 1 column kept 0);
        made once (every matcher call of a criterion step uses them): do not modify them."""
        if self._padded is None:
            max_boxes = int(self.num_boxes.max()) if self.batch_size else 0
            padded = self.boxes.new_zeros(self.batch_size, max_boxes, 4)
            valid = torch.zeros(self.batch_size, max_boxes, dtype=torch.bool, device=self.boxes.device)
            image_index = self.image_index
            slot = torch.arange(self.boxes.shape[0], device=self.boxes.device) - self.offsets()[image_index]
            padded[image_index, slot] = self.boxes
            valid[image_index, slot] = True
            self._padded = (padded, valid)
        return self._padded

    def offsets(self) -> torch.Tensor:
        """(B,) index of each query's first instance in the packed tensors."""
        return torch.cumsum(self.num_boxes, 0) - self.num_boxes

    def has_target(self) -> torch.Tensor:
        """(B,) bool: the prompt has at least one visible instance (width and height > 0)."""
        visible = (self.boxes[:, 2] > 0) & (self.boxes[:, 3] > 0)
        counts = torch.zeros(self.batch_size, dtype=torch.long, device=self.boxes.device)
        counts.index_add_(0, self.image_index, visible.long())
        return counts > 0

    def dense_masks(self) -> torch.Tensor:
        """(N, H, W) bool masks on the targets' device (crops are placed there once and the tensor kept)."""
        if self.masks is None:
            raise ValueError("these targets carry no masks")
        if isinstance(self.masks, InstanceMasks):
            if self._dense is None or self._dense.device != self.boxes.device:
                self._dense = self.masks.to_dense(self.boxes.device)
            return self._dense
        return self.masks

    def semantic_masks(self) -> torch.Tensor:
        """(B, H, W) bool union of each query's instance masks (invalid ones included)."""
        masks = self.dense_masks()
        height, width = masks.shape[-2:]
        counts = torch.zeros(self.batch_size, height * width, device=masks.device)
        counts.index_add_(0, self.image_index, masks.flatten(1).float())
        return counts.view(self.batch_size, height, width) > 0

    def to(self, device: torch.device | str) -> "FindTargets":
        """On ``device`` (crops stay on the host; :meth:`dense_masks` places them on the device)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        masks = self.masks if isinstance(self.masks, InstanceMasks) else move(self.masks)
        return replace(self, boxes=move(self.boxes), num_boxes=move(self.num_boxes),
                       masks=masks, is_valid_mask=move(self.is_valid_mask))
