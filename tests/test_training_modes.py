"""MedSAM3 mode of the training bundle: frozen vision + text encoders, detector-only tuning, text + box prompts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundles" / "medsam3" / "configs"
ENCODERS = ("sam3.vision_encoder.", "sam3.text_encoder.", "sam3.text_projection.")


@pytest.mark.slow
def test_medsam3_mode_trains_the_detector_with_box_prompts_and_leaves_encoders_untouched(shared_data, tmp_path):
    from monai.bundle import ConfigWorkflow

    from medsam3_monai.data import build_datalist, write_datalist

    folder = "Kvasir-SEG_sample"
    datalist = write_datalist(build_datalist(folder, shared_data / folder).datalist, tmp_path / "kvasir.json")
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"), workflow_type="train", bundle_root=str(tmp_path / "run"),
        datalists=[str(datalist)], mode="medsam3", box_prompts=True, max_epochs=1, batch_size=2,
        val_interval=1000, save_interval=1000,
    )
    workflow.initialize()
    network = workflow.parser.get_parsed_content("network")
    before = {k: v.detach().clone() for k, v in network.state_dict().items()}
    logged, log = [], logging.getLogger("medsam3_monai.engines.optim")  # the bundle's logging.conf owns the root
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    log.addHandler(handler)
    try:
        frozen = workflow.parser.get_parsed_content("frozen_parameters")
    finally:
        log.removeHandler(handler)
    assert f"MedSAM3 mode: vision and text encoder(s) frozen, {frozen} parameters out of the optimiser" in logged
    optimizer = workflow.parser.get_parsed_content("optimizer")
    trainer = workflow.parser.get_parsed_content("train#trainer")

    assert frozen == sum(p.numel() for n, p in network.named_parameters() if n.startswith(ENCODERS))
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all((id(p) in optimised) == (not n.startswith(ENCODERS)) for n, p in network.named_parameters())

    seen_boxes = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen_boxes.append(e.state.batch.get("boxes")))
    workflow.run()
    workflow.finalize()

    assert trainer.state.iteration == 2
    assert all(b is not None and b.shape[1:] == (1, 4) for b in seen_boxes)  # every find-query got its box
    after = network.state_dict()
    encoder_keys = [k for k in before if k.startswith(ENCODERS)]
    detector_keys = [k for k in before if not k.startswith(ENCODERS)]
    assert encoder_keys and all(torch.equal(before[k], after[k]) for k in encoder_keys)
    assert sum(not torch.equal(before[k], after[k]) for k in detector_keys) > len(detector_keys) // 2
    assert not any(p.requires_grad for n, p in network.named_parameters() if n.startswith(ENCODERS))
