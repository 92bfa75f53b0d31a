"""`medsam3 segment` and the inference bundle: masks and label maps in the input's own geometry (2D size, 3D
shape and affine), the JSON sidecar, overlays, box prompts, every kind of bad input (non-zero exit, a message
saying what to do, no output file), and the bundle's metadata against MONAI's required metadata fields."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medsam3_monai.deploy.cli import main
from medsam3_monai.inferers.inputs import box_prompts

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundles" / "medsam3" / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")


def segment(*args: str) -> int:
    return main(["segment", *args, "--no-progress"])


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def two_prompt_run(kvasir: Path, tmp_path_factory) -> Path:
    """`medsam3 segment` on a real colonoscopy JPEG with two prompts (label map + sidecar)."""
    out = tmp_path_factory.mktemp("two") / "labels.png"
    assert segment(str(kvasir), "--prompt", "polyp", "--prompt", "mucosa", "--out", str(out)) == 0
    return out


# ------------------------------------------------------------------------------------------------ 2D
def test_dollar_signs_in_a_prompt_or_a_file_name_are_drawn_as_text_not_mathtext(kvasir, tmp_path):
    """Two dollar signs make matplotlib read a text as mathtext: ``$\\frac{x$`` failed the whole run (nothing
    written) and ``$5 or $10`` was drawn as a formula. Prompts, file names and the agent planner's phrases are drawn
    as written."""
    source = tmp_path / "scan $\\frac{a$.jpg"
    source.write_bytes(kvasir.read_bytes())
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    assert segment(str(source), "--prompt", r"polyp $\frac{x$", "--prompt", "cost $5 or $10", "--out", str(out),
                   "--overlay", str(overlay)) == 0
    assert out.is_file() and png(overlay).ndim == 3


def test_one_prompt_writes_a_0_255_mask_of_the_input_size_with_sidecar_and_overlay(kvasir, tmp_path, capsys):
    out, overlay = tmp_path / "sub" / "mask.png", tmp_path / "overlay.png"
    width, height = Image.open(kvasir).size
    box = ["40", "30", str(width - 50), str(height - 20)]
    assert segment(str(kvasir), "--prompt", "polyp", "--box", *box, "--out", str(out), "--overlay", str(overlay)) == 0
    mask = png(out)
    assert mask.shape == (height, width) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert list(sidecar["labels"]) == ["255"] and sidecar["labels"]["255"]["prompt"] == "polyp"
    assert sidecar["labels"]["255"]["pixels"] == int((mask == 255).sum())
    assert 0.0 <= sidecar["labels"]["255"]["score"] <= 1.0
    assert sidecar["protocol"] == "top_query+box" and sidecar["checkpoint"] == "tiny" and sidecar["image_size"] == 112
    assert sidecar["box"] == [[float(v) for v in box]] and sidecar["shape"] == [height, width]
    assert sidecar["autocast"] == "none" and sidecar["compiled"] is False
    assert "score_threshold" not in sidecar  # top_query does not read it (the threshold protocol and volumes do)
    assert png(overlay).ndim == 3 and png(overlay).shape[-1] in (3, 4)
    assert str(out) in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mask.png", "mask.png.json", "overlay.png", "sub"]
    # the box reaches the network: without it, the top query's mask is another one
    assert segment(str(kvasir), "--prompt", "polyp", "--out", str(tmp_path / "unboxed.png")) == 0
    assert not np.array_equal(png(tmp_path / "unboxed.png"), mask)
    # nothing to note but the random weights the default tiny network has, said after the outputs
    assert capsys.readouterr().err.strip() == (
        "note: --checkpoint tiny (the default) is a random-init network: its masks and scores mean nothing; give "
        "--checkpoint real weights (a SAM3 / Medical-SAM3 file or folder, a training run's models/model.pt)")


def test_a_ct_window_on_a_picture_is_noted(kvasir, tmp_path, capsys):
    """A CT window reads Hounsfield units; a JPEG holds display values: said, and the threshold protocol's
    threshold is in the sidecar."""
    out = tmp_path / "ct.png"
    assert segment(str(kvasir), "--prompt", "polyp", "--modality", "CT", "--protocol", "threshold",
                   "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert "note: modality 'CT' scales" in err and "Hounsfield units" in err and kvasir.name in err
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["modality"] == "CT" and sidecar["score_threshold"] == 0.5
    assert sidecar["ct_window"] is not None  # the window it was scaled with, as a CT volume's sidecar says


def test_two_prompts_write_a_label_map_and_a_sidecar_naming_each_value(two_prompt_run, kvasir):
    labels = png(two_prompt_run)
    width, height = Image.open(kvasir).size
    assert labels.shape == (height, width)
    assert set(np.unique(labels)) <= {0, 1, 2}
    sidecar = json.loads(Path(f"{two_prompt_run}.json").read_text())
    assert {k: v["prompt"] for k, v in sidecar["labels"].items()} == {"1": "polyp", "2": "mucosa"}
    assert all(sidecar["labels"][str(v)]["pixels"] == int((labels == v).sum()) for v in (1, 2))
    assert sidecar["protocol"] == "top_query" and sidecar["background"] == 0 and sidecar["kind"] == "image"
    assert "maximum" in sidecar["overlaps"]


def test_predict_file_in_python_gives_the_commands_label_map(two_prompt_run, kvasir):
    """The README's Python call: ``predict_file`` (and a kept ``Predictor``) return the label map ``medsam3 segment``
    wrote; an image size that contradicts the given network is refused rather than ignored."""
    from medsam3_monai.inferers import Predictor, predict_file

    prediction = predict_file(kvasir, ["polyp", "mucosa"], box=None, checkpoint="tiny")
    assert prediction.label_values == [1, 2] and not prediction.is_volume
    assert np.array_equal(prediction.label_map.numpy(), png(two_prompt_run))
    predictor = Predictor.from_checkpoint("tiny")
    assert np.array_equal(predictor(kvasir, ["polyp", "mucosa"]).label_map.numpy(), png(two_prompt_run))
    with pytest.raises(ValueError, match="image_size=224 but the given network works at 112 px"):
        predict_file(kvasir, ["polyp"], network=predictor.network, image_size=224)


def test_a_predictor_of_a_loaded_network_finds_the_tracker_of_that_networks_weights(tmp_path):
    """Given a network loaded from a file without tracker weights, --tracker auto finds none (as the command does),
    not the random-init tiny tracker of the default checkpoint name."""
    from medsam3_monai.inferers import Predictor
    from medsam3_monai.networks import MedSAM3Net, save_checkpoint_file

    path = save_checkpoint_file(MedSAM3Net("tiny").sam3, tmp_path / "model.pt")
    predictor = Predictor(MedSAM3Net(path))
    assert predictor.checkpoint == str(path)
    tracker, name = predictor.tracker()
    assert tracker is None and name.startswith("none"), name


def test_pixel_boxes_become_normalised_cxcywh_and_bad_boxes_are_refused():
    boxes, labels = box_prompts([10, 20, 110, 60], 2, (100, 200))  # H = 100, W = 200
    assert torch.allclose(boxes[:, 0], torch.tensor([[0.3, 0.4, 0.5, 0.4]] * 2)) and labels.tolist() == [[1], [1]]
    boxes, labels = box_prompts([[0, 0, 200, 100], None], 2, (100, 200))
    assert boxes[0, 0].tolist() == [0.5, 0.5, 1.0, 1.0] and labels.tolist() == [[1], [-10]]
    boxes, labels = box_prompts([[10, 20, 110, 60]], 2, (100, 200))  # one box in a list: for every prompt
    assert torch.allclose(boxes[:, 0], torch.tensor([[0.3, 0.4, 0.5, 0.4]] * 2)) and labels.tolist() == [[1], [1]]
    for bad in ([0, 0, 201, 100], [-1, 0, 10, 10], [50, 10, 40, 20], [0, 0, 10, math.nan]):
        with pytest.raises(ValueError, match="x1 y1 x2 y2"):
            box_prompts(bad, 1, (100, 200))


# ------------------------------------------------------------------------------------------------ 3D
def test_volume_label_map_has_the_input_shape_and_affine(hippocampus, tmp_path):
    out = tmp_path / "seg.nii.gz"
    assert segment(str(hippocampus), "--prompt", "hippocampus", "--modality", "MRI", "--tracker", "none",
                   "--out", str(out)) == 0
    written, source = nib.load(out), nib.load(hippocampus)
    assert written.shape == source.shape
    assert np.allclose(written.affine, source.affine) and written.header.get_zooms() == source.header.get_zooms()
    assert written.get_data_dtype() == np.uint8 and set(np.unique(written.get_fdata())) <= {0, 1}
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["kind"] == "volume" and sidecar["tracker"] == "none" and sidecar["shape"] == list(source.shape)
    assert np.allclose(sidecar["affine"], source.affine, atol=1e-5)


def test_batch_size_sets_the_slices_per_detector_forward_of_a_volume(hippocampus, tmp_path, monkeypatch):
    import medsam3_monai.inferers.volume as volume_module

    calls = []
    real = volume_module.segment_volume

    def spy(*args, **kwargs):
        calls.append(kwargs["batch_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(volume_module, "segment_volume", spy)
    out = tmp_path / "seg.nii.gz"
    assert segment(str(hippocampus), "--prompt", "hippocampus", "--tracker", "none", "--batch-size", "3",
                   "--out", str(out)) == 0
    assert calls == [3] and nib.load(out).shape == nib.load(hippocampus).shape


def test_tracker_propagation_on_a_few_slices_keeps_an_oblique_anisotropic_geometry(hippocampus, tmp_path,
                                                                                    monkeypatch):
    """Six real slices with a rotated, anisotropic affine; score threshold 0 so the tracker has a seed."""
    import medsam3_monai.inferers.volume as volume_module

    tracked: list[tuple[list[int], list[int]]] = []  # per call: its seeds, and the prompts it yielded masks for

    def spy(*args, **kwargs):
        seeds, yielded = list(args[3]), []
        tracked.append((seeds, yielded))
        for index, bits in real_track(*args, **kwargs):
            yielded.append(index)
            yield index, bits

    real_track = volume_module.track_prompts
    monkeypatch.setattr(volume_module, "track_prompts", spy)
    source = nib.load(hippocampus)
    data = np.asarray(source.dataobj)[..., 12:18]
    angle = math.radians(30)
    affine = np.array([[0.8 * math.cos(angle), -0.7 * math.sin(angle), 0, -20.0],
                       [0.8 * math.sin(angle), 0.7 * math.cos(angle), 0, 15.0],
                       [0, 0, 2.5, 40.0], [0, 0, 0, 1]])
    volume = tmp_path / "few.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), volume)
    out, overlay = tmp_path / "out" / "few_seg.nii.gz", tmp_path / "few.png"
    assert segment(str(volume), "--prompt", "anterior hippocampus", "--prompt", "posterior hippocampus",
                   "--tracker", "tiny", "--score-threshold", "0", "--out", str(out), "--overlay", str(overlay)) == 0
    written = nib.load(out)
    assert written.shape == data.shape and np.allclose(written.affine, affine, atol=1e-5)
    assert set(np.unique(written.get_fdata())) <= {0, 1, 2}
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["tracker"].startswith("tiny") and all(0 <= s < 6 for s in sidecar["seed_slices"].values())
    # the tracker ran from those seeds, each prompt's masks propagated
    assert [(seeds, sorted(yielded)) for seeds, yielded in tracked] == [(list(sidecar["seed_slices"].values()),
                                                                          [0, 1])]
    assert np.allclose(sidecar["spacing"], [0.8, 0.7, 2.5], atol=1e-5)
    assert png(overlay).ndim == 3


def test_channel_picks_one_time_point_of_a_4d_volume(tmp_path):
    data = np.random.default_rng(0).random((9, 7, 3, 2)).astype(np.float32)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    volume = tmp_path / "fourd.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), volume)
    common = ["--prompt", "lesion", "--tracker", "none", "--score-threshold", "0.2"]  # tiny network: scores ~0.25
    out = tmp_path / "seg.nii.gz"
    assert segment(str(volume), *common, "--channel", "1", "--out", str(out)) == 0
    written = nib.load(out)
    assert written.shape == (9, 7, 3) and np.allclose(written.affine, affine)
    assert json.loads(Path(f"{out}.json").read_text())["channel"] == 1
    # the labels of time point 1 saved as a 3D volume of its own, not those of time point 0
    time_points = []
    for t in (0, 1):
        nib.save(nib.Nifti1Image(data[..., t], affine), tmp_path / f"t{t}.nii.gz")
        assert segment(str(tmp_path / f"t{t}.nii.gz"), *common, "--out", str(tmp_path / f"t{t}_seg.nii.gz")) == 0
        time_points.append(np.asarray(nib.load(tmp_path / f"t{t}_seg.nii.gz").dataobj))
    assert not np.array_equal(time_points[0], time_points[1])
    assert np.array_equal(np.asarray(written.dataobj), time_points[1])


# ------------------------------------------------------------------------------------------------ bad input
def _truncated(kvasir: Path, folder: Path) -> Path:
    path = folder / "truncated.jpg"
    path.write_bytes(kvasir.read_bytes()[:4000])
    return path


def _four_d(folder: Path) -> Path:
    path = folder / "fourd.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), dtype=np.float32), np.eye(4)), path)
    return path


def _named(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


BAD_INPUTS = {
    # name: (maker (kvasir, hippocampus, folder) -> (input, extra arguments), words the message must contain)
    "missing file": (lambda k, h, d: (d / "nope.png", []), "not found"),
    "not an image": (lambda k, h, d: (_named(d, "fake.png", b"this is text, not a PNG"), []), "cannot be read"),
    "truncated file": (lambda k, h, d: (_truncated(k, d), []), "truncated"),
    "unsupported format": (lambda k, h, d: (_named(d, "notes.txt", b"hello"), []), "unsupported format"),
    "4D volume": (lambda k, h, d: (_four_d(d), []), "--channel N"),
    "channel out of range": (lambda k, h, d: (_four_d(d), ["--channel", "3"]), "has 3"),
    "empty prompt": (lambda k, h, d: (k, ["--prompt", " "]), "empty"),
    "overlong prompt": (lambda k, h, d: (k, ["--prompt", "polyp " * 40]), "at most 32"),
    "box outside the image": (lambda k, h, d: (k, ["--box", "0", "0", "5000", "10"]), "outside the image"),
    "box on a volume": (lambda k, h, d: (h, ["--box", "0", "0", "5", "5"]), "2D images only"),
    "missing checkpoint": (lambda k, h, d: (k, ["--checkpoint", "/no/such/sam3.pt"]), "does not exist"),
    "not a checkpoint": (lambda k, h, d: (k, ["--checkpoint", str(_named(d, "w.pt", b"\x00garbage" * 8))]), "w.pt"),
    "bad image size": (lambda k, h, d: (k, ["--image-size", "100"]), "multiple of 14"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_non_zero_with_a_message_and_writes_nothing(case, kvasir, hippocampus, tmp_path, capsys):
    make, words = BAD_INPUTS[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source, extra = make(kvasir, hippocampus, inputs)
    prompts = [] if "--prompt" in extra else ["--prompt", "polyp"]
    outputs = tmp_path / "outputs"
    suffix = ".nii.gz" if str(source).endswith(".nii.gz") else ".png"
    code = segment(str(source), *prompts, *extra, "--out", str(outputs / f"mask{suffix}"),
                   "--overlay", str(outputs / "overlay.png"))
    message = capsys.readouterr().err
    assert code != 0
    assert "medsam3 segment: error:" in message and words.lower() in message.lower(), message
    assert not outputs.exists()
    assert not [p for p in tmp_path.rglob(".medsam3-segment-*")]


def test_missing_prompt_is_a_usage_error(kvasir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        segment(str(kvasir), "--out", str(tmp_path / "m.png"))
    assert exit_info.value.code == 2 and "--prompt" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_failure_while_writing_leaves_no_partial_output(kvasir, tmp_path, monkeypatch, capsys):
    import medsam3_monai.deploy.overlay as overlay_module

    def broken(*args, **kwargs):
        raise ValueError("overlay failed on purpose")

    monkeypatch.setattr(overlay_module, "save_overlay", broken)
    code = segment(str(kvasir), "--prompt", "polyp", "--out", str(tmp_path / "mask.png"),
                   "--overlay", str(tmp_path / "overlay.png"))
    assert code != 0 and "overlay failed on purpose" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_kept_unless_overwrite_is_given(kvasir, tmp_path, capsys):
    out = tmp_path / "mask.png"
    out.write_bytes(b"keep me")
    assert segment(str(kvasir), "--prompt", "polyp", "--out", str(out)) != 0
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert segment(str(kvasir), "--prompt", "polyp", "--out", str(out), "--overwrite") == 0
    assert png(out).shape[:2] == Image.open(kvasir).size[::-1]
    # each refusal names the option whose file is in the way
    overlay = tmp_path / "overlay.png"
    overlay.write_bytes(b"keep me too")
    assert segment(str(kvasir), "--prompt", "polyp", "--out", str(tmp_path / "new.png"), "--overlay",
                   str(overlay)) == 2
    assert "overlay.png already exists; choose another --overlay or pass --overwrite" in capsys.readouterr().err
    assert segment(str(kvasir), "--prompt", "polyp", "--out", str(out), "--overlay", str(out)) == 2
    assert "--out / --overlay (and the .json sidecar) must name different files" in capsys.readouterr().err
    assert segment(str(kvasir), "--prompt", "polyp", "--out", str(tmp_path / "n.png"), "--overlay",
                   str(tmp_path / ".." / tmp_path.name / "n.png")) == 2
    assert "--out / --overlay (and the .json sidecar) must name different files" in capsys.readouterr().err
    copy = tmp_path / "input.png"  # a PNG input given as the overlay too
    Image.open(kvasir).save(copy)
    assert segment(str(copy), "--prompt", "polyp", "--out", str(tmp_path / "n.png"), "--overlay", str(copy)) == 2
    assert f"an output would overwrite the input {copy}; choose another --overlay" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ bundle
def test_inference_bundle_writes_the_cli_label_map_in_the_input_size(kvasir, two_prompt_run, tmp_path):
    from monai.bundle import run

    out_dir = tmp_path / "predictions"
    run(config_file=str(CONFIGS / "inference.json"), meta_file=str(CONFIGS / "metadata.json"),
        bundle_root=str(tmp_path), datalist=[{"image": str(kvasir)}], prompts=["polyp", "mucosa"],
        checkpoint="tiny", output_dir=str(out_dir))
    written = out_dir / f"{kvasir.stem}_seg.png"
    labels = png(written)
    assert labels.shape == Image.open(kvasir).size[::-1]
    assert np.array_equal(labels, png(two_prompt_run))  # the CLI and the bundle share one pipeline


def test_resize_kernel_monai_segments_as_the_inference_bundle_with_that_kernel(kvasir, two_prompt_run, tmp_path):
    """A network trained with ``resize_kernel: monai`` (every fine-tune of before December 2026) is served its own
    kernel: ``segment --resize-kernel monai`` writes the inference bundle's label map of ``resize_kernel=monai``, says
    so in its sidecar, and its network input is not the default's."""
    from monai.bundle import run

    out = tmp_path / "labels.png"
    assert segment(str(kvasir), "--prompt", "polyp", "--prompt", "mucosa", "--resize-kernel", "monai",
                   "--out", str(out)) == 0
    run(config_file=str(CONFIGS / "inference.json"), meta_file=str(CONFIGS / "metadata.json"),
        bundle_root=str(tmp_path), datalist=[{"image": str(kvasir)}], prompts=["polyp", "mucosa"],
        checkpoint="tiny", output_dir=str(tmp_path / "bundle"), resize_kernel="monai")
    assert np.array_equal(png(out), png(tmp_path / "bundle" / f"{kvasir.stem}_seg.png"))
    sidecar = json.loads(out.with_suffix(".png.json").read_text())
    default = json.loads(two_prompt_run.with_suffix(".png.json").read_text())
    assert (sidecar["resize_kernel"], default["resize_kernel"]) == ("monai", "sam3")
    from medsam3_monai.inferers.predict import Predictor

    images = [Predictor.from_checkpoint("tiny", resize_kernel=kernel).pipeline()[0]({"image": str(kvasir)})[0]
              ["image"].as_tensor().int() for kernel in ("monai", "sam3")]
    assert int((images[0] - images[1]).abs().max()) > 10  # MONAI's anti-aliasing of the picture shrunk to 112 px
    with pytest.raises(SystemExit):
        segment(str(kvasir), "--prompt", "polyp", "--resize-kernel", "bicubic", "--out", str(tmp_path / "b.png"))


def test_the_commands_resize_kernels_are_the_transforms_kernels():
    from medsam3_monai.deploy.arguments import RESIZE_KERNEL_CHOICES
    from medsam3_monai.transforms.slices import RESIZE_KERNELS

    assert RESIZE_KERNEL_CHOICES == RESIZE_KERNELS


def test_inference_bundle_writes_a_volume_with_the_input_header_codes_as_segment_does(hippocampus, tmp_path, capsys):
    from monai.bundle import run

    source = nib.load(hippocampus)
    volume = nib.Nifti1Image(np.asanyarray(source.dataobj), source.affine)
    volume.set_qform(source.affine, code=0)  # qform unknown, sform "aligned": MONAI's writer made both 1
    volume.set_sform(source.affine, code=2)
    volume.header.set_xyzt_units("mm", "sec")
    path = tmp_path / "coded.nii.gz"
    nib.save(volume, path)
    out_dir = tmp_path / "predictions"
    run(config_file=str(CONFIGS / "inference.json"), meta_file=str(CONFIGS / "metadata.json"),
        bundle_root=str(tmp_path), datalist=[{"image": str(path), "modality": "MRI"}], prompts=["hippocampus"],
        checkpoint="tiny", tracker_source="none", output_dir=str(out_dir))
    assert "tracker for the volumes: none" in capsys.readouterr().out  # the bundle's log says what propagates
    cli_out = tmp_path / "cli.nii.gz"
    assert segment(str(path), "--prompt", "hippocampus", "--modality", "MRI", "--tracker", "none",
                   "--out", str(cli_out)) == 0
    bundle, cli = nib.load(out_dir / "coded_seg.nii.gz"), nib.load(cli_out)
    for written in (bundle, cli):
        assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (0, 2)
        assert written.header.get_xyzt_units() == ("mm", "sec")
        assert np.allclose(written.affine, source.affine)
    assert np.array_equal(np.asanyarray(bundle.dataobj), np.asanyarray(cli.dataobj))
    # a qform and an sform that differ (each reader picks one): both kept, each with its own matrix
    shifted = source.affine.copy()
    shifted[:3, 3] += (4.0, 4.0, 4.0)
    volume.set_qform(shifted, code=1)
    volume.set_sform(source.affine, code=4)
    nib.save(volume, path)
    assert segment(str(path), "--prompt", "hippocampus", "--modality", "MRI", "--tracker", "none",
                   "--out", str(cli_out), "--overwrite") == 0
    written = nib.load(cli_out).header
    assert (int(written["qform_code"]), int(written["sform_code"])) == (1, 4)
    assert np.allclose(written.get_qform(), shifted) and np.allclose(written.get_sform(), source.affine)


def _required_metadata_schema() -> dict:
    """MONAI's bundle metadata requirements (the fields `verify_metadata` checks with the official
    meta_schema_20240725.json, which cannot be downloaded here), written out as a JSON schema."""
    tensor = {
        "type": "object",
        "properties": {
            "type": {"type": "string"}, "format": {"type": "string"}, "num_channels": {"type": "integer"},
            "spatial_shape": {"type": "array", "items": {"type": ["string", "integer"]}},
            "dtype": {"type": "string"}, "value_range": {"type": "array", "items": {"type": "number"}},
            "is_patch_data": {"type": "boolean"}, "channel_def": {"type": "object"},
        },
        "required": ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"],
    }
    argument = {"anyOf": [{"type": ["number", "string", "boolean"]}, tensor]}
    io = {"type": "object", "patternProperties": {"^.+$": argument}}
    strings = ("schema", "version", "monai_version", "pytorch_version", "numpy_version", "task", "description",
               "authors", "copyright", "data_source", "data_type", "image_classes", "label_classes", "pred_classes",
               "intended_use")
    return {
        "$schema": "https://json-schema.org/draft/2019-09/schema",
        "type": "object",
        "properties": {
            **{name: {"type": "string"} for name in strings},
            "changelog": {"type": "object"}, "required_packages_version": {"type": "object"},
            "eval_metrics": {"type": "object"}, "supported_apps": {"type": "object"},
            "references": {"type": "array", "items": {"type": "string"}},
            "network_data_format": {"type": "object", "properties": {"inputs": io, "outputs": io,
                                                                     "post_processed_outputs": io},
                                    "required": ["inputs", "outputs"]},
        },
        "required": ["schema", "version", "monai_version", "pytorch_version", "numpy_version",
                     "required_packages_version", "task", "description", "authors", "copyright",
                     "network_data_format"],
    }


def test_bundle_metadata_passes_monai_verify_metadata(tmp_path):
    from monai.bundle import verify_metadata

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(_required_metadata_schema()))
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(schema))  # raises when invalid
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    assert metadata["version"] in metadata["changelog"]
    del metadata["task"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="task"):
        verify_metadata(meta_file=str(broken), filepath=str(schema))


def test_monai_verify_net_in_out_checks_the_declared_output():
    """MONAI's ``verify_net_in_out`` builds ``network_def`` from inference.json and checks the output metadata.json
    declares (``pred``: one mask-logit channel per object query, float32; the network's ``pred_masks``). The tiny
    network has 8 queries, not SAM3's 200: told so, it passes; as the full architecture's 200 it is refused, so the
    check runs (at 1008 px with ``--network_def#config '$medsam3_monai.networks.presets.full_sam3_config()'`` the
    full architecture passes as declared; the bundle README has the command)."""
    from monai.bundle import verify_net_in_out

    settings = {"net_id": "network_def", "meta_file": str(CONFIGS / "metadata.json"),
                "config_file": str(CONFIGS / "inference.json"), "checkpoint": "tiny", "tiny_image_size": 112,
                "extra_forward_args": {"prompts": ["liver"]}, "device": "cpu",
                "_meta_#network_data_format#inputs#image#dtype": "float32",  # the tool's random input is float
                "_meta_#network_data_format#inputs#image#spatial_shape": [112, 112]}
    verify_net_in_out(**settings, **{"_meta_#network_data_format#outputs#pred#num_channels": 8})
    with pytest.raises(ValueError, match="output channel number `8` doesn't match: `200`"):
        verify_net_in_out(**settings)


def test_bundle_metadata_describes_the_input_the_preprocessing_hands_over(shared_data: Path):
    """metadata.json's network input is what inference.json's preprocessing gives the network: uint8 levels of a
    colour picture (three channels) and of a grey volume slice (one, repeated by the network)."""
    from medsam3_monai.bundle import config_parser

    described = json.loads((CONFIGS / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    preprocessing = config_parser("inference.json", checkpoint="tiny", image_size=112).get_parsed_content(
        "preprocessing")
    low, high = described["value_range"]
    for path, channels in ((shared_data / "BUSI" / "images" / "benign (1).png", 3),
                           (shared_data / "MSD_Task04_Hippocampus_cropped" / "images" / "hippocampus_001.nii.gz", 1)):
        image = preprocessing({"image": str(path)})[0]["image"]
        assert str(image.dtype) == f"torch.{described['dtype']}" and image.shape == (channels, 112, 112), path
        assert low <= int(image.min()) < int(image.max()) <= high, path


def test_bundle_metadata_pins_versions_the_package_accepts():
    """``required_packages_version`` is what a bundle user installs: each pin must satisfy the package's own
    requirements (pyproject.toml), e.g. transformers within ``compat.SUPPORTED_TRANSFORMERS``."""
    import tomllib

    from packaging.requirements import Requirement

    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    pins = {"torch": metadata["pytorch_version"], "numpy": metadata["numpy_version"],
            "monai": metadata["monai_version"], **metadata["required_packages_version"]}
    project = tomllib.loads((CONFIGS.parents[2] / "pyproject.toml").read_text())["project"]
    checked = []
    for requirement in map(Requirement, project["dependencies"]):
        name = requirement.name.lower().replace("_", "-")
        pinned = next((v for k, v in pins.items() if k.lower().replace("_", "-") == name), None)
        if pinned is not None:
            assert requirement.specifier.contains(pinned, prereleases=True), (name, pinned, str(requirement))
            checked.append(name)
    assert {"transformers", "torch", "monai"} <= set(checked), checked


def test_cli_pipelines_are_the_bundle_configs():
    """`medsam3 segment` / `evaluate` build their chains from configs/inference.json (evaluate.json overlays it)."""
    from medsam3_monai.bundle import BUNDLE_CONFIGS
    from medsam3_monai.engines.evaluation import evaluation_transforms
    from medsam3_monai.inferers.predict import Predictor

    def targets(config: str, key: str) -> list[str]:
        spec = json.loads((BUNDLE_CONFIGS / config).read_text())[key]["transforms"]
        return [step["_target_"].rsplit(".", 1)[-1] for step in spec]

    pre, post = Predictor.from_checkpoint("tiny").pipeline()
    assert [type(t).__name__ for t in pre.transforms] == targets("inference.json", "preprocessing")
    assert [type(t).__name__ for t in post.transforms] == targets("inference.json", "to_input_space")
    from medsam3_monai.inferers.postprocess import InvertToInputd, transforms_of

    [invert] = [step for step in transforms_of(post) if isinstance(step, InvertToInputd)]
    assert invert.transform is pre, "Invertd inverts the very preprocessing"
    evaluation = evaluation_transforms(112)
    assert [type(t).__name__ for t in evaluation.transforms] == targets("inference.json", "preprocessing")
    overlay = json.loads((BUNDLE_CONFIGS / "evaluate.json").read_text())
    assert "preprocessing" not in overlay, "evaluate.json reuses inference.json's chain (an overlay)"


def test_an_overlay_legend_takes_the_columns_that_fit_under_the_picture():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from medsam3_monai.deploy.overlay import LEGEND_COLUMNS, legend_below
    from medsam3_monai.metrics.plots import class_legend

    def legend_of(width_inches: float, labels: list[str]):
        figure = Figure(figsize=(width_inches, 4.9), dpi=100)
        FigureCanvasAgg(figure)
        figure.subplots(1, 1)
        columns = legend_below(figure, class_legend(labels, [1] * len(labels), alpha=0.7))
        extent = figure.legends[0].get_window_extent(figure.canvas.get_renderer())
        return columns, extent, figure.bbox

    many = [f"organ{i} (0.25)" for i in range(1, 17)]  # a 529 x 622 picture with 16 prompts: 12 listed + '4 more'
    columns, extent, box = legend_of(4.7, many)
    assert 1 <= columns < LEGEND_COLUMNS and extent.x0 >= box.x0 and extent.x1 <= box.x1  # nothing cut off
    assert legend_of(14.0, many)[0] == LEGEND_COLUMNS  # a wide montage keeps four
    assert legend_of(4.7, ["polyp (0.91)"])[0] == 1


def test_montage_slices_span_the_predicted_extent():
    """Montage of a volume: the largest slice and the slices at 1/4 and 3/4 of the predicted extent (not of the
    whole depth, which would show empty slices); an empty prediction: 1/4, 1/2, 3/4 of the depth."""
    from medsam3_monai.deploy.overlay import montage_slices

    labels = torch.zeros(4, 4, 20, dtype=torch.uint8)
    labels[1:3, 1:3, 10:15] = 1  # predicted on z = 10..14
    labels[:, :, 12] = 2  # largest on z = 12
    # low 10, high 14: 10 + 4 // 4 = 11, best 12, 10 + 3 * 4 // 4 = 13
    assert montage_slices(labels, axis=2, count=3) == [11, 12, 13]
    assert montage_slices(torch.zeros(4, 4, 20), axis=2, count=3) == [5, 10, 15]
    assert montage_slices(labels, axis=2, count=1) == [12]


def test_the_inference_bundle_without_inputs_says_which_key_takes_them():
    """inference.json's default datalist is empty: run without --datalist (or with the other bundles' --datalists)
    it names the key, instead of an empty 'test' list."""
    from medsam3_monai.bundle import config_parser

    with pytest.raises(Exception) as raised:
        config_parser("inference.json", checkpoint="tiny", prompts=["polyp"]).get_parsed_content("data")
    cause = raised.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert "no inputs: give the images to segment with --datalist" in str(cause) and "--datalists" in str(cause)


def test_no_progress_quiets_the_libraries_bars_too(kvasir, tmp_path, capsys, monkeypatch):
    """transformers' "Loading weights" bar (a checkpoint folder) shows without ``--no-progress`` and not with it."""
    from transformers.utils import logging as transformers_logging

    from medsam3_monai.networks import MedSAM3Net

    folder = MedSAM3Net("tiny").save_pretrained(tmp_path / "saved")
    capsys.readouterr()
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    transformers_logging.enable_progress_bar()  # (this module's other calls give --no-progress)
    image = str(kvasir)
    try:
        assert main(["segment", image, "--prompt", "polyp", "--checkpoint", str(folder),
                     "--out", str(tmp_path / "a.png")]) == 0
        assert "Loading weights" in capsys.readouterr().err
        assert main(["segment", image, "--prompt", "polyp", "--checkpoint", str(folder),
                     "--out", str(tmp_path / "b.png"), "--no-progress"]) == 0
        assert "Loading weights" not in capsys.readouterr().err
    finally:
        transformers_logging.enable_progress_bar()


def test_a_label_of_a_few_pixels_is_not_said_to_cover_none():
    from medsam3_monai.deploy.segment_cli import share_text

    assert [share_text(0, 100), share_text(1, 100_000), share_text(5, 10_000), share_text(50, 100)] == [
        "0.0%", "<0.1%", "0.1%", "50.0%"]
