"""A model file records how its network saw the pictures in training (the training bundle's ``resize_kernel`` and
``ct_window``), and every inference path repeats it unless told otherwise: ``MedSAM3Net.trained_preprocessing``,
``Predictor``, ``medsam3 segment`` / ``evaluate``, the inference bundle; a given setting that differs is noted."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsam3_monai.deploy.cli import main
from medsam3_monai.networks import MedSAM3Net
from medsam3_monai.networks.checkpoints import save_checkpoint_file

pytestmark = pytest.mark.usefixtures("one_thread")

#: what the model file below records: the other kernel, and the lung window as (width, level)
RECORDED = {"resize_kernel": "monai", "ct_window": [1500, -600]}


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    """The tiny network (seed 0, as ``--checkpoint tiny`` builds it) saved as a model file recording ``RECORDED``."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_checkpoint_file(MedSAM3Net("tiny").sam3, path, preprocessing=RECORDED)


@pytest.fixture(scope="module")
def small_ct(shared_data: Path, tmp_path_factory) -> Path:
    """Four axial slices of the TotalSegmentator example CT (Hounsfield units), written to a temporary file."""
    source = shared_data / "TotalSegmentator_example_CT_MR" / "images" / "example_ct_sm.nii.gz"
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    image = nib.load(source)
    volume = np.asanyarray(image.dataobj)[..., 12:16]
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, image.affine), path)
    return path


def test_a_model_file_records_its_training_preprocessing_and_the_network_reads_it(trained_model, tmp_path):
    from medsam3_monai.engines.checkpointing import NetworkConfig

    assert MedSAM3Net(str(trained_model)).trained_preprocessing == RECORDED
    assert MedSAM3Net("tiny").trained_preprocessing == {}  # a file of another kind records none
    plain = save_checkpoint_file(MedSAM3Net("tiny").sam3, tmp_path / "plain.pt")
    assert MedSAM3Net(str(plain)).trained_preprocessing == {}
    # a training checkpoint records it beside the network's configuration
    described = NetworkConfig(MedSAM3Net("tiny"), {"resize_kernel": "sam3", "ct_window": "lung"}).state_dict()
    assert described["preprocessing"] == {"resize_kernel": "sam3", "ct_window": "lung"}


def test_the_predictor_repeats_the_recorded_settings_and_notes_a_given_other(trained_model):
    from medsam3_monai.inferers.predict import Predictor

    network = MedSAM3Net(str(trained_model))
    own = Predictor(network)
    assert (own.resize_kernel, own.ct_window, own.preprocessing_notes) == ("monai", [1500, -600], [])
    same = Predictor(network, ct_window="lung")  # the preset of the recorded width and level: no note
    assert same.preprocessing_notes == []
    other = Predictor(network, resize_kernel="sam3", ct_window="abdomen")
    assert (other.resize_kernel, other.ct_window) == ("sam3", "abdomen")
    assert other.preprocessing_notes == [
        "the model was trained with resize_kernel monai and this run uses sam3: to use the model's own, leave the "
        "setting out (--resize-kernel, the bundles' resize_kernel, the MONAI Label app's --conf resize_kernel)",
        "the model was trained with ct_window 1500,-600 and this run uses abdomen: to use the model's own, leave the "
        "setting out (--ct-window, the bundles' ct_window, the MONAI Label app's --conf ct_window)"]
    default = Predictor(MedSAM3Net("tiny"))
    assert (default.resize_kernel, default.ct_window, default.preprocessing_notes) == ("sam3", "abdomen", [])


def test_the_inference_bundle_takes_the_model_files_settings_unless_overridden(trained_model):
    from medsam3_monai.bundle import config_parser

    parser = config_parser("inference.json", checkpoint=str(trained_model))
    assert (parser.get_parsed_content("resize_kernel"), parser.get_parsed_content("ct_window")) == \
        ("monai", [1500, -600])
    parser = config_parser("inference.json", checkpoint=str(trained_model), resize_kernel="sam3")
    assert parser.get_parsed_content("resize_kernel") == "sam3"
    parser = config_parser("inference.json", checkpoint="tiny")
    assert (parser.get_parsed_content("resize_kernel"), parser.get_parsed_content("ct_window")) == \
        ("sam3", "abdomen")


def test_segment_of_a_ct_with_a_trained_model_uses_its_window_and_kernel(trained_model, small_ct, tmp_path, capsys):
    """``segment --checkpoint model.pt`` on a CT: the label map of the same network given the recorded window and
    kernel by hand, and the sidecar says them; a window given against the model's is used and noted."""
    common = ["--prompt", "liver", "--modality", "CT", "--tracker", "none", "--no-progress"]
    own, by_hand, other = (tmp_path / f"{name}.nii.gz" for name in ("own", "by_hand", "other"))
    assert main(["segment", str(small_ct), *common, "--checkpoint", str(trained_model), "--out", str(own)]) == 0
    assert "trained with" not in capsys.readouterr().err
    assert main(["segment", str(small_ct), *common, "--checkpoint", "tiny", "--ct-window", "1500,-600",
                 "--resize-kernel", "monai", "--out", str(by_hand)]) == 0
    assert np.array_equal(np.asanyarray(nib.load(own).dataobj), np.asanyarray(nib.load(by_hand).dataobj))
    sidecar = json.loads(Path(f"{own}.json").read_text())
    assert (sidecar["resize_kernel"], sidecar["ct_window"]) == ("monai", [1500, -600])

    assert main(["segment", str(small_ct), *common, "--checkpoint", str(trained_model), "--ct-window", "abdomen",
                 "--out", str(other)]) == 0
    assert "note: the model was trained with ct_window 1500,-600 and this run uses abdomen" in capsys.readouterr().err
    assert json.loads(Path(f"{other}.json").read_text())["ct_window"] == "abdomen"


def test_evaluate_repeats_the_models_kernel_and_notes_a_given_other(trained_model, shared_data, tmp_path, capsys):
    from mlflow import MlflowClient

    from medsam3_monai.data import build_datalist, write_datalist

    items = build_datalist("Kvasir-SEG_sample", shared_data / "Kvasir-SEG_sample").datalist["training"][:1]
    datalist = write_datalist({"training": [], "validation": [], "test": items}, tmp_path / "d.json")
    common = ["evaluate", "--datalist", str(datalist), "--checkpoint", str(trained_model), "--overlays", "0",
              "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "own")]) == 0, capsys.readouterr().err
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'own' / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medsam3-evaluate").experiment_id])
    assert run.data.params["resize_kernel"] == "monai"
    assert "trained with" not in (tmp_path / "own" / "table.md").read_text()

    assert main([*common, "--resize-kernel", "sam3", "--no-mlflow", "--out", str(tmp_path / "other")]) == 0
    assert ("Note: the model was trained with resize_kernel monai and this run uses sam3"
            in (tmp_path / "other" / "table.md").read_text())
    with (tmp_path / "own" / "cases.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 1

    # a CT window for a run without CT cases would go unused: refused before anything is written
    assert main([*common, "--ct-window", "lung", "--no-mlflow", "--out", str(tmp_path / "window")]) != 0
    assert "--ct-window lung applies to CT inputs" in capsys.readouterr().err
    assert not (tmp_path / "window").exists()


def test_the_training_records_a_window_only_for_ct_and_notes_a_start_of_other_settings(trained_model, caplog):
    from medsam3_monai.inferers.trained_settings import log_training_differences, recorded_preprocessing

    ct, picture = {"image": "a.nii.gz", "modality": "CT"}, {"image": "b.png", "modality": "endoscopy"}
    assert recorded_preprocessing("sam3", "lung", [picture, ct]) == {"resize_kernel": "sam3", "ct_window": "lung"}
    assert recorded_preprocessing("sam3", "lung", [picture]) == {"resize_kernel": "sam3"}
    with caplog.at_level("WARNING"):
        log_training_differences(MedSAM3Net(str(trained_model)), {"resize_kernel": "sam3", "ct_window": "lung"})
    assert [r.getMessage() for r in caplog.records] == [
        "the starting checkpoint was trained with resize_kernel monai and this training uses sam3: pass "
        "--resize_kernel monai (medsam3 train: --set resize_kernel=monai) to keep the checkpoint's"]  # lung = 1500,-600


def test_an_hf_folder_carries_the_record_through_convert_checkpoint(trained_model, tmp_path, capsys):
    folder = tmp_path / "hf"
    assert main(["convert-checkpoint", str(trained_model), str(folder)]) == 0
    assert "the model's training preprocessing goes with it (resize_kernel monai, ct_window 1500,-600" in \
        capsys.readouterr().out
    assert json.loads((folder / "medsam3_preprocessing.json").read_text()) == RECORDED
    assert MedSAM3Net(str(folder)).trained_preprocessing == RECORDED
    again = tmp_path / "again"
    MedSAM3Net(str(folder)).save_pretrained(again)  # and from the folder on
    assert MedSAM3Net(str(again)).trained_preprocessing == RECORDED
    from medsam3_monai.networks.checkpoints import CheckpointError

    (again / "medsam3_preprocessing.json").write_text('{"ct_window": "banana"}')  # a bad hand edit: named
    with pytest.raises(CheckpointError, match=r"medsam3_preprocessing.json does not read \(unknown CT window "
                                              r"'banana'"):
        MedSAM3Net(str(again))


def test_serve_takes_a_ct_window_and_says_it_in_info(trained_model):
    pytest.importorskip("fastapi")
    import http.client

    from _server_helpers import running_server

    with running_server("--ct-window", "bone", start_timeout_s=30) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/info/")
        info = json.loads(conn.getresponse().read())
        conn.close()
    assert info["models"]["medsam3"]["ct_window"] == "bone"


def test_the_inference_bundle_takes_a_modality_for_plain_paths_and_says_what_scaling_did(small_ct, tmp_path):
    """A CT given as a path has no modality: the bundle's ``modality`` gives it one (the CT window); without it the
    volume is min-max scaled and the bundle's log says so, as ``medsam3 segment`` does."""
    from medsam3_monai.inferers.inputs import inference_items

    (item,) = inference_items([str(small_ct)], ["liver"], modality="CT")
    assert item["modality"] == "CT"
    assert inference_items([{"image": str(small_ct), "modality": "MRI"}], ["liver"], modality="CT")[0][
        "modality"] == "MRI"  # an item's own wins
    from monai.bundle import run

    from medsam3_monai.bundle import BUNDLE_CONFIGS

    import logging

    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("medsam3_monai.engines.inference")  # (MONAI's run sets up the logging itself)
    logger.addHandler(handler)
    try:
        run(config_file=str(BUNDLE_CONFIGS / "inference.json"), bundle_root=str(tmp_path), checkpoint="tiny",
            datalist=[str(small_ct)], prompts=["liver"], tracker_source="none",
            output_dir=str(tmp_path / "predictions"))
    finally:
        logger.removeHandler(handler)
    assert any(line.startswith(f"{small_ct}: no modality was given, so the volume was min-max scaled")
               for line in said), said
    assert (tmp_path / "predictions" / "ct_seg.nii.gz").is_file()
