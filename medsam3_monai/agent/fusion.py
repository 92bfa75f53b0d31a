"""The offline planner's fusion: several phrasings of one concept, segmented together, fused by confidence.

The predictor segments all phrasings in one call and merges them as ``medsam3 segment`` merges several prompts:
each pixel goes to the phrasing with the highest confidence, score x sigmoid(mask logit), among those whose mask
covers it (``metrics.merge_classes``). The fused mask is the pixels won by the *kept* phrasings: those whose score
is at least ``keep_ratio`` x the best phrasing's score (and at least ``min_score``). A phrasing far less confident
than the best does not add its pixels; where the pixels it wins are also covered by a kept phrasing's mask, they
are lost with it (its confidence there was the highest). With no phrasing kept (every score below ``min_score``)
the mask is empty: nothing matches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Fusion", "fuse_by_confidence"]


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
    bar = max(keep_ratio * best, min_score)
    mask = np.zeros(labels.shape, dtype=bool)
    table, kept = [], []
    for text, value, score in zip(prediction.prompts, prediction.label_values, scores):
        won = labels == int(value)
        keep = score >= bar
        if keep:
            mask |= won
            kept.append((score, text))
        table.append({"phrase": text, "score": round(score, 6), "pixels_won": int(won.sum()), "kept": keep})
    kept.sort(key=lambda pair: -pair[0])
    return Fusion(mask, kept[0][0] if kept else best, table, [text for _, text in kept])
