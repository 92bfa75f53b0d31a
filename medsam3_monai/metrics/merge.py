"""Multi-class merge: independent per-class predictions → one label map.

The evaluation protocol queries each class of a multi-class dataset with its own prompt, so two classes can
claim the same pixel. The rule (``bundles/medsam3/docs/conventions.md``, Multi-class images): a pixel claimed by several classes goes to
the class with the highest confidence there (pixel-wise maximum); a pixel no class claims is background 0.
Labels are 1..C in prompt order (channel ``c`` → label ``c + 1``); exact ties go to the earlier prompt.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["merge_classes"]


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.from_numpy(np.ascontiguousarray(x))


def merge_classes(confidence, masks=None, threshold: float = 0.5):
    """Label map (H, W) or (D, H, W) from per-class confidences (C, H, W) or (C, D, H, W).

    Args:
        confidence: per-class probability / confidence maps, one channel per prompt in prompt order
            (e.g. sigmoid(mask logit) × query score). Any real values; only their order per pixel matters.
        masks: per-class binary masks of the same shape (the pixels each class claims). When None, a class
            claims the pixels where its confidence exceeds ``threshold``.
        threshold: used only when ``masks`` is None.

    Returns:
        The label map, same library (torch / numpy) and device as ``confidence``; dtype uint8 for up to 255
        classes, else int32. 0 = background, c + 1 = channel c.
    """
    conf = _as_tensor(confidence)
    if conf.ndim not in (3, 4):
        raise ValueError(f"confidence must be (C, H, W) or (C, D, H, W), got shape {tuple(conf.shape)}")
    if masks is None:
        claim = conf > threshold
    else:
        claim = _as_tensor(masks).to(conf.device)
        if claim.shape != conf.shape:
            raise ValueError(f"masks shape {tuple(claim.shape)} differs from confidence shape {tuple(conf.shape)}")
        claim = claim != 0
    n_classes = conf.shape[0]
    dtype = torch.uint8 if n_classes <= 255 else torch.int32
    if n_classes == 0:
        labels = torch.zeros(conf.shape[1:], dtype=dtype, device=conf.device)
    else:
        scored = torch.where(claim, conf if conf.is_floating_point() else conf.float(), -torch.inf)
        # first maximum wins ties (earlier prompt); max(dim) is argmax(dim)'s result at several times its speed on
        # a CPU, where a reduction over the leading dimension is slow
        best = scored.max(dim=0).indices
        labels = torch.where(claim.any(dim=0), best + 1, torch.zeros_like(best)).to(dtype)
    if isinstance(confidence, torch.Tensor):
        return labels
    return labels.numpy()
