"""Pinned by hand-made mutants (each test fails on a plausible one-line bug the rest of the suite let pass). protocol
rules at their edges (equality with the threshold in every path, many kept queries)."""
from __future__ import annotations

import torch

from medsam3_monai.protocol_registry import get_protocol

from test_evaluation import constructed_outputs


def _at_half():
    """Query 0 scores exactly 0.5 (sigmoid(0) x sigmoid(100) in float32), query 1 far below; query 0's mask on
    pixel 1."""
    masks = torch.full((1, 2, 1, 4), -1.0)
    masks[0, 0, 0, 1] = 5.0
    outputs = constructed_outputs(masks, torch.tensor([[0.0, -3.0]]), torch.tensor([100.0]))
    assert outputs.scores[0, 0].item() == 0.5
    return outputs


def test_the_threshold_protocols_kept_query_maps_keep_a_score_equal_to_the_threshold():
    """The at-mask-size path (PromptInferer: segment, evaluate, serve) keeps it, as threshold_logits does."""
    maps, owners, _ = get_protocol("threshold").query_logits(_at_half(), 0.5)
    assert owners.tolist() == [0] and (maps[0, 0] > 0).tolist() == [False, True, False, False]


def test_the_floor_keeps_a_best_score_equal_to_it():
    """top_query_floor empties a prompt whose best score is *below* the floor."""
    logits, _ = get_protocol("top_query_floor").logits(_at_half(), (1, 4), 0.5)
    assert (logits[0] > 0).tolist() == [[False, True, False, False]]


def test_threshold_unites_more_queries_than_one_upsampling_chunk():
    """20 kept queries (more than threshold_logits' chunk of 16), each with its own pixel: all 20 in the union."""
    queries = 20
    masks = torch.full((1, queries, 1, queries), -1.0)
    for q in range(queries):
        masks[0, q, 0, q] = 5.0
    outputs = constructed_outputs(masks, torch.full((1, queries), 3.0), torch.tensor([100.0]))
    union, _ = get_protocol("threshold").logits(outputs, (1, queries), 0.5)
    assert bool((union[0] > 0).all())
