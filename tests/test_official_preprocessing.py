"""The network sees what SAM3 would see: the slice-space images the inference and training bundles make of shared RGB
pictures are, bit for bit, the input Meta's own ``Sam3Processor.set_image`` (sam3 0.1.4, run in its environment by
``scripts/official_pictures.py``) and transformers' ``Sam3ImageProcessor`` make of them: at SAM3's 1008 px (pictures
enlarged, and one shrunk through the tiled passes of a picture over a megapixel) and at the tiny preset's 112 px
(every picture shrunk). ``kernel="monai"`` (MONAI's Gaussian anti-aliasing) is not SAM3's on a shrunk picture.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from _official_helpers import official_python

from medsam3_monai.networks import network_pixels
from medsam3_monai.transforms.pipelines import slice_space_transforms

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
#: shared RGB pictures (relative to ../shared/data) with the labels of their training items
PICTURES = {
    "Kvasir-SEG_sample/images/cju0qkwl35piu0993l0dewei2.jpg": "Kvasir-SEG_sample/masks/cju0qkwl35piu0993l0dewei2.jpg",
    "Kvasir-SEG_sample/images/cju0qoxqj9q6s0835b43399p4.jpg": "Kvasir-SEG_sample/masks/cju0qoxqj9q6s0835b43399p4.jpg",
    "DRIVE/images/01_test.tif": None,
    "GBM40_HE_nuclei/images/01.tif": "GBM40_HE_nuclei/masks/01_binary.png",
    "BUSI/images/benign (1).png": "BUSI/masks/benign (1)_mask.png",
}
SIZES = (1008, 112)


def pictures(shared_data: Path) -> list[Path]:
    paths = [shared_data / name for name in PICTURES]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        pytest.skip(f"shared pictures not found: {missing}")
    return paths


def levels_of(normalised: torch.Tensor) -> torch.Tensor:
    """SAM3-normalised pixels ((levels / 255 - 0.5) / 0.5) -> their 8-bit levels."""
    return ((normalised.double() * 0.5 + 0.5) * 255).round().to(torch.uint8)


def inference_levels(paths: list[Path], size: int) -> list[torch.Tensor]:
    """The inference bundle's slice-space images (``preprocessing`` of ``configs/inference.json``)."""
    chain = slice_space_transforms(size, with_label=False)
    return [chain({"image": str(path)})[0]["image"].as_tensor() for path in paths]


@pytest.fixture(scope="module", params=SIZES)
def official(request, shared_data, tmp_path_factory) -> tuple[int, list[Path], list[torch.Tensor]]:
    python = official_python()
    paths = pictures(shared_data)
    out = tmp_path_factory.mktemp("official") / "pictures.npz"
    done = subprocess.run([str(python), str(REPO / "scripts" / "official_pictures.py"), str(out), *map(str, paths),
                           "--image-size", str(request.param)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as recorded:
        assert list(recorded["paths"]) == [str(path) for path in paths]
        images = [torch.from_numpy(recorded[f"image_{i}"]) for i in range(len(paths))]
    return request.param, paths, images


def test_the_inference_bundles_images_are_the_official_processors_input(official):
    size, paths, theirs = official
    for path, ours, official_input in zip(paths, inference_levels(paths, size), theirs):
        assert tuple(official_input.shape) == tuple(ours.shape) == (3, size, size)
        assert torch.equal(ours, levels_of(official_input)), path.name
        assert torch.equal(network_pixels(ours[None], "cpu")[0], official_input), path.name  # the network input


def test_the_training_bundles_images_are_the_official_processors_input(official, shared_data):
    size, paths, theirs = official
    chain = slice_space_transforms(size, train=False)  # validate#preprocessing: the training chain without chance
    for path, official_input in zip(paths, theirs):
        label = PICTURES[str(path.relative_to(shared_data))]
        if label is None:
            continue
        item = {"image": str(path), "label": str(shared_data / label), "prompts": {"255": "polyp"},
                "mask_encoding": "binary"}
        ours = chain(item)[0]["image"].as_tensor()
        assert torch.equal(ours, levels_of(official_input)), path.name


@pytest.mark.parametrize("size", SIZES)
def test_the_images_are_transformers_image_processors_input(shared_data, size):
    from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor

    processor = Sam3ImageProcessor(size={"height": size, "width": size})
    paths = pictures(shared_data)
    for path, ours in zip(paths, inference_levels(paths, size)):
        with Image.open(path) as picture:
            theirs = processor(images=picture.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        assert torch.equal(ours, levels_of(theirs)), path.name
        # the same levels, normalised in another order of float operations
        assert torch.allclose(network_pixels(ours[None], "cpu")[0], theirs, rtol=0, atol=2.5e-7), path.name


def test_monais_kernel_differs_from_sam3s_on_a_shrunk_picture(shared_data):
    """What the default changed: MONAI's Gaussian anti-aliasing on the 1348 x 1070 picture shrunk to 1008."""
    from medsam3_monai.transforms import TiledResizeToSliced

    path = shared_data / "Kvasir-SEG_sample/images/cju0qoxqj9q6s0835b43399p4.jpg"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    chain = slice_space_transforms(1008, with_label=False)
    sam3 = chain({"image": str(path)})[0]["image"].as_tensor()
    [resize] = [t for t in chain.transforms[-1].transform.transforms if isinstance(t, TiledResizeToSliced)]
    assert resize.kernel == "sam3"
    resize.kernel = "monai"
    monai = chain({"image": str(path)})[0]["image"].as_tensor()
    difference = (sam3.int() - monai.int()).abs()
    assert int(difference.max()) > 10 and float((difference > 0).float().mean()) > 0.05
