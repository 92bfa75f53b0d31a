"""Volumes as a new user runs them: options that cannot act on volumes are refused (evaluate's 2D protocols when
every case is a volume, the inference bundle's --tracker given a name instead of a model); a 5D file and a mask value
without a prompt are named as they are; a volume not stored axially is noted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _bundle_helpers import assert_refused, run_bundle

from medsam3_monai.deploy.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def hippocampus_datalist(shared_data: Path, tmp_path: Path) -> Path:
    folder = shared_data / "MSD_Task04_Hippocampus_cropped"
    image = sorted((folder / "images").glob("*.nii.gz"))[0]
    item = {"image": str(image), "label": str(folder / "masks" / image.name), "dataset": "MSD_Task04_Hippocampus",
            "modality": "MRI", "prompts": {"1": "anterior hippocampus", "2": "posterior hippocampus"},
            "instance_rule": "semantic", "mask_encoding": "label_map", "case": image.name.split(".")[0]}
    path = tmp_path / "hippocampus.json"
    path.write_text(json.dumps({"training": [], "validation": [], "test": [item]}))
    return path


@pytest.mark.parametrize("option, named", [(("--protocol", "semantic"), "--protocol semantic"),
                                           (("--box-prompts",), "--box-prompts")])
def test_evaluate_refuses_2d_options_when_every_case_is_a_volume(hippocampus_datalist, tmp_path, capsys, option,
                                                                 named):
    """Volumes always take the detector's top query and the tracker: a 2D protocol or box prompts would change
    nothing but the label the table carries."""
    out = tmp_path / "eval"
    assert main(["evaluate", "--datalist", str(hippocampus_datalist), "--checkpoint", "tiny", "--out", str(out),
                 "--no-progress", "--no-mlflow", *option]) == 2
    err = capsys.readouterr().err
    assert f"{named} acts on 2D cases, and every case of this run is a volume" in err
    assert not out.exists()


def test_a_run_of_pictures_and_volumes_labels_each_dataset_with_the_protocol_it_ran(hippocampus_datalist, kvasir,
                                                                                    tmp_path, capsys):
    """--protocol semantic acts on the pictures; the volumes take the detector's top query and the tracker, and
    their rows say so (cases.csv, table.csv and a Protocol column in table.md). --save-predictions writes each
    case's label map at its input's size."""
    import csv

    import numpy as np

    datalist = json.loads(hippocampus_datalist.read_text())
    datalist["test"].append({"image": str(kvasir), "label": str(kvasir.parent.parent / "masks" / kvasir.name),
                             "dataset": "Kvasir-SEG", "prompts": {"1": "polyp"}, "case": kvasir.stem})
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(datalist))
    out = tmp_path / "eval"
    assert main(["evaluate", "--datalist", str(path), "--checkpoint", "tiny", "--out", str(out), "--no-progress",
                 "--protocol", "semantic", "--tracker", "none", "--save-predictions"]) == 0
    report = next(out.rglob("cases.csv")).parent
    from PIL import Image

    picture = np.asarray(Image.open(report / "predictions" / "Kvasir-SEG" / f"{kvasir.stem}_seg.png"))
    assert picture.shape == Image.open(kvasir).size[::-1] and set(np.unique(picture)) <= {0, 1}
    assert (report / "predictions" / "MSD_Task04_Hippocampus" / "hippocampus_001_seg.nii.gz").is_file()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["dataset_protocols"] in ("MSD_Task04_Hippocampus: top_query; Kvasir-SEG: semantic",
                                                    "Kvasir-SEG: semantic; MSD_Task04_Hippocampus: top_query")
    with (report / "cases.csv").open() as f:
        cases = {(row["dataset"], row["protocol"]) for row in csv.DictReader(f)}
    assert cases == {("MSD_Task04_Hippocampus", "top_query"), ("Kvasir-SEG", "semantic")}
    with (report / "table.csv").open() as f:
        table = {row["name"]: row["protocol"] for row in csv.DictReader(f)}
    assert table["MSD_Task04_Hippocampus"] == "top_query" and table["Kvasir-SEG"] == "semantic"
    assert table["overall"] in ("top_query, semantic", "semantic, top_query")
    # one dataset of both kinds cannot take two protocols: refused before anything runs
    for item in datalist["test"]:
        item["dataset"] = "Mixed"
    path.write_text(json.dumps(datalist))
    refused = tmp_path / "refused"
    assert main(["evaluate", "--datalist", str(path), "--checkpoint", "tiny", "--out", str(refused), "--no-progress",
                 "--no-mlflow", "--protocol", "semantic"]) == 2
    assert "dataset(s) Mixed hold 2D pictures and volumes" in capsys.readouterr().err and not refused.exists()
    markdown = (report / "table.md").read_text()
    assert "| Dataset | Group | Protocol | n |" in markdown and "|---|---|---|---:|" in markdown
    assert "protocol of the 2D cases `semantic`" in markdown and "Volumes (1, protocol `top_query`)" in markdown


@pytest.mark.slow
def test_the_inference_bundle_names_tracker_source_when_given_a_tracker_name(hippocampus, tmp_path):
    result = run_bundle(["inference.json"], "--bundle_root", str(tmp_path / "run"), "--datalist",
                        str([str(hippocampus)]), "--prompts", "['hippocampus']", "--checkpoint", "tiny",
                        "--tracker", "none")
    last = assert_refused(result, "tracker must be a loaded tracker model or None, not 'none'")
    assert "--tracker_source" in last
    assert not any((tmp_path / "run").rglob("*.nii.gz"))


def test_a_5d_volume_is_refused_with_the_files_own_shape(tmp_path):
    import nibabel as nib
    import numpy as np

    from medsam3_monai.transforms.io import load_medical_image

    path = tmp_path / "vector.nii.gz"
    nib.Nifti1Image(np.zeros((4, 5, 3, 1, 2), dtype=np.float32), np.eye(4)).to_filename(path)
    with pytest.raises(ValueError, match=r"has 5 dimensions \(shape \(4, 5, 3, 1, 2\)\)"):
        load_medical_image(path)


def test_a_mask_value_without_a_prompt_is_named_with_both_fixes():
    import torch

    from medsam3_monai.transforms import DecodeLabeld

    label = torch.tensor([[[0, 1], [2, 3]]], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"no prompt for \[3\]\).*give a prompt for each label value"):
        DecodeLabeld(keys="label")({"label": label, "prompts": {"1": "a", "2": "b"}})


def test_a_volume_not_stored_axially_is_noted():
    import numpy as np

    from types import SimpleNamespace

    from medsam3_monai.deploy.segment_cli import slice_axis_note, volume_notes
    from medsam3_monai.metrics.plots import slice_plane

    assert slice_axis_note(np.eye(4)) is None  # RAS: axial slices
    assert slice_axis_note(np.diag([-1.0, -1.0, 1.0, 1.0])) is None  # LPS
    sagittal = np.eye(4)[:, [2, 1, 0, 3]]  # third axis along x
    assert "segmented in sagittal slices" in slice_axis_note(sagittal)
    assert "coronal" in slice_axis_note(np.eye(4)[:, [0, 2, 1, 3]])
    # the plane the overlays' volume panels are titled with ("slice 12 (sagittal)")
    planes = [slice_plane(a) for a in (np.diag([-1.0, -1.0, 1.0, 1.0]), sagittal, np.eye(4)[:, [0, 2, 1, 3]])]
    assert planes == ["axial", "sagittal", "coronal"]
    empty = SimpleNamespace(prompts=["liver"], scores=[0.1], seed_slices=[-1])
    assert volume_notes(SimpleNamespace(affine=sagittal, **vars(empty)), 0.5)[0] == slice_axis_note(sagittal)
    assert len(volume_notes(SimpleNamespace(affine=np.eye(4), **vars(empty)), 0.5)) == 1  # the empty mask's alone


def test_the_inference_bundle_checks_its_inputs_and_options_before_the_network(hippocampus, shared_data, tmp_path):
    """As ``medsam3 segment`` does: a missing input, a 2D protocol for a volume and a ``--ct_window`` no CT input
    reads are refused before anything loads or is written; an input found unreadable later is said once (Ignite's
    "terminating due to exception" lines are not repeated)."""
    from medsam3_monai.bundle import check_inference_inputs

    picture = shared_data / "Kvasir-SEG_sample" / "images" / "cju0qkwl35piu0993l0dewei2.jpg"
    items = [{"image": str(picture)}, {"image": str(hippocampus)}]
    runner = ["/venv/lib/python3.11/site-packages/monai/bundle/__main__.py", "run", "--config_file", "inference.json"]
    check_inference_inputs(items, "top_query", argv=runner)
    with pytest.raises(FileNotFoundError, match=r"/nowhere.png: not found; give existing .* --skip_unreadable true"):
        check_inference_inputs([*items, {"image": "/nowhere.png"}], "top_query", argv=runner)
    check_inference_inputs([*items, {"image": "/nowhere.png"}], "top_query", skip_unreadable=True, argv=runner)
    with pytest.raises(ValueError, match="--protocol threshold applies to 2D images but .*hippocampus.* is a volume"):
        check_inference_inputs(items, "threshold", argv=runner)
    check_inference_inputs(items[:1], "threshold", argv=runner)
    with pytest.raises(ValueError, match="--ct_window lung applies to CT inputs, but no input is marked CT"):
        check_inference_inputs(items, "top_query", argv=[*runner, "--ct_window", "lung"])
    check_inference_inputs([dict(items[1], modality="CT")], "top_query", argv=[*runner, "--ct_window", "lung"])
    with pytest.raises(ValueError, match="--protocol top-query: unknown protocol 'top-query'; choose from"):
        check_inference_inputs(items[1:], "top-query", argv=runner)  # a typo, not "a 2D protocol"
    with pytest.raises(ValueError, match="hippocampus_001.nii.gz: channel 1 requested but the volume has 1"):
        check_inference_inputs(items[1:], "top_query", argv=runner, channel=1)  # from the header: nothing runs
    with pytest.raises(ValueError, match="cju0qkwl35piu0993l0dewei2.jpg: is a 2D picture: channel 0 picks"):
        check_inference_inputs(items, "top_query", argv=runner, channel=0)
    with pytest.raises(ValueError, match="--channel must be a whole number >= 0 .*, got 'abc'"):
        check_inference_inputs(items, "top_query", argv=runner, channel="abc")  # the runner passes text as is
    with pytest.raises(FileNotFoundError, match="/nowhere.png: not found; give existing .* in --datalist$"):
        check_inference_inputs([{"image": "/nowhere.png"}], "top_query", skip_unreadable=True, argv=runner)

    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(picture.read_bytes()[:5000])
    result = run_bundle(["inference.json"], "--bundle_root", str(tmp_path / "run"), "--datalist",
                        str([str(picture), str(truncated)]), "--prompts", "['polyp']", "--checkpoint", "tiny")
    assert_refused(result, "truncated.jpg: cannot be read as an image")
    assert (result.stdout + result.stderr).count("truncated.jpg: cannot be read") == 1
    # skipping every case is a run that wrote nothing: an error, not status 0
    result = run_bundle(["inference.json"], "--bundle_root", str(tmp_path / "none"), "--datalist",
                        str([str(truncated)]), "--prompts", "['polyp']", "--checkpoint", "tiny",
                        "--skip_unreadable", "true")
    assert_refused(result, "none of the 1 case(s) could be read (first: ")


def test_a_volume_without_a_modality_is_noted_and_a_ct_one_named(tmp_path, capsys):
    """A volume is min-max scaled when nothing names its modality: ``segment`` says so (naming CT when its values
    look like Hounsfield units), and ``evaluate``'s items and ``datalist --check`` name the items without one."""
    import warnings

    import nibabel as nib
    import numpy as np

    from medsam3_monai.data.selection import evaluation_items, volumes_without_modality
    from medsam3_monai.transforms.intensity import unscaled_volume_note

    rng = np.random.default_rng(0)
    ct = rng.integers(-1024, 400, (24, 24, 3)).astype(np.int16)
    nib.Nifti1Image(ct, np.diag([1.5, 1.5, 3.0, 1.0])).to_filename(tmp_path / "ct.nii.gz")
    common = ["segment", str(tmp_path / "ct.nii.gz"), "--prompt", "liver", "--checkpoint", "tiny", "--device", "cpu",
              "--no-progress", "--tracker", "none"]
    assert main([*common, "--out", str(tmp_path / "plain.nii.gz")]) == 0
    low, high = int(ct.min()), int(ct.max())
    assert (f"note: no modality was given, so the volume was min-max scaled, but its values ({low} to {high}) look "
            "like CT Hounsfield units: give its modality (CT)") in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "ct_window.nii.gz"), "--modality", "CT"]) == 0
    assert "no modality was given" not in capsys.readouterr().err
    import torch

    assert "look like CT" not in unscaled_volume_note(torch.tensor([[0.0, 833.0]]))  # an MRI's: no CT named
    garbage = unscaled_volume_note(torch.tensor([[-2.2e38, 8.6e36]]))  # a corrupt file's voxels (helper-76)
    assert "look like CT" not in garbage and "beyond any modality's range: check the file" in garbage
    nib.Nifti1Image((ct > 0).astype(np.uint8), np.diag([1.5, 1.5, 3.0, 1.0])).to_filename(tmp_path / "mask.nii.gz")
    items = [{"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "mask.nii.gz"), "prompts": {"1": "liver"}}]
    datalist = tmp_path / "own.json"
    datalist.write_text(json.dumps({"training": [], "validation": [], "test": items}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluation_items(datalist)
    said = volumes_without_modality(items)
    assert said.startswith(f"1 volume item(s) have no 'modality' (e.g. {tmp_path / 'ct.nii.gz'}), so they are "
                           "min-max scaled") and said in [str(w.message) for w in caught]
    assert volumes_without_modality([dict(items[0], modality="CT")]) is None
    assert main(["datalist", "--check", str(datalist)]) == 0
    assert f"note: {datalist}: {said}" in capsys.readouterr().err


def test_a_plain_nifti_named_gz_is_told_to_be_renamed(tmp_path):
    import nibabel as nib
    import numpy as np

    from medsam3_monai.transforms.io import DataError, load_medical_image

    plain = tmp_path / "v.nii"
    nib.Nifti1Image(np.zeros((4, 5, 3), np.float32), np.eye(4)).to_filename(plain)
    misnamed = tmp_path / "v.nii.gz"
    misnamed.write_bytes(plain.read_bytes())
    with pytest.raises(DataError, match=r"v.nii.gz: is a plain \(uncompressed\) NIfTI named .gz; rename it to .nii"):
        load_medical_image(misnamed)
    misnamed.write_bytes(b"\0" * 600)  # not a NIfTI either: the corrupt-file message
    with pytest.raises(DataError, match="corrupt, truncated or not an image"):
        load_medical_image(misnamed)


def test_a_nifti_in_microns_or_metres_is_measured_in_millimetres_and_written_in_its_own_units(
        hippocampus_datalist, tmp_path, capsys):
    """NIfTI's ``xyzt_units``: the same volume and mask stored in microns and in metres (matrices x 1000, / 1000) load
    with the mm original's affine, so HD95 and NSD (mm and a 2 mm tolerance) are the original's; the prediction
    written back carries the input's own units and matrices."""
    import csv

    import nibabel as nib
    import numpy as np

    from medsam3_monai.transforms.io import load_medical_image

    datalist = json.loads(hippocampus_datalist.read_text())
    original = datalist["test"][0]
    for unit, factor in (("micron", 1000.0), ("meter", 1e-3)):
        item = dict(original, case=unit)
        for key in ("image", "label"):
            source = nib.load(original[key])
            copy = nib.Nifti1Image(np.asarray(source.dataobj), np.diag([factor] * 3 + [1.0]) @ source.affine)
            copy.header.set_xyzt_units(unit)
            item[key] = str(tmp_path / f"{unit}_{key}.nii.gz")
            nib.save(copy, item[key])
        loaded = load_medical_image(item["image"])
        assert np.allclose(loaded.affine.numpy(), nib.load(original["image"]).affine)
        datalist["test"].append(item)
    path = tmp_path / "units.json"
    path.write_text(json.dumps(datalist))
    out = tmp_path / "eval"
    assert main(["evaluate", "--datalist", str(path), "--checkpoint", "tiny", "--out", str(out), "--no-progress",
                 "--no-mlflow", "--tracker", "none", "--score-threshold", "0.2", "--save-predictions"]) == 0
    with next(out.rglob("cases.csv")).open() as f:
        rows = [row for row in csv.DictReader(f)]
    # --save-predictions: each case's label map in its input's geometry, the one the metrics were counted on
    saved = nib.load(out / "predictions" / original["dataset"] / "micron_seg.nii.gz")
    given = nib.load(tmp_path / "micron_image.nii.gz")
    assert saved.shape == given.shape and saved.header.get_xyzt_units()[0] == "micron"
    assert np.allclose(saved.affine, given.affine)
    pred, truth = np.asarray(saved.dataobj), np.asarray(nib.load(tmp_path / "micron_label.nii.gz").dataobj)
    dice = 2 * np.sum((pred == 1) & (truth == 1)) / (np.sum(pred == 1) + np.sum(truth == 1))
    row = next(r for r in rows if r["case"] == "micron" and r["prompt"] == original["prompts"]["1"])
    assert float(row["dice"]) == pytest.approx(dice, abs=1e-9)
    names = ("dice", "iou", "nsd", "hd95")
    first = {row["prompt"]: [float(row[k]) for k in names] for row in rows if row["case"] == original["case"]}
    assert len(rows) == 6 and all([float(row[k]) for k in names] == pytest.approx(first[row["prompt"]], rel=1e-6)
                                  for row in rows), rows  # the metres' matrices round in float32
    assert all(0 < float(row["hd95"]) < 100 for row in rows), rows  # mm, finite: the masks are not empty
    written = tmp_path / "micron_seg.nii.gz"
    assert main(["segment", str(tmp_path / "micron_image.nii.gz"), "--prompt", "hippocampus", "--out", str(written),
                 "--score-threshold", "0.2", "--tracker", "none", "--no-progress"]) == 0
    header, given = nib.load(written).header, nib.load(tmp_path / "micron_image.nii.gz").header
    assert header.get_xyzt_units()[0] == "micron"
    assert np.allclose(header.get_best_affine(), given.get_best_affine())
    sidecar = json.loads(Path(f"{written}.json").read_text())
    assert np.allclose(sidecar["spacing"], nib.load(original["image"]).header.get_zooms()[:3])
    assert sidecar["spatial_units"] == "mm"  # the sidecar's geometry is the mm original's
