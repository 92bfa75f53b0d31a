"""Pinned by hand-made mutants (each test fails on a plausible one-line bug the rest of the suite let pass).
merge_classes at its edges."""
from __future__ import annotations

import torch

from medsam3_monai.metrics.merge import merge_classes


def test_exactly_256_classes_keep_label_256():
    """Label 256 does not fit uint8: 256 classes need int32 already (the 300-class test leaves 256 free)."""
    conf = torch.zeros(256, 1, 2)
    conf[255, 0, 0] = 1.0
    conf[254, 0, 1] = 1.0
    labels = merge_classes(conf)
    assert labels.tolist() == [[256, 255]]
    conf = torch.zeros(255, 1, 1)
    conf[254] = 1.0
    assert merge_classes(conf).dtype == torch.uint8 and merge_classes(conf).tolist() == [[255]]


def test_without_masks_a_class_claims_where_its_confidence_exceeds_the_threshold():
    """'exceeds': a confidence equal to the threshold claims nothing."""
    conf = torch.tensor([[[0.5, 0.6]], [[0.2, 0.5]]])
    assert merge_classes(conf, threshold=0.5).tolist() == [[0, 1]]
