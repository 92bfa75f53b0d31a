"""Plain tensors out of MONAI's ``MetaTensor`` (or arrays), for code that reads values, not metadata."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["plain_tensor"]


def plain_tensor(x: Any) -> torch.Tensor:
    """``x`` as a plain ``torch.Tensor``: a tensor subclass such as ``MetaTensor`` as a view (same storage, same
    autograd history; what ``MetaTensor.as_tensor`` returns), anything else through ``torch.as_tensor``.

    A subclass runs every operation through its ``__torch_function__``: in the network that cost a training step of
    the tiny network 1.5x the time and its forward 2x, for metadata the network never reads."""
    if isinstance(x, torch.Tensor):
        return x if type(x) is torch.Tensor else x.as_subclass(torch.Tensor)
    return torch.as_tensor(x)
