"""`medsam3 reproduce`: the published tables from the catalogue, the table beside them, dataset discovery, and the
command end to end on the shared samples with the tiny network (found / not found, Δ, labelled means, radar chart,
one MLflow run, the manifest)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil

import pytest

from medsam3_monai.data import catalogue as cat
from medsam3_monai.reproduce.discovery import discover, paper_prompts, table1_comparison
from medsam3_monai.reproduce.published import medical_sam3_table, medsam3_table
from medsam3_monai.reproduce.table import build_table, fmt_delta

PAPERS = json.loads((cat.meta_dir() / "papers.json").read_text(encoding="utf-8"))


def _cells(markdown: str, name: str) -> list[str]:
    """The cells of the Markdown row whose first cell is ``name`` (bold or not)."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].strip("*") == name:
            return cells
    raise AssertionError(f"no row {name!r} in\n{markdown}")


# ------------------------------------------------------------------------------------------------ published
def test_medical_sam3_table_is_the_catalogues_table3():
    table = medical_sam3_table()
    medical = PAPERS["medical_sam3"]
    internal = [row["dataset"] for row in medical["internal_eval"]]
    external = [row["dataset"] for row in medical["external_eval"]]
    assert [n for n, g in table.datasets if g == "internal"] == internal
    assert [n for n, g in table.datasets if g == "external"] == external
    sam3, ours = table.column("sam3"), table.column("medical_sam3")
    assert (sam3.runs, ours.runs) == ("baseline", "checkpoint")
    for row in medical["internal_eval"] + medical["external_eval"]:
        assert sam3.published[row["dataset"]] == row["sam3_dice"]
        assert ours.published[row["dataset"]] == row["medical_sam3_dice"]
    # the group means the paper states are the means of its per-dataset values (to its one decimal)
    for group, rows in (("internal", medical["internal_eval"]), ("external", medical["external_eval"])):
        for column, key in ((sam3, "sam3_dice"), (ours, "medical_sam3_dice")):
            assert round(sum(row[key] for row in rows) / len(rows), 1) == column.averages[group], (group, key)
    assert (external, [sam3.published[n] for n in external], [ours.published[n] for n in external]) == (
        ["TN3K", "HC18", "CVC-ClinicDB", "ETIS-Larib", "PH2", "CHASE_DB1", "STARE"],
        [4.2, 23.9, 0.0, 0.0, 18.4, 17.9, 18.6], [40.8, 92.6, 87.9, 86.1, 92.7, 62.6, 54.4])
    assert any("Table 3" in line and "EXTERNAL_DATA" in line for line in table.sources)
    assert (sam3.averages["internal"], sam3.averages["external"]) == (54.0, 11.9)
    assert (ours.averages["internal"], ours.averages["external"]) == (77.0, 73.9)
    assert table.prompts["CHASE_DB1"] == "Retinal Blood Vessel" and table.prompts["DRIVE"] == "Retinal Blood Vessel"
    assert all(table.prompts[name] == cat.eval_prompt(name, "medical_sam3") for name, _ in table.datasets)
    assert any("Table 3" in line and "RADAR_DATA_INTERNAL" in line for line in table.sources)


def test_medsam3_table_holds_its_four_datasets_and_unknown_values_as_none():
    table = medsam3_table()
    assert [n for n, _ in table.datasets] == ["BUSI", "RIM-ONE", "ISIC2018", "Kvasir-SEG"]
    assert table.protocols == ("T", "T+I")
    assert {c.method for c in table.columns if c.runs is None} == {"U-Net", "MedSAM", "SAM 3 (prompt not stated)",
                                                                   "MedSAM-3 (prompt not stated)"}
    assert [(c.runs, c.box_prompts) for c in table.columns if c.method == "MedSAM-3"] == [("checkpoint", False),
                                                                                           ("checkpoint", True)]
    assert table.prompts == {"BUSI": "breast tumor", "RIM-ONE": "optic cup & optic disc", "ISIC2018": "skin lesion",
                             "Kvasir-SEG": "polyp"}
    # the first author's README table (Dice fractions, x100); its SAM 3 / MedSAM-3 prompting is not stated, so the
    # T and T+I columns stay unknown: nothing is invented
    readme = {"unet": [76.18, 84.8, 87.6, 82.44], "medsam": [75.14, 84.79, 91.77, 76.57],
              "sam3_unstated": [71.1, 83.03, 81.78, 76.71], "medsam3_unstated": [77.72, 89.77, 90.58, 88.31]}
    for column in table.columns:
        values = [column.published[name] for name, _ in table.datasets]
        assert values == readme.get(column.key, [None] * 4), column.key
    assert any("d791536" in line for line in table.sources)


# ------------------------------------------------------------------------------------------------ the table
def test_table_reproduces_the_published_numbers_exactly_when_fed_them():
    table = medical_sam3_table()
    internal = table.members("internal")
    external = table.members("external")
    ours = {}
    for column in table.columns:
        ours[column.key] = {name: column.published[name] for name in internal + external}
    names = internal + external
    result = build_table(table, ours, {n: True for n in names}, {n: 10 for n in names}, {"sam3": True,
                                                                                          "medical_sam3": True})
    text = result.to_markdown()
    for row in PAPERS["medical_sam3"]["internal_eval"] + PAPERS["medical_sam3"]["external_eval"]:
        cells = _cells(text, row["dataset"])
        assert cells[4:10] == [f"{row['sam3_dice']:.1f}", f"{row['sam3_dice']:.1f}", "0.0",
                               f"{row['medical_sam3_dice']:.1f}", f"{row['medical_sam3_dice']:.1f}", "0.0"]
    averages = PAPERS["medical_sam3"]["averages"]
    internal_row = _cells(text, "internal: mean of all 10 datasets (as published)")
    assert internal_row[4:10] == [f"{averages['internal_dice_sam3']:.1f}"] * 2 + ["0.0"] + \
        [f"{averages['internal_dice_medical_sam3']:.1f}"] * 2 + ["0.0"]
    external_row = _cells(text, "external: mean of all 7 datasets (as published)")
    assert external_row[4:10] == [f"{averages['external_dice_sam3']:.1f}"] * 2 + ["0.0"] + \
        [f"{averages['external_dice_medical_sam3']:.1f}"] * 2 + ["0.0"]
    assert "found dataset" not in text  # everything found: no 'found only' rows
    # the CSV keeps full precision: per-dataset Δ exactly 0 where the paper gives the value, unknown elsewhere
    deltas = {row["name"]: row["medical_sam3_delta"] for row in result.rows if row["kind"] == "dataset"}
    assert all(deltas[name] == 0.0 for name in internal + external)


def test_missing_datasets_stay_in_the_table_and_found_only_means_are_labelled(tmp_path):
    table = medical_sam3_table()
    ours = {"medical_sam3": {"DRIVE": 50.0, "GlaS": 90.0}}
    found = {name: name in ("DRIVE", "GlaS") for name, _ in table.datasets}
    result = build_table(table, ours, found, {"DRIVE": 20, "GlaS": 5}, {"medical_sam3": True},
                         splits={"DRIVE": "validation", "GlaS": "test", "PAPILA": "test"})
    text = result.to_markdown()
    assert _cells(text, "PAPILA")[2] == "no" and _cells(text, "PAPILA")[7:10] == ["–", "99.4", "–"]
    assert _cells(text, "SegThy")[4] == "not run"  # SAM3 column: no --baseline
    paper_mean = _cells(text, "internal: mean of all 10 datasets (as published)")
    assert paper_mean[2] == "2/10" and paper_mean[7:10] == ["–", "77.0", "–"]  # ours only over all 10
    subset = _cells(text, "internal: mean of the 2 found datasets only")
    assert subset[3] == "25"
    assert subset[7:10] == ["70.0", f"{(55.8 + 88.2) / 2:.1f}", fmt_delta(70.0, (55.8 + 88.2) / 2)]
    assert not any("external: mean of the" in line for line in text.splitlines())  # nothing external found
    path = result.to_csv(tmp_path / "table.csv")
    rows = list(csv.DictReader(path.open()))
    assert len([r for r in rows if r["kind"] == "dataset"]) == 17
    splits = {r["name"]: r["split"] for r in rows}  # the split scored; none for a dataset not found, nor a mean
    assert (splits["DRIVE"], splits["GlaS"], splits["PAPILA"]) == ("validation", "test", "")
    assert all(r["split"] == "" for r in rows if r["kind"] != "dataset")
    assert math.isclose(float(next(r for r in rows if r["kind"] == "found_mean")["medical_sam3_ours"]), 70.0)


# ------------------------------------------------------------------------------------------------ discovery
def test_the_folder_a_published_archive_unpacks_to_is_found(tmp_path):
    """PH2's archive unpacks to PH2Dataset/ (``medsam3 datalist PH2`` read it; reproduce said "not found")."""
    from medsam3_monai.reproduce.discovery import find_folder

    (tmp_path / "PH2Dataset").mkdir()
    assert find_folder(tmp_path, cat.load_catalogue().get("PH2")) == (tmp_path / "PH2Dataset", [])


def test_paper_phrases_map_onto_label_values():
    catalogue = cat.load_catalogue()
    hippocampus = catalogue.get("MSD_Task04_Hippocampus")
    prompts, note = paper_prompts(hippocampus, "posterior hippocampus & anterior hippocampus", catalogue)
    assert prompts == {"1": "anterior hippocampus", "2": "posterior hippocampus"} and note == ""
    prompts, note = paper_prompts(hippocampus, "hippocampus", catalogue)
    assert prompts == dict(hippocampus.labels) and "catalogue concepts used" in note
    drive = paper_prompts(catalogue.get("DRIVE"), "Retinal Blood Vessel", catalogue)
    assert drive == ({"1": "Retinal Blood Vessel"}, "")


@pytest.fixture()
def data_root(shared_data, tmp_path):
    """Dataset folders named as the catalogue expects, linking the shared samples: DRIVE (a Table 3 internal set),
    Kvasir-SEG and BUSI (MedSAM3 sets, not in Table 3), an empty ETIS-Larib folder (not in the layout)."""
    root = tmp_path / "data"
    root.mkdir()
    os.symlink(shared_data / "DRIVE", root / "DRIVE")
    os.symlink(shared_data / "Kvasir-SEG_sample", root / "kvasir_seg")  # an alias spelling
    os.symlink(shared_data / "BUSI", root / "BUSI")
    (root / "ETIS-Larib").mkdir()
    return root


def test_discovery_reports_found_missing_unreadable_and_unconverted(data_root):
    statuses = {s.dataset: s for s in discover(data_root, medical_sam3_table())}
    assert len(statuses) == 17
    drive = statuses["DRIVE"]
    assert drive.found and drive.folder == data_root / "DRIVE"
    assert drive.counts == {"training": 17, "validation": 3, "test": 20} and drive.evaluation_cases() == 20
    assert {item["prompts"]["1"] for split in drive.datalist.values() for item in split} == {"Retinal Blood Vessel"}
    assert drive.images_found == 40 and "Table 1 count not in the catalogue" in table1_comparison(drive)
    assert statuses["ETIS-Larib"].status == "unreadable" and "empty" in statuses["ETIS-Larib"].message
    assert statuses["TN3K"].status == "missing"
    assert str(data_root / "TN3K") in statuses["TN3K"].message and "trainval-image" in statuses["TN3K"].message
    assert statuses["PAPILA"].status == "no_converter" and "no converter" in statuses["PAPILA"].message
    medsam3 = {s.dataset: s for s in discover(data_root, medsam3_table())}
    assert medsam3["Kvasir-SEG"].found and medsam3["Kvasir-SEG"].folder.name == "kvasir_seg"
    assert medsam3["BUSI"].found and medsam3["BUSI"].prompts == {"1": "breast tumor"}
    assert medsam3["ISIC2018"].status == "missing" and medsam3["RIM-ONE"].status == "no_converter"


def _drive_official(shared_data, root, test_labels: bool, drop_masks: int = 0):
    """DRIVE in its official layout (training/, test/), linking the shared sample's files."""
    source = shared_data / "DRIVE"
    for half in ("training", "test"):
        (root / half / "images").mkdir(parents=True)
        (root / half / "1st_manual").mkdir()
    for image in sorted((source / "images").glob("*.tif")):
        number, half = image.stem.split("_")
        os.symlink(image, root / half / "images" / image.name)
        if half == "training" or test_labels:
            os.symlink(source / "masks" / f"{number}_manual1.gif", root / half / "1st_manual" / f"{number}_manual1.gif")
    if not test_labels:
        (root / "test" / "1st_manual").rmdir()
    for mask in sorted((root / "training" / "1st_manual").iterdir())[:drop_masks]:
        mask.unlink()


def test_a_drive_copy_without_test_labels_is_said_to_be_scored_on_validation(shared_data, tmp_path):
    """Today's DRIVE download has no test labels: the table must not pass its validation split off as the paper's
    test half (console and table notes say so); a partial copy names every bad file and what to do."""
    from medsam3_monai.reproduce.report import table_notes
    from medsam3_monai.reproduce.runner import ReproduceSettings

    _drive_official(shared_data, tmp_path / "data" / "DRIVE", test_labels=False)
    drive = next(s for s in discover(tmp_path / "data", medical_sam3_table()) if s.dataset == "DRIVE")
    assert drive.found and drive.counts["test"] == 0 and drive.unlabelled == 20
    assert "scored on its validation split (3 cases: 15 % of the labelled images, seed 42)" in drive.split_warning()
    assert "(3 cases: 15 % of the labelled images, seed 42; 2 of them scored (--max-cases))" in drive.split_warning(2)
    assert drive.split_warning(5) == drive.split_warning()  # a sample as large as the split: all of it
    settings = ReproduceSettings(paper="medical-sam3", data_root=str(tmp_path / "data"), checkpoint="tiny",
                                 out=str(tmp_path / "out"))
    notes = table_notes(medical_sam3_table(), [drive], settings, {}, {})
    assert any(n.startswith("WARNING: DRIVE has no labelled test images") for n in notes)

    _drive_official(shared_data, tmp_path / "labelled" / "DRIVE", test_labels=True)
    labelled = next(s for s in discover(tmp_path / "labelled", medical_sam3_table()) if s.dataset == "DRIVE")
    assert labelled.counts["test"] == 20 and labelled.split_warning() == ""

    _drive_official(shared_data, tmp_path / "partial" / "DRIVE", test_labels=True, drop_masks=2)
    partial = next(s for s in discover(tmp_path / "partial", medical_sam3_table()) if s.dataset == "DRIVE")
    assert partial.status == "unreadable" and "--skip-bad" not in partial.message
    assert "a dataset is evaluated whole: repair or remove these files" in partial.message
    assert "21_training.tif" in partial.message and "22_training.tif" in partial.message  # every file named
    assert "or give --skip-unreadable to leave them out" in partial.message
    # --skip-unreadable: the same copy with a broken header too is evaluated without those files, which are named
    broken = sorted((tmp_path / "partial" / "DRIVE" / "training" / "images").iterdir())[3]
    broken.unlink()
    broken.write_bytes(b"II*\x00 not a TIFF")
    skipped = next(s for s in discover(tmp_path / "partial", medical_sam3_table(), skip_unreadable=True)
                   if s.dataset == "DRIVE")
    assert skipped.found and skipped.counts == {"training": 14, "validation": 3, "test": 20}
    assert len(skipped.left_out) == 3 and "cannot read image header" in skipped.left_out[2]
    assert f"; 3 file(s) left out (--skip-unreadable): {skipped.left_out[0]}" in skipped.line()


def test_table1_comparison_says_when_a_copy_differs(data_root):
    drive = next(s for s in discover(data_root, medical_sam3_table()) if s.dataset == "DRIVE")
    drive.published_images = 40
    assert table1_comparison(drive).endswith("matches Table 1")
    drive.published_images = 45
    assert "DIFFERS from Table 1 (45)" in table1_comparison(drive)


# ------------------------------------------------------------------------------------------------ end to end
def _run(argv):
    from medsam3_monai.deploy.cli import main

    return main(argv)


@pytest.mark.slow
def test_reproduce_medical_sam3_end_to_end_with_the_tiny_network(data_root, tmp_path, capsys):
    import torch

    from medsam3_monai.networks import MedSAM3Net
    from medsam3_monai.networks.checkpoints import save_checkpoint_file

    baseline = save_checkpoint_file(MedSAM3Net("tiny").sam3, tmp_path / "sam3_tiny.pt")
    out = tmp_path / "repro"
    torch.manual_seed(0)
    code = _run(["reproduce", "medical-sam3", "--data-root", str(data_root), "--checkpoint", "tiny",
                 "--baseline", str(baseline), "--image-size", "112", "--max-cases", "1", "--out", str(out),
                 "--no-progress", "--overlays", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # found / not found, with what was expected
    assert "1 of 17 evaluation sets found" in captured.err
    assert "found     DRIVE (internal)" in captured.err
    assert f"not found TN3K (external): expected {data_root / 'TN3K'}/" in captured.err
    assert "unreadable ETIS-Larib" in captured.err and "no converter PAPILA" in captured.err
    # the table: ours, published, Δ per checkpoint; every dataset listed; means labelled
    text = (out / "table.md").read_text()
    assert text == captured.out.strip() + "\n"
    assert "| SAM3 ours | SAM3 paper | Δ | Medical SAM3 ours | Medical SAM3 paper | Δ |" in text
    drive = _cells(text, "DRIVE")
    assert drive[2:4] == ["yes", "1"] and drive[5] == "24.8" and drive[8] == "55.8"
    assert float(drive[6]) == pytest.approx(float(drive[4]) - 24.8, abs=0.051)
    assert _cells(text, "TN3K")[2] == "not found" and _cells(text, "PAPILA")[2] == "no converter"
    assert _cells(text, "internal: mean of all 10 datasets (as published)")[4:6] == ["–", "54.0"]
    assert _cells(text, "internal: mean of the 1 found dataset only")[5] == "24.8"
    assert _cells(text, "external: mean of all 7 datasets (as published)")[7:9] == ["–", "73.9"]
    assert "WARNING: at most 1 cases per dataset" in text and "tiny random-init" in text
    # everything in one folder
    for name in ("table.csv", "datasets.md", "timing.md", "radar.png", "radar_medical_sam3_vs_paper.png",
                 "datalists/DRIVE.json", "medical_sam3/cases.csv", "medical_sam3/DRIVE/cases.csv", "sam3/table.md"):
        assert (out / name).is_file(), name
    datalist = json.loads((out / "datalists" / "DRIVE.json").read_text())
    assert datalist["test"][0]["prompts"] == {"1": "Retinal Blood Vessel"}
    with (out / "medical_sam3" / "cases.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 1 and rows[0]["prompt"] == "Retinal Blood Vessel" and rows[0]["protocol"] == "top_query"
    # the manifest: versions, commit, checkpoint hashes ('tiny' has no file), timings
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["paper"] == "medical-sam3"
    assert manifest["environment"]["packages"]["torch"] and manifest["environment"]["packages"]["transformers"]
    checkpoints = {c["role"]: c for c in manifest["checkpoints"]}
    assert checkpoints["checkpoint"]["files"] == []
    digest = hashlib.sha256(baseline.read_bytes()).hexdigest()
    assert checkpoints["baseline"]["files"] == [{"path": str(baseline.resolve()), "bytes": baseline.stat().st_size,
                                                 "sha256": digest}]
    assert [t["dataset"] for t in manifest["timings"]] == ["DRIVE", "DRIVE"]
    assert manifest["timings"][0]["full_split_cases"] == 20 and manifest["timings"][0]["seconds_per_case"] > 0
    assert {d["dataset"]: d["status"] for d in manifest["datasets"]}["TN3K"] == "missing"
    drive_entry = next(d for d in manifest["datasets"] if d["dataset"] == "DRIVE")
    assert drive_entry["evaluated_split"] == "test" and drive_entry["warning"] is None
    # one MLflow run with the numbers and every file
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("medsam3-reproduce").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == manifest["mlflow"]["run_id"]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["found"] == "DRIVE"
    assert run.data.params["release_rules"] == "False"
    assert run.data.params[f"sha256/baseline/{baseline.name}"] == digest
    assert run.data.metrics["medical_sam3/DRIVE/published_dice"] == 55.8
    assert run.data.metrics["medical_sam3/paper_mean/internal/published_dice"] == 77.0
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"table.md", "manifest.json", "radar.png", "datalists", "medical_sam3", "sam3"} <= logged


@pytest.mark.slow
def test_the_cases_column_leaves_out_the_cases_skipped_as_unreadable(data_root, tmp_path, monkeypatch):
    """With ``--skip-unreadable``, DRIVE's cases column counts the cases evaluated: 2 asked, 1 reported unreadable
    (injected into the evaluation report: a corrupt file that passes discovery's header checks is hard to make)."""
    import medsam3_monai.engines.evaluation as evaluation

    evaluate = evaluation.run_evaluation

    def one_unreadable(*args, **kwargs):
        report = evaluate(*args, **kwargs)
        report.unreadable = [*report.unreadable, "injected unreadable case"]
        return report

    monkeypatch.setattr(evaluation, "run_evaluation", one_unreadable)
    out = tmp_path / "repro"
    assert _run(["reproduce", "medical-sam3", "--data-root", str(data_root), "--checkpoint", "tiny", "--baseline",
                 "tiny", "--image-size", "112", "--max-cases", "2", "--out", str(out), "--no-progress",
                 "--overlays", "0", "--skip-unreadable"]) == 0
    text = (out / "table.md").read_text()
    assert _cells(text, "DRIVE")[2:4] == ["yes", "1"]
    assert "WARNING: unreadable cases left out (--skip-unreadable), so n is below the split's count: DRIVE 1" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped_unreadable_cases"] == {"DRIVE": 1}
    assert manifest["command"][:3] == ["medsam3", "reproduce", "medical-sam3"]  # as given, however it was run


@pytest.mark.slow
def test_a_dataset_none_of_whose_cases_can_be_read_drops_out_and_the_others_are_scored(shared_data, tmp_path,
                                                                                          capsys):
    """--skip-unreadable with every Kvasir-SEG picture truncated (its header still reads, so discovery finds it): the
    run goes on, scores BUSI, and names Kvasir-SEG's unreadable cases; it ended with no report at all before."""
    root = tmp_path / "data"
    shutil.copytree(shared_data / "Kvasir-SEG_sample", root / "Kvasir-SEG")
    for picture in (root / "Kvasir-SEG" / "images").glob("*.jpg"):
        picture.write_bytes(picture.read_bytes()[: picture.stat().st_size // 3])
    os.symlink(shared_data / "BUSI", root / "BUSI")
    argv = ["reproduce", "medsam3", "--data-root", str(root), "--checkpoint", "tiny", "--image-size", "112",
            "--max-cases", "1", "--protocol", "T", "--no-progress", "--overlays", "0"]
    failed = tmp_path / "failed"
    assert _run([*argv, "--out", str(failed)]) == 2 and not failed.exists()  # without the option: nothing written
    out = tmp_path / "repro"  # (another store: MLflow keeps its engine on the one the failed run removed)
    assert _run([*argv, "--out", str(out), "--skip-unreadable"]) == 0
    text = (out / "table.md").read_text()
    assert _cells(text, "Kvasir-SEG")[2] == "unreadable cases" and _cells(text, "BUSI")[2] == "yes"
    assert "WARNING: unreadable cases left out (--skip-unreadable)" in text and "Kvasir-SEG 1" in text
    skipped = (out / "medsam3_t" / "Kvasir-SEG" / "skipped.csv").read_text()
    assert ".jpg" in skipped and "Kvasir-SEG" in skipped
    assert "none of its 1 case(s) could be read" in (out / "datasets.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    kvasir = next(d for d in manifest["datasets"] if d["dataset"] == "Kvasir-SEG")
    assert kvasir["status"] == "unreadable_cases" and manifest["skipped_unreadable_cases"] == {"Kvasir-SEG": 1}
    # nothing readable anywhere: the error names the files itself (the output folder, skipped.csv too, is removed)
    (root / "BUSI").unlink()
    alone = tmp_path / "alone"
    capsys.readouterr()
    assert _run([*argv, "--out", str(alone), "--skip-unreadable"]) == 2 and not alone.exists()
    said = capsys.readouterr().err
    assert "no dataset could be scored: no case of Kvasir-SEG (1 case(s); e.g. " in said and ".jpg" in said
    assert "skipped.csv" not in said.splitlines()[-1]


def test_release_rules_apply_to_pictures_and_leave_volumes_as_the_papers():
    from medsam3_monai.reproduce.runner import ReproduceSettings, evaluation_rules

    settings = ReproduceSettings("medical-sam3", "root", "tiny", "out", release_rules=True)
    pictures, volumes = [{"image": "a.png"}], [{"image": "a.png"}, {"image": "b.nii.gz"}]
    assert evaluation_rules(settings, pictures) == {"protocol": "top_query_floor", "score_threshold": 0.1,
                                                    "skip_empty_truth": True}
    assert evaluation_rules(settings, volumes) == {"protocol": "top_query"}
    settings.release_rules = False
    assert evaluation_rules(settings, pictures) == {"protocol": "top_query"}


@pytest.mark.slow
def test_reproduce_medical_sam3_by_the_release_rules(data_root, tmp_path, capsys):
    out = tmp_path / "repro"
    assert _run(["reproduce", "medical-sam3", "--data-root", str(data_root), "--checkpoint", "tiny",
                 "--image-size", "112", "--max-cases", "1", "--out", str(out), "--no-progress", "--overlays", "0",
                 "--release-rules"]) == 0, capsys.readouterr().err
    with (out / "medical_sam3" / "cases.csv").open() as stream:
        (row,) = list(csv.DictReader(stream))
    assert row["dataset"] == "DRIVE" and row["protocol"] == "top_query_floor"
    text = (out / "table.md").read_text()
    assert "Rules (--release-rules)" in text and "best query scoring at least 0.1" in text
    assert "Protocol of the published numbers: " in text and "ours follows the rules above" in text
    assert "\n- Protocol: " not in text  # (the published protocol is not ours here)
    assert "empty when its score is below 0.1" in (out / "medical_sam3" / "DRIVE" / "table.md").read_text()


@pytest.mark.slow
def test_reproduce_medsam3_text_and_box_protocol(data_root, tmp_path, capsys):
    out = tmp_path / "medsam3"
    code = _run(["reproduce", "medsam3", "--data-root", str(data_root), "--checkpoint", "tiny", "--protocol", "T+I",
                 "--image-size", "112", "--max-cases", "1", "--out", str(out), "--no-progress", "--overlays", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "2 of 4 evaluation sets found" in captured.err
    text = (out / "table.md").read_text()
    assert "protocol T+I" in text and "protocol T (" not in text
    assert ("| U-Net paper | MedSAM paper | SAM 3 (prompt not stated) paper | MedSAM-3 (prompt not stated) paper "
            "| SAM 3 ours | SAM 3 paper | Δ | MedSAM-3 ours | MedSAM-3 paper | Δ |" in text)
    kvasir = _cells(text, "Kvasir-SEG")
    assert kvasir[4:8] == ["82.4", "76.6", "76.7", "88.3"]  # the README's values, published only
    assert kvasir[2] == "yes" and kvasir[8] == "not run"  # SAM 3: no --baseline
    assert 0.0 <= float(kvasir[11]) <= 100.0 and kvasir[12:14] == ["–", "–"]  # MedSAM-3 ours; T+I value unknown
    assert _cells(text, "ISIC2018")[2] == "not found" and _cells(text, "RIM-ONE")[2] == "no converter"
    assert "mean of the 2 found datasets only" in text and "MedSAM-3 agent: not run" in text
    rows = list(csv.DictReader((out / "medsam3_ti" / "cases.csv").open()))
    assert {r["protocol"] for r in rows} == {"top_query+box"}
    assert {r["prompt"] for r in rows} == {"breast tumor", "polyp"}
    assert (out / "radar_TI.png").is_file()


@pytest.mark.slow
def test_reproduce_medsam3_agent_row_with_the_offline_planner(data_root, tmp_path, capsys):
    out = tmp_path / "agent"
    code = _run(["reproduce", "medsam3", "--data-root", str(data_root), "--checkpoint", "tiny", "--protocol", "T",
                 "--agent", "--llm", "none", "--image-size", "112", "--max-cases", "1", "--out", str(out),
                 "--no-progress", "--overlays", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    text = (out / "table.md").read_text()
    assert "| MedSAM-3 ours | MedSAM-3 paper | Δ | MedSAM-3 agent ours | MedSAM-3 agent paper | Δ |" in text
    kvasir = _cells(text, "Kvasir-SEG")
    assert 0.0 <= float(kvasir[-3]) <= 100.0 and kvasir[-2:] == ["–", "–"]  # agent ours; published value unknown
    assert "MedSAM-3 agent: the --checkpoint driven by the agent, planner offline" in text
    assert "not run" not in text.split("MedSAM-3 agent:")[1]
    rows = list(csv.DictReader((out / "medsam3_agent" / "Kvasir-SEG" / "agent_cases.csv").open()))
    assert len(rows) == 1 and rows[0]["planner"] and rows[0]["request"].startswith("Segment the polyp")
    assert list((out / "medsam3_agent" / "Kvasir-SEG" / "traces").glob("*.trace.json"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["agent"] is True and manifest["settings"]["llm"] == "none"
    assert any(f.startswith("medsam3_agent/Kvasir-SEG/traces/") for f in manifest["files"])


def test_bad_input_exits_2_and_writes_nothing(data_root, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "never"
    assert _run(["reproduce", "medical-sam3", "--data-root", str(empty), "--checkpoint", "tiny",
                 "--out", str(out)]) == 2
    assert "none of the 17 evaluation sets" in capsys.readouterr().err and not out.exists()
    assert _run(["reproduce", "medical-sam3", "--data-root", str(tmp_path / "nowhere"), "--checkpoint", "tiny",
                 "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert _run(["reproduce", "medical-sam3", "--data-root", str(a_file), "--checkpoint", "tiny",
                 "--out", str(out)]) == 2
    assert "is not a folder" in capsys.readouterr().err and not out.exists()
    # a tracking server that does not answer: refused at once (MLflow alone retries for minutes), nothing written
    assert _run(["reproduce", "medical-sam3", "--data-root", str(data_root), "--checkpoint", "tiny",
                 "--out", str(out), "--tracking-uri", "http://127.0.0.1:9"]) == 2
    assert "MLflow tracking URI http://127.0.0.1:9 cannot be used" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):  # the paper's own usage, not reproduce's
        _run(["reproduce", "medical-sam3", "--data-root", str(data_root), "--checkpoint", "tiny", "--out", str(out),
              "--protocol", "T"])
    assert "usage: medsam3 reproduce medical-sam3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(["reproduce", "medical-sam3", "--data-root", str(data_root), "--checkpoint", "tiny", "--out", str(out),
              "--overlays", "-1"])
    assert "--overlays: '-1': give a number >= 0" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    assert _run(["reproduce", "medsam3", "--data-root", str(data_root), "--checkpoint", "tiny",
                 "--out", str(taken)]) == 2
    assert "not an empty folder" in capsys.readouterr().err and os.listdir(taken) == ["x"]
    assert _run(["reproduce", "medical-sam3", "--data-root", str(data_root), "--checkpoint", "tiny", "--out", str(out),
                 "--dry-run"]) == 0
    assert "found     DRIVE" in capsys.readouterr().err and not out.exists()
    # the dry run checks what the run would refuse: a used --out, a mistyped weights path
    assert _run(["reproduce", "medical-sam3", "--data-root", str(data_root), "--checkpoint", "tiny",
                 "--out", str(taken), "--dry-run"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert _run(["reproduce", "medical-sam3", "--data-root", str(data_root), "--checkpoint", str(tmp_path / "no.pt"),
                 "--out", str(out), "--dry-run"]) == 2
    assert f"{tmp_path / 'no.pt'}" in capsys.readouterr().err and not out.exists()
    # a dataset whose layout has a file that cannot be read: said as such, not as "not found"
    broken = tmp_path / "broken"
    shutil.copytree(data_root / "DRIVE", broken / "DRIVE")
    first = sorted((broken / "DRIVE").rglob("*.tif"))[0]
    first.write_bytes(first.read_bytes()[:100])
    assert _run(["reproduce", "medical-sam3", "--data-root", str(broken), "--checkpoint", "tiny", "--out", str(out),
                 "--dry-run"]) == 2
    assert "DRIVE is there but not readable in the expected layout" in capsys.readouterr().err
