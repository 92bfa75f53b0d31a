"""Pinned by hand-made mutants (each test fails on a plausible one-line bug the rest of the suite let pass).
volume/tracking mutants that the suite left alive."""
from __future__ import annotations

import pytest
import torch

from medsam3_monai.inferers.bitmasks import BitMasks
from medsam3_monai.inferers.volume import merge_masks, segment_volume, select_seeds

from test_volume_inference import (PROMPTS, S, PropagationSpy, detector, hand_set_detections,  # noqa: F401, F811
                                         random_slices, tracker)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_seed_on_slice_1_tracks_back_to_slice_0(monkeypatch, detector, tracker):
    """Every seed past slice 0 has a backward pass: a seed on slice 1 still reaches slice 0."""
    hand_set_detections(monkeypatch, 4, confident={0: 1})
    spy = PropagationSpy(tracker, monkeypatch)
    result = segment_volume(detector, random_slices(4), PROMPTS[:1], tracker)
    assert [visited for _, _, visited in spy.runs] == [[1, 2, 3], [1, 0]]
    assert result.masks[0, 0].any()


def test_tracked_masks_go_to_their_own_prompt_when_an_earlier_prompt_has_no_seed(monkeypatch, detector, tracker):
    """Prompt 0 is never confident, prompt 1 is: the propagation is prompt 1's, prompt 0 stays empty."""
    hand_set_detections(monkeypatch, 5, confident={1: 2})
    result = segment_volume(detector, random_slices(5), PROMPTS, tracker)
    assert result.seed_slices.tolist() == [-1, 2]
    assert not result.masks[0].any()
    assert result.masks[1].flatten(1).any(1).all()


def test_a_score_exactly_at_the_threshold_counts():
    """The rule is score >= threshold, for the seed and for the merge."""
    masks = BitMasks.pack(torch.ones(1, 3, 8, 8, dtype=torch.bool))
    scores = torch.tensor([[0.25, 0.5, 0.25]])
    assert select_seeds(masks, scores, 0.5).tolist() == [1]
    merged = merge_masks(BitMasks.pack(torch.ones(1, 3, 8, 8, dtype=torch.bool)), scores, None, 0.5)
    assert merged.unpack()[0].flatten(1).any(1).tolist() == [False, True, False]
