"""`medsam3 demo`: phantom data -> the training bundle -> the evaluator -> reports and MLflow (reduced size)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medsam3_monai.deploy.cli import main


@pytest.mark.slow
def test_quick_demo_trains_evaluates_and_reports(tmp_path: Path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert Path(summary["final_model"]).is_file()
    comparison = Path(summary["comparison_table"]).read_text()
    assert "Δ Dice" in comparison and "Phantom_discs_bars" in comparison
    assert len(summary["radar_charts"]) == 2 and all(Path(p).stat().st_size > 0 for p in summary["radar_charts"])
    assert all(any(Path(folder).glob("*.png")) for folder in summary["overlays"])
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=summary["training_mlflow"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and "loss" in runs[0].data.metrics
    assert any(key.endswith("weight_ce") for key in runs[0].data.params)
    data = json.loads((out / "data" / "phantom_datalist.json").read_text())
    assert {len(data[s]) for s in ("training", "validation", "test")} == {12, 3, 4}
    assert set(data["training"][0]["prompts"].values()) == {"bright disc", "dark bar"}


def test_demo_with_a_missing_datalist_fails_and_writes_nothing(tmp_path: Path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--data", str(tmp_path / "absent.json"), "--out", str(out)]) == 2
    assert "datalist not found" in capsys.readouterr().err
    assert not out.exists()
