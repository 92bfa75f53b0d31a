"""MLflow runs worth reviewing: the training bundle with ``--tracking configs/mlflow.json`` logs on the iteration
axis, names the learning-rate groups and keeps the best and final checkpoints and the metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medsam3_monai.bundle import BUNDLE_CONFIGS
from medsam3_monai.networks import MedSAM3Net

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_training_run_is_reviewable_in_mlflow(shared_data: Path, tmp_path: Path):
    from mlflow import MlflowClient
    from monai.bundle import ConfigWorkflow

    from medsam3_monai.data import build_datalist, write_datalist

    datalist = write_datalist(build_datalist("Kvasir-SEG_sample", shared_data / "Kvasir-SEG_sample").datalist,
                              tmp_path / "kvasir.json")
    bundle_root = tmp_path / "my runs é" / "kvasir-tiny"  # a space and an accent in the path (helper-90)

    def train(max_epochs: int) -> None:
        workflow = ConfigWorkflow(
            config_file=str(BUNDLE_CONFIGS / "train.json"), meta_file=str(BUNDLE_CONFIGS / "metadata.json"),
            logging_file=str(BUNDLE_CONFIGS / "logging.conf"), workflow_type="train",
            tracking=str(BUNDLE_CONFIGS / "mlflow.json"), bundle_root=str(bundle_root), datalists=[str(datalist)],
            max_epochs=max_epochs, batch_size=1, val_interval=2, log_interval=2, save_interval=100,
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()

    train(max_epochs=2)

    client = MlflowClient(tracking_uri=f"sqlite:///{bundle_root / 'runs' / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medsam3").experiment_id])
    assert run.info.run_name == "kvasir-tiny" and run.info.status == "FINISHED"
    val = client.get_metric_history(run.info.run_id, "val_dice")
    assert [m.step for m in val] == [2, 4, 6, 8]  # 4 iterations per epoch, validation every 2: iteration steps
    assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == {2, 4, 6, 8}
    metrics = set(run.data.metrics)
    assert {"lr/detector", "lr/language", "lr/geometry"} <= metrics and not any("lr_group" in m for m in metrics)
    assert any(m.startswith("lr/vision") for m in metrics)
    # the rate each logged iteration trained with: warm-up 20 counts optimiser steps from 0, so iteration 2 (step 1)
    # used 3e-4 / 20 (the scheduler steps after it; logged after the step, the next iteration's 3e-4 * 2 / 20 showed)
    first_lr = client.get_metric_history(run.info.run_id, "lr/detector")[0]
    assert first_lr.step == 2 and first_lr.value == pytest.approx(3e-4 / 20)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "model_best_val_dice.pt", "metadata.json"} <= artifacts, artifacts
    # beside the store, inside the run folder (MONAI's own rule gave a folder named 'my%20runs%20%C3%A9')
    assert (bundle_root / "runs" / "mlruns" / run.info.run_id / "artifacts" / "model.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kvasir.json", "my runs é"]
    assert {"checkpoint", "batch_size", "lr.detector", "loss.weight_mask"} <= set(run.data.params)
    # the best model is written like models/model.pt (its configuration inside): MedSAM3Net loads it as it is,
    # with the validation Dice and the iteration it was reached at
    best_file = bundle_root / "runs" / "checkpoints" / "model_best_val_dice.pt"
    best = torch.load(best_file, map_location="cpu", weights_only=True)
    first_best = max(val, key=lambda m: m.value)  # the first of equal values: only a better one rewrites the file
    assert best["val_dice"] == pytest.approx(first_best.value) and best["iteration"] == first_best.step
    assert MedSAM3Net(best_file).image_size == 112

    # one more epoch: training resumes at iteration 9 from the last checkpoint, in a new run (the first finished)
    # that gets every hyper-parameter too
    train(max_epochs=3)
    second = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_id != run.info.run_id]
    assert len(second) == 1 and second[0].info.run_name == "kvasir-tiny"
    assert [m.step for m in client.get_metric_history(second[0].info.run_id, "val_dice")] == [10, 12]
    assert set(run.data.params) - {"max_epochs"} <= set(second[0].data.params)


def test_the_inference_and_evaluation_bundles_run_with_monais_tracking(shared_data: Path, tmp_path: Path):
    """``--tracking configs/mlflow.json`` on the other two bundles: the evaluation runs in the folder MONAI has just
    written its executed config to (it was refused as "not empty"), its report and MLflow runs in ``eval/``; the
    inference bundle's MLflow store is ``bundle_root/runs``, and its predictions folder holds the predictions alone."""
    from mlflow import MlflowClient
    from monai.bundle import run

    from medsam3_monai.data import build_datalist, write_datalist

    datalist = write_datalist(build_datalist("Kvasir-SEG_sample", shared_data / "Kvasir-SEG_sample").datalist,
                              tmp_path / "kvasir.json")
    image = sorted((shared_data / "Kvasir-SEG_sample" / "images").glob("*.jpg"))[0]
    common = {"meta_file": str(BUNDLE_CONFIGS / "metadata.json"), "tracking": str(BUNDLE_CONFIGS / "mlflow.json"),
              "checkpoint": "tiny"}
    evaluation = tmp_path / "evaluation"
    run(config_file=[str(BUNDLE_CONFIGS / "inference.json"), str(BUNDLE_CONFIGS / "evaluate.json")],
        bundle_root=str(evaluation), datalists=[str(datalist)], max_cases=1, progress=False, **common)
    written = {p.name for p in (evaluation / "eval").iterdir()}
    assert {"cases.csv", "table.md", "mlruns.db"} <= written and any(n.startswith("config_") for n in written)
    client = MlflowClient(tracking_uri=f"sqlite:///{evaluation / 'eval' / 'mlruns.db'}")
    assert client.search_runs([client.get_experiment_by_name("medsam3-evaluate").experiment_id])
    inference = tmp_path / "inference"
    run(config_file=str(BUNDLE_CONFIGS / "inference.json"), bundle_root=str(inference),
        datalist=[{"image": str(image)}], prompts=["polyp"], **common)
    assert sorted(p.name for p in (inference / "predictions").iterdir()) == [f"{image.stem}_seg.png"]
    assert (inference / "runs" / "mlruns.db").is_file()


def test_a_store_in_a_folder_with_a_question_mark_is_where_it_was_asked(tmp_path: Path):
    """``bundle.sqlite_uri`` keeps spaces and accents as they are (MONAI's encoded them, and its handler and MLflow
    then made folders named with the codes) and encodes ``%``, ``?`` and ``#`` (a '?' began a query: the database
    became a file named after the folder's first part)."""
    from mlflow import MlflowClient

    from medsam3_monai.bundle import sqlite_uri

    from medsam3_monai.engines.mlflow_runs import MLFlowRunHandler
    from medsam3_monai.engines.reports import open_experiment

    folder = tmp_path / "q?x #1 é 100%" / "runs"  # not made yet: SQLite cannot make it, MLflow retried for 100 s
    uri = sqlite_uri(folder / "mlruns.db")
    assert uri == f"sqlite:///{tmp_path}/q%3Fx %231 é 100%25/runs/mlruns.db"
    MLFlowRunHandler(tracking_uri=uri, experiment_name="medsam3", run_name="r")
    open_experiment(uri, "medsam3-evaluate")
    MlflowClient(tracking_uri=uri).get_experiment_by_name("medsam3-evaluate")
    assert (folder / "mlruns.db").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q?x #1 é 100%"]  # no folder named with the codes
