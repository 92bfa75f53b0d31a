"""The GPU benchmark's parts (``scripts/bench_gpu.py``, ``scripts/bench_train.py``), run on the CPU with the tiny
network and tracker: a GPU machine is lent rarely and briefly (``scripts/device_check.sh``), so the code it runs
there is checked here, on every CI run, to give each part's JSON fields. Not a timing test: the values are only
checked to exist and be in range."""

from __future__ import annotations

import sys

import pytest
from _script_helpers import SCRIPTS, load_script

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench_gpu():
    yield load_script("bench_gpu")
    sys.path[:] = [p for p in sys.path if p != str(SCRIPTS)]  # the evaluate part imports bench_eval from there


def _run(bench_gpu, *argv: str) -> dict:
    args = bench_gpu.parse_args([*argv, "--tiny", "--device", "cpu"])
    return bench_gpu.PARTS[args.part](args)


def test_the_forward_part_reports_each_batch(bench_gpu, tmp_path):
    profile = tmp_path / "forward_profile.txt"
    result = _run(bench_gpu, "forward", "--batch", "1", "2", "--repeats", "1", "--warmup", "0",
                  "--profile", str(profile), "--detector-chunk", "1")
    assert profile.read_text().startswith("forward, batch 2\n")  # the last batch's operators, by time
    assert "aten::" in profile.read_text()
    assert result["config"] == "tiny" and result["image_size"] == 112 and result["detector_chunk"] == 1
    assert set(result["results"]) == {"batch_1", "batch_2"}
    for entry in result["results"].values():
        assert entry["images_per_s"] > 0 and entry["forward_images_per_s"] > 0
        assert entry["gflop_per_image"] > 0 and entry["segment_ms"] > 0
        assert entry["host_syncs_per_forward"] is None  # counted on CUDA only
        assert "mfu" not in entry


def test_the_volume_part_segments_the_synthetic_ct(bench_gpu, tmp_path):
    profile = tmp_path / "volume_profile.txt"
    result = _run(bench_gpu, "volume", "--size", "40", "--depth", "6", "--profile", str(profile),
                  "--prompts", "liver", "spleen", "--tracker-batch", "2")
    assert profile.read_text().startswith("volume 40 x 40 x 6, slice batch 8\n")  # one whole segmentation's operators
    assert "aten::" in profile.read_text()
    assert result["compile"] is False and result["compile_s"] is None
    assert result["volume_shape"] == [40, 40, 6] and result["label_shape"][-3:] == [40, 40, 6]
    assert result["tracker"] == "tiny"
    for key in ("way_in_s", "segment_volume_s", "detector_s", "way_back_s", "case_s", "slices_per_s"):
        assert result[key] >= 0, key
    assert result["case_s"] >= result["segment_volume_s"]
    assert len(result["seed_slices"]) == 2 and all(0 <= s < 6 for s in result["seed_slices"])
    assert result["prompts"] == ["liver", "spleen"] and result["tracker_batch"] == 2


def test_the_compiled_volume_part_compiles_before_the_clock(bench_gpu, monkeypatch, dynamo_counters):
    """``volume --compile``: the vision encoder and the tracker's per-slice modules compile during the warm-up on the
    volume's first slices, so the timed segmentation of the whole volume (slice batches padded, the memory bank at
    every size) compiles nothing."""
    warm_up, after_warm_up = bench_gpu._compile_warm_up, []

    def counted(*args, **kwargs):
        seconds = warm_up(*args, **kwargs)
        after_warm_up.append(dynamo_counters["stats"]["unique_graphs"])
        return seconds

    monkeypatch.setattr(bench_gpu, "_compile_warm_up", counted)
    result = _run(bench_gpu, "volume", "--size", "40", "--depth", "30", "--slice-batch", "4", "--compile")
    graphs = dynamo_counters["stats"]["unique_graphs"]
    assert result["compile"] is True and result["compile_s"] > 0 and result["detector_chunk"] == 16
    assert after_warm_up == [graphs] and graphs >= 5  # the encoder and the tracker's four modules, all before
    assert result["seed_slices"] and all(0 <= s < 30 for s in result["seed_slices"])


def test_the_evaluate_part_sets_the_case_against_the_forward(bench_gpu):
    result = _run(bench_gpu, "evaluate", "--repeats", "1")
    two_d = result["2d"]
    assert two_d["images"] >= 3
    for key in ("forward_ms", "case_ms", "bare_case_ms", "case_over_forward", "batched_case_over_forward"):
        assert two_d[key] > 0, key


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_training_part_counts_the_step(checkpointing: bool, tmp_path):
    argv = ["--batch", "2", "--iterations", "1", "--warmup", "0"] + (["--checkpointing"] if checkpointing else [])
    profile = tmp_path / "step_profile.txt"
    result = load_script("bench_train").main(argv + ["--profile", str(profile)])
    assert profile.read_text().startswith(f"training step, batch 2, checkpointing {checkpointing}\n")
    assert "Optimizer.step" in profile.read_text()  # one whole step: forward, loss, backward, AdamW
    assert result["config"] == "tiny" and result["gradient_checkpointing"] is checkpointing
    assert result["step_s_median"] > 0 and result["images_per_s"] > 0
    assert result["train_step_tflop"] > 0  # the FLOPs the GPU run turns into MFU (CUDA only: no "mfu" here)
    operators = result["operators_per_step"]  # an eager step's dispatched operators (kernel launches on a GPU)
    assert min(operators.values()) > 0 and operators["total"] == sum(v for k, v in operators.items() if k != "total")
    assert "mfu" not in result
    if checkpointing:  # the recomputed forward is hardware FLOPs, not the step's model FLOPs
        assert 0 < result["model_step_tflop"] < result["train_step_tflop"]
    else:
        assert "model_step_tflop" not in result


def test_the_shell_runner_stops_on_a_machine_without_cuda_leaving_nothing(tmp_path):
    """``scripts/bench_gpu.sh`` where torch sees no GPU (this CI): exit 3 with one line naming the CPU benchmarks, and
    no log folder left behind in the temporary directory."""
    import os
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the runner would benchmark")
    done = subprocess.run(["bash", str(SCRIPTS / "bench_gpu.sh")], capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(tmp_path), "PYTHON": sys.executable})
    assert done.returncode == 3 and "bench_gpu.sh: no CUDA device" in done.stderr and done.stdout == ""
    assert not list(tmp_path.iterdir())
