"""Pinned by hand-made mutants (each test fails on a plausible one-line bug the rest of the suite let pass). a concept
already among the targets as a negative is not sampled again."""
from __future__ import annotations

import torch

from medsam3_monai.transforms import RandNegativePromptsd
from medsam3_monai.transforms.targets import empty_target


def test_a_concept_already_a_negative_target_is_not_sampled_again():
    """BuildTargetsd made "liver" a negative (absent from this slice): the pool's "liver" is not added twice."""
    targets = [empty_target("liver", (40, 60), label=2)]
    targets[0]["is_negative"] = True
    d = {"targets": targets, "image": torch.zeros(3, 40, 60)}
    out = RandNegativePromptsd(concepts=["liver", "spleen"], num_negatives=2, seed=0)(d)["targets"]
    assert [t["text"] for t in out] == ["liver", "spleen"]
