"""``distinct_values`` is ``np.unique`` (values and dtype) on every kind of array the data path reads."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medsam3_monai.distinct import MIN_HISTOGRAM_SPAN, distinct_values


def _same_as_unique(array: np.ndarray) -> None:
    got, want = distinct_values(array), np.unique(array)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.int64, np.uint64])
def test_integer_maps_give_what_unique_gives(dtype):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    values = rng.integers(max(info.min, -50), min(info.max, 120), size=(37, 41)).astype(dtype)
    _same_as_unique(values)
    _same_as_unique(values[::3, ::2])  # a strided view
    _same_as_unique(np.full((5, 5), info.max, dtype))  # the largest value of the dtype
    _same_as_unique(np.full((5, 5), info.min, dtype))


def test_bool_float_empty_and_sparse_wide_values():
    rng = np.random.default_rng(1)
    _same_as_unique(rng.random((20, 30)) > 0.5)
    _same_as_unique(np.ones((4, 4), bool))
    _same_as_unique(np.round(rng.random((20, 30)) * 4).astype(np.float32))
    _same_as_unique(np.zeros((0, 3), np.int32))
    wide = np.zeros((8, 8), np.int64)  # a span far beyond the size: np.unique's sort
    wide[0, 0], wide[1, 1] = -(1 << 40), 1 << 40
    _same_as_unique(wide)
    far = np.full((8, 8), 10**12, np.int64)  # large values, small span: a shifted histogram
    far[2:4] += 7
    _same_as_unique(far)
    edge = np.zeros((2, 2), np.int32)
    edge[0, 0] = max(4, MIN_HISTOGRAM_SPAN)  # exactly the histogram's bound
    _same_as_unique(edge)


def test_real_masks_and_a_label_volume(shared_data: Path):
    pictures = [shared_data / "GBM40_HE_nuclei" / "masks" / "01_instances.png",
                shared_data / "GBM40_HE_nuclei" / "masks" / "01_binary.png",
                next((shared_data / "Kvasir-SEG_sample" / "masks").glob("*.jpg"))]
    for path in pictures:
        with Image.open(path) as image:
            _same_as_unique(np.asarray(image))
    volume = next((shared_data / "MSD_Task04_Hippocampus_cropped" / "masks").glob("*.nii.gz"))
    _same_as_unique(np.asanyarray(nib.load(str(volume)).dataobj))
