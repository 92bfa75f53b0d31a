"""The file system is not the user's friend: a full disk (quota, file-size limit, read-only mount) ends a command in one
line with status 2 and nothing half-written; a second command aimed at a folder another one is writing is refused at
once; outputs are checked before the work; broken links are named, not dropped; a folder's own earlier masks are not
taken as inputs."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsam3_monai.deploy.cli import main
from medsam3_monai.storage_errors import StorageError, storage_error

pytestmark = pytest.mark.usefixtures("one_thread")


def _picture(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.arange(40 * 56).reshape(40, 56) % 255).astype(np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------------ a full disk
@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "free space on that disk"),
                                         (errno.EDQUOT, "within your quota"),
                                         (errno.EFBIG, "ulimit -f"), (errno.EROFS, "writable file system")])
def test_a_storage_error_is_found_behind_any_wrapper_and_says_what_to_do(code, words):
    """torch re-raises a failed write as a RuntimeError while handling the OSError (its context), which MONAI's
    bundle wraps again (a cause): the OSError is found, and said with the file and what to do."""
    written = OSError(code, os.strerror(code), "/scratch/run/model.pt")
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8147904")
    torch_error.__context__ = written
    bundle_error = RuntimeError("Failed to evaluate ConfigExpression")
    bundle_error.__cause__ = torch_error
    found = storage_error(bundle_error)
    assert isinstance(found, StorageError)
    assert str(found).startswith(f"writing /scratch/run/model.pt: {os.strerror(code)}: ") and words in str(found)
    assert storage_error(RuntimeError("applying transform")) is None  # a bug is no storage error
    sqlite = storage_error(RuntimeError("(sqlite3.OperationalError) database or disk is full [SQL: UPDATE ...]"))
    assert sqlite is not None and "database or disk is full: free space" in str(sqlite)


def test_a_full_disk_ends_a_command_in_one_line_with_status_2(tmp_path, monkeypatch, capsys):
    """``medsam3 segment`` writing its mask onto a full disk: one line naming the file and what to do, status 2,
    no traceback, and nothing left where the mask was to be."""
    from medsam3_monai.deploy import segment_cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "mask.png"))

    monkeypatch.setattr(segment_cli, "write_prediction", full)
    picture = _picture(tmp_path / "in.png")
    assert main(["segment", str(picture), "--prompt", "polyp", "--out", str(tmp_path / "mask.png"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"medsam3 segment: error: writing {tmp_path / 'mask.png'}: No space left on device: free space" in err
    assert "Traceback" not in err and not (tmp_path / "mask.png").exists()


def test_the_inference_bundle_writes_a_mask_whole_or_not_at_all(tmp_path, monkeypatch):
    """MONAI's writers are given a hidden name and renamed: a write that fails leaves neither file."""
    from medsam3_monai.inferers.postprocess import write_staged

    target = tmp_path / "case_seg.nii.gz"

    def half_then_full(name):
        assert Path(name).parent == tmp_path and name.endswith("-case_seg.nii.gz")  # the format's suffix kept last
        Path(name).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_staged(target, half_then_full)
    assert list(tmp_path.iterdir()) == []
    write_staged(target, lambda name: Path(name).write_bytes(b"whole"))
    assert [p.name for p in tmp_path.iterdir()] == ["case_seg.nii.gz"] and target.read_bytes() == b"whole"


def test_the_server_answers_a_full_disk_with_507(monkeypatch):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import http.client

    from _server_helpers import running_server
    from medsam3_monai.deploy import server as server_module

    def full(upload, target):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(server_module, "_save_upload", full)
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + b"\x89PNG" + b"\r\n--b--\r\n")
    with running_server(start_timeout_s=30) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("PUT", "/datastore/?image=x", body, {"Content-Type": "multipart/form-data; boundary=b"})
        answer = conn.getresponse()
        status, said = answer.status, json.loads(answer.read())
        conn.close()
    assert status == 507 and "the server's disk is full or read-only" in said["error"]


# ------------------------------------------------------------------------------------------------ one writer
def test_a_second_command_aimed_at_a_folder_being_written_is_refused_at_once(tmp_path, capsys):
    from medsam3_monai.deploy.output_lock import output_lock

    out = tmp_path / "jobs" / "report"
    evaluate = ["evaluate", "--datalist", str(tmp_path / "none.json"), "--checkpoint", "tiny", "--no-progress"]
    with output_lock(out, "--out"):  # another process's evaluate, as far as this one can tell (flock is per open file)
        assert (tmp_path / "jobs" / ".report.medsam3.lock").is_file()
        assert main([*evaluate, "--out", str(out)]) == 2
        assert f"--out {out}: another medsam3 command is writing into it now" in capsys.readouterr().err
        assert [p.name for p in (tmp_path / "jobs").iterdir()] == [".report.medsam3.lock"]  # the holder's alone
    assert list(tmp_path.iterdir()) == []  # the holder's lock and the parent it made are gone with it
    # a refused command leaves nothing either: not its lock, not the parent folders it made for it
    assert main([*evaluate, "--out", str(tmp_path / "a" / "b" / "c")]) == 2
    assert "none.json" in capsys.readouterr().err and not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------------------ outputs first
def test_convert_checkpoint_checks_its_output_before_reading_and_fills_an_empty_linked_folder(tmp_path, capsys):
    from medsam3_monai.networks import MedSAM3Net
    from medsam3_monai.networks.checkpoints import save_checkpoint_file

    model = save_checkpoint_file(MedSAM3Net("tiny").sam3, tmp_path / "model.pt")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["convert-checkpoint", str(model), str(blocker / "hf")]) == 2
    assert "is a file, so the folder cannot be made there" in capsys.readouterr().err
    empty = tmp_path / "made_by_admin"
    empty.mkdir()
    link = tmp_path / "link"
    link.symlink_to(empty)
    assert main(["convert-checkpoint", str(model), str(link), "--config", "tiny", "--image-size", "112"]) == 0
    assert (empty / "config.json").is_file() and link.is_symlink()
    assert not [p for p in empty.iterdir() if p.name.startswith(".")]  # the staging folder is gone
    assert MedSAM3Net(str(link)).image_size == 112


def test_demo_checks_its_output_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["demo", "--out", str(blocker / "demo")]) == 2
    assert "--out" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ inputs
def test_a_broken_link_among_folder_inputs_is_named_not_dropped(tmp_path, capsys):
    _picture(tmp_path / "links" / "a.png")
    (tmp_path / "links" / "lost.png").symlink_to(tmp_path / "unmounted" / "lost.png")
    assert main(["segment", str(tmp_path / "links"), "--prompt", "x", "--out-dir", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"input {tmp_path / 'links' / 'lost.png'} is a symbolic link to {tmp_path / 'unmounted' / 'lost.png'}, " \
           "which does not exist" in err


def test_a_converter_names_a_broken_link_in_a_published_layout(shared_data, tmp_path):
    from medsam3_monai.data import build_datalist
    from medsam3_monai.data.pairs import DatalistError

    source = shared_data / "Kvasir-SEG_sample"
    for kind in ("images", "masks"):
        (tmp_path / kind).mkdir()
        for path in (source / kind).iterdir():
            (tmp_path / kind / path.name).symlink_to(path)
    (tmp_path / "images" / "gone.jpg").symlink_to(tmp_path / "unmounted.jpg")
    with pytest.raises(DatalistError, match=r"images/gone.jpg: is a symbolic link to .*unmounted.jpg, which does "
                                            r"not exist"):
        build_datalist("Kvasir-SEG_sample", tmp_path)


def test_a_folder_s_earlier_masks_are_not_taken_as_inputs(tmp_path, capsys):
    folder = tmp_path / "pictures"
    _picture(folder / "a.png")
    common = ["segment", str(folder), "--prompt", "x", "--no-progress"]
    assert main([*common, "--out-dir", str(folder), "--overwrite"]) == 0
    assert (folder / "a_seg.png").is_file()
    capsys.readouterr()
    assert main([*common, "--out-dir", str(folder), "--overwrite"]) == 0  # again: the mask is no input now
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a_seg.png", "a_seg.png.json"]
    assert main([*common, "--out-dir", str(tmp_path / "again")]) == 0
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["a_seg.png", "a_seg.png.json"]
    assert "left out 1 mask(s) an earlier medsam3 segment wrote there" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ train's ending
@pytest.mark.parametrize("status, says, mark", [
    (-signal.SIGKILL, "the training process was killed by SIGKILL (often the out-of-memory killer", "KILLED"),
    (2, "the training stopped with status 2 (the error is above)", "FAILED"),
    (-signal.SIGINT, "interrupted", "KILLED")])
def test_train_says_how_a_stopped_run_goes_on(tmp_path, monkeypatch, capsys, status, says, mark):
    import argparse

    from medsam3_monai.deploy import train_cli

    checkpoints = tmp_path / "runs" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "checkpoint_iter4.pt").write_bytes(b"x")
    marked = []
    monkeypatch.setattr(train_cli, "_end_interrupted_runs", lambda *args: marked.append(args[-1]))
    train_cli._say_how_it_ended(argparse.Namespace(no_mlflow=False), tmp_path, status, True, "sqlite:///x", None)
    line = capsys.readouterr().err.strip()
    assert line == (f"medsam3 train: {says}; the same command resumes from the newest checkpoint, "
                    f"{checkpoints / 'checkpoint_iter4.pt'}") or (says in line and "resumes" in line)
    assert marked == [mark]


def test_a_model_file_written_past_a_real_file_size_limit_is_a_storage_error(tmp_path):
    """Not a monkeypatched error: a child process under a 64 kB file-size limit (RLIMIT_FSIZE; Python ignores
    SIGXFSZ, so the write fails with EFBIG) saves the tiny network's model file. torch's own writer would say only
    "unexpected pos"; the file is written through a Python file, whose OSError is recognised, and nothing is left."""
    import subprocess
    import sys

    script = (
        "import resource, sys\n"
        "from medsam3_monai.networks import MedSAM3Net\n"
        "from medsam3_monai.networks.checkpoints import save_checkpoint_file\n"
        "from medsam3_monai.storage_errors import storage_error\n"
        "net = MedSAM3Net('tiny')\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        "try:\n"
        f"    save_checkpoint_file(net.sam3, {str(tmp_path / 'model.pt')!r})\n"
        "except BaseException as err:\n"
        "    print(storage_error(err))\n"
    )
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's package, whichever one is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (repo, os.environ.get("PYTHONPATH"))))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "File too large: raise the file-size limit (ulimit -f" in done.stdout, done.stdout + done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # neither the model file nor its temporary


def test_one_lock_whatever_the_path_and_the_training_child_inherits_it(tmp_path):
    """A link to the folder, or a path through '..', is the same folder: the same lock. The descriptors of held
    locks are what ``medsam3 train`` passes to its bundle process, so the lock outlives a killed front."""
    from medsam3_monai.deploy.output_lock import held_descriptors, output_lock

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with output_lock(tmp_path / "link", "--out"):
        assert len(held_descriptors()) == 1 and (tmp_path / ".real.medsam3.lock").is_file()
        for same in (real, tmp_path / "new" / ".." / "real"):
            with pytest.raises(FileExistsError, match="another medsam3 command is writing into it now"):
                with output_lock(same, "--out"):
                    pass
    assert held_descriptors() == () and not (tmp_path / "new").exists()


def test_evaluate_into_a_deleted_mlflow_experiment_is_refused_before_the_work(shared_data, tmp_path, capsys):
    from mlflow import MlflowClient

    from medsam3_monai.bundle import sqlite_uri
    from medsam3_monai.data import build_datalist, write_datalist

    items = build_datalist("Kvasir-SEG_sample", shared_data / "Kvasir-SEG_sample").datalist["training"][:1]
    datalist = write_datalist({"training": [], "validation": [], "test": items}, tmp_path / "d.json")

    store = sqlite_uri(tmp_path / "store" / "mlruns.db")
    (tmp_path / "store").mkdir()
    client = MlflowClient(tracking_uri=store)
    client.delete_experiment(client.create_experiment("old"))
    assert main(["evaluate", "--datalist", str(datalist), "--checkpoint", "tiny", "--out", str(tmp_path / "report"),
                 "--tracking-uri", store, "--experiment", "old", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"MLflow experiment 'old' in {store} is deleted: restore it (mlflow experiments restore" in err, err
    assert not (tmp_path / "report").exists()


def test_the_inference_bundles_png_writer_logs_the_final_name(tmp_path, caplog):
    """A PNG is written under a staged hidden name and renamed whole: the log names the file that stays, not the
    staged one (which no longer exists when the run ends)."""
    import logging

    import numpy as np

    from medsam3_monai.inferers.postprocess import RowsFirstPILWriter

    writer = RowsFirstPILWriter(output_dtype=np.uint8)
    writer.set_data_array(np.zeros((1, 4, 6), np.uint8), channel_dim=0)
    target = tmp_path / "case_seg.png"
    monai_writer = logging.getLogger("monai.data.image_writer")  # MONAI's own logger (it does not propagate)
    monai_writer.addHandler(caplog.handler)
    try:
        writer.write(str(target), verbose=True)
    finally:
        monai_writer.removeHandler(caplog.handler)
    assert target.is_file() and f"writing: {target}" in caplog.text and ".partial" not in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_seg.png"]
