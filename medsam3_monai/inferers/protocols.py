"""Turning detector outputs into one mask per prompt: the functions of the protocols registered in
:mod:`medsam3_monai.protocol_registry` (definitions in ``bundles/medsam3/docs/conventions.md``), and logit upsampling.

Each protocol function is ``(outputs, size, score_threshold) -> (logits (B, H, W) float32, scores (B,))``; ``size``
None keeps the logits at the masks' own resolution (S / 3.5: 288 px at SAM3's 1008), for a way back that resizes
them once, straight to the picture's size, as SAM3's ``Sam3Processor`` does. A protocol uniting several queries'
masks (``threshold``) also has a function giving the kept queries' own maps at that resolution
(:func:`threshold_query_logits`), which that way back resizes one by one and unites at the picture's size.
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


def threshold_query_logits(outputs: MedSAM3Output, score_threshold: float = 0.5
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries :func:`threshold_logits` unites, each with its own map: (K, h, w) float32 mask logits at the masks'
    resolution, the prompt of each (K,) long in prompt order, and the scores (B,) (the best query's: the highest kept
    one when any is kept). A prompt with no kept query has one map of ``EMPTY_LOGIT``. The union of a prompt's masks
    is made where they have been resized to: ``prompt's mask = any(map > 0)`` at the picture's size."""
    scores = outputs.scores.float()
    kept = scores >= score_threshold
    none = ~kept.any(dim=1)
    first = torch.arange(scores.shape[1], device=scores.device) == 0
    owners, queries = torch.nonzero(kept | (none[:, None] & first), as_tuple=True)  # row-major: prompt order
    maps = outputs.pred_masks[owners, queries].float()
    maps[none[owners]] = EMPTY_LOGIT
    return maps, owners, scores.max(dim=1).values


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
                  at_mask_size: bool = False, **kwargs: Any
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """The detector on B find-queries -> per protocol name, ``(logits, scores, owners)``: the (B, H, W) mask logits at
    ``size`` (None: the masks' own), (B,) scores and None. ``at_mask_size``: at the masks' own resolution; a protocol
    uniting several queries' masks (``Protocol.unites_queries``) then gives its kept queries' own maps (K, h, w) and
    ``owners`` (K,), the find-query of each (:meth:`~medsam3_monai.protocol_registry.Protocol.query_logits`).

    The queries go through :func:`detector_chunks`; of each chunk's outputs only the protocols' logits and scores
    are kept, so the detector's memory is that of one chunk whatever B is. ``kwargs``: the forward's."""
    names = list(dict.fromkeys(protocols))
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {name: [] for name in names}
    for start, _, outputs in detector_chunks(network, images, prompts, **kwargs):
        for name in names:
            protocol = get_protocol(name)
            if at_mask_size and protocol.unites_queries:
                maps, owners, scores = protocol.query_logits(outputs, score_threshold)
                parts[name].append((maps, scores, owners + start))
            else:
                parts[name].append((*protocol.logits(outputs, None if at_mask_size else size, score_threshold), None))
        del outputs
    return {name: found[0] if len(found) == 1 else
            (torch.cat([p[0] for p in found]), torch.cat([p[1] for p in found]),
             None if found[0][2] is None else torch.cat([p[2] for p in found]))
            for name, found in parts.items()}


def dice_per_prompt(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Dice (B,) of boolean masks (B, H, W); 1 when both are empty."""
    pred, truth = pred.flatten(1).float(), truth.flatten(1).float()
    inter = (pred * truth).sum(1)
    total = pred.sum(1) + truth.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp(min=1e-9), torch.ones_like(total))
