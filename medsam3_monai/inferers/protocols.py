"""Turning detector outputs into one mask per prompt: the functions of the protocols registered in
:mod:`medsam3_monai.protocol_registry` (definitions in ``bundles/medsam3/docs/conventions.md``), and logit upsampling.

Each protocol function is ``(outputs, size, score_threshold) -> (logits (B, H, W) float32, scores (B,))``; ``size``
None keeps the logits at the masks' own resolution (S / 3.5: 288 px at SAM3's 1008), for a way back that resizes
them once, straight to the picture's size, as SAM3's ``Sam3Processor`` does.
:func:`prompt_logits` runs the detector and keeps only that, chunk by chunk of find-queries.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..networks.outputs import MedSAM3Output, logit_size, upsample_logits
from ..protocol_registry import get_protocol

#: logit of "no mask here": finite, so that bilinear inversion never mixes infinities into NaN
EMPTY_LOGIT = -1.0e4
#: logit written for a pixel of a binary mask (the volume path's slices): finite, the mirror of EMPTY_LOGIT
MASK_LOGIT = 1.0e4


def top_query_logits(outputs: MedSAM3Output, size: int | tuple[int, int] | None,
                     score_threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The papers' protocol: mask logits (B, H, W) of each prompt's highest-scoring query (whatever its score;
    ``score_threshold`` is not used), and that score (B,)."""
    scores = outputs.scores
    best = scores.argmax(dim=1)
    rows = torch.arange(scores.shape[0], device=scores.device)
    logits = outputs.pred_masks[rows, best][:, None]
    return upsample_logits(logits, size)[:, 0], scores[rows, best]


def top_query_floor_logits(outputs: MedSAM3Output, size: int | tuple[int, int] | None,
                           score_threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`top_query_logits` with a score floor: a prompt whose best query scores below ``score_threshold`` gets
    an empty mask (``EMPTY_LOGIT``), as the Medical-SAM3 release's 2D evaluation does with 0.1; (B, H, W), (B,)."""
    logits, scores = top_query_logits(outputs, size)
    logits[scores < score_threshold] = EMPTY_LOGIT
    return logits, scores


def threshold_logits(outputs: MedSAM3Output, size: int | tuple[int, int] | None, score_threshold: float = 0.5,
                     chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of the queries with score >= ``score_threshold``: the pixel-wise max of their logits (so ``> 0`` is
    exactly the union) and the highest kept score; with none kept, ``EMPTY_LOGIT`` and the best query's score.
    Only kept queries are upsampled, ``chunk`` at a time (at 1008 px a query's map is 4 MB)."""
    scores = outputs.scores.float()
    size = logit_size(size, outputs.pred_masks)
    logits = torch.full((scores.shape[0], *size), EMPTY_LOGIT, dtype=torch.float32, device=scores.device)
    chosen = scores.max(dim=1).values
    for b in range(scores.shape[0]):
        keep = torch.nonzero(scores[b] >= score_threshold).flatten()
        if keep.numel() == 0:
            continue
        chosen[b] = scores[b, keep].max()
        for start in range(0, keep.numel(), chunk):
            part = upsample_logits(outputs.pred_masks[b, keep[start:start + chunk]][None], size)[0]
            logits[b] = torch.maximum(logits[b], part.amax(dim=0))
    return logits, chosen


def semantic_logits(outputs: MedSAM3Output, size: int | tuple[int, int] | None,
                    score_threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The semantic head's logits (B, H, W) and sigmoid(presence logit) (B,) as the score."""
    return upsample_logits(outputs.semantic_seg, size)[:, 0], outputs.presence_logits[:, 0].float().sigmoid()


def detector_chunks(network: torch.nn.Module, images: torch.Tensor, prompts: Sequence[str] | None,
                    **kwargs: Any) -> Iterator[tuple[int, int, MedSAM3Output]]:
    """``(start, stop, outputs)`` of the detector's find-queries ``start:stop``: ``network.forward_chunks`` (a
    ``MedSAM3Net``: the ViT once, the detector on at most ``network.detector_chunk`` queries at a time), or one
    forward of all of them for a network without it. ``kwargs``: the forward's (``image_ids``, ``boxes``, ...)."""
    chunks = getattr(network, "forward_chunks", None)
    if chunks is not None:
        yield from chunks(images, prompts, **kwargs)
        return
    count = len(prompts) if prompts is not None else int(kwargs["boxes"].shape[0])
    yield 0, count, network(images, prompts, **kwargs)


def prompt_logits(network: torch.nn.Module, images: torch.Tensor, prompts: Sequence[str] | None,
                  protocols: Sequence[str], size: int | tuple[int, int] | None, score_threshold: float = 0.5,
                  at_mask_size: bool = False, **kwargs: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The detector on B find-queries -> per protocol name, the (B, H, W) mask logits at ``size`` (None: the masks'
    own) and (B,) scores; ``at_mask_size``: at the masks' own resolution, but for a protocol that unites several
    queries' masks (``Protocol.unites_queries``), made at ``size``.

    The queries go through :func:`detector_chunks`; of each chunk's outputs only the protocols' logits and scores
    are kept, so the detector's memory is that of one chunk whatever B is. ``kwargs``: the forward's."""
    names = list(dict.fromkeys(protocols))
    sizes = {name: None if at_mask_size and not get_protocol(name).unites_queries else size for name in names}
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in names}
    for _, _, outputs in detector_chunks(network, images, prompts, **kwargs):
        for name in names:
            parts[name].append(get_protocol(name).logits(outputs, sizes[name], score_threshold))
        del outputs
    return {name: (torch.cat([p[0] for p in found]), torch.cat([p[1] for p in found])) if len(found) > 1
            else found[0] for name, found in parts.items()}


def dice_per_prompt(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Dice (B,) of boolean masks (B, H, W); 1 when both are empty."""
    pred, truth = pred.flatten(1).float(), truth.flatten(1).float()
    inter = (pred * truth).sum(1)
    total = pred.sum(1) + truth.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp(min=1e-9), torch.ones_like(total))
