"""What a user meets after the first run: training settings that are checked (mode, learning rates, intervals), a
checkpoint used at another size, and an evaluation bundle run again into the same folder. Every refusal: one line
on stderr, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _bundle_helpers import assert_refused, run_bundle

from medsam3_monai.data import build_datalist, write_datalist
from medsam3_monai.engines import build_optimizer, freeze_for_mode
from medsam3_monai.networks import MedSAM3Net
from medsam3_monai.networks.checkpoints import save_checkpoint_file


pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_training_mode_is_full_or_medsam3(tiny_net):
    network = MedSAM3Net("tiny")
    assert freeze_for_mode(network, "full") == 0 and all(p.requires_grad for p in network.parameters())
    for mode in ("MedSAM3", "frozen", ""):
        with pytest.raises(ValueError, match=f"unknown training mode {mode!r}: choose full .*; medsam3 "):
            freeze_for_mode(network, mode)
    assert all(p.requires_grad for p in network.parameters())
    assert freeze_for_mode(network, "medsam3") > 0


@pytest.mark.parametrize("settings, message", [
    ({"detector_lr": -1e-4}, "lr#detector must be >= 0, got -0.0001"),
    ({"vision_lr": float("nan")}, "lr#vision must be >= 0, got nan"),
    ({"weight_decay": -0.1}, "lr#weight_decay must be >= 0"),
    ({"layer_decay": 0.0}, r"lr#layer_decay must be in \(0, 1\]"),
    ({"layer_decay": 1.5}, r"lr#layer_decay must be in \(0, 1\]"),
])
def test_learning_rates_that_cannot_train_areassert_refused(tiny_net, settings, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(tiny_net, **settings)


def test_a_checkpoint_given_another_image_size_says_its_own(tmp_path):
    """``MedSAM3Net(model.pt, image_size=224)`` for a 112-px checkpoint: the training bundle's ``--image_size``
    used to be dropped, and the first forward failed with advice about resizing slices."""
    path = save_checkpoint_file(MedSAM3Net("tiny").sam3, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"works at 112 px, not 224: give its size \(112\) as the image size"):
        MedSAM3Net(path, image_size=224)
    assert MedSAM3Net(path, image_size=112).image_size == MedSAM3Net(path).image_size == 112


def _kvasir_datalist(shared_data: Path, folder: Path) -> str:
    name = "Kvasir-SEG_sample"
    return str(write_datalist(build_datalist(name, shared_data / name).datalist, folder / "kvasir.json"))


@pytest.mark.slow
def test_training_bundle_settings_are_refused_by_name(shared_data, tmp_path):
    kvasir = _kvasir_datalist(shared_data, tmp_path)
    datalist = str([kvasir])
    for name, overrides, expected in (
        ("mode", ("--mode", "MedSAM3"), "unknown training mode 'MedSAM3': choose full"),
        ("interval", ("--val_interval", "0"), "--val_interval must be a whole number >= 1, got 0"),
        ("size", ("--image_size", "100"), "image size must be a positive multiple of 14"),
        ("checkpoint", ("--checkpoint", kvasir), "not a readable PyTorch checkpoint"),
    ):
        root = tmp_path / name
        result = run_bundle(["train.json"], "--bundle_root", str(root), "--datalists", datalist, "--max_epochs", "1",
                            *overrides)
        assert_refused(result, expected)
        assert "Loading dataset" not in result.stdout + result.stderr, "refused only after caching the data"
        assert not (root / "models").exists() and not any((root / "runs" / "checkpoints").glob("*.pt"))


@pytest.mark.slow
def test_evaluation_bundle_refuses_a_folder_holding_an_earlier_run(shared_data, tmp_path):
    """Run again into the same bundle_root, the evaluation bundle kept the earlier run's overlays beside the new
    ones and logged them to the new MLflow run; ``medsam3 evaluate`` refuses a non-empty --out, and so does it."""
    earlier = tmp_path / "run" / "eval" / "overlays" / "000_ChestXray_lung_sample_1.png"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier run's overlay")
    result = run_bundle(["inference.json", "evaluate.json"], "--bundle_root", str(tmp_path / "run"),
                        "--datalists", str([_kvasir_datalist(shared_data, tmp_path)]), "--checkpoint", "tiny",
                        "--mlflow", "false")
    assert_refused(result, f"output {tmp_path / 'run' / 'eval'} exists and is not an empty folder")
    assert [p for p in (tmp_path / "run").rglob("*") if p.is_file()] == [earlier]


def test_the_evaluation_bundles_report_names_the_tracker_auto_resolves_to(tmp_path):
    """evaluate.json's notes and MLflow parameters name the tracker the volumes ran with, as the CLI's do, not the
    word 'auto'."""
    from medsam3_monai.bundle import BUNDLE_CONFIGS
    from medsam3_monai.networks.tracker import tracker_choice

    assert tracker_choice("auto", "tiny") == ("tiny", "tiny (random init, ViT shared with the detector)")
    weights = tmp_path / "model.pt"
    torch.save({"model": {}}, weights)
    assert tracker_choice("auto", str(weights)) == ("none", "none (the checkpoint has no tracker weights)")
    assert tracker_choice("none", "tiny") == tracker_choice(None, "tiny") == ("none", "none")
    assert tracker_choice("/weights/sam3-hf", "tiny") == ("/weights/sam3-hf", "/weights/sam3-hf")
    report = json.loads((BUNDLE_CONFIGS / "evaluate.json").read_text())["handlers"][2]
    described = "$medsam3_monai.networks.tracker.tracker_choice(@tracker_source, @checkpoint)[1]"
    assert report["notes"]["tracker"] == report["params"]["tracker"] == described  # MLflow's param too (helper-75)
    text = tracker_choice("auto", "tiny")[1]  # the CLI's tracker_source is the description: described again, it stays
    assert tracker_choice(text, "tiny")[1] == text


def test_a_comparison_says_when_the_checkpoints_volumes_ran_with_different_trackers():
    from medsam3_monai.deploy.evaluate_cli import _tracker_note

    labels = ["tiny", "model"]
    assert _tracker_note(labels, ["none", "none"]) is None
    note = _tracker_note(labels, ["tiny (random init)", "none (the checkpoint has no tracker weights)"])
    assert note.startswith("Volumes ran with different trackers (tiny: tiny (random init); model: none (the ")
    assert "give --tracker to use one for both" in note
