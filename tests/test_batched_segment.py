"""Batched `medsam3 segment` over many inputs (a folder, a glob, a datalist) with --out-dir: the same masks and
sidecars as one `medsam3 segment` per file whatever the batch size and loader workers (batching changes the
forward's float rounding only, so a pixel whose logit lies within that rounding of 0 may flip: the random tiny
network's logits are all near 0, ``assert_same_masks``), volumes in the same run,
bad inputs refused before anything is written, an unreadable input in the middle stopping the run or skipped,
and the batched inference API the evaluation engine can call (``PromptInferer.infer_cases``). No timings here:
``scripts/bench_segment.py`` measures images/s."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medsam3_monai.deploy.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

KVASIR = ("cju0qkwl35piu0993l0dewei2.jpg", "cju0qoxqj9q6s0835b43399p4.jpg", "cju0qx73cjw570799j4n5cjze.jpg")
CHEST = ("1.jpg", "2.jpg")


def segment(*args: str) -> int:
    return main(["segment", *args, "--no-progress"])


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def sidecar_core(path: Path) -> dict:
    """What must agree between a batched and a one-by-one sidecar: not the paths it names, nor whether the network
    was compiled, nor the pixel counts (a pixel within rounding of the threshold may flip, ``assert_same_masks``),
    which must be the mask's own."""
    data = json.loads(Path(f"{path}.json").read_text())
    mask = png(path)
    for value, label in data.get("labels", {}).items():
        assert label.pop("pixels") == int((mask == int(value)).sum()), f"{path.name}: label {value}'s pixel count"
    return {k: v for k, v in data.items() if k not in ("input", "output", "overlay", "compiled")}


@pytest.fixture(scope="module")
def samples(shared_data: Path, tmp_path_factory) -> Path:
    """Five real 2D samples of four sizes (622x529, 1348x1070, 619x529 RGB; 512x512 grey)."""
    folder = tmp_path_factory.mktemp("samples") / "inputs"
    folder.mkdir()
    for name in KVASIR:
        shutil.copy(shared_data / "Kvasir-SEG_sample" / "images" / name, folder / name)
    for name in CHEST:
        shutil.copy(shared_data / "ChestXray_lung_sample" / "images" / name, folder / f"chest{name}")
    return folder


@pytest.fixture(scope="module")
def one_by_one(samples: Path, tmp_path_factory) -> Path:
    """`medsam3 segment FILE --prompt polyp --out ref/<name>_seg.png` for each sample, one call per file."""
    out = tmp_path_factory.mktemp("one_by_one")
    for path in sorted(samples.iterdir()):
        assert segment(str(path), "--prompt", "polyp", "--out", str(out / f"{path.stem}_seg.png")) == 0
    return out


#: a pixel may differ between a batched and a one-by-one mask when its logit is within this share of the picture's
#: largest logit (float32 rounding of a batched forward, ~1e-7 relative, with room)
ROUNDING = 1e-4


@functools.lru_cache(maxsize=None)
def polyp_logits(path: str) -> np.ndarray:
    """The one-by-one 'polyp' mask logit of every pixel of the picture ``path``, (H, W): the tiny network's (the CLI's
    ``--checkpoint tiny``) slice-space logits resized by ``F.interpolate``, not by the package's way back."""
    from medsam3_monai.bundle import config_parser
    from medsam3_monai.inferers.predict import PromptInferer
    from medsam3_monai.networks import MedSAM3Net

    network = MedSAM3Net("tiny").eval()
    preprocessing = config_parser("inference.json", image_size=network.image_size, resize_kernel="sam3",
                                  ct_window="abdomen").get_parsed_content("preprocessing")
    case = preprocessing({"image": path, "prompts": {"1": "polyp"}})
    height, width = case[0]["image"].applied_operations[-1]["orig_size"]
    with torch.no_grad():
        logits = PromptInferer()(case, network)[0]["pred"].as_tensor()
    return torch.nn.functional.interpolate(logits[None].float(), size=(height, width), mode="bilinear",
                                           align_corners=False)[0, 0].numpy()


def assert_same_masks(ours: np.ndarray, theirs: np.ndarray, source: Path) -> None:
    """Two 'polyp' masks of ``source`` agree, but for pixels whose logit lies within float rounding of 0."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.uint8
    differ = ours != theirs
    if differ.any():
        logits = np.abs(polyp_logits(str(source)))
        assert logits[differ].max() <= ROUNDING * logits.max(), (
            f"{source.name}: {int(differ.sum())} pixels differ, logits up to {logits[differ].max():.3g} "
            f"(largest {logits.max():.3g})")


def source_of(name: str, folder: Path) -> Path:
    """The input in ``folder`` whose mask is named ``name`` (``<stem>_seg.png``)."""
    return next(p for p in folder.iterdir() if f"{p.stem}_seg.png" == name)


@pytest.fixture()
def encoded(monkeypatch) -> list[tuple[int, bool, torch.dtype]]:
    """(images, CPU autocast on, its dtype) of every ``MedSAM3Net.encode_images`` call (vision pass) of the test."""
    from medsam3_monai.networks import MedSAM3Net

    seen: list[tuple[int, bool, torch.dtype]] = []
    encode = MedSAM3Net.encode_images

    def recording(self, pixel_values):
        seen.append((pixel_values.shape[0], torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return encode(self, pixel_values)

    monkeypatch.setattr(MedSAM3Net, "encode_images", recording)
    return seen


def assert_same_outputs(batched: Path, reference: Path, names: list[str], inputs: Path) -> None:
    assert sorted(p.name for p in batched.iterdir()) == sorted(n + s for n in names for s in ("", ".json"))
    for name in names:
        assert_same_masks(png(batched / name), png(reference / name), source_of(name, inputs))
        assert sidecar_core(batched / name) == sidecar_core(reference / name)


# ------------------------------------------------------------------------------------------------ same masks
@pytest.mark.parametrize("batch_size, workers", [(1, 0), (4, 0), (4, 2)])
def test_a_folder_gives_the_masks_of_one_by_one_calls(samples, one_by_one, tmp_path, capsys, encoded, batch_size,
                                                      workers):
    out = tmp_path / "masks"
    assert segment(str(samples), "--prompt", "polyp", "--out-dir", str(out), "--batch-size", str(batch_size),
                   "--num-workers", str(workers)) == 0
    sizes = [images for images, _, _ in encoded]  # before the checks below run the network one picture at a time
    assert max(sizes) == batch_size and sum(sizes) == 5  # the five pictures in batches of up to batch_size
    names = sorted(f"{p.stem}_seg.png" for p in samples.iterdir())
    assert_same_outputs(out, one_by_one, names, samples)
    printed = capsys.readouterr().out
    assert f"segmented 5 of 5 input(s) into {out}" in printed and "img/s" in printed
    assert printed.count("wrote ") == 5


def test_no_more_loader_workers_start_than_there_are_batches(samples, tmp_path, monkeypatch):
    """``--num-workers 1000`` over five pictures in batches of 4: torch would start all 1000 workers (minutes)."""
    import torch.utils.data

    started = []
    real = torch.utils.data.DataLoader

    def recording(*args, **kwargs):
        started.append(kwargs["num_workers"])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", recording)
    assert segment(str(samples), "--prompt", "polyp", "--out-dir", str(tmp_path / "masks"), "--batch-size", "4",
                   "--num-workers", "1000") == 0
    assert started == [2]


def test_a_quoted_glob_selects_its_matches(samples, one_by_one, tmp_path):
    out = tmp_path / "glob"
    assert segment(str(samples / "cju0*.jpg"), "--prompt", "polyp", "--out-dir", str(out), "--batch-size", "8") == 0
    assert_same_outputs(out, one_by_one, sorted(f"{Path(n).stem}_seg.png" for n in KVASIR), samples)


def test_a_datalist_with_its_own_prompts_and_a_volume(samples, one_by_one, shared_data, tmp_path):
    """Decathlon-style datalist, relative paths, per-item prompts (one item with two, with its own label values),
    and a volume among the 2D images (the volume path, one at a time)."""
    volume = sorted((shared_data / "MSD_Task04_Hippocampus_cropped" / "images").glob("*.nii.gz"))[0]
    datalist = samples.parent / "list.json"
    datalist.write_text(json.dumps({
        "training": [{"image": "inputs/chest1.jpg", "prompts": {"1": "lung"}}],
        "test": [
            {"image": f"inputs/{KVASIR[0]}", "prompts": {"1": "polyp"}, "label": "ignored.png"},
            {"image": "inputs/chest2.jpg", "prompts": {"3": "left lung", "5": "right lung"}, "modality": "X-ray"},
            {"image": str(volume), "prompts": {"1": "hippocampus"}, "modality": "MRI"},
            {"image": f"inputs/{KVASIR[1]}", "prompts": {"1": "polyp"}},
        ],
    }))
    out = tmp_path / "from_list"  # 0.2: the tiny network's volume scores (~0.25) pass it, so the volume is not empty
    assert segment("--datalist", str(datalist), "--out-dir", str(out), "--batch-size", "4", "--tracker", "none",
                   "--score-threshold", "0.2") == 0
    stem = volume.name[: -len(".nii.gz")]
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".json") == sorted(
        [f"{Path(KVASIR[0]).stem}_seg.png", f"{Path(KVASIR[1]).stem}_seg.png", "chest2_seg.png", f"{stem}_seg.nii.gz"])
    for name in (KVASIR[0], KVASIR[1]):  # top_query (the 2D default) does not use the score threshold
        name = f"{Path(name).stem}_seg.png"
        assert_same_masks(png(out / name), png(one_by_one / name), source_of(name, samples))
    labels = png(out / "chest2_seg.png")
    assert labels.shape == (512, 512) and set(np.unique(labels)) <= {0, 3, 5}
    sidecar = json.loads((out / "chest2_seg.png.json").read_text())
    assert {k: v["prompt"] for k, v in sidecar["labels"].items()} == {"3": "left lung", "5": "right lung"}
    assert sidecar["modality"] == "X-ray"
    reference = tmp_path / "chest2_ref.png"
    assert segment(str(samples / "chest2.jpg"), "--prompt", "left lung", "--prompt", "right lung", "--modality",
                   "X-ray", "--out", str(reference)) == 0  # (a picture's top_query reads no --score-threshold)
    ref = png(reference)
    assert np.array_equal(np.select([ref == 1, ref == 2], [3, 5], 0), labels)
    written, source = nib.load(out / f"{stem}_seg.nii.gz"), nib.load(volume)
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    sidecar = json.loads((out / f"{stem}_seg.nii.gz.json").read_text())
    assert sidecar["kind"] == "volume"
    assert {k: v["prompt"] for k, v in sidecar["labels"].items()} == {"1": "hippocampus"}
    reference = tmp_path / "volume_ref.nii.gz"  # the volume alone, with its prompt
    assert segment(str(volume), "--prompt", "hippocampus", "--modality", "MRI", "--tracker", "none",
                   "--score-threshold", "0.2", "--out", str(reference)) == 0
    labels = np.asarray(written.dataobj)
    assert labels.any() and np.array_equal(labels, np.asarray(nib.load(reference).dataobj))


def test_inputs_sharing_a_name_keep_their_folder(samples, tmp_path):
    for sub in ("a", "b"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        shutil.copy(samples / "chest1.jpg", tmp_path / "in" / sub / "x.jpg")
    out = tmp_path / "out"
    assert segment(str(tmp_path / "in" / "*" / "x.jpg"), "--prompt", "lung", "--out-dir", str(out)) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["a/x_seg.png", "b/x_seg.png"]


def test_a_compiled_vision_encoder_gives_the_masks_of_one_by_one_calls(samples, one_by_one, tmp_path, capsys,
                                                                     dynamo_counters):
    counters = dynamo_counters
    out = tmp_path / "compiled"  # one batch of five: one compilation (about a minute on a CPU)
    assert segment(str(samples), "--prompt", "polyp", "--out-dir", str(out), "--batch-size", "8", "--compile") == 0
    assert counters["frames"]["ok"] >= 1  # the vision encoder's forward was compiled and ran compiled
    assert "medsam3 segment: --compile: the vision encoder compiles at the first batch" in capsys.readouterr().err
    assert_same_outputs(out, one_by_one, sorted(f"{p.stem}_seg.png" for p in samples.iterdir()), samples)


def test_bf16_autocast_runs_on_the_cpu(samples, tmp_path, encoded):
    out = tmp_path / "bf16"
    assert segment(str(samples / "chest*.jpg"), "--prompt", "lung", "--out-dir", str(out), "--autocast", "bf16") == 0
    assert encoded and all(on and dtype == torch.bfloat16 for _, on, dtype in encoded)  # every vision pass in bf16
    masks = [png(p) for p in sorted(out.glob("*.png"))]
    assert [m.shape for m in masks] == [(512, 512)] * 2 and all(set(np.unique(m)) <= {0, 255} for m in masks)
    sidecars = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert [(s["autocast"], s["compiled"]) for s in sidecars] == [("bf16", False)] * 2  # the numerics are recorded


# ------------------------------------------------------------------------------------------------ bad inputs
def _bad_empty_folder(samples: Path, folder: Path) -> list[str]:
    (folder / "empty").mkdir()
    return [str(folder / "empty"), "--prompt", "polyp"]


def _bad_missing_datalist(samples: Path, folder: Path) -> list[str]:
    return ["--datalist", str(folder / "nope.json")]


def _bad_non_empty_out_dir(samples: Path, folder: Path) -> list[str]:
    return [str(samples), "--prompt", "polyp"]


def _bad_glob_matching_nothing(samples: Path, folder: Path) -> list[str]:
    return [str(samples / "*.nothing"), "--prompt", "polyp"]


def _bad_missing_file(samples: Path, folder: Path) -> list[str]:
    return [str(samples / KVASIR[0]), str(folder / "missing.png"), "--prompt", "polyp"]


def _bad_prompt(samples: Path, folder: Path) -> list[str]:
    return [str(samples), "--prompt", "polyp " * 40]


def _bad_label_value_over_255(samples: Path, folder: Path) -> list[str]:
    datalist = folder / "values.json"
    datalist.write_text(json.dumps([{"image": str(samples / "chest1.jpg"),
                                     "prompts": {"1": "lung", "256": "heart"}}]))
    return ["--datalist", str(datalist)]


def _bad_colliding_names(samples: Path, folder: Path) -> list[str]:
    for name in ("x.png", "x.jpg", "x_png.jpg"):  # x.png and x_png.jpg: both x_png_seg.png once extensions are kept
        shutil.copy(samples / "chest1.jpg", folder / name)
    return [str(folder / "x.png"), str(folder / "x.jpg"), str(folder / "x_png.jpg"), "--prompt", "lung"]


def _bad_prompts_not_text(samples: Path, folder: Path) -> list[str]:
    datalist = folder / "prompts.json"
    datalist.write_text(json.dumps([{"image": str(samples / "chest1.jpg"), "prompts": {"1": 5}}]))
    return ["--datalist", str(datalist)]


def _four_d(folder: Path) -> Path:
    path = folder / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4, 2), np.float32), np.eye(4)), str(path))
    return path


def _bad_4d_volume_without_channel(samples: Path, folder: Path) -> list[str]:
    return [str(samples / "chest1.jpg"), str(_four_d(folder)), "--prompt", "lung"]


def _bad_channel_on_a_picture(samples: Path, folder: Path) -> list[str]:
    return [str(_four_d(folder)), str(samples / "chest1.jpg"), "--prompt", "lung", "--channel", "1"]


def _bad_channel_out_of_range(samples: Path, folder: Path) -> list[str]:
    return [str(_four_d(folder)), "--prompt", "lung", "--channel", "5"]


BAD = {
    "a 4D volume without --channel, read from its header": (_bad_4d_volume_without_channel, "is a 4D volume with 2"),
    "--channel and a 2D picture": (_bad_channel_on_a_picture, "chest1.jpg: is a 2D picture: channel 1 picks"),
    "--channel beyond a 4D volume's": (_bad_channel_out_of_range, "channel 5 requested but the volume has 2"),
    "label value over 255 for a 2D mask": (_bad_label_value_over_255, "label value 256 does not fit"),
    "two inputs, one output name": (_bad_colliding_names, "would both be written as"),
    "a prompt that is not text": (_bad_prompts_not_text, "is 5, not a text"),
    "empty folder": (_bad_empty_folder, "holds no image"),
    "missing datalist": (_bad_missing_datalist, "not found"),
    "non-empty out-dir": (_bad_non_empty_out_dir, "not empty"),
    "glob matching nothing": (_bad_glob_matching_nothing, "no image or volume matches"),
    "missing file among inputs": (_bad_missing_file, "not found"),
    "overlong prompt": (_bad_prompt, "at most 32"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_exit_2_with_one_line_and_write_nothing(case, samples, tmp_path, capsys):
    make, words = BAD[case]
    args = make(samples, tmp_path)
    out = tmp_path / "out"
    if case == "non-empty out-dir":
        out.mkdir()
        (out / "keep.txt").write_text("keep me")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert segment(*args, "--out-dir", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medsam3 segment: error:") and words in err[0], err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    if case == "non-empty out-dir":
        assert segment(*args, "--out-dir", str(out), "--overwrite", "--batch-size", "5") == 0
        assert (out / "keep.txt").read_text() == "keep me" and len(list(out.glob("*_seg.png"))) == 5


@pytest.mark.parametrize("argv, words", [
    (["a.png", "b.png", "--prompt", "x", "--out", "m.png"], "give --out-dir"),
    (["a.png", "--prompt", "x", "--out", "m.png", "--out-dir", "d"], "not both"),
    (["--datalist", "l.json", "--out", "m.png"], "give --out-dir"),
    (["--out-dir", "d"], "required: INPUT, --prompt"),
    (["a.png", "--prompt", "x", "--out-dir", "d", "--batch-size", "0"], "--batch-size"),
    (["a.png", "--prompt", "x", "--out-dir", "d", "--split", "validation"], "--split validation picks a list of a"),
])
def test_usage_errors(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        segment(*argv)
    assert stop.value.code == 2 and words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_input_in_the_middle_stops_or_is_skipped(samples, tmp_path, capsys):
    folder = tmp_path / "inputs"
    shutil.copytree(samples, folder)
    (folder / "ci_broken.png").write_bytes(b"not a picture at all")  # third of six by name
    out = tmp_path / "stop"
    assert segment(str(folder), "--prompt", "polyp", "--out-dir", str(out), "--batch-size", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ci_broken.png" in err[0] and "--skip-unreadable" in err[0], err
    assert "stopped after 2 of 6" in err[0]
    assert sorted(p.name for p in out.glob("*.png")) == ["chest1_seg.png", "chest2_seg.png"]
    assert not list(tmp_path.rglob(".medsam3-segment-*"))

    out = tmp_path / "skip"
    assert segment(str(folder), "--prompt", "polyp", "--out-dir", str(out), "--batch-size", "2",
                   "--skip-unreadable") == 0
    assert len(list(out.glob("*_seg.png"))) == 5
    skipped = (out / "skipped.csv").read_text().splitlines()
    assert skipped[0] == "image,error" and len(skipped) == 2 and "ci_broken.png" in skipped[1]
    assert "skipped 1 unreadable input(s) of 6" in capsys.readouterr().err


def test_outputs_stay_inside_the_out_dir(samples, tmp_path, capsys):
    """A datalist item reaching out of its folder (``../b/x.jpg``) is ``b/x.jpg``: its mask is written inside
    --out-dir, and the file of the same name beside the input is left alone; prompts given as a list are values
    1..P."""
    for folder in ("study/a", "study/b", "b"):
        (tmp_path / folder).mkdir(parents=True)
    shutil.copy(samples / "chest1.jpg", tmp_path / "study" / "a" / "x.jpg")
    shutil.copy(samples / "chest2.jpg", tmp_path / "study" / "b" / "x.jpg")
    (tmp_path / "b" / "x_seg.png.json").write_text("precious")
    datalist = tmp_path / "study" / "a" / "list.json"
    datalist.write_text(json.dumps({"test": [{"image": "x.jpg", "prompts": ["left lung", "right lung"]},
                                             {"image": "../b/x.jpg", "prompts": "lung"}]}))
    out = tmp_path / "masks"
    assert segment("--datalist", str(datalist), "--out-dir", str(out)) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["a/x_seg.png", "b/x_seg.png"]
    assert (tmp_path / "b" / "x_seg.png.json").read_text() == "precious"
    first = json.loads((out / "a" / "x_seg.png.json").read_text())
    assert {k: v["prompt"] for k, v in first["labels"].items()} == {"1": "left lung", "2": "right lung"}
    assert json.loads((out / "b" / "x_seg.png.json").read_text())["input"] == str(tmp_path / "study" / "b" / "x.jpg")


def test_a_run_that_segments_nothing_exits_2(tmp_path, capsys):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"not a picture")
    out = tmp_path / "out"
    assert segment(str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--prompt", "x", "--out-dir", str(out),
                   "--skip-unreadable") == 2
    err = capsys.readouterr().err
    assert "none of the 2 input(s) could be segmented" in err and (out / "skipped.csv").is_file()
    assert not list(out.glob("*.png"))


def test_a_folder_of_pictures_as_the_one_input_says_to_use_out_dir(samples, tmp_path, capsys):
    assert segment(str(samples), "--prompt", "x", "--out", str(tmp_path / "m.nii.gz")) == 2
    assert "not a DICOM series: segment them with --out-dir DIR" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    notes = tmp_path / "notes"  # extension-less files, as DICOM files may be: read as a series, which fails
    notes.mkdir()
    for name in ("README", "LICENSE"):
        (notes / name).write_text("text")
    assert segment(str(notes), "--prompt", "x", "--out", str(tmp_path / "m.nii.gz")) == 2
    assert "is a folder but not a readable DICOM series" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


# ------------------------------------------------------------------------------------------------ API
def test_prompt_inferer_infer_cases_equals_one_call_per_case(samples, tiny_net):
    """The batched entry point an engine iteration can call: 2D cases (one with a box, different prompt counts
    and protocols) through shared forwards, the same logits as the inferer on each case."""
    from medsam3_monai.bundle import config_parser
    from medsam3_monai.inferers.batch import collate_case_batch
    from medsam3_monai.inferers.predict import PromptInferer

    preprocessing = config_parser("inference.json", image_size=tiny_net.image_size, resize_kernel="sam3",
                                  ct_window="abdomen").get_parsed_content("preprocessing")
    items = [
        {"image": str(samples / KVASIR[0]), "prompts": {"1": "polyp"}},
        {"image": str(samples / "chest1.jpg"), "prompts": {"1": "left lung", "2": "right lung"},
         "protocol": "threshold"},
        {"image": str(samples / KVASIR[2]), "prompts": {"1": "polyp"}, "box": [40, 30, 300, 200]},
        {"image": str(samples / "chest2.jpg"), "prompts": {"1": "lung"}, "protocol": "semantic"},
        # a threshold of its own (a server request's): its own forward, the others' batch without its row
        {"image": str(samples / KVASIR[1]), "prompts": {"1": "polyp"}, "protocol": "top_query_floor",
         "score_threshold": 0.0},
    ]
    batch = collate_case_batch([preprocessing(dict(item)) for item in items])
    assert batch.images.shape == (5, 3, tiny_net.image_size, tiny_net.image_size) and batch.indices == [0, 1, 2, 3, 4]
    inferer = PromptInferer(score_threshold=0.2)
    together = inferer.infer_cases(batch.cases, tiny_net, batch.images)
    for case, batched in zip(batch.cases, together):
        alone = inferer(case, tiny_net)[0]
        ours = batched[0]
        assert ours["protocol"] == alone["protocol"] and ours["prompt_values"] == alone["prompt_values"]
        assert ours.get("kept_prompts") == alone.get("kept_prompts")  # threshold: the prompt of each query's map
        assert torch.allclose(ours["pred"], alone["pred"], atol=1e-5)
        assert torch.equal(ours["pred"] > 0, alone["pred"] > 0)
        assert torch.allclose(ours["prompt_scores"], alone["prompt_scores"], atol=1e-6)
    assert [c[0]["protocol"] for c in together] == ["top_query", "threshold", "top_query+box", "semantic",
                                                   "top_query_floor"]
    assert [c[0]["score_threshold"] for c in together] == [0.2] * 4 + [0.0] and inferer.score_threshold == 0.2
    floor = together[-1][0]  # at 0.0 the floor keeps the top query's mask: top_query's logits
    top = inferer(dict(batch.cases[-1][0], protocol="top_query"), tiny_net)[0]
    assert torch.equal(floor["pred"], top["pred"]) and (floor["pred"] > 0).any()
    strict = inferer(dict(batch.cases[-1][0], score_threshold=1), tiny_net)[0]
    assert not (strict["pred"] > 0).any() and strict["score_threshold"] == 1.0
    with pytest.raises(ValueError, match=r"cju.*\.jpg: score_threshold 'high': give a number in \[0, 1\]"):
        inferer(dict(batch.cases[-1][0], score_threshold="high"), tiny_net)


def test_inputs_expand_folders_globs_and_dicom_series(tmp_path):
    from medsam3_monai.inferers.inputs import expand_inputs, output_names

    series = tmp_path / "series"
    series.mkdir()
    for i in range(3):
        (series / f"IM{i}.dcm").write_bytes(b"")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("b.png", "a.nii.gz", "notes.txt", ".hidden.png", "c.JPG"):
        (mixed / name).write_bytes(b"")
    (mixed / "ct").mkdir()
    (mixed / "ct" / "1.dcm").write_bytes(b"")
    (mixed / "masks").mkdir()
    (mixed / "masks" / "m.png").write_bytes(b"")
    assert expand_inputs([series]) == [str(series)]  # a DICOM series is one volume
    for name in ("README.txt", "DICOMDIR", "export.xml"):  # what exports hold beside the series: still one volume
        (series / name).write_bytes(b"")
    assert expand_inputs([series]) == [str(series)]
    (series / "preview.png").write_bytes(b"")  # another image: a folder of inputs, not a series
    assert expand_inputs([series]) == [str(series / n) for n in ("IM0.dcm", "IM1.dcm", "IM2.dcm", "preview.png")]
    (series / "preview.png").unlink()
    notes = []
    assert expand_inputs([mixed], notes) == [str(mixed / n) for n in ("a.nii.gz", "b.png", "c.JPG", "ct")]
    assert notes == [f"{mixed}: 1 sub-folder(s) not searched (e.g. masks): a folder input takes the files directly "
                     f"in it; quote a pattern such as '{mixed / '**' / '*.png'}' to take the files in its sub-folders"]
    assert expand_inputs([str(mixed / "*.png"), str(mixed / "b.png")]) == [str(mixed / "b.png")]
    assert expand_inputs([str(tmp_path / "**" / "*.png")]) == [str(mixed / "b.png"), str(mixed / "masks" / "m.png")]
    # symbolic links back up the tree (a shared drive's "data -> .."): each picture once, and the walk ends
    (mixed / "masks" / "up").symlink_to("..")
    (mixed / "self").symlink_to(mixed)
    assert expand_inputs([str(tmp_path / "**" / "*.png")]) == [str(mixed / "b.png"), str(mixed / "masks" / "m.png")]
    outside = tmp_path.parent / f"{tmp_path.name}_linked"  # a link to another folder is followed
    outside.mkdir()
    Image.new("L", (4, 4)).save(outside / "o.png")
    (mixed / "linked").symlink_to(outside)
    assert str(mixed / "linked" / "o.png") in expand_inputs([str(tmp_path / "**" / "*.png")])
    for link in ("masks/up", "self", "linked"):
        (mixed / link).unlink()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image"):
        expand_inputs([tmp_path / "empty"])
    (tmp_path / "empty" / "sub").mkdir()
    with pytest.raises(ValueError, match=r"holds no image .*; its 1 sub-folder\(s\) are not searched: quote"):
        expand_inputs([tmp_path / "empty"])
    (tmp_path / "empty" / "sub").rmdir()
    with pytest.raises(FileNotFoundError, match="not found"):
        expand_inputs([tmp_path / "nope.png"])
    paths = [tmp_path / "a" / "1.png", tmp_path / "b" / "1.png", tmp_path / "b" / "1.jpg", tmp_path / "v.nii.gz"]
    assert output_names(paths[-1:], ["volume"]) == ["v_seg.nii.gz"]
    assert output_names(paths, ["image"] * 3 + ["volume"]) == ["a/1_seg.png", "b/1_png_seg.png", "b/1_jpg_seg.png",
                                                               "v_seg.nii.gz"]


def test_the_inference_bundle_batches_cases_with_the_same_masks(samples, tmp_path, encoded):
    from monai.bundle import run

    from medsam3_monai.bundle import BUNDLE_CONFIGS

    pictures = sorted(p for p in samples.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:3]
    written = {}
    for batch_size in (1, 3):
        out_dir = tmp_path / f"batch{batch_size}"
        encoded.clear()
        run(config_file=str(BUNDLE_CONFIGS / "inference.json"), meta_file=str(BUNDLE_CONFIGS / "metadata.json"),
            bundle_root=str(tmp_path), datalist=[{"image": str(p)} for p in pictures], prompts=["polyp"],
            checkpoint="tiny", output_dir=str(out_dir), batch_size=batch_size)
        assert [images for images, _, _ in encoded] == [batch_size] * (3 // batch_size)  # the batches formed
        written[batch_size] = {p.name: png(p) for p in sorted(out_dir.glob("*.png"))}
    assert len(written[1]) == len(pictures) and written[1].keys() == written[3].keys()
    for name in written[1]:
        assert_same_masks(written[3][name], written[1][name], source_of(name, samples))
    twins = []  # two inputs of one name (case_a/image.jpg, case_b/image.jpg): one file each, as segment names them
    for folder, picture in zip(("case_a", "case_b"), pictures):
        (tmp_path / folder).mkdir()
        twins.append(tmp_path / folder / f"image{picture.suffix}")
        twins[-1].symlink_to(picture)
    run(config_file=str(BUNDLE_CONFIGS / "inference.json"), meta_file=str(BUNDLE_CONFIGS / "metadata.json"),
        bundle_root=str(tmp_path), datalist=[str(p) for p in twins], prompts=["polyp"], checkpoint="tiny",
        output_dir=str(tmp_path / "twins"))
    assert sorted(str(p.relative_to(tmp_path / "twins")) for p in (tmp_path / "twins").rglob("*.png")) == \
        ["case_a/image_seg.png", "case_b/image_seg.png"]
    for twin, picture in zip(twins, pictures):
        assert np.array_equal(png(tmp_path / "twins" / twin.parent.name / "image_seg.png"),
                              written[1][f"{picture.stem}_seg.png"])


def test_an_input_error_raised_in_a_loader_worker_is_found_in_its_traceback_text():
    """torch re-raises a DataLoader worker's error as its outermost class (MONAI's RuntimeError wrapper) with the
    worker's traceback as text: the input error inside is found there, so the commands still say it in one line."""
    from torch._utils import ExceptionWrapper

    from medsam3_monai.inferers.inputs import user_error, worker_input_error
    from medsam3_monai.transforms.io import DataError

    def reraised(error: BaseException) -> BaseException:
        try:
            try:
                raise error
            except Exception as cause:
                raise RuntimeError("applying transform <monai.transforms.Compose>") from cause
        except RuntimeError:
            wrapper = ExceptionWrapper(where="in DataLoader worker process 1")
        try:
            wrapper.reraise()
        except Exception as err:  # noqa: BLE001 - what the main process catches
            return err
        raise AssertionError("reraise raised nothing")

    worker = reraised(DataError("/d/m.png", "mask size (2, 3) does not match the image size (4, 6)",
                                "pair each image with its own mask"))
    assert type(worker) is RuntimeError and "Traceback" in str(worker)
    found = user_error(worker)
    assert type(found) is ValueError and str(found) == (
        "/d/m.png: mask size (2, 3) does not match the image size (4, 6); pair each image with its own mask")
    missing = user_error(reraised(FileNotFoundError("/d/gone.png: no such file")))
    assert type(missing) is FileNotFoundError and str(missing) == "/d/gone.png: no such file"
    assert user_error(reraised(ZeroDivisionError("a bug"))) is None  # a bug keeps its traceback
    assert worker_input_error(ValueError("not from a worker")) is None
    assert user_error(ValueError("plain")).args == ("plain",)


def test_a_folder_holding_series_folders_names_them(tmp_path):
    """An export's PATIENT/STUDY/SERIES layout: the folder given holds no DICOM files itself, its sub-folders do."""
    from medsam3_monai.inferers.inputs import input_kind

    series = tmp_path / "export" / "series1"
    series.mkdir(parents=True)
    for i in range(3):
        (series / f"IM{i}.dcm").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"input folder {tmp_path / 'export'} holds no DICOM files itself but 1 "
                                         rf"DICOM series folder\(s\), e.g. {series}: give a series folder, or segment "
                                         r"each series in it with --out-dir DIR"):
        input_kind(tmp_path / "export")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="input folder .*empty holds nothing: a folder input must hold one DICOM"):
        input_kind(tmp_path / "empty")


def test_logits_at_the_masks_resolution_for_the_way_back(tiny_net, tiny_images):
    """``at_mask_size`` (what ``PromptInferer`` asks for): a protocol's logits stay at the mask head's resolution
    (S / 3.5), which the way back resizes once, straight to the picture, as SAM3's ``Sam3Processor``; ``threshold``,
    which unites several queries' masks, gives each kept query's own map and its prompt (``owners``), so that the
    union is made at the picture's size. Batched and one by one alike; resizing the mask-size logits to S gives the
    S-size logits (for ``threshold``, resized one by one and united)."""
    from medsam3_monai.inferers import segment_image
    from medsam3_monai.inferers.batch import segment_image_batch
    from medsam3_monai.inferers.protocols import EMPTY_LOGIT
    from medsam3_monai.networks.outputs import upsample_logits

    size = tiny_net.image_size
    prompts = ["nucleus", "liver"]
    with torch.no_grad():
        outputs = tiny_net(tiny_images[:1], prompts)
    mask_size = tuple(outputs.pred_masks.shape[-2:])
    assert mask_size == (size * 2 // 7, size * 2 // 7)  # S / 3.5
    # a threshold keeping two of the first prompt's queries and none of the second's
    first, second = outputs.scores[0].sort(descending=True).values, outputs.scores[1].max()
    threshold = float(first[1] + second) / 2
    assert first[2] < threshold < first[1] and second < threshold
    for protocol in ("top_query", "semantic", "threshold"):
        one = segment_image(tiny_net, tiny_images[0], prompts, protocol=protocol, score_threshold=threshold,
                            at_mask_size=True)
        [batched] = segment_image_batch(tiny_net, tiny_images[:1], [prompts], protocols=protocol,
                                        score_threshold=threshold, at_mask_size=True)
        at_s = segment_image(tiny_net, tiny_images[0], prompts, protocol=protocol, score_threshold=threshold)
        assert torch.equal(one.logits, batched.logits) and torch.equal(one.scores, at_s.scores), protocol
        resized = upsample_logits(one.logits[None], size)[0]
        if protocol != "threshold":
            assert one.owners is None and tuple(one.logits.shape) == (2, *mask_size)
            assert torch.allclose(resized, at_s.logits, atol=1e-5), protocol
            continue
        # the two kept queries' maps for the first prompt, one empty map for the second
        assert one.owners.tolist() == [0, 0, 1] and torch.equal(one.owners, batched.owners)
        assert tuple(one.logits.shape) == (3, *mask_size) and bool((one.logits[2] == EMPTY_LOGIT).all())
        assert torch.allclose(resized[:2].amax(0), at_s.logits[0], atol=1e-5)
        assert torch.equal(one.prompt_logits[0], one.logits[:2].amax(0)) and not one.masks[1].any()


def test_threshold_masks_are_united_at_the_pictures_size(tiny_net, kvasir):
    """The ``threshold`` protocol's way back (``PromptInferer`` + the bundle's ``to_input_space``): each kept query's
    mask logits resized on their own from the mask head's resolution to the picture (``F.interpolate``, what SAM3's
    ``Sam3Processor`` does), united per prompt there, overlaps to the most confident prompt (its score x sigmoid of
    its best map). The union at the slice space, resized, is another map along its edges."""
    import torch.nn.functional as F

    from medsam3_monai.bundle import config_parser, inference_postprocessing
    from medsam3_monai.inferers import segment_image
    from medsam3_monai.inferers.predict import PromptInferer

    prompts = {"1": "nucleus", "2": "liver"}
    preprocessing = config_parser("inference.json", image_size=tiny_net.image_size, resize_kernel="sam3",
                                  ct_window="abdomen").get_parsed_content("preprocessing")
    case = preprocessing({"image": str(kvasir), "prompts": prompts})
    image = case[0]["image"].as_tensor()
    size = tuple(case[0]["image"].applied_operations[-1]["orig_size"])
    with torch.no_grad():
        scores = tiny_net(image[None], list(prompts.values())).scores
        threshold = float(scores.max(dim=1).values.min())  # every prompt keeps a query, one of them several
        items = PromptInferer("threshold", threshold)(case, tiny_net)
        seg = segment_image(tiny_net, image, list(prompts.values()), protocol="threshold", score_threshold=threshold,
                            at_mask_size=True)
        at_s = segment_image(tiny_net, image, list(prompts.values()), protocol="threshold", score_threshold=threshold)
    assert items[0]["kept_prompts"] == seg.owners.tolist() and len(seg.owners) > len(prompts)
    ours = inference_postprocessing(preprocessing)(items)["pred"].as_tensor()[0].numpy()

    def label_map(maps: torch.Tensor, owners: torch.Tensor) -> np.ndarray:  # dense: every pixel of every map
        logits = F.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        confidence = torch.where(logits > 0, seg.scores[owners][:, None, None] * logits.sigmoid(), -1.0)
        best = confidence.max(dim=0)
        return torch.where(best.values >= 0, owners[best.indices] + 1, 0).to(torch.uint8).numpy()

    theirs = label_map(seg.logits, seg.owners)
    assert ours.shape == theirs.shape == size and 0.01 < (theirs > 0).mean() < 0.99
    assert set(np.unique(theirs)) == {0, 1, 2}
    differ = ours != theirs
    logits = F.interpolate(seg.logits[None], size=size, mode="bilinear", align_corners=False)[0].abs()
    assert not differ.any() or float(logits.amin(0)[torch.from_numpy(differ)].max()) <= ROUNDING * float(logits.max())
    united_at_s = label_map(at_s.logits, torch.arange(len(prompts)))
    assert (united_at_s != theirs).sum() > 100  # what the way back gave before: the union made at S, then resized
