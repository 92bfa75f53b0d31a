"""Shared helpers of the network tests."""

from __future__ import annotations

import torch


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules hold the same state: the same keys and equal tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def tracker_neck(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tracker's neck as SAM3's video model stores it among an original detector's keys (``sam2_convs``: 22
    tensors of the detector neck's shapes, random values; Meta's ``sam3.pt`` holds 1156 detector tensors, the image
    model 1134)."""
    return {k.replace(".convs.", ".sam2_convs."): torch.randn(v.shape) for k, v in original.items()
            if k.startswith("backbone.vision_backbone.convs.")}
