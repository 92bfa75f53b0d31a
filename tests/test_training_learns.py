"""The training bundle end to end: `python -m monai.bundle run` on a mix of real datasets learns, and MLflow
records every hyper-parameter, loss term, learning rate, the validation Dice and the final model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundles" / "medsam3" / "configs"
DATASETS = ("Kvasir-SEG_sample", "BUSI", "DRIVE", "GBM40_HE_nuclei")  # optical, ultrasound, fundus, histology
BATCH, EPOCHS = 4, 6
BUSI_STRIDE = 3  # every third BUSI item (benign, malignant and normal alike), so no dataset dominates the mix
LR = 5e-4  # a random-init tiny network learns from scratch: one rate for every group, no weight decay


def _datalists(shared: Path, out: Path) -> tuple[list[str], int]:
    """Datalist files of DATASETS and the number of training items in all of them."""
    from medsam3_monai.data import build_datalist, write_datalist

    paths, num_training = [], 0
    for name in DATASETS:
        datalist = build_datalist(name, shared / name).datalist
        if name == "BUSI":
            datalist = {split: items[::BUSI_STRIDE] for split, items in datalist.items()}
        num_training += len(datalist["training"])
        paths.append(str(write_datalist(datalist, out / f"{name}.json")))
    return paths, num_training


def _history(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
def test_bundle_run_learns_on_a_real_mix_and_logs_to_mlflow(shared_data: Path, tmp_path: Path):
    datalists, num_training = _datalists(shared_data, tmp_path / "datalists")
    iterations = EPOCHS * -(-num_training // BATCH)
    root = tmp_path / "bundle"
    overrides = {
        "bundle_root": root, "datalists": repr(datalists), "max_epochs": EPOCHS, "batch_size": BATCH,
        "val_interval": iterations, "validate_at_start": True, "val_protocol": "semantic", "save_interval": 10**6,
        "lr#detector": LR, "lr#vision": LR, "lr#language": LR, "lr#geometry": LR, "lr#layer_decay": 1.0,
        "lr#weight_decay": 0.0, "scheduler#timescale": 1000, "tracking": "mlflow",
        "ct_window": "lung",  # no CT here: not recorded in the model files
    }
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "train.json"),
               "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf")]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (root / "models" / "model.pt").is_file()
    # every file the run wrote records how the network saw the pictures, for inference to repeat
    from medsam3_monai.networks import MedSAM3Net

    checkpoints = root / "runs" / "checkpoints"
    for written in (root / "models" / "model.pt", checkpoints / "model_best_val_dice.pt",
                    max(checkpoints.glob("checkpoint_iter*.pt"))):
        # (no CT item: the window is not recorded, a later CT inference would have nothing to repeat)
        assert MedSAM3Net(str(written)).trained_preprocessing == {"resize_kernel": "sam3"}

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'runs' / 'mlruns.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    run = runs[0]
    params = run.data.params
    for name in ("weight_ce", "weight_presence", "weight_mask", "weight_semantic_dice", "weight_o2m", "pos_weight",
                 "mode", "checkpoint", "batch_size", "grad_clip_norm", "frozen_parameters"):
        assert any(key.endswith(name) for key in params), f"parameter {name} not logged: {sorted(params)}"
    logged = set(run.data.metrics)
    for term in ("loss", "loss_ce", "loss_ce_aux0", "presence_loss", "loss_bbox", "loss_giou_aux0_o2m", "loss_mask",
                 "loss_dice", "loss_semantic_seg", "loss_semantic_dice", "loss_semantic_presence", "grad_norm",
                 "val_dice"):
        assert term in logged, f"metric {term} not logged: {sorted(logged)}"
    assert sum(key.startswith("lr") for key in logged) >= 4  # one learning rate per parameter group
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert any(path.endswith("model.pt") for path in artifacts), artifacts

    # loss: the mean over the last epoch (the same images, reshuffled) against the first epoch's
    losses = _history(client, run.info.run_id, "loss")
    per_epoch = len(losses) // EPOCHS
    first, last = losses[:per_epoch], losses[-per_epoch:]
    assert sum(last) / len(last) < 0.8 * sum(first) / len(first), (sum(first) / len(first), sum(last) / len(last))
    # validation Dice on the held-out split: untrained (before the first iteration) against trained
    val_dice = _history(client, run.info.run_id, "val_dice")
    assert len(val_dice) == 2, val_dice
    # the numbers the bundle docs quote (pytest -s prints them)
    print(json.dumps({"val_dice": val_dice, "loss_first_epoch": sum(first) / len(first),
                      "loss_last_epoch": sum(last) / len(last)}))
    assert val_dice[1] > val_dice[0] + 0.05, val_dice
