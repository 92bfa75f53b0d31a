"""What the losses' other tests left free, pinned: each test here fails on a plausible one-line bug that passed the
rest (hand-made mutants). Targets packed past earlier find-queries in both matchers, the one-to-many match strictly
above its quantile and threshold, the default weights and matcher settings of DESIGN.md and train.json, the soft
target's floor, and N averaged over ranks."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from medsam3_monai.boxes import cxcywh_to_xyxy
from medsam3_monai.losses import (CriterionSettings, FindTargets, HungarianMatcher, Matches, OneToManyMatcher,
                                  SetCriterion)
from medsam3_monai.losses.criterion import LossWeights


def _brute_force(cost: torch.Tensor) -> float:
    """Minimum total cost of assigning every column (target) to a distinct row (query)."""
    q, n = cost.shape
    return min(sum(cost[r, c].item() for c, r in enumerate(rows)) for rows in itertools.permutations(range(q), n))


def test_hungarian_target_indices_are_packed_past_earlier_find_queries():
    """Find-query 1's targets are packed after find-query 0's: its pairs must name targets 1 and 2, not 0 and 1,
    and each pair must be the optimal assignment of that find-query's own targets."""
    generator = torch.Generator().manual_seed(3)
    boxes = torch.rand(2, 4, 4, generator=generator) * 0.4 + 0.3
    logits = torch.randn(2, 4, generator=generator)
    tgt0 = torch.tensor([[0.3, 0.3, 0.2, 0.2]])
    tgt1 = torch.tensor([[0.6, 0.6, 0.3, 0.2], [0.4, 0.5, 0.2, 0.4]])
    targets = FindTargets.from_instances([tgt0, tgt1])
    matcher = HungarianMatcher()
    matches = matcher(logits, boxes, targets)
    by_row = {b: sorted(t for bb, t in zip(matches.batch_idx.tolist(), matches.target_idx.tolist()) if bb == b)
              for b in (0, 1)}
    assert by_row == {0: [0], 1: [1, 2]}
    for b, own in ((0, tgt0), (1, tgt1)):
        cost = matcher.cost_matrix(logits[b:b + 1], boxes[b:b + 1], own[None])[0]
        chosen = sum(cost[q, t - (0 if b == 0 else 1)].item()
                     for bb, q, t in zip(*(m.tolist() for m in (matches.batch_idx, matches.query_idx,
                                                                  matches.target_idx)))
                     if bb == b)
        assert chosen == pytest.approx(_brute_force(cost), rel=1e-6)


def test_one_to_many_target_indices_are_packed_past_earlier_find_queries():
    """Find-query 1's one-to-many pairs name its own packed targets (1 and 2), with the query that fits each."""
    # query j of find-query 1 sits exactly on target j (IoU 1), the others far away
    far = [0.05, 0.05, 0.02, 0.02]
    t0, t1a, t1b = [0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]
    boxes = torch.tensor([[t0, far, far, far], [t1a, t1b, far, far]])
    targets = FindTargets.from_instances([torch.tensor([t0]), torch.tensor([t1a, t1b])])
    matches = OneToManyMatcher(topk=1)(torch.zeros(2, 4), boxes, targets)
    triples = sorted(zip(*(m.tolist() for m in (matches.batch_idx, matches.query_idx, matches.target_idx))))
    assert triples == [(0, 0, 0), (1, 0, 1), (1, 1, 2)]


def test_one_to_many_ties_at_the_quantile_do_not_match_as_in_sam3():
    """SAM3 matches scores strictly above the quantile and the threshold: identical queries (all equal scores, e.g.
    a collapsed or freshly initialised decoder) match nothing."""
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4]] * 8])
    targets = FindTargets.from_instances([torch.tensor([[0.5, 0.5, 0.4, 0.4]])])
    matches = OneToManyMatcher()(torch.zeros(1, 8), boxes, targets)
    assert len(matches) == 0


def test_one_to_many_threshold_is_strict():
    # score = 0.3 * sigmoid(logit) + 0.7 * IoU = 0.4 exactly for IoU 0.4 / 0.7 ... use alpha 1 so score = p
    matcher = OneToManyMatcher(alpha=1.0, threshold=0.5, topk=8)  # every query above the 0-quantile but one
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -5.0]])  # p = 0.5 exactly == threshold
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4]] * 8])
    assert len(matcher(logits, boxes, FindTargets.from_instances([torch.tensor([[0.5, 0.5, 0.4, 0.4]])]))) == 0


def test_the_default_loss_weights_and_matcher_settings_are_sam3s():
    """DESIGN.md: bbox 5, GIoU 2, ce 20, presence 20, mask 200, dice 10, L_seg focal 20 + dice 30, seg-presence 1,
    o2m 2; Hungarian 2 / 5 / 2 with alpha 0.25 gamma 2; one-to-many alpha 0.3, threshold 0.4, topk 4."""
    from dataclasses import asdict
    assert asdict(LossWeights()) == {"bbox": 5.0, "giou": 2.0, "ce": 20.0, "presence": 20.0, "mask": 200.0,
                                     "dice": 10.0, "semantic_seg": 20.0, "semantic_dice": 30.0,
                                     "semantic_presence": 1.0, "o2m": 2.0}
    assert HungarianMatcher().settings() == {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0, "alpha": 0.25,
                                             "gamma": 2.0}
    assert OneToManyMatcher().settings() == {"alpha": 0.3, "threshold": 0.4, "topk": 4}


def test_the_bundles_loss_block_is_the_python_defaults():
    """train.json spells every weight and matcher setting: they must be the documented defaults."""
    import json
    from dataclasses import asdict
    from pathlib import Path
    config = json.loads((Path(__file__).resolve().parents[1] / "bundles/medsam3/configs/train.json").read_text())
    assert config["loss_weights"] == asdict(LossWeights())
    assert config["matcher"] == HungarianMatcher().settings()
    assert config["o2m_matcher"] == OneToManyMatcher().settings()


def sig(x):
    return 1 / (1 + math.exp(-x))


def bce(x, t):
    return -(t * math.log(sig(x)) + (1 - t) * math.log(1 - sig(x)))


def test_a_matched_query_without_overlap_gets_the_soft_target_floor_0_01():
    """t = max(p^0.25 IoU^0.75, 0.01): a matched query whose box misses its target (IoU 0) learns towards 0.01."""
    logits = torch.tensor([[0.4]])
    boxes = cxcywh_to_xyxy(torch.tensor([[[0.2, 0.2, 0.1, 0.1]]]))
    targets = FindTargets.from_instances([torch.tensor([[0.8, 0.8, 0.1, 0.1]])])
    matches = Matches(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    criterion = SetCriterion(settings=CriterionSettings(normalization="local"))
    loss = criterion.classification_terms(logits, boxes, None, targets, matches)["loss_ce"].item()
    assert loss == pytest.approx(10 * bce(0.4, 0.01) / 200, rel=1e-6)


def test_global_normalisation_averages_the_instance_count_over_ranks(monkeypatch):
    """N = (sum of every rank's targets) / world size, as SAM3: two ranks with 3 and 1 targets give N = 2."""
    from medsam3_monai.losses import criterion as criterion_module

    fake = criterion_module.dist
    monkeypatch.setattr(fake, "is_initialized", lambda: True)
    monkeypatch.setattr(fake, "get_world_size", lambda: 2)
    monkeypatch.setattr(fake, "all_reduce", lambda tensor: tensor.add_(1.0))  # the other rank holds 1 target
    targets = FindTargets.from_instances([torch.rand(3, 4) * 0.2 + 0.3])
    assert SetCriterion().num_instances(targets).item() == 2.0
