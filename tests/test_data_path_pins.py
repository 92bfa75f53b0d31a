"""The training data path's output on a fixed batch, pinned: faster transforms must not change what the loss sees.

The numbers were recorded with the data path before the throughput work of issue 15 (dense native-resolution
instance masks, float loading) and are reproduced exactly by the current one (crops from one labelling pass,
uint8 loading, one-thread BLAS). A batch of real samples: two GBM40 H&E images (instance ids, up to 100 nuclei),
one BUSI ultrasound (grey, semantic), one hippocampus MRI volume (a random slice, two labels), seed 0.
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
    "loss": 156.74569702148438,
    "loss_bbox": 0.09143737703561783,
    "loss_ce": 0.07082729786634445,
    "loss_ce_o2m": 0.0030911166686564684,
    "loss_dice": 0.08848542720079422,
    "loss_giou": 0.08790193498134613,
    "loss_mask": 0.011555524542927742,
    "loss_semantic_dice": 0.8495009541511536,
    "loss_semantic_seg": 0.06915832310914993,
    "presence_loss": 0.34657010436058044,
    "num_instances": 202.0,
}


def fixed_batch(shared_data: Path, image_size: int) -> dict:
    from medsam3_monai.data import build_datalist
    from medsam3_monai.engines.batch import collate_find_queries
    from medsam3_monai.transforms.pipelines import slice_space_transforms

    items = (build_datalist("GBM40_HE_nuclei", shared_data / "GBM40_HE_nuclei").datalist["training"][:2]
             + build_datalist("BUSI", shared_data / "BUSI").datalist["training"][:1]
             + build_datalist("MSD_Task04_Hippocampus_cropped", shared_data / "MSD_Task04_Hippocampus_cropped",
                              check_values=False).datalist["training"][:1])
    chain = slice_space_transforms(image_size, train=True, negative_concepts=["polyp", "liver"], seed=0)
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
    assert float(network_pixels(images, "cpu").double().sum()) == pytest.approx(1396129.972476542, rel=1e-7)


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
        assert float(losses[name]) == pytest.approx(expected, rel=1e-4), name
