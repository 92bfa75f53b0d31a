"""What a new user meets on unseen data: unreadable files in a datalist, bundles run from the shell, notes that
say why a mask is empty, radiological overlays, log intervals. Every bad input: one line on stderr, exit 2, no
traceback, nothing left behind."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _bundle_helpers import assert_refused, run_bundle


pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*argv: str) -> int:
    from medsam3_monai.deploy.cli import main

    return main(list(argv))


def error_line(err: str, command: str) -> str:
    """The one non-progress line of stderr, which must be our error."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"medsam3 {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture()
def kvasir_with_a_truncated_mask(shared_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the Kvasir sample with one mask cut to 2000 bytes, and its datalist."""
    from medsam3_monai.data.datalist import build_datalist, write_datalist

    root = tmp_path / "kvasir"
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
        for path in sorted((shared_data / "Kvasir-SEG_sample" / folder).iterdir()):
            (root / folder / path.name).write_bytes(path.read_bytes())
    cut = sorted((root / "masks").iterdir())[0]
    cut.write_bytes(cut.read_bytes()[:2000])
    datalist = write_datalist(build_datalist("Kvasir-SEG", root).datalist, tmp_path / "kvasir.json")
    return datalist, cut


def test_evaluate_names_the_unreadable_file_or_skips_it(kvasir_with_a_truncated_mask, tmp_path, capsys):
    datalist, cut = kvasir_with_a_truncated_mask
    out = tmp_path / "report"
    common = ["evaluate", "--datalist", str(datalist), "--checkpoint", "tiny", "--split", "all", "--no-mlflow",
              "--no-progress", "--overlays", "0", "--out", str(out)]
    assert cli(*common) == 2
    line = error_line(capsys.readouterr().err, "evaluate")
    assert str(cut) in line and "truncated" in line
    assert not out.exists()

    assert cli(*common, "--skip-unreadable") == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable case(s) of 5" in err
    skipped = (out / "skipped.csv").read_text()
    assert str(cut) in skipped and "truncated" in skipped
    assert "1 unreadable case(s) skipped" in (out / "table.md").read_text()
    assert sum(1 for _ in (out / "cases.csv").open()) == 1 + 4  # header + the four readable cases


def test_datalist_check_decodes_every_file(kvasir_with_a_truncated_mask, tmp_path, capsys):
    _, cut = kvasir_with_a_truncated_mask
    root, out = cut.parent.parent, tmp_path / "checked.json"
    assert cli("datalist", "Kvasir-SEG", str(root), "--out", str(out)) == 0  # headers only: passes
    capsys.readouterr()
    out.unlink()
    assert cli("datalist", "Kvasir-SEG", str(root), "--out", str(out), "--check", "--no-progress") == 2
    assert str(cut) in error_line(capsys.readouterr().err, "datalist") and not out.exists()
    assert cli("datalist", "Kvasir-SEG", str(root), "--out", str(out), "--check", "--skip-bad", "--no-progress") == 0
    assert "1 skipped (bad input)" in capsys.readouterr().err
    assert sum(len(v) for v in json.loads(out.read_text()).values()) == 4


@pytest.mark.slow
def test_bundles_end_an_input_error_with_one_line_and_exit_2(kvasir_with_a_truncated_mask, tmp_path):
    datalist, cut = kvasir_with_a_truncated_mask
    evaluation = run_bundle(["inference.json", "evaluate.json"], "--bundle_root", str(tmp_path / "eval"),
                            "--datalists", str([str(datalist)]), "--split", "all", "--mlflow", "false",
                            "--checkpoint", "tiny")
    no_weights = run_bundle(["inference.json", "evaluate.json"], "--bundle_root", str(tmp_path / "eval"),
                            "--datalists", str([str(datalist)]))
    training = run_bundle(["train.json"], "--bundle_root", str(tmp_path / "train"),
                          "--datalists", str([str(tmp_path / "missing.json")]))
    for result, expected in ((evaluation, str(cut)), (no_weights, "no weights"), (training, "missing.json")):
        assert_refused(result, expected)
    assert not (tmp_path / "eval").exists() and not (tmp_path / "train").exists()


def test_garbage_checkpoints_get_our_words_not_pytorchs(tmp_path, capsys, shared_data):
    image = next((shared_data / "Kvasir-SEG_sample" / "images").iterdir())
    for name, payload in (("random.pt", bytes(range(256)) * 8), ("text.pt", b"hello")):
        garbage = tmp_path / name
        garbage.write_bytes(payload)
        out = tmp_path / "mask.png"
        assert cli("segment", str(image), "--prompt", "polyp", "--checkpoint", str(garbage), "--out", str(out)) == 2
        line = error_line(capsys.readouterr().err, "segment")
        assert "not a readable PyTorch checkpoint" in line and "Re-running" not in line and not out.exists()


def test_nan_volumes_are_refused_without_talking_of_training(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    volume = np.random.default_rng(0).random((16, 16, 4)).astype(np.float32)
    volume[3, 3, 1] = np.nan
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    out = tmp_path / "seg.nii.gz"
    assert cli("segment", str(path), "--prompt", "liver", "--out", str(out), "--no-progress") == 2
    line = error_line(capsys.readouterr().err, "segment")
    assert "NaN" in line and "training" not in line and not out.exists()


def test_every_prediction_empty_is_said_under_the_table(tmp_path):
    from medsam3_monai.engines.reports import EvaluationReport

    record = {"dataset": "D", "group": "internal", "case": "c", "prompt": "polyp", "protocol": "top_query",
              "label": 1, "score": 0.1, "metrics": {"dice": 0.0, "iou": 0.0}, "empty_prediction": True}
    report = EvaluationReport(tmp_path / "r", mlflow=False)
    report.records = [record, dict(record, case="d")]
    report.write()
    text = (tmp_path / "r" / "table.md").read_text()
    assert "WARNING: every prediction of this run is empty" in text and "--protocol semantic" in text
    report.records[1] = dict(record, case="d", empty_prediction=False)
    report.write()
    assert "WARNING" not in (tmp_path / "r" / "table.md").read_text()
    # a run of pictures and volumes whose volumes all came back empty: said for that dataset, with the volume hint
    report.records = [dict(record, volume=False, empty_prediction=False, protocol="semantic"),
                      dict(record, dataset="Hippo", volume=True), dict(record, dataset="Hippo", case="e", volume=True)]
    report.write()
    text = (tmp_path / "r" / "table.md").read_text()
    assert "- WARNING: every prediction of dataset Hippo is empty (2 case-prompt rows, protocol top_query), so its " \
           "foreground cases score 0. A volume keeps only the slices whose detection scores >= --score-threshold" in text
    assert "--volume-score-threshold" in text and "of dataset D" not in text and "of this run" not in text
    # a protocol that reads the score threshold: lowering it is the first thing to try
    report.records = [dict(record, protocol="threshold", volume=False), dict(record, case="d", protocol="threshold")]
    report.write()
    text = (tmp_path / "r" / "table.md").read_text()
    assert "(2 case-prompt rows), so every foreground case scores 0: with protocol top_query" not in text
    assert "With protocol threshold a query scoring below --score-threshold gives no mask" in text
    # thresholds every empty row scored above: the masks themselves are empty, and a lower threshold is no cure
    report.params = {"score_threshold": 0.05, "volume_score_threshold": 0.0}
    report.records = [dict(record, protocol="threshold", volume=False),
                      dict(record, case="d", protocol="threshold", volume=False)]
    report.write()
    text = (tmp_path / "r" / "table.md").read_text()
    assert "no mask the model gave (protocol threshold) has a foreground pixel. With protocol threshold every prompt " \
           "scored >= --score-threshold (0.05), so queries were kept and their masks themselves" in text
    assert "needs a lower threshold" not in text
    report.records = [dict(record, volume=False, empty_prediction=False, protocol="semantic"),
                      dict(record, dataset="Hippo", volume=True), dict(record, dataset="Hippo", case="e", volume=True)]
    report.write()
    text = (tmp_path / "r" / "table.md").read_text()
    assert "Every volume's best slice scored >= the volumes' detection threshold (0), so slices were kept" in text
    assert "needs a lower threshold" not in text
    report.params = {"score_threshold": 0.5, "volume_score_threshold": 0.5}  # scores 0.1: below it
    report.write()
    assert "needs a lower threshold" in (tmp_path / "r" / "table.md").read_text()


def test_a_label_value_in_no_truth_mask_is_said_under_the_table(tmp_path):
    from medsam3_monai.engines.reports import EvaluationReport, absent_label_warnings

    def record(case: str, label: int, prompt: str, empty_truth: bool) -> dict:
        return {"dataset": "D", "group": "internal", "case": case, "prompt": prompt, "protocol": "top_query",
                "label": label, "score": 0.9, "metrics": {"dice": 1.0, "iou": 1.0}, "empty_prediction": False,
                "empty_truth": empty_truth}

    records = [record("a", 1, "kidney", False), record("b", 1, "kidney", True),
               record("a", 2, "kidney tumor", True), record("b", 2, "kidney tumor", True)]
    (line,) = absent_label_warnings(records)
    assert "dataset D: label value 2 (prompt 'kidney tumor')" in line and "2 case(s)" in line
    assert absent_label_warnings(records[:2]) == []  # label 1 is in case a's truth
    # a many-class case lacking most classes: one line for its dataset, the first values with their prompts
    ct = [dict(record("ct", v, f"organ {v}", v != 5), dataset="CT") for v in range(1, 21)]
    (ct_line,) = absent_label_warnings(ct)
    assert ct_line.startswith("dataset CT: 19 of its 20 label values, 1 (prompt 'organ 1'), 2 (prompt 'organ 2'), ")
    assert "9 (prompt 'organ 9') and 11 more (10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20), are in no truth mask of " \
        "its 1 case(s), so their rows only count false positives" in ct_line and "'organ 5'" not in ct_line
    assert len(absent_label_warnings(ct + records)) == 2  # one line per dataset
    assert absent_label_warnings([{k: v for k, v in r.items() if k != "empty_truth"} for r in records]) == []
    report = EvaluationReport(tmp_path / "r", mlflow=False)
    report.records = records
    report.write()
    assert f"- WARNING: {line}." in (tmp_path / "r" / "table.md").read_text()


def test_volume_notes_tell_low_scores_from_empty_masks():
    from medsam3_monai.deploy.segment_cli import empty_volume_notes

    prediction = SimpleNamespace(prompts=["liver", "spleen", "kidney"], scores=[0.088, 0.03, 0.9],
                                 seed_slices=[-1, -1, 4])
    low_score_but_empty, low, = empty_volume_notes(prediction, 0.05)
    assert "'liver'" in low_score_but_empty and "0.088" in low_score_but_empty and "masks were empty" in low_score_but_empty
    assert "'spleen'" in low and "no slice scored >= 0.05 (best 0.030)" in low
    assert low.endswith("lower --score-threshold to see weaker detections")  # segment's option; a server's its own
    assert empty_volume_notes(prediction, 0.05, remedy="send a lower score_threshold")[1].endswith(
        "the mask is empty: send a lower score_threshold")


def test_a_picture_whose_floor_emptied_a_mask_gets_a_note(tmp_path, capsys, shared_data):
    """``medsam3 segment --protocol top_query_floor``: a prompt whose best query scores below the floor gets an empty
    mask and a note saying why and what to lower; the papers' top_query reads no threshold and notes nothing."""
    from medsam3_monai.deploy.cli import main

    image = sorted((shared_data / "Kvasir-SEG_sample" / "images").glob("*.jpg"))[0]
    common = [str(image), "--prompt", "polyp", "--checkpoint", "tiny", "--device", "cpu", "--no-progress"]
    from medsam3_monai.deploy.arguments import random_weights_notes

    (random,) = (f"note: {line}" for line in random_weights_notes("tiny"))  # said after every tiny network's outputs
    assert main(["segment", *common, "--out", str(tmp_path / "top.png")]) == 0
    assert capsys.readouterr().err.strip() == random
    assert main(["segment", *common, "--out", str(tmp_path / "floor.png"), "--protocol", "top_query_floor",
                 "--score-threshold", "1"]) == 0
    score = json.loads((tmp_path / "floor.png.json").read_text())["labels"]["255"]["score"]
    assert capsys.readouterr().err.strip() == (
        f"note: 'polyp': no query scored >= 1 (best {score:.3f}), so the top_query_floor mask is empty: lower "
        f"--score-threshold to see weaker detections\n{random}")
    # a datalist item's own threshold: the note names the item's entry, which is what to lower
    datalist = tmp_path / "own.json"
    datalist.write_text(json.dumps({"test": [{"image": str(image), "prompts": {"1": "polyp"},
                                              "protocol": "top_query_floor", "score_threshold": 1}]}))
    assert main(["segment", "--datalist", str(datalist), "--out-dir", str(tmp_path / "own"), "--checkpoint", "tiny",
                 "--device", "cpu", "--no-progress"]) == 0
    assert capsys.readouterr().err.strip().endswith(
        "so the top_query_floor mask is empty: lower the item's \"score_threshold\" in the datalist to see weaker "
        f"detections\n{random}")
    # a threshold that nothing would read (a picture, top_query) is refused, not ignored
    assert main(["segment", *common, "--out", str(tmp_path / "unused.png"), "--score-threshold", "0.3"]) == 2
    assert error_line(capsys.readouterr().err, "segment").endswith(
        "--score-threshold 0.3 would change nothing here: protocol top_query reads no threshold; it is read by "
        "--protocol top_query_floor and threshold, and by volumes")
    assert not (tmp_path / "unused.png").exists()
    assert main(["agent", str(image), "--request", "segment the polyp", "--llm", "none", "--checkpoint", "tiny",
                 "--out", str(tmp_path / "agent.png"), "--score-threshold", "0.3", "--no-progress"]) == 2
    assert "--score-threshold 0.3 would change nothing here" in error_line(capsys.readouterr().err, "agent")
    assert not (tmp_path / "agent.png").exists()


def test_a_note_does_not_round_a_score_up_to_the_threshold_it_missed():
    from medsam3_monai.protocol_registry import score_text

    assert score_text(0.251688, 0.25182) == "0.251688" and score_text(0.251688, 0.3) == "0.252"


@pytest.mark.parametrize("diagonal, flips", [
    ((3.0, 3.0, 3.0), (True, True)),      # RAS-stored (nibabel's default): both axes run the wrong way on screen
    ((-1.0, -1.0, 1.0), (False, False)),  # LPS-stored (DICOM order): already radiological
    ((-1.0, 1.0, 1.0), (True, False)),    # LAS-stored
])
def test_volume_slices_are_shown_in_the_radiological_convention(diagonal, flips):
    from medsam3_monai.metrics.plots import radiological_view

    plane = torch.arange(12.0).reshape(3, 4)  # rows along volume axis 1 (Y), columns along axis 0 (X)
    shown = radiological_view(plane, torch.diag(torch.tensor([*diagonal, 1.0])), row_axis=1, col_axis=0)
    expected = plane.flip(-2) if flips[0] else plane
    expected = expected.flip(-1) if flips[1] else expected
    assert torch.equal(shown, expected)
    swapped = torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # axis 0 is y, axis 1 is x
    # plane[i, j] = 4i + j at x = i, y = j; shown[r, c] must have y = 3 - r (anterior on top), x = 2 - c (right on
    # the left): plane[2 - c, 3 - r] = 11 - 4c - r
    expected = torch.tensor([[11.0, 7, 3], [10, 6, 2], [9, 5, 1], [8, 4, 0]])
    assert torch.equal(radiological_view(plane, swapped, row_axis=1, col_axis=0), expected)


@pytest.mark.parametrize("order, plane_name", [((2, 1, 0), "sagittal"), ((0, 2, 1), "coronal")])
def test_sagittal_and_coronal_slices_are_shown_head_up(order, plane_name):
    """A volume stored in sagittal (or coronal) slices: the panels show the head at the top and anterior (the
    patient's right) on the left, the radiological display of that plane, not the axial rule turned sideways."""
    from medsam3_monai.metrics.plots import radiological_view, slice_plane

    affine = torch.eye(4)[:, [*order, 3]]  # RAS world axes in the array's order: the third is x (or y)
    assert slice_plane(affine) == plane_name
    plane = torch.arange(12.0).reshape(3, 4)  # rows along array axis 1, columns along array axis 0
    shown = radiological_view(plane, affine, row_axis=1, col_axis=0)
    # sagittal: axis 1 is y (A), axis 0 is z (S); coronal: axis 1 is z (S), axis 0 is x (R)
    # plane[i, j] = 4i + j; the head up means the world z falls down the screen, the left/right rule as named
    if plane_name == "sagittal":  # rows: S from top (j = 3) down; columns: A from the left (i = 2) to the right
        expected = torch.tensor([[11.0, 7, 3], [10, 6, 2], [9, 5, 1], [8, 4, 0]])
    else:  # rows: S (i) from the top, 2 down to 0; columns: the patient's right (x = j large) on the left
        expected = torch.tensor([[11.0, 10, 9, 8], [7, 6, 5, 4], [3, 2, 1, 0]])
    assert torch.equal(shown, expected)


def test_training_logs_every_log_interval_iterations_not_every_one():
    from medsam3_monai.bundle import config_parser

    parser = config_parser("train.json", log_interval=10)
    handler = next(h for h in parser.get("train#handlers") if isinstance(h, dict) and h.get("_target_") == "StatsHandler")
    parser["train#handlers"] = [handler]
    (stats,) = parser.get_parsed_content("train#handlers")
    assert callable(stats.iteration_log)
    assert [i for i in range(1, 31) if stats.iteration_log(None, i)] == [10, 20, 30]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    """``--device cuda`` where torch sees no GPU: one line naming the fix, not the driver's traceback (every command
    resolves --device with ``tensors.resolve_device``)."""
    from medsam3_monai.tensors import resolve_device

    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    for name, words in (("cuda", "no CUDA GPU"), ("cuda:1", "no CUDA GPU"), ("gpu0", "not a device")):
        with pytest.raises(ValueError, match=words):
            resolve_device(name)
    picture = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (32, 32)).save(picture)
    assert cli("segment", str(picture), "--prompt", "x", "--out", str(tmp_path / "m.png"), "--device", "cuda") == 2
    assert "--device cpu" in error_line(capsys.readouterr().err, "segment")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_options_that_would_go_unused_are_refused_not_ignored(shared_data, tmp_path, capsys):
    """A CT window with no CT input, a channel of a file that has one, a slice size the checkpoint does not work
    at, an unreadable starting checkpoint: each said at once (exit 2, one line, nothing written), where they
    used to be dropped silently (or, for the demo, found after the data was made)."""
    ct = shared_data / "TotalSegmentator_example_CT_MR" / "images" / "example_ct_sm.nii.gz"
    picture = sorted((shared_data / "Kvasir-SEG_sample" / "images").iterdir())[0]
    out = tmp_path / "out"
    volume = ["segment", str(ct), "--prompt", "liver", "--tracker", "none", "--no-progress"]
    refused = [
        (["segment", *volume[1:], "--ct-window", "lung", "--out", f"{out}.nii.gz"], "add --modality CT"),
        (["segment", *volume[1:], "--channel", "1", "--out", f"{out}.nii.gz"], "has 1 channel (a 3D volume)"),
        (["segment", str(picture), "--prompt", "polyp", "--channel", "2", "--out", f"{out}.png"], "is a 2D picture"),
        (["convert-checkpoint", "tiny", str(out), "--image-size", "100"], "multiple of 14"),
        (["demo", "--checkpoint", str(picture), "--out", str(out)], "not a readable PyTorch checkpoint"),
    ]
    for argv, expected in refused:
        assert cli(*argv) == 2, argv
        assert expected in error_line(capsys.readouterr().err, argv[0]), argv
        assert not list(tmp_path.iterdir()), argv
    converted = tmp_path / "tiny224"  # a checkpoint keeps its own size
    assert cli("convert-checkpoint", "tiny", str(converted), "--image-size", "224") == 0
    assert f"note: tiny is a random-init network (for tests and demos): {converted} holds random weights" in \
        capsys.readouterr().err
    assert cli("convert-checkpoint", str(converted), str(out), "--image-size", "112") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert last.startswith("medsam3 convert-checkpoint: error: ") and "works at 224 px" in last, last
    assert not out.exists()
    # the demo checks the size a checkpoint stores before it makes any data, in its own option's words
    assert cli("demo", "--checkpoint", str(converted), "--image-size", "112", "--out", str(out)) == 2
    assert error_line(capsys.readouterr().err, "demo").endswith("works at 224 px, not 112: give --image-size 224")
    assert not out.exists()
    # the control: with a CT input the window and channel 0 of a 3D volume apply, and the sidecar says so
    assert cli(*volume, "--modality", "CT", "--ct-window", "lung", "--channel", "0", "--out", f"{out}.nii.gz") == 0
    sidecar = json.loads(Path(f"{out}.nii.gz.json").read_text())
    assert (sidecar["ct_window"], sidecar["channel"]) == ("lung", 0)


def test_a_short_box_and_a_missing_datalist_say_what_is_wrong(tmp_path):
    from medsam3_monai.data.datalist import load_datalist
    from medsam3_monai.inferers.inputs import box_prompts

    with pytest.raises(ValueError, match=r"box \[1, 2, 3\] must be four finite numbers"):
        box_prompts([1, 2, 3], 1, (10, 10))
    with pytest.raises(FileNotFoundError, match="make one with `medsam3 datalist"):
        load_datalist(tmp_path / "missing.json")


def test_a_datalist_without_a_validation_list_says_how_to_train_without_one(tmp_path):
    from medsam3_monai.data.datalist import DatalistError, load_datalist

    path = tmp_path / "noval.json"
    path.write_text(json.dumps({"training": []}))
    with pytest.raises(DatalistError, match=r"no 'validation' list \(has training\) \(add \"validation\": \[\] to "
                                            r"train without validation\)"):
        load_datalist(path, "validation")
    with pytest.raises(DatalistError, match=r"no 'test' list \(has training\) \(add \"test\": \[\] for none\)"):
        load_datalist(path, "test")


def test_a_datalist_given_twice_to_training_is_warned_of(tmp_path):
    from medsam3_monai.data.datalist import load_datalists

    image = tmp_path / "a.png"
    image.write_bytes(b"")
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": [{"image": "a.png", "label": "a.png", "prompts": {"1": "x"}}]}))
    with pytest.warns(UserWarning, match=rf"1 training image\(s\) are listed more than once \(e.g. {image}\): "
                                         rf"datalist {path} is given 2 times, so each copy counts"):
        assert len(load_datalists([path, str(path)])) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_datalists([path])) == 1


def test_a_report_whose_every_case_was_skipped_says_so(tmp_path):
    from medsam3_monai.engines.inference import UnreadableCase
    from medsam3_monai.engines.reports import EvaluationReport

    report = EvaluationReport(tmp_path / "r", mlflow=False)
    report.unreadable = [UnreadableCase({"image": "a.nii.gz"}, "a.nii.gz: cannot be read as an image")]
    with pytest.raises(ValueError, match=r"every case read was unreadable and skipped \(--skip-unreadable: 1, e.g. "
                                         r"a.nii.gz: cannot be read as an image\)"):
        report.write()


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "argument --epochs: '0'"), (["--lr", "-1"], "'-1': give a learning rate > 0, or 0 for the "
                                                                    "papers' rates"),
    (["--batch-size", "0"], "argument --batch-size: '0'"),
])
def test_demo_refuses_counts_and_rates_as_train_does(tmp_path, capsys, argv, message):
    from medsam3_monai.deploy.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["demo", "--out", str(tmp_path / "demo"), *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """An --overlay, --out-dir or evaluate --out in a folder that cannot be written (a read-only mount, another
    user's folder; ``os.access`` answers as for such a folder), and a name longer than the file system allows: one
    line naming the option, exit 2, before the network runs, nothing written (they were tracebacks after the work)."""
    import json
    import os

    from PIL import Image

    picture, mask = tmp_path / "in.png", tmp_path / "in_mask.png"
    Image.new("L", (32, 24), 90).save(picture)
    Image.new("L", (32, 24), 0).save(mask)
    denied = tmp_path / "denied"
    denied.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != denied and access(path, mode))
    segment = ["segment", str(picture), "--prompt", "x"]
    assert cli(*segment, "--out", str(tmp_path / "ok.png"), "--overlay", str(denied / "ov.png")) == 2
    assert error_line(capsys.readouterr().err, "segment").endswith(
        f"--overlay {denied / 'ov.png'}: the folder {denied} cannot be written (read-only, or not this user's): "
        "choose a place you can write")
    assert cli(*segment, "--out-dir", str(denied / "masks")) == 2
    assert f"--out-dir {denied / 'masks'}: the folder {denied} cannot" in error_line(capsys.readouterr().err,
                                                                                        "segment")
    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps({"test": [{"image": str(picture), "label": str(mask), "prompts": {"1": "x"},
                                              "dataset": "D"}]}))
    assert cli("evaluate", "--datalist", str(datalist), "--checkpoint", "tiny", "--out", str(denied / "ev"),
               "--no-mlflow") == 2
    assert f"--out {denied / 'ev'}: the folder {denied} cannot" in error_line(capsys.readouterr().err, "evaluate")
    long = tmp_path / ("b" * 250 + ".png")  # its mask's sidecar, b..b_seg.png.json, is 263 bytes
    Image.new("L", (32, 24), 90).save(long)
    assert cli("segment", str(long), "--prompt", "x", "--out-dir", str(tmp_path / "masks")) == 2
    assert "longer than the file system allows (255); choose a shorter name" in error_line(
        capsys.readouterr().err, "segment")
    assert cli("segment", str(picture), "--prompt", "x", "--out", str(tmp_path / ("c" * 260 + ".png"))) == 2
    assert "--out " in error_line(capsys.readouterr().err, "segment")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.png", "in_mask.png", "denied", "d.json",
                                                                 long.name])
    assert not list(denied.iterdir())


def test_a_quoted_tilde_is_the_home_folder_in_segments_paths(tmp_path, monkeypatch, capsys, shared_data):
    """``'~/x.png'`` (quoted, or from a config file: no shell expanded it) is the home folder's, for the one input and
    --out as for --out-dir's inputs; it was a folder named '~' (or 'not found')."""
    from PIL import Image

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "..")
    Image.new("L", (32, 24), 90).save(tmp_path / "x.png")
    assert cli("segment", "~/x.png", "--prompt", "x", "--out", "~/m.png") == 0
    assert (tmp_path / "m.png").is_file() and not (tmp_path.parent / "~").exists()
    # every command's paths (helper-87: datalist --out wrote into a folder named '~' in the cwd)
    assert cli("datalist", "Kvasir-SEG_sample", str(shared_data / "Kvasir-SEG_sample"), "--out=~/k.json") == 0
    assert (tmp_path / "k.json").is_file() and not (tmp_path.parent / "~").exists()
    capsys.readouterr()


def test_the_overlay_of_an_elongated_picture_has_a_bounded_size(tmp_path, capsys):
    """A 1000 x 20 picture: its overlay is drawn at most twice as wide as high per panel (it was 50 times: 20000 px
    wide here, and a 20000 x 10 picture's overlay filled the machine's memory)."""
    from PIL import Image

    picture = tmp_path / "strip.png"
    Image.new("L", (1000, 20), 90).save(picture)
    overlay = tmp_path / "o.png"
    assert cli("segment", str(picture), "--prompt", "x", "--out", str(tmp_path / "m.png"),
               "--overlay", str(overlay)) == 0
    width, height = Image.open(overlay).size
    assert width <= 1000 and height <= 600, (width, height)
    capsys.readouterr()


def test_a_file_whose_name_starts_with_a_dash_gets_the_way_to_name_it(tmp_path, monkeypatch, capsys):
    """argparse takes ``-dash.png`` for an option; the usage error says it is a file and how to name it."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    Image.new("L", (32, 24), 90).save("-dash.png")
    with pytest.raises(SystemExit) as raised:
        cli("segment", "-dash.png", "--prompt", "x", "--out", "m.png")
    assert raised.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "unrecognized arguments: -dash.png (-dash.png is a file: write ./-dash.png for a name that starts with '-')")
    assert cli("segment", "./-dash.png", "--prompt", "x", "--out", "m.png") == 0
    capsys.readouterr()


def test_a_hash_in_a_path_of_a_bundle_command_is_refused_before_anything_is_made(tmp_path, capsys, shared_data):
    """MONAI's bundle configs read '#' in any string as their old key separator (helper-94: `train --out tr#2` wrote
    tr::2/ and said tr#2; evaluate's reports went to ev::1/). Commands that run no bundle keep such paths."""
    datalist = tmp_path / "k.json"
    assert cli("datalist", "Kvasir-SEG_sample", str(shared_data / "Kvasir-SEG_sample"), "--out", str(datalist)) == 0
    capsys.readouterr()
    for argv in (["train", "--datalist", str(datalist), "--out", str(tmp_path / "tr#2")],
                 ["evaluate", "--datalist", str(datalist), "--checkpoint", "tiny", "--out", str(tmp_path / "ev#1")]):
        assert cli(*argv) == 2
        assert "read '#' as a key separator" in error_line(capsys.readouterr().err, argv[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json"]
