"""The MONAI Label app (apps/monailabel_medsam3) in the real MONAI Label server, driven by MONAI Label's client.

`monailabel start_server` runs from the MONAI Label environment (``make monailabel``; skipped when it is not
built) with a studies folder holding one Kvasir JPEG and one MSD hippocampus NIfTI; MONAI Label's own client
(``apps/monailabel_medsam3/client.py``, run by that environment's python) asks for ``/info/``, infers both by
image id from the studies folder and both by upload, and every returned mask must equal what ``medsam3 segment``
(this environment) writes for the same input and prompts. The app folder is copied to a temporary folder first:
``start_server`` creates model/, lib/, logs/ and bin/ folders and writes logs/app.log inside the app folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _server_helpers import answers_200, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
APP = REPO_ROOT / "apps" / "monailabel_medsam3"
MONAILABEL_VENV = Path(os.environ.get("MEDSAM3_MONAILABEL_VENV")
                       or Path.home() / ".cache" / "medsam3-monai" / "monailabel-venv")
IMAGE = "cju0qkwl35piu0993l0dewei2.jpg"  # Kvasir-SEG_sample/images
VOLUME = "hippocampus_001.nii.gz"  # MSD_Task04_Hippocampus_cropped/images
LABELS = {"polyp": 1, "hippocampus": 2}
SCORE_THRESHOLD = "0.2"  # the tiny random network's volume detections score ~0.25: keeps the volume masks non-empty
MODALITY = "MRI"  # the server's default modality (--conf): the references use it too
DEADLINE_S = 600  # generous: the server's start and every request together



def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _medsam3() -> list[str]:
    """This environment's ``medsam3`` command."""
    script = Path(sys.executable).parent / "medsam3"
    return [str(script)] if script.exists() else [sys.executable, "-m", "medsam3_monai.deploy.cli"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_data):
    """URL of `monailabel start_server --app <copy of apps/monailabel_medsam3> --studies <2 files>`."""
    for tool in ("monailabel", "python"):
        if not (MONAILABEL_VENV / "bin" / tool).exists():
            pytest.skip(f"the MONAI Label environment is not built at {MONAILABEL_VENV} (no bin/{tool}): run "
                        "`make monailabel` (scripts/setup_monailabel_env.sh) to run this test")
    root = tmp_path_factory.mktemp("monailabel")
    studies = root / "studies"
    studies.mkdir()
    shutil.copy(shared_data / "Kvasir-SEG_sample" / "images" / IMAGE, studies / IMAGE)
    shutil.copy(shared_data / "MSD_Task04_Hippocampus_cropped" / "images" / VOLUME, studies / VOLUME)
    app = root / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__", "logs", "model", "bin"))

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    uploads = root / "tmp"  # the server's temporary folder: MONAI Label saves each upload there
    uploads.mkdir()
    env.update(PATH=f"{MONAILABEL_VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(MONAILABEL_VENV),
               MONAILABEL_PYEXE=str(MONAILABEL_VENV / "bin" / "python"),
               MONAI_LABEL_SESSION_PATH=str(root / "sessions"), TMPDIR=str(uploads))
    log_path = root / "server.log"
    # `monailabel` is a bash wrapper that word-splits its arguments: JSON with spaces would break, so the
    # labels go in the comma form (values 1..P)
    command = [str(MONAILABEL_VENV / "bin" / "monailabel"), "start_server", "--app", str(app), "--studies",
               str(studies), "--host", "127.0.0.1", "--port", str(port),
               "--conf", "labels", ",".join(LABELS), "--conf", "score_threshold", SCORE_THRESHOLD,
               "--conf", "modality", MODALITY]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                                start_new_session=True)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not answers_200(port, "/info/"):
            if proc.poll() is not None:
                pytest.fail(f"monailabel start_server exited with {proc.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"monailabel start_server did not answer /info/ in {DEADLINE_S} s:\n{_tail(log_path)}")
            time.sleep(1)
        yield {"url": f"http://127.0.0.1:{port}", "root": root, "log": log_path, "deadline": deadline,
               "studies": studies, "uploads": uploads}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the wrapper execs python: the group is the server
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def _client(server, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """apps/monailabel_medsam3/client.py (MONAI Label's client) with the MONAI Label environment's python."""
    left = max(server["deadline"] - time.monotonic(), 1)
    done = subprocess.run([str(MONAILABEL_VENV / "bin" / "python"), str(APP / "client.py"), "--server", server["url"],
                           *args], capture_output=True, text=True, timeout=left, cwd=server["root"])
    if check and done.returncode != 0:
        pytest.fail(f"client {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}\n"
                    f"server log:\n{_tail(server['log'])}")
    return done


def _infer(server, out: Path, image: str | None = None, file: Path | None = None, **params) -> dict:
    params.setdefault("device", "cpu")  # the reference below runs on the CPU
    where = ["--image", image] if image is not None else ["--file", str(file)]
    done = _client(server, "infer", *where, "--params", json.dumps(params), "--out", str(out))
    return json.loads(done.stdout)


def _segment(source: Path, out: Path, prompts: list[str], *extra: str) -> dict:
    command = [*_medsam3(), "segment", str(source), "--out", str(out), "--device", "cpu", "--no-progress",
               "--modality", MODALITY, *extra]
    for prompt in prompts:
        command += ["--prompt", prompt]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(Path(f"{out}.json").read_text())


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as picture:
        assert picture.mode == "L"
        return np.asarray(picture)


def _same_png(served: Path, reference: Path) -> np.ndarray:
    got, want = _png(served), _png(reference)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    return got


def _same_nifti(served: Path, reference: Path) -> np.ndarray:
    import nibabel as nib

    got, want = nib.load(str(served)), nib.load(str(reference))
    assert got.get_data_dtype() == want.get_data_dtype()
    assert got.shape == want.shape
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-6)
    assert int(got.header["qform_code"]) == int(want.header["qform_code"])
    assert int(got.header["sform_code"]) == int(want.header["sform_code"])
    data = np.asarray(got.dataobj)
    np.testing.assert_array_equal(data, np.asarray(want.dataobj))
    return data


def _same_image(served: Path, reference: Path) -> None:
    """Both files read by ITK: the same voxels at the same origin, spacing and direction (world geometry)."""
    import itk

    got, want = itk.imread(str(served)), itk.imread(str(reference))
    np.testing.assert_array_equal(itk.array_view_from_image(got), itk.array_view_from_image(want))
    np.testing.assert_allclose(np.asarray(got.GetOrigin()), np.asarray(want.GetOrigin()), atol=1e-4)
    np.testing.assert_allclose(np.asarray(got.GetSpacing()), np.asarray(want.GetSpacing()), atol=1e-5)
    np.testing.assert_allclose(itk.array_from_matrix(got.GetDirection()), itk.array_from_matrix(want.GetDirection()),
                               atol=1e-5)


def _same_summary(result: dict, sidecar: dict) -> None:
    """The result JSON is `medsam3 segment`'s sidecar (less the file names)."""
    for key in ("kind", "shape", "protocol", "checkpoint", "values"):
        assert result[key] == sidecar[key], key
    assert result["labels"].keys() == sidecar["labels"].keys()
    for value, entry in sidecar["labels"].items():
        got = result["labels"][value]
        assert got["prompt"] == entry["prompt"]
        assert got.get("pixels", got.get("voxels")) == entry.get("pixels", entry.get("voxels"))
        assert got["score"] == pytest.approx(entry["score"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_monailabel_server_serves_the_pipeline(server, shared_data, tmp_path):
    from scipy import ndimage

    image = shared_data / "Kvasir-SEG_sample" / "images" / IMAGE
    volume = shared_data / "MSD_Task04_Hippocampus_cropped" / "images" / VOLUME

    # GET /info/: the model, its labels (the concepts) and its config
    info = json.loads(_client(server, "info").stdout)
    model = info["models"]["medsam3"]
    assert info["labels"] == LABELS and model["labels"] == LABELS
    assert model["type"] == "segmentation"
    assert model["config"]["concepts"] == {"polyp": "polyp", "hippocampus": "hippocampus"}
    assert model["config"]["checkpoint"] == "tiny"
    assert model["config"]["score_threshold"] == float(SCORE_THRESHOLD)
    assert model["config"]["protocol"][0] == "top_query"
    assert info["datastore"]["total"] == 2

    # references: `medsam3 segment` with the same prompts (label values 1..P in the labels' order)
    prompts = list(LABELS)
    ref_image = _segment(image, tmp_path / "ref_image.png", prompts)
    ref_polyp = _segment(image, tmp_path / "ref_polyp.png", ["polyp"])
    ref_volume = _segment(volume, tmp_path / "ref_volume.nii.gz", prompts, "--score-threshold", SCORE_THRESHOLD)

    # 2D image by id from the studies folder: every label (a folder of that name in the server's working folder
    # does not hide the datastore's image, which MONAI Label alone would take the folder for)
    (server["root"] / Path(IMAGE).stem).mkdir()
    result = _infer(server, tmp_path / "id_image.png", image=Path(IMAGE).stem)
    labels = _same_png(tmp_path / "id_image.png", tmp_path / "ref_image.png")
    assert set(np.unique(labels)) == {0, 1, 2}  # both concepts present: the comparison is not vacuous
    _same_summary(result, ref_image)
    assert result["label_names"] == LABELS

    # largest_cc (MONAI Label's option of its SAM2 model, as a client sends it: a text) keeps each label's largest
    # 8-connected component of the same prediction; the tiny network's hippocampus label has many components
    _infer(server, tmp_path / "cc_image.png", image=Path(IMAGE).stem, largest_cc="true")
    kept = _png(tmp_path / "cc_image.png")
    for value in LABELS.values():
        components, count = ndimage.label(labels == value, structure=np.ones((3, 3)))
        sizes = np.bincount(components.ravel())[1:]
        np.testing.assert_array_equal(kept == value, components == 1 + int(np.argmax(sizes)))
        assert value != LABELS["hippocampus"] or count > 1  # not vacuous

    # volume by id from the studies folder (no modality sent: the server's --conf modality)
    result = _infer(server, tmp_path / "id_volume.nii.gz", image=VOLUME.removesuffix(".nii.gz"))
    labels = _same_nifti(tmp_path / "id_volume.nii.gz", tmp_path / "ref_volume.nii.gz")
    assert {1, 2} <= set(np.unique(labels).tolist())
    _same_summary(result, ref_volume)
    assert result["modality"] == ref_volume["modality"] == MODALITY and result["notes"] == []  # axial, masks: no note
    # "auto" asks for the channel rule instead; a threshold no slice reaches: empty masks, and the notes say why
    result = _infer(server, tmp_path / "auto_volume.nii.gz", image=VOLUME.removesuffix(".nii.gz"), modality="auto",
                    score_threshold=0.99)
    assert result["modality"] is None and all(entry["voxels"] == 0 for entry in result["labels"].values())
    assert any(note.endswith("the mask is empty: send a lower score_threshold") for note in result["notes"])

    # 2D image by upload, one label: the mask `medsam3 segment --prompt polyp` writes, with the label's value
    # (as /info/ lists it) where segment writes 255
    result = _infer(server, tmp_path / "up_polyp.png", file=image, labels=["polyp"])
    mask, want = _png(tmp_path / "up_polyp.png"), _png(tmp_path / "ref_polyp.png")
    assert set(np.unique(mask)) == {0, LABELS["polyp"]}
    np.testing.assert_array_equal(mask == LABELS["polyp"], want == 255)
    assert result["label_names"] == {"polyp": LABELS["polyp"]}
    assert result["labels"].keys() == {str(LABELS["polyp"])} and result["input"] == "the uploaded file (.jpg)"
    got, want = result["labels"][str(LABELS["polyp"])], ref_polyp["labels"]["255"]
    assert got["pixels"] == want["pixels"] and got["score"] == pytest.approx(want["score"], abs=1e-4)
    # a request's threshold that the picture's protocol (top_query) does not read: the same mask, and a note
    result = _infer(server, tmp_path / "up_polyp_unused.png", file=image, labels=["polyp"], score_threshold=0.9)
    np.testing.assert_array_equal(_png(tmp_path / "up_polyp_unused.png"), mask)
    assert result["notes"] == ["score_threshold 0.9 is not read by protocol top_query, so it changed nothing: send "
                               "it with protocol top_query_floor or threshold"]

    # volume by upload
    result = _infer(server, tmp_path / "up_volume.nii.gz", file=volume)
    _same_nifti(tmp_path / "up_volume.nii.gz", tmp_path / "ref_volume.nii.gz")
    _same_summary(result, ref_volume)
    assert result["label_names"] == LABELS

    # what 3D Slicer's MONAI Label module sends (the config's values, result_extension .nrrd, uint8): MONAI
    # Label's own writer, the same labels in the same world geometry as the NIfTI / PNG above
    slicer = {"protocol": "top_query", "score_threshold": float(SCORE_THRESHOLD), "modality": MODALITY,
              "result_extension": ".nrrd", "result_dtype": "uint8"}
    result = _infer(server, tmp_path / "slicer_volume.nrrd", image=VOLUME.removesuffix(".nii.gz"), **slicer)
    _same_image(tmp_path / "slicer_volume.nrrd", tmp_path / "ref_volume.nii.gz")
    assert result["label_names"] == LABELS
    result = _infer(server, tmp_path / "slicer_image.nrrd", image=Path(IMAGE).stem, **slicer)
    _same_image(tmp_path / "slicer_image.nrrd", tmp_path / "ref_image.png")

    # an unknown label is the client's error (HTTP 400 with the reason), and the server keeps serving
    done = _client(server, "infer", "--image", Path(IMAGE).stem, "--params", json.dumps({"labels": ["liver"]}),
                   "--out", str(tmp_path / "none.png"), check=False)
    assert done.returncode != 0 and "400" in done.stderr and "liver" in done.stderr
    assert json.loads(_client(server, "info").stdout)["models"]["medsam3"]["labels"] == LABELS
    # so is an image id the datastore does not hold, named in the answer
    done = _client(server, "infer", "--image", "no_such_case", "--out", str(tmp_path / "none.png"), check=False)
    assert done.returncode != 0 and "400" in done.stderr and "'no_such_case' is not in the datastore" in done.stderr
    _refusals(server, image, volume, tmp_path)


def _refusals(server, image: Path, volume: Path, tmp_path: Path) -> None:
    """What a client gets wrong is answered with the reason (MONAI Label alone answers a bare 500 or ignores it),
    nothing is written for it, and no rejected upload stays in the server's temporary folder."""
    import nibabel as nib

    stem, volume_id = Path(IMAGE).stem, VOLUME.removesuffix(".nii.gz")
    four_d = tmp_path / "two_echoes.nii.gz"
    nib.Nifti1Image(np.zeros((6, 7, 5, 2), dtype=np.float32), np.eye(4)).to_filename(str(four_d))
    cases = [  # (where, params, --out, status, what the answer says)
        (["--image", volume_id], {"result_extension": ".png"}, "r.png", "400",
         "a volume's labels are written as .nii.gz, .nii, .nrrd"),
        (["--image", volume_id], {}, "r.png", "400", "a volume's labels are written as"),  # --out's format asked
        (["--image", stem], {"result_extension": ".jpg"}, "r.jpg", "400", "result_extension '.jpg': choose one"),
        (["--image", stem], {"lables": ["polyp"]}, "r.png", "400", "unknown params ['lables']: use labels"),
        (["--image", stem], {"label": "polyp"}, "r.png", "400", "this model has no 'label' param; to segment some"),
        (["--image", stem], {"box": "abc"}, "r.png", "400", "'box' must be [x1, y1, x2, y2] in pixels"),
        (["--file", str(volume)], {"protocol": "threshold"}, "r.nii.gz", "400", "protocol 'threshold' is for 2D"),
        (["--file", str(image)], {"labels": ["liver"]}, "r.png", "400", "['liver'] are not labels of this model"),
        (["--image", str(server["studies"] / IMAGE)], {}, "r.png", "400", "server paths are not read"),
        (["--model", "segmentation", "--file", str(image)], {}, "r.png", "404", "no model 'segmentation'"),
        (["--image", stem], {"device": "gpu"}, "r.png", "400", "device 'gpu': give cpu, cuda"),
        (["--file", str(four_d)], {}, "r.nii.gz", "400", "is a 4D volume (6x7x5x2): this app segments 3D volumes"),
    ]
    before = set(server["uploads"].iterdir())  # MONAI Label's own logging config is there from the start
    for where, params, name, status, says in cases:
        out = tmp_path / name
        done = _client(server, "infer", *where, "--params", json.dumps(params), "--out", str(out), check=False)
        assert done.returncode == 2 and f"Status: {status}" in done.stderr and says in done.stderr, (where, done.stderr)
        assert not out.exists()
    # the client's own refusals, before anything is sent: an --out the server cannot write, or one that
    # contradicts the result_extension asked for
    for params, name, says in (({}, "r.out", "--out r.out: name a label file the server writes"),
                               ({"result_extension": ".nrrd"}, "r.png", "ends in .png but --params asks for")):
        done = _client(server, "infer", "--image", stem, "--params", json.dumps(params), "--out", str(tmp_path / name),
                       check=False)
        assert done.returncode == 2 and says in done.stderr and "Status:" not in done.stderr, done.stderr
    assert set(server["uploads"].iterdir()) == before


def _configs():
    """apps/monailabel_medsam3/lib/configs.py (plain Python: no MONAI Label needed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("medsam3_app_configs", APP / "lib" / "configs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


def test_largest_cc_param_and_components():
    """``largest_cc`` as clients send it (bool or text, blank = not given), and what it keeps: each label's largest
    component with diagonal neighbours connected (MONAI's KeepLargestConnectedComponent), other labels untouched."""
    import torch
    from monai.data import MetaTensor

    from medsam3_monai.deploy.monailabel_protocol import ParamsError, parse_label_params
    from medsam3_monai.inferers.predict import Prediction

    for value, want in [(True, True), ("true", True), ("On", True), ("1", True), (False, False), ("false", False),
                        ("", False)]:
        assert parse_label_params({"largest_cc": value}).largest_cc is want
    assert parse_label_params({}).largest_cc is False
    for bad in ("maybe", 2, [True]):
        with pytest.raises(ParamsError, match="'largest_cc' must be true or false"):
            parse_label_params({"largest_cc": bad})

    labels = torch.zeros(8, 8, dtype=torch.uint8)
    labels[0:2, 0:2] = 3  # 4 pixels
    labels[5:8, 5:8] = 3  # 9 pixels: kept
    labels[4, 0] = labels[5, 1] = labels[6, 2] = 7  # 3 pixels touching at corners: one component, kept
    labels[0, 5:7] = 7  # 2 pixels
    meta = {"filename_or_obj": "x.png", "spatial_shape": (8, 8)}
    prediction = Prediction(MetaTensor(labels, meta=meta), ["a", "b"], [3, 7], [0.9, 0.8], "top_query", False,
                            torch.eye(4), "x.png")
    kept = prediction.largest_components()
    want = torch.zeros_like(labels)
    want[5:8, 5:8] = 3
    want[4, 0] = want[5, 1] = want[6, 2] = 7
    assert isinstance(kept.label_map, MetaTensor) and kept.label_map.dtype == torch.uint8
    assert torch.equal(kept.label_map.as_tensor(), want) and kept.label_map.meta["filename_or_obj"] == "x.png"
    assert kept.summary()["labels"] == {"3": {"prompt": "a", "score": 0.9, "pixels": 9},
                                        "7": {"prompt": "b", "score": 0.8, "pixels": 3}}
    assert torch.equal(prediction.label_map.as_tensor(), labels)  # the prediction itself is unchanged


def test_app_conf_parsing():
    configs = _configs()
    default = configs.parse_conf({})
    assert default.labels == {"polyp": 1} and default.prompts == {"polyp": "polyp"}
    assert default.checkpoint == "tiny" and default.model == "medsam3" and default.score_threshold == 0.5

    conf = configs.parse_conf({"labels": '{"polyp":3,"instrument":7}', "prompts": '{"polyp": "colon polyp"}',
                               "score_threshold": "0.2", "modality": "auto", "ct_window": "400,40",
                               "image_size": "224", "preload": "true", "resize_kernel": "monai"})
    assert conf.labels == {"polyp": 3, "instrument": 7}
    assert conf.prompts == {"polyp": "colon polyp", "instrument": "instrument"}
    assert (conf.score_threshold, conf.modality, conf.ct_window, conf.image_size, conf.preload) == (
        0.2, None, (400.0, 40.0), 224, True)
    assert (conf.resize_kernel, default.resize_kernel) == ("monai", None)  # None: the model file's own
    assert default.ct_window is None
    assert configs.parse_conf({"labels": "liver, spleen"}).labels == {"liver": 1, "spleen": 2}
    assert configs.parse_conf({"labels": '["liver","spleen"]'}).labels == {"liver": 1, "spleen": 2}

    for bad, says in [({"labels": '{"polyp": 0}'}, "1..255"), ({"labels": '{"a": 1, "b": 1}'}, "share"),
                      ({"labels": '{"polyp": 1'}, "JSON"), ({"prompts": '{"liver": "x"}'}, "not labels"),
                      ({"score_threshold": "2"}, "[0, 1]"), ({"ct_window": "4,x"}, "width,level"),
                      ({"checkpont": "/w/sam3.pt"}, "'checkpont' (did you mean 'checkpoint'?)"),
                      ({"labels": "polyp,polyp"}, "['polyp'] named twice"), ({"labels": '{"a": 1.7}'}, "integer"),
                      ({"image_size": "abc"}, "--conf image_size 'abc'"), ({"image_size": "7"}, "multiple of 14"),
                      ({"tracker": "bogus"}, "--conf tracker: tracker checkpoint bogus does not exist"),
                      ({"checkpoint": "/no/such.pt"}, "--conf checkpoint: checkpoint /no/such.pt does not exist"),
                      ({"ct_window": "bogus"}, "unknown CT window 'bogus'"), ({"protocol": "best"}, "choose one of"),
                      ({"modality": "PET"}, "--conf modality 'PET'"), ({"preload": "ture"}, "give true or false"),
                      ({"resize_kernel": "bicubic"}, "--conf resize_kernel 'bicubic': choose one of sam3, monai")]:
        with pytest.raises(configs.ConfError, match=re.escape(says)):
            configs.parse_conf(bad)



def test_a_studies_folder_with_its_images_in_sub_folders_is_said(tmp_path):
    """MONAI Label lists only the files directly in --studies: a dataset's images/ below it would serve nothing."""
    configs = _configs()
    patterns = ["*.nii.gz", "*.png", "*.jpg"]
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "images" / name).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    note = configs.studies_note(str(tmp_path), patterns)
    assert note.startswith(f"--studies {tmp_path} lists no images") and f"2 in {tmp_path / 'images'}: give" in note
    (tmp_path / "c.jpg").write_bytes(b"")
    assert configs.studies_note(str(tmp_path), patterns) is None  # it lists one
    assert configs.studies_note("http://127.0.0.1:8042/dicom-web", patterns) is None
