"""``mask_encoding: outline`` (HC18 head ellipses): closed, border-clipped and degenerate contours."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from _transforms_helpers import SHARED_DATA
from medsam3_monai.transforms import DecodeLabeld, LoadMedicalImaged
from medsam3_monai.transforms.labels import OutlineFillWarning

SHAPE = (270, 400)  # HC18 images (540 x 800) at half size


def ellipse(
    center: tuple[float, float], axes: tuple[float, float], angle: float = 0.3, thick: int = 1,
    shape: tuple[int, int] = SHAPE, arc: tuple[float, float] = (0.0, 2 * np.pi),
) -> tuple[np.ndarray, np.ndarray]:
    """(outline, analytic filled ellipse) on the image grid: the parts outside the image are cut off.

    The outline is the rounded parametric curve (8-connected, ``thick`` px), as annotation tools draw it.
    """
    (cy, cx), (a, b) = center, axes
    t = np.linspace(*arc, 40000)
    x = cx + a * np.cos(t) * np.cos(angle) - b * np.sin(t) * np.sin(angle)
    y = cy + a * np.cos(t) * np.sin(angle) + b * np.sin(t) * np.cos(angle)
    rows, cols = np.round(y).astype(int), np.round(x).astype(int)
    inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    outline = np.zeros(shape, bool)
    outline[rows[inside], cols[inside]] = True
    if thick > 1:
        outline = ndimage.binary_dilation(outline, iterations=thick - 1)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    return outline, (u / a) ** 2 + (v / b) ** 2 <= 1


def decode(outline: np.ndarray) -> np.ndarray:
    """The real decoding path: a (1, H, W) 0/255 mask through DecodeLabeld(outline)."""
    label = torch.from_numpy(outline.astype(np.uint8) * 255)[None]
    out = DecodeLabeld(mask_encoding="outline")({"label": label, "prompts": {"1": "fetal head"}})["label"]
    assert out.shape == (1, *outline.shape)
    return out[0].numpy() > 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def cut_share(center, axes, angle=0.3) -> float:
    """The share of the whole ellipse's area outside the image."""
    big = (SHAPE[0] + 600, SHAPE[1] + 600)
    full = ellipse((center[0] + 300, center[1] + 300), axes, angle, shape=big)[1].sum()
    return 1 - ellipse(center, axes, angle)[1].sum() / full


@pytest.mark.parametrize("thick", [1, 2])
def test_closed_outline_fills_to_the_ellipse(thick):
    outline, truth = ellipse((135, 200), (150, 105), thick=thick)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutlineFillWarning)
        filled = decode(outline)
    assert np.array_equal(filled, ndimage.binary_fill_holes(outline))  # closed contours: exactly as before
    assert iou(filled, truth) > 0.97
    assert 0.4 < filled.mean() < 0.5


CLIPPED = {  # center (row, col), axes: cut by the left edge, a corner (top + left), both sides, the bottom
    "left": ((135, 60), (150, 105)),
    "corner": ((70, 70), (150, 105)),
    "left_and_right": ((135, 200), (230, 100)),
    "bottom": ((220, 200), (150, 105)),
}


@pytest.mark.parametrize("thick", [1, 2])
@pytest.mark.parametrize("case", sorted(CLIPPED))
def test_border_clipped_outline_is_closed_against_the_border(case, thick):
    center, axes = CLIPPED[case]
    outline, truth = ellipse(center, axes, thick=thick)
    assert ndimage.binary_fill_holes(outline).sum() == outline.sum()  # hole filling alone leaves the ring
    if case in ("left", "corner"):
        assert 0.2 <= cut_share(center, axes) <= 0.35
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutlineFillWarning)
        filled = decode(outline)
    assert iou(filled, truth) > 0.95
    assert filled.mean() > 0.2


def test_clipped_outline_in_a_png_file_decodes_filled(tmp_path):
    outline, truth = ellipse((70, 70), (150, 105), thick=2)
    image, mask = tmp_path / "001_HC.png", tmp_path / "001_HC_Annotation.png"
    Image.new("L", SHAPE[::-1]).save(image)
    Image.fromarray(outline.astype(np.uint8) * 255).save(mask)
    d = LoadMedicalImaged(keys=("image", "label"))({"image": str(image), "label": str(mask)})
    d.update(prompts={"1": "fetal head"}, mask_encoding="outline")
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutlineFillWarning)
        decoded = DecodeLabeld()(d)["label"]
    assert decoded.meta["mask_encoding"] == "outline"
    assert iou(decoded[0].numpy() > 0, truth) > 0.95


def test_clipped_and_closed_outlines_in_one_slice():
    clipped, clipped_truth = ellipse((135, 20), (60, 40))
    closed, closed_truth = ellipse((135, 280), (60, 40))
    filled = decode(clipped | closed)
    assert iou(filled, clipped_truth | closed_truth) > 0.93


def test_volume_outline_is_filled_per_slice_and_empty_slices_stay_empty():
    outline, truth = ellipse((135, 60), (150, 105))
    volume = np.stack([np.zeros_like(outline), outline, outline], -1)
    label = torch.from_numpy(volume.astype(np.uint8))[None]
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutlineFillWarning)
        out = DecodeLabeld(mask_encoding="outline")({"label": label, "prompts": {"1": "head"}})["label"][0].numpy()
    assert out[..., 0].sum() == 0
    assert iou(out[..., 1] > 0, truth) > 0.95 and np.array_equal(out[..., 1], out[..., 2])


@pytest.mark.parametrize("case", ["short_arc_inside", "arc_touching_one_border", "straight_cut"])
def test_degenerate_contour_warns(case, tmp_path):
    if case == "short_arc_inside":  # a gap in the outline: nothing is enclosed
        outline, _ = ellipse((135, 200), (60, 40), arc=(0.0, 1.0))
    elif case == "arc_touching_one_border":
        outline, _ = ellipse((135, 60), (150, 105), angle=0.0, arc=(1.2, 2.5))
        assert outline[:, 0].any()
    else:  # a straight line from edge to edge: neither side is enclosed
        outline = np.zeros(SHAPE, bool)
        outline[100] = True
    path = tmp_path / f"{case}.png"
    Image.fromarray(outline.astype(np.uint8) * 255).save(path)
    d = LoadMedicalImaged(keys=("label",))({"label": str(path)})
    d.update(prompts={"1": "fetal head"}, mask_encoding="outline")
    message = rf"{case}\.png: outline mask filled to only .*closed outline"
    with pytest.warns(OutlineFillWarning, match=message) as record:
        decoded = DecodeLabeld()(d)["label"]
    assert len(record) == 1
    assert decoded.float().mean() < 0.05


def test_small_closed_outline_does_not_warn():
    ring = np.zeros((9, 9), bool)
    ring[2, 2:7] = ring[6, 2:7] = ring[2:7, 2] = ring[2:7, 6] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutlineFillWarning)
        assert decode(ring).sum() == 25


HC18_ANNOTATIONS = sorted(SHARED_DATA.glob("**/*HC_Annotation.png")) if SHARED_DATA.is_dir() else []


@pytest.mark.skipif(not HC18_ANNOTATIONS, reason=f"no HC18 annotation (*HC_Annotation.png) under {SHARED_DATA}")
@pytest.mark.parametrize("path", HC18_ANNOTATIONS[:10], ids=lambda p: p.name)
def test_real_hc18_annotations_decode_to_a_plausible_head(path: Path):
    d = LoadMedicalImaged(keys=("label",))({"label": str(path)})
    d.update(prompts={"1": "fetal head"}, mask_encoding="outline")
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutlineFillWarning)
        decoded = DecodeLabeld()(d)["label"]
    assert float((decoded > 0).float().mean()) > 0.10
