"""Typed outputs of :class:`MedSAM3Net`, the resize of its mask logits, and unwrapping a distributed network."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def logit_size(size: int | tuple[int, int] | None, logits: torch.Tensor) -> tuple[int, int]:
    """A resize's (H, W): ``size`` (an int for S x S), or None for the (h, w) of ``logits`` (..., h, w) themselves."""
    return tuple(logits.shape[-2:]) if size is None else (size, size) if isinstance(size, int) else tuple(size)


def upsample_logits(logits: torch.Tensor, size: int | tuple[int, int] | None) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of (B, K, h, w) mask logits to ``size``, in float32 (SAM3's
    convention for comparing mask logits with targets, and ours for every prediction); ``None``: kept at (h, w)."""
    size = logit_size(size, logits)
    if tuple(logits.shape[-2:]) == size:
        return logits.float()
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside ``DistributedDataParallel`` and ``torch.compile`` wrappers (or the network itself)."""
    while True:
        inner = getattr(network, "module", None)  # DistributedDataParallel
        if not isinstance(inner, nn.Module):
            inner = getattr(network, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, nn.Module):
            return network
        network = inner


@dataclass
class OneToManyOutput:
    """The one-to-many (DAC) query set of a training forward: Q more queries through the same heads.

    Attributes:
        all_pred_logits: (L, B, Q) class logits of every decoder layer.
        all_pred_boxes: (L, B, Q, 4) boxes xyxy in [0, 1].
        all_pred_boxes_cxcywh: (L, B, Q, 4) the same boxes as normalised cx, cy, w, h.
        pred_masks: (B, Q, H, W) last-layer instance mask logits.
    """

    all_pred_logits: torch.Tensor
    all_pred_boxes: torch.Tensor
    all_pred_boxes_cxcywh: torch.Tensor
    pred_masks: torch.Tensor


@dataclass
class MedSAM3Output:
    """Detector outputs for B find-queries (one (image, prompt) pair each), Q object queries, L decoder layers.

    Attributes:
        all_pred_logits: (L, B, Q) class logits of every decoder layer (last = ``pred_logits``).
        all_pred_boxes: (L, B, Q, 4) boxes xyxy in [0, 1] of every decoder layer.
        all_pred_boxes_cxcywh: (L, B, Q, 4) the same boxes as normalised cx, cy, w, h.
        all_presence_logits: (L, B, 1) presence-token logits of every decoder layer.
        pred_masks: (B, Q, H, W) last-layer instance mask logits; H = W = S / 14 * 4 (288 at 1008 px).
        semantic_seg: (B, 1, H, W) semantic-head logits (union of the prompt's instances).
        query_hidden_states: (B, Q, C) last-layer normalised query features.
        one_to_many: the one-to-many query set, present in training forwards only (SAM3's DAC); no presence
            output of its own.
    """

    all_pred_logits: torch.Tensor
    all_pred_boxes: torch.Tensor
    all_pred_boxes_cxcywh: torch.Tensor
    all_presence_logits: torch.Tensor
    pred_masks: torch.Tensor
    semantic_seg: torch.Tensor
    query_hidden_states: torch.Tensor
    one_to_many: OneToManyOutput | None = None

    @property
    def pred_logits(self) -> torch.Tensor:
        """(B, Q) last-layer class logits."""
        return self.all_pred_logits[-1]

    @property
    def shape(self) -> torch.Size:
        """``pred_masks``' shape (B, Q, H, W): the output the bundle's metadata declares (``network_data_format``
        ``outputs.pred``: one channel per object query), which MONAI's ``verify_net_in_out`` checks."""
        return self.pred_masks.shape

    @property
    def dtype(self) -> torch.dtype:
        """``pred_masks``' dtype (see :attr:`shape`)."""
        return self.pred_masks.dtype

    @property
    def pred_boxes(self) -> torch.Tensor:
        """(B, Q, 4) last-layer boxes, xyxy in [0, 1]."""
        return self.all_pred_boxes[-1]

    @property
    def presence_logits(self) -> torch.Tensor:
        """(B, 1) last-layer presence logit."""
        return self.all_presence_logits[-1]

    @property
    def scores(self) -> torch.Tensor:
        """(B, Q) query scores sigmoid(logit) * sigmoid(presence), the detector's confidence."""
        return self.pred_logits.sigmoid() * self.presence_logits.sigmoid()

    @property
    def num_layers(self) -> int:
        return self.all_pred_logits.shape[0]
