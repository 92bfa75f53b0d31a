"""Pinned by hand-made mutants (each test fails on a plausible one-line bug the rest of the suite let pass). the way
back of a volume slice on which a single prompt other than the first is present."""
from __future__ import annotations

import torch

from medsam3_monai.inferers import postprocess
from medsam3_monai.inferers.bitmasks import BitMasks


def test_a_slice_with_only_its_second_prompt_keeps_that_prompts_mask_and_label():
    """Prompt 0 absent, prompt 1 present (a slice with the liver only): the kept map is prompt 1's, labelled with
    its value -- not prompt 0's empty map in its place."""
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[1, 4:10, 5:12] = True
    item = {"pred": BitMasks.pack(masks), "mask_scores": torch.tensor([0.9, 0.8, 0.7]), "prompt_values": [1, 2, 5]}
    out = postprocess.MaskLogitsd(keys="pred")(item)
    assert out[postprocess.KEPT_PROMPTS] == [1]
    assert torch.equal(out["pred"].as_tensor() > 0, masks[1:2])
    merged = postprocess.MergePromptsd(keys="pred")(out)["pred"]
    assert torch.equal(merged[0], masks[1].to(torch.uint8) * 2)
