"""Multi-GPU bundle (multi_gpu_train.json over train.json) under torchrun: 2 CPU ranks on gloo stay in step.

The slow test trains the tiny network for one epoch on real samples with two ranks that see different shards,
then compares every tensor of both ranks' state dicts: DDP must have averaged the gradients so the replicas are
bit-identical. It also pins that only rank 0 logs and writes checkpoints and the final model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medsam3_monai.engines import distributed
from medsam3_monai.engines.handlers import EpochSeedHandler, FinalCheckpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundles" / "medsam3" / "configs"


class _Named:
    """Stand-in handler whose class name is chosen per instance (the filter matches class names)."""


def _handler(name: str):
    return type(name, (_Named,), {})()


def test_handlers_for_rank_keeps_everything_on_rank0():
    handlers = [_handler("StatsHandler"), _handler("TrainingCheckpoint"), _handler("MLFlowHandler")]
    assert distributed.handlers_for_rank(handlers) == handlers
    assert distributed.handlers_for_rank(None) == []


def test_handlers_for_rank_drops_logging_and_writers_on_other_ranks(monkeypatch):
    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    seed = EpochSeedHandler()
    kept = [seed, _handler("LrScheduleHandler"), _handler("ValidationHandler"), _handler("TrainingCheckpoint")]
    from ignite.handlers import ProgressBar

    dropped = [_handler("StatsHandler"), FinalCheckpoint(torch.nn.Linear(1, 1), "unused.pt"),
               _handler("MLflowRunInfoHandler"), _handler("MLFlowHandler"), _handler("CheckpointSaver"),
               ProgressBar(desc="evaluate")]  # an Ignite progress bar: rank 0's alone
    assert distributed.handlers_for_rank(kept[:2] + dropped + kept[2:]) == kept


def test_the_training_bundle_shows_the_validations_progress(monkeypatch, capsys):
    """A validation of many volumes takes minutes: the validation loader shows its items (pictures and volumes)
    done out of its own, on rank 0 only (the trainer's bar stands still meanwhile)."""
    from medsam3_monai.bundle import config_parser
    from medsam3_monai.engines import ImageBudgetBatches

    assert config_parser("train.json").config["validate"]["dataloader"]["progress"] == "validate"
    loader = [[{"image": torch.zeros(3, 4, 4)}] * 3, [{"image": torch.zeros(3, 4, 4)}] * 2]  # two items' slices
    batches = list(ImageBudgetBatches(loader, 4, collate_fn=len, progress="validate"))
    assert batches == [4, 1] and "validate:   0%|          | 0/2" in capsys.readouterr().err  # items, out of 2
    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    assert list(ImageBudgetBatches(loader, 4, collate_fn=len, progress="validate")) == [4, 1]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("size", "expected"), [(3, [[0, 2], [1]]), (1, [[0], [0]]), (0, [[], []])])
def test_validation_sampler_shards_without_empty_ranks(monkeypatch, size, expected):
    """Each item on one rank (uneven shards); fewer items than ranks: repeat rather than leave a rank idle."""
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "get_rank", lambda rank=rank: rank)
        shards.append(list(distributed.validation_sampler(list(range(size)))))
    assert shards == expected


def _datalist(shared: Path, out: Path) -> list[str]:
    """Kvasir (4 training, 1 validation) + chest X-ray (2 + 2): 6 training items, 3 per rank, 3 validation."""
    from medsam3_monai.data import build_datalist, write_datalist

    paths = []
    for folder, val_fraction in (("Kvasir-SEG_sample", 0.15), ("ChestXray_lung_sample", 0.5)):
        datalist = build_datalist(folder, shared / folder, val_fraction=val_fraction).datalist
        paths.append(str(write_datalist(datalist, out / f"{folder}.json")))
    return paths


def _rank_log(log_dir: Path, rank: int) -> str:
    found = sorted(log_dir.glob(f"*/attempt_0/{rank}/stdout.log"))
    assert len(found) == 1, f"torchrun log of rank {rank} not found under {log_dir}"
    return found[0].read_text(encoding="utf-8", errors="replace")


@pytest.mark.slow
def test_two_gloo_ranks_train_identical_parameters(shared_data: Path, tmp_path: Path):
    datalists = _datalist(shared_data, tmp_path / "datalists")
    bundle_root, log_dir = tmp_path / "bundle", tmp_path / "torchrun_logs"
    # a third overlay, for this test only: dump every rank's parameters before and after training
    dump = "medsam3_monai.engines.distributed.save_rank_state"
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"run": [
        f"${dump}(@network, @bundle_root + '/rank_states/init')",
        "$@train#trainer.run()",
        f"${dump}(@network, @bundle_root + '/rank_states/final', indices=list(@train#sampler), "
        "validation_indices=list(@validate#volume_loader.sampler))",
    ]}))
    configs = [str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json"), str(probe)]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "--log-dir", str(log_dir), "--redirects", "3",
        "-m", "monai.bundle", "run",
        "--config_file", repr(configs),
        "--meta_file", str(CONFIGS / "metadata.json"),
        "--logging_file", str(CONFIGS / "logging.conf"),
        "--bundle_root", str(bundle_root),
        "--datalists", repr(datalists),
        "--max_epochs", "1", "--batch_size", "1",
        "--val_interval", "3", "--save_interval", "2", "--log_interval", "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.monotonic()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    logs = {rank: _rank_log(log_dir, rank) if log_dir.is_dir() else "" for rank in (0, 1)}
    assert done.returncode == 0, (
        f"torchrun failed ({done.returncode}) after {time.monotonic() - start:.0f}s\n{done.stderr[-4000:]}\n"
        f"rank 0:\n{logs[0][-3000:]}\nrank 1:\n{logs[1][-3000:]}"
    )

    states = {
        (stage, rank): torch.load(bundle_root / "rank_states" / stage / f"rank{rank}.pt", weights_only=False)
        for stage in ("init", "final") for rank in (0, 1)
    }
    # the ranks trained on different, complementary shards of the 6 training items ...
    shards = [states["final", rank]["indices"] for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 3
    assert sorted(shards[0] + shards[1]) == list(range(6))
    # ... validated complementary shards of the 3 validation items (uneven: each item on exactly one rank) ...
    validation = [states["final", rank]["validation_indices"] for rank in (0, 1)]
    assert sorted(validation[0] + validation[1]) == list(range(3)) and all(validation)
    # ... for 3 optimiser steps that moved the weights ...
    init = states["init", 0]["state_dict"]
    final0, final1 = states["final", 0]["state_dict"], states["final", 1]["state_dict"]
    assert final0.keys() == final1.keys() == init.keys()
    assert any(not torch.equal(init[k], final0[k]) for k in init), "training did not change any parameter"
    # ... and still hold bit-identical parameters and buffers
    different = [k for k in final0 if not torch.equal(final0[k], final1[k])]
    assert not different, f"{len(different)} tensors differ between ranks, e.g. {different[:5]}"

    # the final model is rank 0's network; checkpoints and logs come from rank 0 alone
    model = torch.load(bundle_root / "models" / "model.pt", map_location="cpu", weights_only=False)
    assert model["model"].keys() == final0.keys()
    assert all(torch.equal(value, final0[key]) for key, value in model["model"].items())
    checkpoints = sorted(p.name for p in (bundle_root / "runs" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint_iter2.pt", "checkpoint_iter3.pt", "model_best_val_dice.pt"]
    for line in ("saved training checkpoint", "saved final model", "Epoch: 1/1, Iter: 3/3", "val_dice",
                 "MedSAM3Trainer - INFO"):
        assert line in logs[0], f"rank 0 did not log {line!r}"
        assert line not in logs[1], f"rank 1 logged {line!r}: only rank 0 should"


def test_an_input_error_under_the_distributed_overlay_is_said_in_one_line(shared_data: Path, tmp_path: Path):
    """Once the process group is up, torch's excepthook runs ours with ``sys.stderr`` swapped for a buffer it would
    print after ours returns; ours ends the process, so it must write to the process's own stderr: a corrupt
    picture is named, as without the overlay."""
    from _bundle_helpers import assert_refused, run_bundle
    from _server_helpers import free_port

    from medsam3_monai.data import build_datalist, write_datalist

    datalist = build_datalist("Kvasir-SEG_sample", shared_data / "Kvasir-SEG_sample").datalist
    first = datalist["training"][0]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(Path(first["image"]).read_bytes()[:2000])
    datalist["training"][0] = dict(first, image=str(truncated))
    path = write_datalist(datalist, tmp_path / "kvasir.json")
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    result = run_bundle(["train.json", "multi_gpu_train.json"], "--bundle_root", str(tmp_path / "run"),
                        "--datalists", repr([str(path)]), "--max_epochs", "1", "--batch_size", "1", env=env)
    assert_refused(result, str(truncated))


def test_the_torchrun_front_ends_as_its_ranks_did_after_an_input_error(tmp_path: Path):
    """``medsam3 train --nproc N`` runs torchrun through ``deploy.torchrun``: ranks that stopped on an input error
    (status 2, their one line said) end it with status 2 and no failure report; a bug keeps torchrun's."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from medsam3_monai.deploy.torchrun import main

    said = tmp_path / "said.py"
    said.write_text("import sys\nprint('medsam3 train: error: a.png: truncated', file=sys.stderr)\nsys.exit(2)\n")
    common = ["--standalone", "--nproc_per_node", "2", "--log-dir", str(tmp_path / "logs")]
    assert main([*common, str(said)]) == 2
    bug = tmp_path / "bug.py"
    bug.write_text("raise ZeroDivisionError('a bug')\n")
    with pytest.raises(ChildFailedError):
        main([*common, str(bug)])
    fine = tmp_path / "fine.py"
    fine.write_text("pass\n")
    assert main([*common, str(fine)]) == 0


def test_ctrl_c_to_the_torchrun_front_ends_it_with_the_shells_status_and_no_traceback(monkeypatch):
    """Ctrl-C reaches torchrun's launcher too (one process group): its agent raises ``SignalException`` after
    stopping the ranks, which ends the front with 130 (SIGTERM: 143), as a one-process ``medsam3 train`` ends."""
    import signal

    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from medsam3_monai.deploy.torchrun import main

    for signum, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        def stopped(args, signum=signum):
            raise SignalException(f"Process 1 got signal: {signum}", sigval=signum)

        monkeypatch.setattr(torch.distributed.run, "run", stopped)
        assert main(["--standalone", "--nproc_per_node", "2", "unused.py"]) == status


def test_an_input_error_every_rank_meets_is_said_once(tmp_path: Path, capfd, monkeypatch):
    """Both ranks of ``medsam3 train --nproc 2`` stop on the same bad file: the line is said once (the first rank to
    say it marks it in the launcher's folder; a line only one rank meets is still said), and the launcher ends with
    status 2 whether the other rank said it too or torchrun stopped it first (SIGTERM)."""
    from medsam3_monai.bundle import SAID_ONCE_VARIABLE, _first_to_say
    from medsam3_monai.deploy.torchrun import main

    assert _first_to_say("x") and _first_to_say("x")  # outside a launcher: always
    monkeypatch.setenv(SAID_ONCE_VARIABLE, str(tmp_path))
    assert _first_to_say("medsam3 train: error: a") and not _first_to_say("medsam3 train: error: a")
    assert _first_to_say("medsam3 train: error: b")
    monkeypatch.delenv(SAID_ONCE_VARIABLE)
    rank = tmp_path / "rank.py"
    rank.write_text("from medsam3_monai.bundle import report_input_errors\n"
                    "report_input_errors('medsam3 train', always=True)\n"
                    "raise ValueError('a.png: truncated')\n")
    capfd.readouterr()
    assert main(["--standalone", "--nproc_per_node", "2", "--log-dir", str(tmp_path / "logs"), str(rank)]) == 2
    said = [line for line in capfd.readouterr().err.splitlines() if "error:" in line]
    assert said == ["medsam3 train: error: a.png: truncated"], said
    assert SAID_ONCE_VARIABLE not in os.environ
    # one rank meets the bad file; its peer then loses the connection (DDP's "Connection reset by peer"): the peer
    # ends quietly with status 2, the run with the one line, no traceback, no torchrun report (helper-75)
    ready = tmp_path / "rank0_ready"
    rank.write_text(f"import os, time\nfrom pathlib import Path\n"
                    f"from medsam3_monai.bundle import SAID_ONCE_VARIABLE, report_input_errors\n"
                    f"report_input_errors('medsam3 train', always=True)\n"
                    f"def wait(found):  # the other rank's step (bounded: a broken launch fails, not hangs)\n"
                    f"    for _ in range(1200):\n        if found():\n            return\n        time.sleep(0.05)\n"
                    f"if os.environ['RANK'] == '1':\n    wait(Path({str(ready)!r}).exists)\n"
                    f"    raise ValueError('b.png: truncated')\n"
                    f"Path({str(ready)!r}).touch()\n"
                    f"wait(lambda: os.listdir(os.environ[SAID_ONCE_VARIABLE]))  # the peer marks its line, then exits\n"
                    f"raise RuntimeError('[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer')\n")
    capfd.readouterr()
    assert main(["--standalone", "--nproc_per_node", "2", "--monitor-interval", "5", "--log-dir",  # (torchrun's
                 str(tmp_path / "logs2"), str(rank)]) == 2  # SIGTERM to rank 0 comes after the lost connection)
    err = capfd.readouterr().err
    assert [line for line in err.splitlines() if "error:" in line] == ["medsam3 train: error: b.png: truncated"], err
    assert "Traceback" not in err and "Connection reset" not in err, err
