"""Pinned by hand-made mutants (each test fails on a plausible one-line bug the rest of the suite let pass). the plan at
the near-end boundary (distance lookahead - 1 and lookahead from the last slice)."""
from __future__ import annotations

from medsam3_monai.inferers.tracking import plan_tracking_groups


def test_every_seed_is_planned_once_and_the_near_end_boundary_is_exact():
    lookahead, depth = 15, 100
    seeds = list(range(depth)) * 2  # every slice, twice
    groups = plan_tracking_groups(seeds, depth, lookahead, max_batch=8)
    assert sorted(m for g in groups for m in g.members) == list(range(len(seeds)))  # nobody dropped or doubled
    for g in groups:
        near = [s for s in g.seeds if depth - 1 - s < lookahead]
        if near:  # fewer than lookahead slices after the seed: only with the same seed
            assert len(set(g.seeds)) == 1, g.seeds
    # 84 has exactly lookahead slices after it (batched by window), 85 one fewer (kept apart)
    assert [g.seeds for g in plan_tracking_groups([80, 84, 85], depth, lookahead)] == [(80, 84), (85,)]
