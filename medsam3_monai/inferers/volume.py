"""3D inference: every slice of a volume through the detector, then SAM3's tracker propagates the most
confident slice's mask through the volume with its memory, both ways; detected and propagated masks merge
per slice.

Per prompt ``p`` and slice ``z`` (all in slice space, S x S):

* detector: ``det[p, z]`` = the highest-scoring query's mask (upsampled logits > 0), ``score[p, z]`` its
  score ``sigmoid(logit) * sigmoid(presence)`` (the paper's top-query protocol, :func:`top_query_logits`);
* seed: ``seed[p]`` = the slice with the highest score among those with ``score >= score_threshold`` **and**
  a non-empty ``det`` mask (an empty mask is no prompt for the tracker); ties go to the lowest index;
  ``-1`` when there is none;
* tracker (only when a tracker is given and ``seed[p] >= 0``): prompted with ``det[p, seed]`` as a mask on
  the seed slice, it propagates to the last slice (forward) and then to slice 0 (backward) in one session,
  as Meta's SAM3 video predictor does (the backward pass can see the forward pass's memories next to the
  seed); ``trk[p, z]`` = its mask (upsampled logits > 0, empty where its object score says "absent");
* merge: ``mask[p, z] = (det[p, z] if score[p, z] >= score_threshold) OR trk[p, z]`` — the detection where
  the detector is confident, united with the propagated mask everywhere; empty where neither. With no seed
  the prompt's masks are all empty (no slice is confident, so the detector contributes nothing either).

Vision features. transformers' ``Sam3TrackerVideoModel`` carries its own vision encoder (ViT + the tracker's
FPN neck); in SAM3's video model the tracker instead reads the detector's ViT output through its own neck
(``tracker_neck``), and ``Sam3TrackerVideoModel.from_pretrained(<facebook/sam3 folder>)`` copies the
detector's ViT into the tracker. We therefore *share* the ViT pass when the tracker's ViT weights are the
detector's (the same module, as :func:`build_tracker` ties it with ``detector=``, or equal tensors, as when
both come from one facebook/sam3 folder): the detector's ViT output of each slice goes through the tracker's
neck, and the tracker never runs its ViT. This is exact, only faster. When the weights differ (e.g. a
fine-tuned Medical-SAM3 detector with the original tracker) the tracker runs its own ViT, so it sees the
features it was trained on; ``share_vision=True`` forces sharing (SAM3-video semantics with a swapped-in
detector), ``False`` forbids it. Either way the tracker's features of all slices are computed once, in
batches, and every prompt's session reads them from its cache: about 21 MB per slice at 1008 px (levels
0-2 after the SAM decoder projections; position encodings are shared by all slices).

Prompts propagate ``tracker_batch`` at a time through the tracker's modules (:mod:`.tracking`): each with its own
seed and memory bank, each with the masks it would get alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from tqdm import tqdm
from transformers import Sam3TrackerVideoModel

from ..networks.medsam3_net import check_pixel_range, network_pixels
from ..networks.tracker import backbone_signature, detector_config, same_backbone
from ..tensors import plain_tensor
from .bitmasks import BitMasks
from .protocols import detector_chunks, top_query_logits
from .tracking import TRACKER_BATCH, track_prompts

__all__ = [
    "VolumeSegmentation",
    "detect_slices",
    "merge_masks",
    "segment_volume",
    "select_seeds",
]


@dataclass
class VolumeSegmentation:
    """Per-prompt masks of one volume in slice space.

    Attributes:
        bits: (P, D, S, S) masks, one per prompt and slice (the merge rule in the module docstring), as
            :class:`~.bitmasks.BitMasks`: one bit a pixel on the host; ``bits[:, z].unpack()`` is slice ``z``'s.
        scores: (P, D) float32, the detector's score of the chosen (top) query on each slice.
        seed_slices: (P,) long, the most confident slice the tracker started from; -1 when no slice is
            confident (then the prompt's masks are empty). Set the same way without a tracker.
    """

    bits: BitMasks
    scores: torch.Tensor
    seed_slices: torch.Tensor

    @property
    def masks(self) -> torch.Tensor:
        """(P, D, S, S) bool, all of them unpacked: P x D x S x S bytes (prefer ``bits`` slice by slice)."""
        return self.bits.unpack()


# ---------------------------------------------------------------------------------------- helpers
@contextmanager
def _eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Eval mode for the duration (dropout off, tracker inference outputs), previous modes restored after."""
    states = [(m, m.training) for m in modules if m is not None]
    for module, _ in states:
        module.eval()
    try:
        yield
    finally:
        for module, training in states:
            module.train(training)


def _check_inputs(detector: nn.Module, slices: torch.Tensor, prompts: Sequence[str], score_threshold: float,
                  batch_size: int, pixels_normalized: bool) -> tuple[torch.Tensor, list[str]]:
    if not isinstance(slices, torch.Tensor):
        raise TypeError(f"slices must be a (D, 3, S, S) tensor, got {type(slices).__name__}")
    slices = plain_tensor(slices)  # MetaTensor from the transforms: plain tensor math from here on
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"give at least one non-empty text prompt; got {prompts!r}")
    size = int(detector.image_size)
    channels = (1, 3) if slices.dtype == torch.uint8 else (3,)
    if slices.ndim != 4 or slices.shape[1] not in channels or tuple(slices.shape[-2:]) != (size, size) \
            or slices.shape[0] == 0:
        raise ValueError(
            f"slices must be (D, 3, {size}, {size}) float slices of one volume (in [0, 1], or SAM3-normalised with "
            f"pixels_normalized=True), or their uint8 levels (D, 1 or 3, {size}, {size}) (D >= 1); got "
            f"{tuple(slices.shape)} {slices.dtype}: slice with AxialSlicesd, resize with ResizeToSliced({size}), "
            "Sam3Normalized"
        )
    check_pixel_range(slices, pixels_normalized)
    if not 0.0 <= float(score_threshold) <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return slices, prompts


def _batches(total: int, size: int, progress: bool, desc: str) -> Iterator[tuple[int, int]]:
    starts = range(0, total, size)
    for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        yield start, min(start + size, total)


# ---------------------------------------------------------------------------------------- detector pass
def detect_slices(
    detector: nn.Module,
    slices: torch.Tensor,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool = False,
    vision_hook: Any = None,
    pixels_normalized: bool = False,
) -> tuple[BitMasks, torch.Tensor]:
    """Every slice x every prompt through the detector: top-query masks (P, D, S, S) (:class:`~.bitmasks.BitMasks`,
    packed as each detector chunk's come) and scores (P, D).

    ``batch_size`` slices go in per forward, each with all P prompts (the ViT runs once per slice; text
    features come from the network's cache; the detector takes the batch's ``batch_size`` x P find-queries
    ``detector_chunk`` at a time, :func:`~.protocols.detector_chunks`, keeping only each one's top-query mask).
    ``vision_hook(last_hidden_state, start, stop)`` is called with the ViT output of slices ``start:stop`` (for
    sharing it with the tracker). ``slices`` as :func:`segment_volume` takes them (``pixels_normalized``: float slices
    are SAM3-normalised, not in [0, 1]).
    """
    num_slices, size, num_prompts = slices.shape[0], slices.shape[-1], len(prompts)
    device = next(detector.parameters()).device
    masks = BitMasks.zeros(num_prompts, num_slices, size, size)
    scores = torch.zeros(num_prompts, num_slices, dtype=torch.float32)
    handle = None
    span: list[int] = [0, 0]
    if vision_hook is not None:
        vision_encoder = getattr(detector, "sam3", detector).vision_encoder
        # never traced: with the encoder compiled (``compile_network``) the hook, which differs from batch to
        # batch, runs eagerly after the compiled forward instead of making every batch recompile it; a batch padded
        # to the network's ``vision_batch`` has more rows than slices: only the slices' are handed on
        handle = vision_encoder.register_forward_hook(torch.compiler.disable(
            lambda _m, _i, out: vision_hook(out.last_hidden_state[: span[1] - span[0]], span[0], span[1])
        ))
    try:
        with torch.no_grad():
            for start, stop in _batches(num_slices, batch_size, progress, "detector"):
                span[:] = [start, stop]
                count = stop - start
                image_ids = torch.arange(count).repeat_interleave(num_prompts)
                queries = [prompt for _ in range(count) for prompt in prompts]  # slice-major
                found = BitMasks.zeros(count * num_prompts, size, size)
                best = torch.empty(count * num_prompts, dtype=torch.float32)
                pixels = network_pixels(slices[start:stop], device, pixels_normalized=pixels_normalized)
                for first, last, outputs in detector_chunks(detector, pixels, queries, image_ids=image_ids,
                                                            pixels_normalized=True):
                    logits, top = top_query_logits(outputs, size)  # (last - first, S, S), (last - first,)
                    found[first:last], best[first:last] = logits > 0, top.float().cpu()
                by_slice = found.bits.view(count, num_prompts, *found.bits.shape[1:])  # slice-major queries
                masks.bits[:, start:stop] = by_slice.transpose(0, 1)
                scores[:, start:stop] = best.view(count, num_prompts).T
    finally:
        if handle is not None:
            handle.remove()
    return masks, scores


def select_seeds(masks: BitMasks, scores: torch.Tensor, score_threshold: float) -> torch.Tensor:
    """(P,) most confident slice with score >= threshold and a non-empty mask (``masks`` (P, D, S, S)); -1 where
    there is none."""
    eligible = (scores >= score_threshold) & masks.any_pixel()
    ranked = torch.where(eligible, scores, torch.full_like(scores, -1.0))
    seeds = ranked.argmax(dim=1)  # first maximum: ties go to the lowest slice
    return torch.where(eligible.any(dim=1), seeds, torch.full_like(seeds, -1))


def merge_masks(detected: BitMasks, scores: torch.Tensor, tracked: BitMasks | None,
                score_threshold: float) -> BitMasks:
    """``(detected where score >= threshold) | tracked``, (P, D, S, S) (scores (P, D)), written into ``detected``
    (no second volume of masks)."""
    merged = detected.keep_where(scores >= score_threshold)
    return merged.or_(slice(None), tracked) if tracked is not None else merged


# ---------------------------------------------------------------------------------------- tracker pass
def _tracker_level_features(tracker: Sam3TrackerVideoModel, fpn_hidden_states: Sequence[torch.Tensor],
                            fpn_positions: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """FPN levels 0-2 -> what the tracker caches per frame: SAM-decoder projections of levels 0 and 1,
    flattened to (HW, B, C) (as ``Sam3TrackerVideoModel.get_image_features``)."""
    levels = list(fpn_hidden_states[:-1])
    levels[0] = tracker.mask_decoder.conv_s0(levels[0])
    levels[1] = tracker.mask_decoder.conv_s1(levels[1])
    feats = [level.flatten(2).permute(2, 0, 1) for level in levels]
    positions = [pos.flatten(2).permute(2, 0, 1) for pos in fpn_positions[:-1]]
    return feats, positions


class _TrackerFeatures:
    """The tracker's vision features of every slice, computed once, served to every prompt's session."""

    def __init__(self, tracker: Sam3TrackerVideoModel) -> None:
        self.tracker = tracker
        self.frames: dict[int, list[torch.Tensor]] = {}
        self.positions: list[torch.Tensor] | None = None

    def _store(self, feats: list[torch.Tensor], positions: list[torch.Tensor], start: int) -> None:
        for i in range(feats[0].shape[1]):
            # (HW, 1, C) with the same strides whatever the batch (a batch of one slice would keep its permuted
            # strides, and a compiled tracker guards on them: it would recompile)
            self.frames[start + i] = [f[:, i].contiguous().unsqueeze(1) for f in feats]
        if self.positions is None:  # sine encodings depend on the grid only: one copy for all slices
            self.positions = [p[:, :1].contiguous() for p in positions]

    @torch.no_grad()
    def from_vit_output(self, last_hidden_state: torch.Tensor, start: int, _stop: int) -> None:
        """Shared ViT: the detector's (B, HW, C) ViT output of slices ``start:stop`` through the tracker's own neck."""
        batch, tokens, channels = last_hidden_state.shape
        side = int(round(tokens**0.5))
        spatial = last_hidden_state.view(batch, side, side, channels).permute(0, 3, 1, 2)
        fpn, positions = self.tracker.vision_encoder.neck(spatial)
        self._store(*_tracker_level_features(self.tracker, fpn, positions), start)

    @torch.no_grad()
    def from_pixels(self, slices: torch.Tensor, batch_size: int, progress: bool, pixels_normalized: bool) -> None:
        """The tracker's own ViT and neck, in batches."""
        param = next(self.tracker.parameters())
        for start, stop in _batches(slices.shape[0], batch_size, progress, "tracker features"):
            pixels = network_pixels(slices[start:stop], param.device, pixels_normalized=pixels_normalized)
            vision = self.tracker.vision_encoder(pixels.to(param.dtype))
            self._store(*_tracker_level_features(self.tracker, vision.fpn_hidden_states,
                                                 vision.fpn_position_encoding), start)


def _check_tracker(detector: nn.Module, tracker: Sam3TrackerVideoModel, share_vision: bool | None) -> bool:
    """Validate the pair and decide whether the ViT pass is shared (module docstring)."""
    size = int(detector.image_size)
    if int(tracker.config.image_size) != size:
        raise ValueError(f"the tracker works at {tracker.config.image_size} px but the slices are {size} px: "
                         "build both at the same image_size")
    if tracker.vision_encoder is None:
        raise ValueError("the tracker has no vision encoder (remove_vision_encoder=True): load it with its neck")
    if share_vision is False:
        return False
    compatible = (backbone_signature(tracker.config.vision_config)
                  == backbone_signature(detector_config(detector).vision_config))
    if share_vision and not compatible:
        raise ValueError("share_vision=True but the tracker's ViT configuration differs from the detector's")
    return bool(share_vision) or (compatible and same_backbone(detector, tracker))


# ---------------------------------------------------------------------------------------- entry point
def segment_volume(
    detector: nn.Module,
    slices: torch.Tensor,
    prompts: Sequence[str],
    tracker: Sam3TrackerVideoModel | None = None,
    *,
    score_threshold: float = 0.5,
    batch_size: int = 8,
    progress: bool = False,
    share_vision: bool | None = None,
    tracker_batch: int = TRACKER_BATCH,
    pixels_normalized: bool = False,
) -> VolumeSegmentation:
    """Segment one volume per text prompt: detector on every slice, tracker both ways from the best slice.

    Args:
        detector: a :class:`~medsam3_monai.networks.MedSAM3Net` (run in eval mode here, mode restored after).
        slices: (D, 3, S, S) float slices in order, in [0, 1] (as ``MedSAM3Net`` and ``segment_image`` take
            images) or SAM3-normalised (AxialSlicesd -> ResizeToSliced -> Sam3Normalized) with
            ``pixels_normalized=True``; or their uint8 levels (D, 1 or 3, S, S) (``Sam3Normalized(levels=True)``).
            Each is normalised a batch at a time on the device (``networks.network_pixels``).
        prompts: P text prompts, each segmented independently.
        tracker: a ``Sam3TrackerVideoModel`` at the same S (:func:`~medsam3_monai.networks.tracker.build_tracker`);
            None = detector only.
        score_threshold: detector score from which a slice's detection counts (and may seed the tracker).
        batch_size: slices per detector forward (each with all P prompts) and per tracker-feature batch.
        progress: tqdm bars for the detector batches and each prompt's propagation.
        share_vision: None = share the ViT pass when the tracker's ViT weights are the detector's; True /
            False force it on / off (module docstring).
        tracker_batch: prompts propagated together (:func:`~.tracking.track_prompts`: each gets the masks it gets
            alone; 1 = one at a time).
        pixels_normalized: float ``slices`` are SAM3-normalised ([-1, 1]), not in [0, 1] (uint8 levels: ignored).

    Returns:
        :class:`VolumeSegmentation` on the CPU; the merge rule is in the module docstring.
    """
    slices, prompts = _check_inputs(detector, slices, prompts, score_threshold, batch_size, pixels_normalized)
    size = int(detector.image_size)
    shared = _check_tracker(detector, tracker, share_vision) if tracker is not None else False
    with _eval_mode(detector, tracker):
        features = _TrackerFeatures(tracker) if tracker is not None else None
        hook = features.from_vit_output if shared else None
        detected, scores = detect_slices(detector, slices, prompts, batch_size=batch_size, progress=progress,
                                         vision_hook=hook, pixels_normalized=pixels_normalized)
        seeds = select_seeds(detected, scores, score_threshold)
        masks = merge_masks(detected, scores, None, score_threshold)  # in the detections' memory
        del detected
        tracked = [(p, seed) for p, seed in enumerate(seeds.tolist()) if seed >= 0]
        if tracker is not None and tracked:
            if len(features.frames) < slices.shape[0]:  # not shared (or a detector pass that did not hand it on)
                features.from_pixels(slices, batch_size, progress, pixels_normalized)
            # a seed slice is confident, so its detection is still in masks[p, seed]
            seed_masks = torch.stack([masks[p, seed].unpack() for p, seed in tracked])
            for index, bits in track_prompts(tracker, features.frames, features.positions,
                                             [seed for _, seed in tracked], seed_masks, size,
                                             max_batch=tracker_batch, progress=progress):
                masks.or_(tracked[index][0], BitMasks(bits.cpu(), size))
    return VolumeSegmentation(bits=masks, scores=scores, seed_slices=seeds.long())
