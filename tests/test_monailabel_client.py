"""``medsam3 serve`` driven by the unmodified MONAI Label client (monailabel 0.8.5's ``MONAILabelClient``), and by
requests shaped like 3D Slicer's and OHIF's: every segmentation must equal what ``medsam3 segment`` writes for
the same input and prompts (tiny checkpoint: deterministic).

The servers are real uvicorn servers on loopback in background threads (the client speaks HTTP to a URL).
monailabel is a test-only dependency (scripts/setup_env.sh installs it with --no-deps); without it these tests
skip.
"""

from __future__ import annotations

import http.client
import json
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
with warnings.catch_warnings():  # the 0.8.5 client imports the cgi module (deprecated since Python 3.11)
    warnings.simplefilter("ignore", DeprecationWarning)
    client_module = pytest.importorskip(
        "monailabel.client.client",
        reason="the MONAI Label client (monailabel 0.8.5) is not importable: scripts/setup_env.sh installs it "
               "(pip install --no-deps monailabel==0.8.5)")

from _server_helpers import running_server  # noqa: E402
from PIL import Image  # noqa: E402

MONAILabelClient = client_module.MONAILabelClient
MONAILabelClientException = client_module.MONAILabelClientException

MODEL = "medsam3"
TOKEN = "t0ken-for-tests"
ORIGIN = "http://localhost:3000"  # where OHIF's dev server runs
# volumes: the tiny random network's detections score about 0.25, so the default 0.5 would give empty masks
SCORE_THRESHOLD = "0.1"
SERVE_OPTIONS = ("--cors-origin", ORIGIN, "--score-threshold", SCORE_THRESHOLD)


@pytest.fixture(scope="module")
def url():
    """An open server (no token), CORS for OHIF's origin."""
    with running_server(*SERVE_OPTIONS, join_timeout_s=30) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def token_url():
    """A server started with --token."""
    with running_server(*SERVE_OPTIONS, "--token", TOKEN, join_timeout_s=30) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def samples(shared_data) -> dict[str, Path]:
    paths = {
        "jpeg": shared_data / "Kvasir-SEG_sample" / "images" / "cju0qkwl35piu0993l0dewei2.jpg",
        "png": shared_data / "BUSI" / "images" / "benign (1).png",
        "nifti": shared_data / "MSD_Task04_Hippocampus_cropped" / "images" / "hippocampus_001.nii.gz",
        "nifti2": shared_data / "MSD_Task04_Hippocampus_cropped" / "images" / "hippocampus_003.nii.gz",
    }
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        pytest.skip(f"real samples not found: {', '.join(missing)}")
    return paths


@pytest.fixture(scope="module")
def segment(tmp_path_factory):
    """What `medsam3 segment INPUT --prompt ... --out` writes, as an array (cached per input and prompts)."""
    from medsam3_monai.deploy.cli import main

    folder = tmp_path_factory.mktemp("segment")
    cache: dict[tuple, np.ndarray] = {}

    def run(path: Path, prompts: list[str]) -> np.ndarray:
        key = (str(path), tuple(prompts))
        if key not in cache:
            volume = path.name.endswith(".nii.gz")
            out = folder / f"{len(cache)}{'.nii.gz' if volume else '.png'}"
            argv = ["segment", str(path), "--out", str(out), "--device", "cpu", "--no-progress"]
            argv += ["--score-threshold", SCORE_THRESHOLD] if volume else []  # (a picture's top_query reads none)
            for prompt in prompts:
                argv += ["--prompt", prompt]
            assert main(argv) == 0
            cache[key] = _read(out)
        return cache[key]

    return run


def _read(path: str | Path) -> np.ndarray:
    """A label file as an array in ``medsam3 segment``'s layout: PNG (H, W); NIfTI (X, Y, Z); NRRD via ITK,
    whose (Z, Y, X) array is transposed."""
    name = str(path).lower()
    if name.endswith(".png"):
        return np.asarray(Image.open(path))
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        return np.asarray(nib.load(str(path)).dataobj)
    import itk

    return itk.array_from_image(itk.imread(str(path))).transpose()


def _client(address: str, tmp_path: Path, client_id: str | None = None) -> MONAILabelClient:
    folder = tmp_path / f"client-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    return MONAILabelClient(address, tmpdir=str(folder), client_id=client_id)


# ------------------------------------------------------------------------------------------------ info
def test_info(url, tmp_path):
    client = _client(url, tmp_path)
    assert client.auth_enabled() is False
    info = client.info()
    assert isinstance(info["labels"], dict)
    model = info["models"][MODEL]
    assert model["type"] == "segmentation" and isinstance(model["labels"], dict)
    assert model["config"] == {"prompts": "", "protocol": ["top_query", "top_query_floor", "threshold", "semantic"],
                               "score_threshold": float(SCORE_THRESHOLD), "modality": "", "largest_cc": False}
    assert "config" not in info  # 3D Slicer refuses servers with a top-level config (pre-0.2 MONAI Label)
    assert set(info["strategies"]) == {"first", "random"} and info["trainers"] == {}
    assert client.train_status(check_if_running=True) is False  # what Slicer polls: no training here


# ------------------------------------------------------------------------------------------------ upload
@pytest.mark.parametrize("kind, prompts", [("jpeg", ["polyp"]), ("png", ["breast tumor", "tissue"])])
def test_infer_2d_upload(url, tmp_path, samples, segment, kind, prompts):
    client = _client(url, tmp_path)
    result_file, params = client.infer(MODEL, "", {"prompts": prompts}, file=str(samples[kind]))
    assert result_file is not None and result_file.endswith(".png"), (result_file, params)
    expected = segment(samples[kind], prompts)
    assert len(np.unique(expected)) == len(prompts) + 1, "trivial reference mask: choose another sample"
    mask = _read(result_file)
    assert mask.dtype == expected.dtype and np.array_equal(mask, expected)
    values = [255] if len(prompts) == 1 else list(range(1, len(prompts) + 1))
    assert params["label_names"] == dict(zip(prompts, values))
    assert params["shape"] == list(expected.shape)
    for value in values:
        assert params["labels"][str(value)]["pixels"] == int((expected == value).sum())


def test_infer_nifti_upload(url, tmp_path, samples, segment):
    import nibabel as nib

    client = _client(url, tmp_path)
    result_file, params = client.infer(MODEL, "", {"prompts": ["hippocampus"]}, file=str(samples["nifti"]))
    assert result_file.endswith(".nii.gz"), (result_file, params)
    expected = segment(samples["nifti"], ["hippocampus"])
    assert 0 < expected.sum() < expected.size, "trivial reference mask: lower SCORE_THRESHOLD or change sample"
    assert np.array_equal(_read(result_file), expected)
    assert np.allclose(nib.load(result_file).affine, nib.load(str(samples["nifti"])).affine)
    assert params["label_names"] == {"hippocampus": 1} and params["labels"]["1"]["voxels"] == int(expected.sum())
    # this request's own detection threshold, above every slice's score: an empty label and why
    result_file, params = client.infer(MODEL, "", {"prompts": ["hippocampus"], "score_threshold": 0.99},
                                       file=str(samples["nifti"]))
    assert not _read(result_file).any() and params["score_threshold"] == 0.99
    assert params["notes"][-1].startswith("'hippocampus': no slice scored >= 0.99")

# ------------------------------------------------------------------------------------------------ 3D Slicer
def test_slicer_upload_then_infer_by_id(url, tmp_path, samples, segment):
    """Slicer: upload_image(file, volume node name), then infer by that id with its client_id and the model's
    config values as params (blank options as empty texts); then submit the label."""
    client = _client(url, tmp_path, client_id="user-xyz")
    image_id = "hippocampus_001 (T2)"
    assert client.upload_image(str(samples["nifti"]), image_id) == {"image": image_id}
    info = client.info()
    assert info["datastore"]["total"] >= 1
    config = dict(info["models"][MODEL]["config"])
    # the options table sends texts: two concepts typed as one, comma-separated
    params = {"prompts": "hippocampus, brain", "protocol": config["protocol"][0], "modality": config["modality"],
              "largest_cc": config["largest_cc"], "score_threshold": config["score_threshold"]}
    result_file, answer = client.infer(MODEL, image_id, params)
    assert np.array_equal(_read(result_file), segment(samples["nifti"], ["hippocampus", "brain"]))
    assert answer["input"] == "datastore image"
    labels = [k for k, _ in sorted(answer["label_names"].items(), key=lambda item: item[1])]  # Slicer's reading
    assert labels == ["hippocampus", "brain"]

    stored = client.datastore()["objects"][image_id]
    assert stored["image"]["ext"] == ".nii.gz" and stored["image"]["info"]["client_id"] == "user-xyz"
    saved = client.save_label(image_id, result_file, params={"label_info": [{"name": "hippocampus", "idx": 1},
                                                                            {"name": "brain", "idx": 2}]})
    assert saved["image"] == image_id and saved["label"] == image_id
    assert "final" in client.datastore()["objects"][image_id]["labels"]
    assert client.next_sample("first", {}).get("id") != image_id  # labelled now
    label_file = client.download_label(image_id, "final")
    assert Path(label_file).read_bytes() == Path(result_file).read_bytes()


def test_slicer_session_then_infer(url, tmp_path, samples, segment):
    """Slicer's session mode: create_session(file), then infer with session_id (and the node name as image)."""
    client = _client(url, tmp_path, client_id="user-xyz")
    session = client.create_session(str(samples["nifti2"]))
    session_id = session["session_id"]
    assert client.get_session(session_id)["name"] == session_id
    result_file, answer = client.infer(MODEL, "Volume node", {"prompts": ["hippocampus"]}, session_id=session_id)
    assert np.array_equal(_read(result_file), segment(samples["nifti2"], ["hippocampus"]))
    assert answer["input"] == "session"
    client.remove_session(session_id)
    with pytest.raises(MONAILabelClientException) as raised:
        client.get_session(session_id)
    assert raised.value.status_code == 404


def test_next_sample_serves_the_upload(url, tmp_path, samples):
    """Next sample -> an unlabelled image id; Slicer then downloads it from /datastore/image?image=ID."""
    client = _client(url, tmp_path)
    image_id = f"case-{uuid.uuid4().hex[:6]}"
    client.upload_image(str(samples["jpeg"]), image_id)
    ids = set()
    for _ in range(200):  # random among the unlabelled images (other tests upload too)
        sample = _client(url, tmp_path).next_sample("random", {})
        ids.add(sample["id"])
        if sample["id"] == image_id:
            assert sample["name"] == f"{image_id}.jpg"
            break
    assert image_id in ids
    status, headers, body = _http(url, "GET", f"/datastore/image?image={image_id}")
    assert status == 200 and body == samples["jpeg"].read_bytes()


# ------------------------------------------------------------------------------------------------ OHIF
def _http(address: str, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    host, port = address.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_ohif_request(url, tmp_path, samples, segment):
    """OHIF's MONAI Label plugin: a CORS preflight, then POST /infer/{model}?image=UID&output=image with only
    'params' (its prompts plus result_extension .nrrd, result_dtype, result_compress, restore_label_idx)."""
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    _client(url, tmp_path).upload_image(str(samples["nifti"]), uid)  # the series, as the datastore holds it
    query = f"/infer/{MODEL}?image={uid}&output=image"

    status, headers, _ = _http(url, "OPTIONS", query, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "accept, content-type"})
    assert status == 200
    assert headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in headers["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
    assert {"accept", "content-type"} <= allowed
    status, headers, _ = _http(url, "OPTIONS", query, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert status == 400 and "access-control-allow-origin" not in headers

    params = {"prompts": ["hippocampus"], "result_extension": ".nrrd", "result_dtype": "uint8",
              "result_compress": False, "restore_label_idx": False}
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{json.dumps(params)}\r\n"
            f"--{boundary}--\r\n").encode()
    status, headers, data = _http(url, "POST", query, body, {
        "Origin": ORIGIN, "Accept": "application/json, multipart/form-data",
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, data
    assert headers["access-control-allow-origin"] == ORIGIN
    assert "x-medsam3-result" in headers["access-control-expose-headers"].lower()
    assert data.startswith(b"NRRD") and b"type: unsigned char" in data and b"encoding: raw" in data
    nrrd = tmp_path / "answer.nrrd"
    nrrd.write_bytes(data)
    expected = segment(samples["nifti"], ["hippocampus"])
    assert np.array_equal(_read(nrrd), expected)

    # the geometry OHIF overlays: ITK reads the NRRD and the input NIfTI alike
    import itk

    answer, source = itk.imread(str(nrrd)), itk.imread(str(samples["nifti"]))
    assert np.allclose(answer.GetSpacing(), source.GetSpacing())
    assert np.allclose(answer.GetOrigin(), source.GetOrigin())
    assert np.allclose(itk.array_from_matrix(answer.GetDirection()), itk.array_from_matrix(source.GetDirection()))
    assert json.loads(headers["x-medsam3-result"])["label_names"] == {"hippocampus": 1}


# ------------------------------------------------------------------------------------------------ token
def test_token_flow(token_url, tmp_path, samples, segment):
    client = _client(token_url, tmp_path)
    assert client.auth_enabled() is True
    with pytest.raises(MONAILabelClientException) as raised:
        client.info()
    assert raised.value.status_code == 401
    with pytest.raises(MONAILabelClientException) as raised:
        client.auth_token("radiologist", "not-the-token")
    assert raised.value.status_code == 401

    token = client.auth_token("radiologist", TOKEN)
    assert token["token_type"] == "bearer" and token["access_token"]
    client.update_auth(token)
    assert client.auth_valid_token() is True
    assert client.info()["models"][MODEL]["type"] == "segmentation"
    result_file, params = client.infer(MODEL, "", {"prompts": ["polyp"]}, file=str(samples["jpeg"]))
    assert np.array_equal(_read(result_file), segment(samples["jpeg"], ["polyp"]))

    # without the token: 401 before anything is read; a browser's preflight still gets its CORS answer
    status, headers, body = _http(token_url, "POST", f"/infer/{MODEL}", b"x" * 10, {"Content-Type": "text/plain"})
    assert status == 401 and headers["www-authenticate"] == "Bearer" and "token" in json.loads(body)["error"]
    status, headers, _ = _http(token_url, "OPTIONS", f"/infer/{MODEL}", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
