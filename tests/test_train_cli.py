"""``medsam3 train``: the training bundle in one command (a thin front to ``python -m monai.bundle run``).

The command it runs is checked by how MONAI's own runner reads it (``fire``'s value parser, which ``monai.bundle``'s
``__main__`` uses), bad input by its exit status and by what it leaves behind, and one slow test trains the tiny
network on the shared Kvasir sample through it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medsam3_monai.bundle import BUNDLE_CONFIGS
from medsam3_monai.deploy.cli import build_parser, main
from medsam3_monai.deploy.train_cli import bundle_command


def _command(*argv: str) -> list[str]:
    return bundle_command(build_parser().parse_args(["train", *argv]))


def _bundle_arguments(command: list[str]) -> dict[str, object]:
    """``--key value`` pairs after ``monai.bundle run``, each value as MONAI's runner (fire) parses it."""
    from fire.parser import DefaultParseValue

    rest = command[command.index("run", command.index("monai.bundle")) + 1:]
    assert len(rest) % 2 == 0 and all(key.startswith("--") for key in rest[::2]), rest
    return {key[2:]: DefaultParseValue(value) for key, value in zip(rest[::2], rest[1::2])}


def test_options_reach_the_bundle_as_its_keys(tmp_path: Path):
    datalists = [tmp_path / "a b.json", tmp_path / "c.json"]
    command = _command("--datalist", str(datalists[0]), "--datalist", str(datalists[1]), "--out", str(tmp_path / "run"),
                       "--checkpoint", "tiny", "--image-size", "112", "--mode", "medsam3", "--box-prompts",
                       "--epochs", "3", "--batch-size", "2", "--val-interval", "5", "--save-interval", "7",
                       "--set", "val_protocol=semantic", "--set", "loss_weights#mask=150")
    assert command[1:4] == ["-m", "monai.bundle", "run"]
    assert _bundle_arguments(command) == {
        "config_file": str(BUNDLE_CONFIGS / "train.json"), "meta_file": str(BUNDLE_CONFIGS / "metadata.json"),
        "logging_file": str(BUNDLE_CONFIGS / "logging.conf"), "tracking": str(BUNDLE_CONFIGS / "mlflow.json"),
        "bundle_root": str(tmp_path / "run"), "datalists": [str(p) for p in datalists], "checkpoint": "tiny",
        "image_size": 112, "mode": "medsam3", "box_prompts": "true", "max_epochs": 3, "batch_size": 2,
        "val_interval": 5, "save_interval": 7, "val_protocol": "semantic", "loss_weights#mask": 150,
    }


def test_one_rate_and_torchrun_without_mlflow(tmp_path: Path):
    command = _command("--datalist", "d.json", "--out", "run", "--lr", "5e-4", "--nproc", "2", "--no-mlflow")
    assert command[1:6] == ["-m", "medsam3_monai.deploy.torchrun", "--standalone", "--nproc_per_node", "2"]
    arguments = _bundle_arguments(command)
    assert arguments["config_file"] == [str(BUNDLE_CONFIGS / "train.json"),
                                        str(BUNDLE_CONFIGS / "multi_gpu_train.json")]
    assert "tracking" not in arguments
    assert arguments["bundle_root"] == str(Path("run").resolve())
    assert {key: arguments[key] for key in ("lr#detector", "lr#vision", "lr#language", "lr#geometry")} == \
        dict.fromkeys(("lr#detector", "lr#vision", "lr#language", "lr#geometry"), 5e-4)
    assert (arguments["lr#layer_decay"], arguments["lr#weight_decay"], arguments["scheduler#timescale"]) == (1, 0, 1000)
    assert "max_epochs" not in arguments and "checkpoint" not in arguments  # unset options keep the bundle's values


def test_dry_run_prints_the_command_and_runs_nothing(tmp_path: Path, capsys):
    datalist = tmp_path / "d.json"
    datalist.write_text("{}")
    assert main(["train", "--datalist", str(datalist), "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    printed = capsys.readouterr().out.strip()
    assert "-m monai.bundle run --config_file" in printed and f"--bundle_root {tmp_path / 'run'}" in printed
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--set", "max_epochs=2"], "--set max_epochs: use --epochs for it"),
    (["--lr", "1e-4", "--set", "lr#vision=1e-5"], "--set lr#vision: use --lr for it"),
    (["--set", "val_protocol"], "give KEY=VALUE"),
    (["--set", "seed=1", "--set", "seed=2"], "--set seed is given twice"),
    (["--lr", "0"], "--lr 0.0: give a learning rate > 0 (leave --lr out for the papers' rates)"),
    (["--checkpoint", "missing/sam3.pt"], "missing/sam3.pt"),
    (["--image-size", "100"], "100"),
])
def test_bad_options_exit_2_before_anything_runs(tmp_path: Path, capsys, argv: list[str], message: str):
    datalist = tmp_path / "d.json"
    datalist.write_text("{}")
    assert main(["train", "--datalist", str(datalist), "--out", str(tmp_path / "run"), *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("medsam3 train: error:") and message in error, error
    assert not (tmp_path / "run").exists()


def test_missing_datalist_and_a_file_as_out(tmp_path: Path, capsys):
    assert main(["train", "--datalist", str(tmp_path / "none.json"), "--out", str(tmp_path / "run")]) == 2
    assert "datalist not found" in capsys.readouterr().err
    datalist, out = tmp_path / "d.json", tmp_path / "out.txt"
    datalist.write_text("{}")
    out.write_text("keep")
    assert main(["train", "--datalist", str(datalist), "--out", str(out)]) == 2
    assert "is a file" in capsys.readouterr().err and out.read_text() == "keep"
    assert main(["train", "--datalist", str(datalist), "--out", str(out / "run")]) == 2  # under a file
    assert f"--out {out / 'run'}: {out} is a file, so the folder cannot be made there" in capsys.readouterr().err


def test_a_tracking_uri_mlflow_refuses_is_refused_before_the_bundle_starts(tmp_path: Path, capsys):
    datalist = tmp_path / "d.json"
    datalist.write_text("{}")
    # a scheme no MLflow has a store for: a file: store is refused by recent MLflow only (3.9 still opens one)
    uri = "nosuchscheme://store"
    assert main(["train", "--datalist", str(datalist), "--out", str(tmp_path / "run"),
                 "--set", f"tracking_uri={uri}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"medsam3 train: error: MLflow tracking URI {uri} cannot be used")
    assert error.strip().endswith("or leave --set tracking_uri out for a SQLite store in the output folder")
    assert not (tmp_path / "run").exists()


def test_an_out_folder_this_user_cannot_write_is_refused_first(tmp_path: Path, capsys, monkeypatch):
    """(Run as root, every folder is writable: ``os.access`` answers as for a user whom ``tmp_path`` denies.)"""
    from medsam3_monai.deploy import train_cli

    datalist = tmp_path / "d.json"
    datalist.write_text("{}")
    denied = tmp_path / "denied"
    denied.mkdir()
    monkeypatch.setattr(train_cli.os, "access", lambda path, mode: Path(path) != denied)
    assert main(["train", "--datalist", str(datalist), "--out", str(denied / "runs" / "a")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"medsam3 train: error: --out {denied / 'runs' / 'a'}: the folder {denied} cannot be written (read-only, or "
        "not this user's): choose a place you can write")
    assert main(["train", "--datalist", str(datalist), "--out", str(denied)]) == 2
    assert "--out " + str(denied) + ": the folder cannot be written" in capsys.readouterr().err
    assert list(denied.iterdir()) == []


@pytest.mark.slow
def test_train_fine_tunes_the_tiny_network_and_a_bundle_error_leaves_no_folder(shared_data: Path, tmp_path: Path,
                                                                              capfd):
    from PIL import Image

    from medsam3_monai.data import build_datalist, write_datalist
    from medsam3_monai.networks import MedSAM3Net

    datalist = write_datalist(build_datalist("Kvasir-SEG_sample", shared_data / "Kvasir-SEG_sample").datalist,
                              tmp_path / "kvasir.json")
    first = json.loads(Path(datalist).read_text())["training"][0]
    run = tmp_path / "run"
    assert main(["train", "--datalist", str(datalist), "--out", str(run), "--lr", "5e-4", "--epochs", "1",
                 "--batch-size", "2", "--val-interval", "2", "--set", "val_protocol=semantic"]) == 0
    said = capfd.readouterr()
    assert "saved final model" in said.out + said.err  # (the bundle's log)
    assert f"medsam3 train: final model {run / 'models' / 'model.pt'}" in said.err
    trained = MedSAM3Net(str(run / "models" / "model.pt"))
    assert trained.image_size == 112
    assert sorted(p.name for p in (run / "runs" / "checkpoints").iterdir()) == ["checkpoint_iter2.pt",
                                                                                  "model_best_val_dice.pt"]
    assert (run / "runs" / "mlruns.db").is_file()  # MLflow on by default
    config = json.loads(next((run / "runs").glob("config_*.json")).read_text())
    assert config["lr"]["vision"] == 5e-4 and config["val_protocol"] == "semantic"
    common = ["train", "--datalist", str(datalist), "--out", str(run), "--lr", "5e-4", "--batch-size", "2",
              "--val-interval", "2", "--set", "val_protocol=semantic"]
    files = sorted(p for p in run.rglob("*") if p.is_file() and p.name != "mlruns.db")
    # the same run again at another size: refused before caching, and the run folder gains no executed config
    assert main([*common, "--epochs", "2", "--image-size", "224"]) == 2
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        f"medsam3 train: error: checkpoint {run / 'runs' / 'checkpoints' / 'checkpoint_iter2.pt'} was trained at 112 "
        "px and this run's slice space is 224 px: resume with --image-size 112 (and the --checkpoint it started "
        "from), or start afresh with --set resume=false")
    assert sorted(p for p in run.rglob("*") if p.is_file() and p.name != "mlruns.db") == files
    # ... and as it was: a finished run, nothing to train, which the last line says
    assert main([*common, "--epochs", "1", "--no-mlflow"]) == 0
    assert f"medsam3 train: nothing trained; the run had finished: its final model {run / 'models'}" in \
        capfd.readouterr().err

    # the bundle refuses its input (an item whose files are not there): its one-line error under this command's
    # name and status 2, and the folder MONAI's tracking had started (its executed config) is gone
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"training": [{"image": str(tmp_path / "no.png"), "label": str(tmp_path / "no.png"),
                                                 "prompts": {"1": "polyp"}}], "validation": []}))
    other = tmp_path / "other"
    assert main(["train", "--datalist", str(missing), "--out", str(other)]) == 2
    err = capfd.readouterr().err
    assert "medsam3 train: error:" in err and "no.png" in err and "Traceback" not in err
    assert not other.exists()
    # ... also when a loader worker meets it (no cache: the mask is read in the worker) after MLflow started
    half = tmp_path / "half.png"
    Image.open(first["label"]).resize((64, 48)).save(half)
    mismatched = tmp_path / "mismatched.json"
    mismatched.write_text(json.dumps({"training": [dict(first, label=str(half))], "validation": []}))
    assert main(["train", "--datalist", str(mismatched), "--out", str(other), "--set", "cache=none",
                 "--set", "num_workers=1"]) == 2
    err = capfd.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"medsam3 train: error: {half}: mask size (48, 64) does not match")
    assert "Traceback" not in err and not other.exists()


def test_bundle_messages_are_said_in_this_commands_options():
    from medsam3_monai.deploy.train_cli import front_words

    assert front_words("works at 504 px, not 112: give --image_size 504") == \
        "works at 504 px, not 112: give --image-size 504"
    assert front_words("raise --max_epochs to train on, or pass --resume false to start afresh") == \
        "raise --epochs to train on, or pass --set resume=false to start afresh"
    assert front_words("did you mean --val_protocol? (MONAI's --tracking)") == \
        "did you mean --set val_protocol=...? (MONAI's --tracking)"  # not a key of the training configs: as it is
    assert front_words("resume with --resize_kernel 'monai', or start afresh") == \
        "resume with --set resize_kernel=monai, or start afresh"  # a word value, quoted in the bundle's message
    assert front_words("--resume '/runs/x.pt': no such checkpoint file") == \
        "--set resume=/runs/x.pt: no such checkpoint file"  # a path, quoted too


def test_bundle_messages_name_the_set_values_they_do_not_give():
    """Inside the bundle a message may name a key alone; ``medsam3 train`` hands its ``--set`` values over, so the
    message says what was given."""
    from medsam3_monai.bundle import front_words

    message = "--lr#detectr: lr has no 'detectr' (did you mean 'detector'?)"
    assert front_words(message, {}, {"lr#detectr": "1e-4"}) == \
        "--set lr#detectr=1e-4: lr has no 'detectr' (did you mean 'detector'?)"
    assert front_words(message, {}) == "--set lr#detectr=...: lr has no 'detectr' (did you mean 'detector'?)"


def test_the_bundle_says_its_messages_in_the_words_of_the_command_that_runs_it(monkeypatch):
    """Inside the bundle (``bundle.in_front_words``, e.g. the checkpoint handler's warnings), the words come from
    what ``medsam3 train`` puts into the bundle's environment; a plain ``monai.bundle run`` keeps its own."""
    from medsam3_monai import bundle
    from medsam3_monai.deploy.train_cli import front_options

    message = "raise --max_epochs to train on, or pass --resume false to start afresh"
    monkeypatch.delenv(bundle.FRONT_VARIABLE, raising=False)
    assert bundle.in_front_words(message) == message
    monkeypatch.setenv(bundle.FRONT_VARIABLE, "medsam3 train")
    monkeypatch.setenv(bundle.FRONT_OPTIONS_VARIABLE, json.dumps(front_options()))
    assert bundle.in_front_words(message) == "raise --epochs to train on, or pass --set resume=false to start afresh"


def test_a_key_the_bundle_does_not_have_is_refused_before_anything_runs(tmp_path: Path, capsys):
    datalist = tmp_path / "d.json"
    datalist.write_text("{}")
    assert main(["train", "--datalist", str(datalist), "--out", str(tmp_path / "run"), "--set", "val_protocl=semantic",
                 "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert "the bundle has no setting 'val_protocl'" in error and "did you mean --set val_protocol=...?" in error
    assert "error: --set val_protocl=semantic: the bundle" in error  # named as it was given
    assert not (tmp_path / "run").exists()
    assert main(["train", "--datalist", str(datalist), "--out", str(tmp_path / "run"), "--set", "epochs=3",
                 "--dry-run"]) == 2
    assert "error: --set epochs=3: the bundle has no setting 'epochs', so it would change nothing; did you mean " \
           "--epochs?" in capsys.readouterr().err


def test_the_training_bundle_trains_a_checkpoint_at_its_own_size_unless_told(tmp_path: Path):
    """train.json's ``image_size`` is null: ``slice_size`` is then the checkpoint's own (tiny 112, a folder's or
    model file's stored size, 1008 for a sam3.pt / Medical-SAM3 file, which carries none), so a real checkpoint is
    never trained at the tiny network's 112 px unless asked; a given ``image_size`` wins (504 for the release's 3D
    checkpoint)."""
    import torch

    from medsam3_monai.bundle import config_parser, slice_size
    from medsam3_monai.networks import MedSAM3Net, save_checkpoint_file

    assert config_parser("train.json").get_parsed_content("image_size") is None
    model = save_checkpoint_file(MedSAM3Net("tiny", image_size=224).sam3, tmp_path / "model.pt")
    bare = tmp_path / "sam3.pt"
    torch.save({"model": {"detector.backbone.vision_backbone.trunk.pos_embed": torch.zeros(1)}}, bare)
    assert [slice_size("tiny", None), slice_size(model, None), slice_size(bare, None)] == [112, 224, 1008]
    assert [slice_size("tiny", 224), slice_size(bare, 504)] == [224, 504]
    assert config_parser("train.json", checkpoint=str(model)).get_parsed_content("slice_size") == 224


def interrupted_bundle(monkeypatch, train_cli, before_exit) -> None:
    """``medsam3 train``'s bundle process replaced by one that runs ``before_exit()`` and ends as Ctrl-C ends it
    (status 130)."""
    class Interrupted:
        def wait(self):
            return 130

    popen = train_cli.subprocess.Popen

    def start(command, *args, **kwargs):
        if "monai.bundle" not in command:
            return popen(command, *args, **kwargs)
        before_exit()
        return Interrupted()

    monkeypatch.setattr(train_cli.subprocess, "Popen", start)


@pytest.mark.parametrize("saved", [False, True])
def test_ctrl_c_says_whether_the_same_command_resumes_or_starts_again(tmp_path: Path, capsys, monkeypatch, saved):
    """The bundle ended by Ctrl-C (exit 130): the newest checkpoint the same command resumes from is named, and
    before the first one there is none to name."""
    from medsam3_monai.deploy import train_cli

    datalist, run = tmp_path / "d.json", tmp_path / "run"
    datalist.write_text('{"training": [], "validation": []}')

    def saves():  # what the bundle's process had saved when Ctrl-C ended it
        (run / "runs" / "checkpoints").mkdir(parents=True)
        for n in (10, 20) if saved else ():
            (run / "runs" / "checkpoints" / f"checkpoint_iter{n}.pt").write_bytes(b"x")

    interrupted_bundle(monkeypatch, train_cli, saves)
    assert main(["train", "--datalist", str(datalist), "--out", str(run), "--no-mlflow"]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"medsam3 train: interrupted; the same command resumes from the newest checkpoint, "
                    f"{run / 'runs' / 'checkpoints' / 'checkpoint_iter20.pt'}" if saved else
                    "medsam3 train: interrupted before the first checkpoint; the same command starts the run again")


@pytest.mark.parametrize("store_from", ["default", "MLFLOW_TRACKING_URI"])
def test_ctrl_c_marks_the_trainings_mlflow_run_killed_and_the_resume_opens_a_new_run(tmp_path: Path, capsys,
                                                                                      monkeypatch, store_from):
    """Left RUNNING, the interrupted run would take another training of that name in the store (helper-75 saw two
    mixed) and a resume's redone iterations again. Marked KILLED, the bundle's handler (MONAI's would re-open any run
    that is not FINISHED: helper-88 saw the resume log into the KILLED run and set it FINISHED) opens a new run for
    the resume; another run of the store is left as it is. With ``MLFLOW_TRACKING_URI`` set, MONAI's handler logs to
    that store: the run is marked there, and the command says where the run goes."""
    from ignite.engine import Engine
    from mlflow import MlflowClient

    from medsam3_monai.deploy import train_cli
    from medsam3_monai.engines.mlflow_runs import MLFlowRunHandler

    datalist, run = tmp_path / "d.json", tmp_path / "bob's run"  # a quote: not in an MLflow filter string
    datalist.write_text('{"training": [], "validation": []}')
    store = f"sqlite:///{run / 'runs' / 'mlruns.db'}"
    if store_from == "MLFLOW_TRACKING_URI":
        store = f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}"
        (tmp_path / "server").mkdir()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    ids = {}

    def tracks():  # the bundle's process had opened its run (and another training its own) when Ctrl-C ended it
        (run / "runs").mkdir(parents=True)
        client = MlflowClient(tracking_uri=store)
        experiment = client.create_experiment("medsam3")
        ids.update({name: client.create_run(experiment, run_name=name).info.run_id for name in ("bob's run", "other")})

    interrupted_bundle(monkeypatch, train_cli, tracks)
    assert main(["train", "--datalist", str(datalist), "--out", str(run)]) == 130
    if store_from == "MLFLOW_TRACKING_URI":
        assert f"note: MLFLOW_TRACKING_URI is set: the run is logged to {store}" in capsys.readouterr().err
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(ids["bob's run"]).info.status == "KILLED"
    assert client.get_run(ids["other"]).info.status == "RUNNING"

    def handler():  # as bundles/medsam3/configs/mlflow.json builds the trainer's and the validator's
        return MLFlowRunHandler(tracking_uri=store, experiment_name="medsam3", run_name="bob's run")

    trainer, validator = handler(), handler()
    trainer.start(Engine(lambda engine, batch: None))
    assert trainer.cur_run.info.run_id not in ids.values()  # the resume's own run
    validator.start(Engine(lambda engine, batch: None))
    assert validator.cur_run.info.run_id == trainer.cur_run.info.run_id  # the bundle's handlers share it
