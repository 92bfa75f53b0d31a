"""Pinned by hand-made mutants (each test fails on a plausible one-line bug the rest of the suite let pass). intensity
rules the suite left free."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medsam3_monai.transforms import ScaleIntensityByModalityd
from medsam3_monai.transforms.intensity import CT_WINDOWS, materialize_intensity


@pytest.mark.parametrize("name, width, level", [("mediastinum", 350, 50), ("liver", 150, 30)])
def test_the_other_ct_window_presets(name, width, level):
    """test_ct_window_presets pins five of the seven presets; `--ct-window liver|mediastinum` are the other two."""
    assert CT_WINDOWS[name] == (width, level)


def test_a_constant_mri_volume_scales_to_zeros_not_nan():
    """All voxels equal: the 0.5 and 99.5 percentiles coincide; min-max gives zeros (no 0/0)."""
    volume = MetaTensor(torch.full((1, 4, 4, 3), 7.0), meta={"is_volume": True})
    out = ScaleIntensityByModalityd(modality="MRI")({"image": volume})["image"]
    assert torch.equal(out.as_tensor(), torch.zeros(1, 4, 4, 3))


def test_a_float_rgb_picture_of_whole_values_up_to_255_is_divided_by_255():
    """rgb_scale: float data of whole values in [0, 255] is 8-bit levels (/255), 255 included, not min-max."""
    x = torch.tensor([[[10.0, 128.0, 255.0]]]).repeat(3, 1, 1)
    out = ScaleIntensityByModalityd(modality="endoscopy")({"image": MetaTensor(x, meta={"source_dtype": "float32"})})
    torch.testing.assert_close(out["image"].as_tensor(), x / 255.0)


def test_a_deferred_2d_mri_picture_uses_the_given_percentiles():
    """defer_2d=True gives the picture the eager path gives, with the transform's own mri_percentiles."""
    x = torch.from_numpy(np.random.default_rng(0).normal(100, 20, (1, 40, 50)).astype(np.float32))
    kwargs = dict(modality="MRI", mri_percentiles=(5.0, 95.0))
    eager = ScaleIntensityByModalityd(**kwargs)({"image": MetaTensor(x.clone())})["image"]
    deferred = ScaleIntensityByModalityd(defer_2d=True, **kwargs)({"image": MetaTensor(x.clone())})["image"]
    torch.testing.assert_close(materialize_intensity(deferred).as_tensor(), eager.as_tensor())
