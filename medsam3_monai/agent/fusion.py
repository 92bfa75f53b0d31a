"""The offline planner's fusion: several phrasings of one concept, segmented together, fused by confidence.

The predictor segments all phrasings in one call. The *kept* phrasings are those whose score is at least
``keep_ratio`` x the best phrasing's score (and at least ``min_score``): :func:`kept_phrasings`, decided on the
scores before the masks are merged. The others are silenced before the merge (:func:`silence_phrasings`: they
claim no pixel), and the kept ones are merged as ``medsam3 segment`` merges several prompts (each pixel to the
highest confidence, score x sigmoid(mask logit)). The fused mask is the pixels of the kept phrasings: the union of
their masks. A phrasing far less confident than the best neither adds its pixels nor takes any from a kept one
(``keep_ratio`` 1 gives the best phrasing's own mask). With no phrasing kept (every score below ``min_score``) the
mask is empty: nothing matches. :func:`fuse_by_confidence` reads the fused mask off the merged prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Fusion", "fuse_by_confidence", "kept_phrasings", "silence_phrasings"]


@dataclass
class Fusion:
    """Result of :func:`fuse_by_confidence`.

    Attributes:
        mask: bool array in the input's geometry.
        score: the best kept phrasing's score (the best score overall when none is kept).
        table: per phrasing: text, score, pixels won in the merged map, kept.
        kept: the kept phrasings, best score first.
    """

    mask: Any
    score: float
    table: list[dict[str, Any]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def kept_phrasings(scores: Any, groups: Sequence[int], keep_ratio: float = 0.5, min_score: float = 0.0
                   ) -> list[bool]:
    """Per phrasing (``scores`` (P,); ``groups``: the concept each belongs to), whether it is kept: its score is at
    least ``keep_ratio`` x the best score of its concept's phrasings and at least ``min_score``."""
    values = [float(s) for s in scores]
    best: dict[int, float] = {}
    for group, score in zip(groups, values):
        best[group] = max(best.get(group, score), score)
    return [score >= max(keep_ratio * best[group], min_score) for group, score in zip(groups, values)]


def silence_phrasings(items: Sequence[dict[str, Any]], groups: Sequence[int], keep_ratio: float = 0.5,
                      min_score: float = 0.0) -> None:
    """Before the merge (the case's items as the ``PromptInferer`` leaves them, with their ``prompt_scores``): the
    phrasings :func:`kept_phrasings` does not keep claim no pixel, so that they neither add pixels nor take any from
    a kept one. A 2D image's mask logits of those prompts become ``EMPTY_LOGIT``; a volume slice's bit masks are
    emptied. In place."""
    import torch

    from ..inferers.bitmasks import BitMasks
    from ..inferers.postprocess import KEPT_PROMPTS
    from ..inferers.protocols import EMPTY_LOGIT

    keep = kept_phrasings(items[0]["prompt_scores"], groups, keep_ratio, min_score)
    if all(keep):
        return
    for item in items:
        pred = item["pred"]
        if isinstance(pred, BitMasks):
            pred.keep_where(torch.tensor(list(keep), dtype=torch.bool, device=pred.bits.device))
        else:  # one map per prompt, or per kept query with the prompt of each in ``kept_prompts``
            dropped = torch.tensor([not k for k in keep], dtype=torch.bool, device=pred.device)
            owners = item.get(KEPT_PROMPTS)
            pred[dropped if owners is None else dropped[torch.as_tensor(owners, device=pred.device)]] = EMPTY_LOGIT


def fuse_by_confidence(prediction: Any, keep_ratio: float = 0.5, min_score: float = 0.0) -> Fusion:
    """Fuse a multi-phrasing ``Prediction`` (see the module docstring)."""
    import numpy as np

    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep ratio must be in [0, 1], got {keep_ratio}")
    if not 0.0 <= min_score <= 1.0:
        raise ValueError(f"minimum score must be in [0, 1], got {min_score}")
    labels = prediction.label_map
    labels = np.asarray((labels.as_tensor() if hasattr(labels, "as_tensor") else labels).cpu().numpy())
    scores = [float(s) for s in prediction.scores]
    best = max(scores)
    flags = kept_phrasings(scores, [0] * len(scores), keep_ratio, min_score)
    mask = np.zeros(labels.shape, dtype=bool)
    table, kept = [], []
    for text, value, score, keep in zip(prediction.prompts, prediction.label_values, scores, flags):
        won = labels == int(value)  # its pixels in the merged map (none when it was silenced before the merge)
        if keep:
            mask |= won
            kept.append((score, text))
        table.append({"phrase": text, "score": round(score, 6), "pixels_won": int(won.sum()), "kept": keep})
    kept.sort(key=lambda pair: -pair[0])
    return Fusion(mask, kept[0][0] if kept else best, table, [text for _, text in kept])
