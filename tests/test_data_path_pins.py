"""The training data path's output on a fixed batch, pinned: faster transforms must not change what the loss sees.

The numbers were recorded with the data path before the throughput work of issue 15 (dense native-resolution
instance masks, float loading) and are reproduced exactly by the current one (crops from one labelling pass,
uint8 loading, one-thread BLAS). One exception: the images' sum. The old chain resized 3 channels with MONAI's
``Resize`` on one thread, where ATen rounds differently in the last float bit than on two; the chain now resizes
channel by channel (``TiledResizeToSliced``, grey pictures before their repeat), which gives MONAI's two-thread
values on any number of threads (checked below against MONAI's own chain), and the sum was pinned again.
The images' sum and the losses were pinned again when the slice-space resize became SAM3's own (``kernel="sam3"``:
torchvision's anti-aliased resize of the 8-bit picture, as ``Sam3Processor``; checked below against torchvision on
the whole picture, and ``tests/test_official_preprocessing.py`` against Meta's code); the targets are unchanged.
A batch of real samples: two GBM40 H&E images (instance ids, up to 100 nuclei), one BUSI ultrasound (grey,
semantic), one hippocampus MRI volume (a random slice, two labels), seed 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["cell nucleus", "liver", "cell nucleus", "polyp", "breast tumor", "polyp", "anterior hippocampus",
           "posterior hippocampus", "polyp"]

#: SetCriterion() terms of the tiny network (seed 0, training mode) on the 112-px batch
LOSSES = {
    "loss": 156.7454833984375,
    "loss_bbox": 0.09143737703561783,
    "loss_ce": 0.07082730531692505,
    "loss_ce_o2m": 0.0030911173671483994,
    "loss_dice": 0.08848542720079422,
    "loss_giou": 0.08790192753076553,
    "loss_mask": 0.011555511504411697,
    "loss_semantic_dice": 0.8495091795921326,
    "loss_semantic_seg": 0.06914278864860535,
    "presence_loss": 0.34657010436058044,
    "num_instances": 202.0,
}


def fixed_batch(shared_data: Path, image_size: int, edit_chain=None) -> dict:
    from medsam3_monai.data import build_datalist
    from medsam3_monai.engines.batch import collate_find_queries
    from medsam3_monai.transforms.pipelines import slice_space_transforms

    items = (build_datalist("GBM40_HE_nuclei", shared_data / "GBM40_HE_nuclei").datalist["training"][:2]
             + build_datalist("BUSI", shared_data / "BUSI").datalist["training"][:1]
             + build_datalist("MSD_Task04_Hippocampus_cropped", shared_data / "MSD_Task04_Hippocampus_cropped",
                              check_values=False).datalist["training"][:1])
    chain = slice_space_transforms(image_size, train=True, negative_concepts=["polyp", "liver"], seed=0)
    chain = chain if edit_chain is None else edit_chain(chain)
    return collate_find_queries([chain(item) for item in items])


def test_the_1008_px_batch_is_pinned(shared_data: Path):
    from medsam3_monai.networks import network_pixels

    batch = fixed_batch(shared_data, 1008)
    targets = batch["targets"]
    assert batch["prompts"] == PROMPTS
    assert int(targets.num_boxes.sum()) == 202
    assert int(targets.masks.to_dense().sum()) == 425981
    assert float(targets.boxes.double().sum()) == pytest.approx(217.533233942464, rel=1e-9)
    images = batch["images"]
    assert images.dtype == torch.uint8  # the 8-bit levels travel; the network input is made on the device
    assert float(network_pixels(images, "cpu").double().sum()) == pytest.approx(1396757.1095388532, rel=1e-7)


class _Sam3ProcessorResized:
    """The resize of SAM3's image processor (``Sam3Processor``: ``v2.Resize`` on the uint8 picture) of the float
    picture's 8-bit levels, on the whole picture (``image``; its metadata kept)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, data: dict) -> dict:
        from monai.data import MetaTensor
        from torchvision.transforms import v2

        from medsam3_monai.transforms.intensity import sam3_levels

        image = data["image"]
        resized = v2.Resize((self.size, self.size))(sam3_levels(image))
        return {**data, "image": MetaTensor(resized, meta=dict(image.meta))}


@pytest.mark.parametrize("kernel", ["sam3", "monai"])
def test_the_1008_px_images_are_the_kernels_resize_of_the_whole_picture(shared_data: Path, kernel: str):
    """The fixed batch's images on one thread (DataLoader workers) equal, level for level, those of a chain that
    maps the intensities on the whole picture and repeats a grey picture to RGB first, then resizes the whole picture
    with the kernel's reference: ``"sam3"`` (the default) torchvision's ``v2.Resize`` of the 8-bit levels, as SAM3's
    image processor; ``"monai"`` MONAI's ``Resize`` (``ResizeToSliced``) and the 8-bit levels, on two threads."""
    from monai.transforms import Compose

    from medsam3_monai.transforms import (
        GreyToRGBd,
        ResizeToSliced,
        Sam3Normalized,
        ScaleIntensityByModalityd,
        TiledResizeToSliced,
    )

    def with_kernel(chain: Compose) -> Compose:
        [resize] = [t for t in chain.transforms if isinstance(t, TiledResizeToSliced)]
        assert resize.kernel == "sam3"  # the bundle's default
        resize.kernel = kernel
        return chain

    def whole_picture_first(chain: Compose) -> Compose:
        transforms = list(chain.transforms)
        intensity = next(t for t in transforms if isinstance(t, ScaleIntensityByModalityd))
        assert intensity.defer_2d  # the chain maps a picture's intensities tile by tile, within the resize
        intensity.defer_2d = False
        resize = next(i for i, t in enumerate(transforms) if isinstance(t, TiledResizeToSliced))
        levels = next(i for i, t in enumerate(transforms) if isinstance(t, Sam3Normalized))
        grey = next(i for i, t in enumerate(transforms) if isinstance(t, GreyToRGBd))
        assert resize < levels < grey  # the chain resizes and quantises a grey picture once, then repeats it
        repeat = transforms.pop(grey)
        reference = _Sam3ProcessorResized(1008) if kernel == "sam3" else ResizeToSliced(keys="image",
                                                                                         spatial_size=1008)
        transforms[resize:resize + 1] = [repeat, reference]
        chain.transforms = tuple(transforms)
        return chain

    ours = fixed_batch(shared_data, 1008, edit_chain=with_kernel)["images"]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        theirs = fixed_batch(shared_data, 1008, edit_chain=whole_picture_first)["images"]
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(ours, theirs)


def test_the_deferred_intensity_gives_the_eager_chains_images(shared_data: Path):
    """``loading`` leaves a picture's intensity to the resize (``defer_2d``); mapping the whole picture first, as
    ``"defer_2d": false`` does, gives the same levels, bit for bit, at 112 px (every picture shrunk: the tiled,
    banded resize) and the same targets."""
    from monai.transforms import Compose

    from medsam3_monai.transforms import ScaleIntensityByModalityd

    def eager(chain: Compose) -> Compose:
        intensity = next(t for t in chain.transforms if isinstance(t, ScaleIntensityByModalityd))
        assert intensity.defer_2d
        intensity.defer_2d = False
        return chain

    ours, theirs = fixed_batch(shared_data, 112), fixed_batch(shared_data, 112, edit_chain=eager)
    assert torch.equal(ours["images"], theirs["images"])
    assert torch.equal(ours["targets"].masks.to_dense(), theirs["targets"].masks.to_dense())


def test_the_loss_of_the_fixed_batch_is_pinned(shared_data: Path):
    from medsam3_monai.engines.batch import PrepareFindBatch
    from medsam3_monai.losses import SetCriterion
    from medsam3_monai.networks import MedSAM3Net

    batch = fixed_batch(shared_data, 112)
    assert batch["prompts"] == PROMPTS
    torch.manual_seed(0)
    net = MedSAM3Net("tiny").train()
    images, _, _, kwargs = PrepareFindBatch()(batch, "cpu")  # the trainer's own step: levels -> normalised pixels
    assert images.dtype == torch.float32 and kwargs["pixels_normalized"]
    outputs = net(images, batch["prompts"], image_ids=batch["image_ids"], pixels_normalized=True)
    losses = SetCriterion()(outputs, batch["targets"])
    for name, expected in LOSSES.items():
        assert float(losses[name].detach()) == pytest.approx(expected, rel=1e-4), name
