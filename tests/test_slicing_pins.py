"""Pinned by hand-made mutants (each test fails on a plausible one-line bug the rest of the suite let pass). slicing
along an axis other than the last (axis=0/1/'auto') was never tested."""
from __future__ import annotations

import torch
from monai.data import MetaTensor

from medsam3_monai.transforms import RandAxialSliced, axial_axis


def test_foreground_biased_sampling_along_the_first_axis():
    """axis=0: the foreground is looked for along axis 0, not the default last axis."""
    label = torch.zeros(1, 10, 6, 4, dtype=torch.uint8)
    label[0, 7, 2, :] = 1  # foreground on x = 7 only (every z)
    image = MetaTensor(torch.rand(1, 10, 6, 4), affine=torch.eye(4))
    out = RandAxialSliced(num_samples=30, pos_fraction=1.0, axis=0, seed=0)({"image": image, "label": label})
    assert {s["image"].meta["slice_index"] for s in out} == {7}


def test_auto_axis_is_the_voxel_axis_pointing_head_foot():
    """A sagittal-stored volume: voxel axis 0 runs along world z (its direction column 0 is (0, 0, 2))."""
    affine = torch.tensor([[0.0, 0.0, 1.0, 0], [0.0, 1.0, 0.0, 0], [2.0, 0.0, 0.0, 0], [0, 0, 0, 1.0]])
    assert axial_axis(affine) == 0
    affine = torch.tensor([[0.0, 0.7, 0.0, 0], [0.0, 0.0, -0.7, 0], [3.0, 0.0, 0.0, 0], [0, 0, 0, 1.0]])
    assert axial_axis(affine) == 0
    affine = torch.tensor([[0.9, 0.0, 0.0, 0], [0.0, 0.0, 3.0, 0], [0.0, -0.9, 0.0, 0], [0, 0, 0, 1.0]])
    assert axial_axis(affine) == 1
