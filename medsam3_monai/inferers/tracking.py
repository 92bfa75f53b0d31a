"""Several prompts' propagations through SAM3's tracker in one batch.

Each prompt of a volume is tracked from its own seed slice (:mod:`.volume`): forward to the last slice, then
backward to slice 0, with a memory bank of its own. transformers' tracker runs one object at a time with batch
size 1, so a volume with many prompts (a multi-organ CT) launches every module once per prompt and slice. Here up to
``max_batch`` prompts go through the tracker's modules together, each in its own row of the batch, with its own
memory bank, and each gets the masks it gets alone (the same operations; batched matrix products may round
differently in the last bit).

Prompts in one batch must see the same memory bank *structure* at every step, which depends only on the number of
steps taken since the seed -- except near the volume's last slice: the backward pass reads the forward pass's
memories and object pointers up to ``lookahead`` (15 for SAM3: 16 object pointers, 7 memories) slices past the seed,
and a seed closer than that to the last slice sees fewer of them. So:

* prompts with fewer than ``lookahead`` slices after their seed batch only with prompts of the same seed;
* the others batch by seed in windows of ``SEED_WINDOW`` x the slices: they run on a common timeline, each shifted
  so that the seeds coincide, for ``(D + spread of the seeds)`` steps; a prompt's steps beyond its own slices read
  its nearest slice's features and their outputs are discarded (no other row reads them).

A session keeps the stored outputs of the slices its next steps can read (the memory bank reaches ``lookahead``
slices back, plus the forward slices next to the seed that the backward pass reads), not every slice's: a session's
memory stays bounded whatever the number of slices.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..compat import add_mask_prompt, batched_objects, encode_frame_memory, forget_frame, frame_masks, tracker_session
from ..networks.outputs import upsample_logits
from .bitmasks import BitMasks, pack_bits

__all__ = ["SEED_WINDOW", "TRACKER_BATCH", "TrackingGroup", "plan_tracking_groups", "track_prompts",
           "tracker_lookahead"]

#: prompts propagated together by default
TRACKER_BATCH = 8
#: seeds of one batch lie within this share of the slices (a batch then runs at most that share longer than one
#: prompt's propagation)
SEED_WINDOW = 0.25


def tracker_lookahead(tracker: torch.nn.Module) -> int:
    """How many slices back (in the direction of travel) a propagation step reads: the memory bank's
    ``num_maskmem - 1`` and the object pointers' ``max_object_pointers_in_encoder - 1``, whichever is more."""
    config = tracker.config
    return max(int(config.num_maskmem) - 1, int(config.max_object_pointers_in_encoder) - 1, 1)


@dataclass(frozen=True)
class TrackingGroup:
    """Prompts propagated in one batch: ``members`` (their positions in the caller's list) with their ``seeds``,
    in a volume of ``num_slices``. They run on a common timeline whose seed is the latest of theirs."""

    members: tuple[int, ...]
    seeds: tuple[int, ...]
    num_slices: int

    @property
    def seed(self) -> int:
        """The seed's step on the common timeline."""
        return max(self.seeds)

    @property
    def num_steps(self) -> int:
        """Steps on the common timeline: the latest seed plus the longest forward pass."""
        return self.seed + max(self.num_slices - 1 - s for s in self.seeds) + 1

    def slices_at(self, step: int) -> list[int]:
        """Each member's slice at ``step`` of the timeline (outside 0 .. num_slices - 1 where it has none)."""
        return [step - self.seed + s for s in self.seeds]


def plan_tracking_groups(seeds: Sequence[int], num_slices: int, lookahead: int, max_batch: int = TRACKER_BATCH,
                         window: float = SEED_WINDOW) -> list[TrackingGroup]:
    """Batches of the prompts with these ``seeds`` (module docstring): prompts closer than ``lookahead`` slices to
    the last slice only with those of the same seed; the others by seed, within ``window`` x ``num_slices`` of the
    batch's first seed; at most ``max_batch`` a batch. Groups come in seed order."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if any(not 0 <= s < num_slices for s in seeds):
        raise ValueError(f"seeds must be slices 0 .. {num_slices - 1}, got {list(seeds)}")
    order = sorted(range(len(seeds)), key=lambda i: (seeds[i], i))
    near_end = [i for i in order if num_slices - 1 - seeds[i] < lookahead]
    span = int(window * num_slices)
    groups: list[list[int]] = []
    for i in (i for i in order if num_slices - 1 - seeds[i] >= lookahead):
        if groups and len(groups[-1]) < max_batch and seeds[i] - seeds[groups[-1][0]] <= span:
            groups[-1].append(i)
        else:
            groups.append([i])
    for i in near_end:
        if groups and len(groups[-1]) < max_batch and seeds[groups[-1][0]] == seeds[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [TrackingGroup(tuple(g), tuple(int(seeds[i]) for i in g), int(num_slices)) for g in groups]


def _group_features(group: TrackingGroup, frames: Mapping[int, list[torch.Tensor]]):
    """Step -> FPN levels (HW, B, C) of each member's slice at that step (its nearest slice beyond its own)."""
    last = group.num_slices - 1

    def features(step: int) -> list[torch.Tensor]:
        members = [frames[min(max(z, 0), last)] for z in group.slices_at(step)]
        if len(members) == 1:
            return members[0]
        return [torch.cat(levels, dim=1) for levels in zip(*members)]

    return features


def _propagate_group(tracker: torch.nn.Module, group: TrackingGroup, frames: Mapping[int, list[torch.Tensor]],
                     positions: list[torch.Tensor], seed_masks: torch.Tensor, size: int, bar: tqdm) -> torch.Tensor:
    """One batch's propagation: (B, D, S, ceil(S / 8)) uint8 packed masks on the tracker's device."""
    param = next(tracker.parameters())
    lookahead = tracker_lookahead(tracker)
    session = tracker_session(group.num_steps, size, param.device, param.dtype, _group_features(group, frames),
                              positions)
    add_mask_prompt(session, obj_id=1, frame_idx=group.seed, mask=seed_masks.to(param.device))
    bits = torch.zeros(len(group.members), group.num_slices, size, -(-size // 8), dtype=torch.uint8,
                       device=param.device)
    seen = torch.zeros(len(group.members), group.num_slices, dtype=torch.bool)
    passes = [(False, range(group.seed, group.num_steps))]
    if group.seed > 0:  # as transformers' propagation: a seed on slice 0 has no backward pass
        passes.append((True, range(group.seed, -1, -1)))
    with batched_objects(tracker), torch.inference_mode():
        for reverse, steps in passes:
            for step in steps:
                tracker(session, frame_idx=step, reverse=reverse, run_mem_encoder=False)
                encode_frame_memory(tracker, session, step)
                logits = frame_masks(session, step)  # (B, 1, h, w)
                slices = torch.tensor(group.slices_at(step))
                rows = ((slices >= 0) & (slices < group.num_slices)).nonzero()[:, 0]
                if len(rows):
                    masks = upsample_logits(logits[rows.to(logits.device)].float(), size)[:, 0] > 0
                    bits[rows.to(bits.device), slices[rows].to(bits.device)] = _packed(masks)
                    bar.update(int((~seen[rows, slices[rows]]).sum()))
                    seen[rows, slices[rows]] = True
                stale = step + lookahead if reverse else step - lookahead  # no later step reads it
                if reverse or stale > group.seed + lookahead:  # the backward pass reads those after the seed
                    forget_frame(session, stale)
    return bits


def _packed(masks: torch.Tensor) -> torch.Tensor:
    """(N, S, S) bool -> (N, S, ceil(S / 8)) uint8 bits where the masks are."""
    return pack_bits(masks) if masks.device.type != "cpu" else BitMasks.pack(masks).bits


def track_prompts(tracker: torch.nn.Module, frames: Mapping[int, list[torch.Tensor]],
                  positions: list[torch.Tensor], seeds: Sequence[int], seed_masks: torch.Tensor, size: int, *,
                  max_batch: int = TRACKER_BATCH, progress: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """Propagate each prompt's seed mask from its seed slice to the last slice, then back to slice 0, batches of
    prompts at a time (module docstring).

    Args:
        tracker: a ``Sam3TrackerVideoModel`` (in eval mode).
        frames: slice -> its vision features, FPN levels 0-2 as the tracker's session caches them ((HW, 1, C)
            each, after the SAM decoder's projections); ``positions`` their position encodings (one for all slices).
        seeds: P seed slices; ``seed_masks`` (P, S, S) bool: each prompt's mask on its seed.
        size: the slice side S.
        max_batch: prompts in one batch (1: one at a time, as transformers runs them).
        progress: a tqdm bar over the prompts' slices.

    Yields:
        ``(p, bits)`` per prompt as its batch ends: ``bits`` (D, S, ceil(S / 8)) uint8, its tracked masks packed
        (:class:`~.bitmasks.BitMasks` bits) on the tracker's device.
    """
    num_slices = len(frames)
    if len(seeds) != len(seed_masks):
        raise ValueError(f"{len(seeds)} seeds for {len(seed_masks)} seed masks")
    groups = plan_tracking_groups(seeds, num_slices, tracker_lookahead(tracker), max_batch)
    with tqdm(total=len(seeds) * num_slices, desc="tracker", disable=not progress, unit="slice") as bar:
        for group in groups:
            masks = seed_masks[list(group.members)]
            bits = _propagate_group(tracker, group, frames, positions, masks, size, bar)
            for row, member in enumerate(group.members):
                yield member, bits[row]
