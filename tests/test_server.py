"""``medsam3 serve``: a real uvicorn server on loopback (in a thread, tiny checkpoint), real HTTP requests.

The MONAI Label client itself drives the server in test_monailabel_client.py; these tests speak HTTP directly:
answers (multipart by default, ``output=image``, ``output=json``), limits and every kind of bad request."""

from __future__ import annotations

import email.parser
import email.policy
import http.client
import io
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

from _server_helpers import free_port, running_server  # noqa: E402
from PIL import Image  # noqa: E402

TOKEN = "s3cret-token"
MAX_MB = 1
MAX_PIXELS = 2_000_000
MAX_CHARS = 50


@pytest.fixture(scope="module")
def server():
    """(host, port) of `medsam3 serve` started from the CLI's own parser, in a background thread."""
    with running_server("--token", TOKEN, "--max-request-mb", str(MAX_MB), "--max-image-pixels", str(MAX_PIXELS),
                        "--max-prompt-chars", str(MAX_CHARS), "--max-prompts", "4", start_timeout_s=30) as port:
        yield "127.0.0.1", port


def _request(server, method, path, body=b"", headers=None, token=TOKEN, timeout=60):
    conn = http.client.HTTPConnection(*server, timeout=timeout)
    try:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=body or None, headers=all_headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _multipart(fields: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, (filename, data) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _infer(server, data: bytes, filename: str, params, model="medsam3", query="", token=TOKEN):
    text = params if isinstance(params, str) else json.dumps(params)
    body, content_type = _multipart({"file": (filename, data), "params": (None, text.encode())})
    return _request(server, "POST", f"/infer/{model}{query}", body, {"Content-Type": content_type}, token=token)


def _parts(headers: dict[str, str], body: bytes) -> dict[str, tuple[str | None, str, bytes]]:
    """A multipart answer -> {field name: (file name, content type, bytes)}."""
    assert headers["content-type"].startswith("multipart/form-data; boundary=")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {headers['content-type']}\r\n\r\n".encode() + body)
    return {part.get_param("name", header="content-disposition"):
            (part.get_filename(), part.get_content_type(), part.get_payload(decode=True))
            for part in message.iter_parts()}


def _png(width: int, height: int, seed: int = 0) -> bytes:
    array = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def kvasir_jpeg(shared_data) -> Path:
    images = sorted((shared_data / "Kvasir-SEG_sample" / "images").glob("*.jpg"))
    if not images:
        pytest.skip("Kvasir-SEG sample JPEGs not found in ../shared/data")
    return images[0]


def _alive(server) -> None:
    status, _, body = _request(server, "GET", "/info")
    assert status == 200, body


def test_info(server):
    status, headers, body = _request(server, "GET", "/info/")
    assert status == 200 and headers["content-type"] == "application/json"
    info = json.loads(body)
    model = info["models"]["medsam3"]
    assert model["type"] == "segmentation" and model["dimension"] == 3 and model["dimensions"] == [2, 3]
    assert isinstance(model["labels"], dict) and isinstance(info["labels"], dict)  # MONAI Label: name -> value
    assert set(model["config"]) == {"prompts", "protocol", "score_threshold", "modality", "largest_cc"}
    assert "config" not in info
    # the server's threshold, which a request's params.score_threshold replaces (3D Slicer edits it as a number)
    assert model["config"]["score_threshold"] == model["score_threshold"] == 0.5
    assert info["models"]["medsam3_agent"]["config"]["score_threshold"] == 0.5
    assert model["resize_kernel"] == info["models"]["medsam3_agent"]["resize_kernel"] == "sam3"  # how it resizes
    assert "prompts" in model and "description" in model and info["version"]
    assert info["limits"]["max_image_pixels"] == MAX_PIXELS
    assert info["datastore"].keys() >= {"total", "completed"} and info["trainers"] == {}
    assert _request(server, "GET", "/info")[0] == 200  # without the slash too


def test_infer_real_image(server, kvasir_jpeg):
    data = kvasir_jpeg.read_bytes()
    width, height = Image.open(kvasir_jpeg).size
    # MONAI Label's default answer: multipart params (result JSON) + image (the mask file, name with extension)
    status, headers, body = _infer(server, data, "case 1.JPG", {"prompts": ["polyp"], "client_id": None})
    assert status == 200, body
    parts = _parts(headers, body)
    assert set(parts) == {"params", "image"}
    result = json.loads(parts["params"][2])
    filename, content_type, mask_bytes = parts["image"]
    assert filename.endswith(".png") and content_type == "image/png"
    mask = unboxed_mask = np.asarray(Image.open(io.BytesIO(mask_bytes)))
    assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 255}
    assert result["labels"]["255"]["prompt"] == "polyp" and 0 <= result["labels"]["255"]["score"] <= 1
    assert result["label_names"] == {"polyp": 255}
    assert result["shape"] == [height, width] and result["input"] == "upload.jpg"

    # output=image: the mask file alone, the result JSON in a header (output=file: the older name)
    for output in ("image", "file"):
        status, headers, body = _infer(server, data, "x.jpg", {"prompts": ["polyp"]}, query=f"?output={output}")
        assert status == 200 and headers["content-type"] == "image/png"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(body))), mask)
        assert json.loads(headers["x-medsam3-result"])["labels"] == result["labels"]

    # output=json: the result JSON; two prompts and a box -> label map 0..2
    params = {"prompts": ["polyp", "mucosa"], "box": [10, 10, width - 10, height - 10], "protocol": "threshold"}
    status, headers, body = _infer(server, data, "x.jpeg", params, query="?output=json")
    assert status == 200 and headers["content-type"] == "application/json", body
    answer = json.loads(body)
    assert answer["mask_format"] == "png" and set(answer["labels"]) == {"1", "2"}
    assert answer["label_names"] == {"polyp": 1, "mucosa": 2} and answer["protocol"] == "threshold+box"
    status, headers, body = _infer(server, data, "x.jpeg", params, query="?output=all")
    mask = np.asarray(Image.open(io.BytesIO(_parts(headers, body)["image"][2])))
    assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 1, 2}
    # the box reaches the network: with it, the top query's mask of "polyp" is another one
    boxed = {"prompts": ["polyp"], "box": params["box"]}
    status, headers, body = _infer(server, data, "x.jpeg", boxed, query="?output=image")
    assert status == 200 and json.loads(headers["x-medsam3-result"])["protocol"] == "top_query+box"
    boxed_mask = np.asarray(Image.open(io.BytesIO(body)))
    assert boxed_mask.shape == unboxed_mask.shape and not np.array_equal(boxed_mask, unboxed_mask)
    # the protocol belongs to that request only: the next one gets the server's default again
    status, headers, body = _infer(server, data, "x.jpeg", {"prompts": ["polyp"]}, query="?output=json")
    assert status == 200 and json.loads(body)["protocol"] == "top_query"
    assert "score_threshold" not in json.loads(body)  # top_query reads none
    # so does the score threshold: top_query_floor empties a mask whose top query scores below it
    floor = {}
    for threshold in (1, 0.0, None):
        request = {"prompts": ["polyp"], "protocol": "top_query_floor", "score_threshold": threshold}
        status, headers, body = _infer(server, data, "x.jpeg", request, query="?output=image")
        assert status == 200, body
        floor[threshold] = np.asarray(Image.open(io.BytesIO(body)))
        answer = json.loads(headers["x-medsam3-result"])
        assert answer["score_threshold"] == (0.5 if threshold is None else threshold)
        assert answer["labels"]["255"]["pixels"] == np.count_nonzero(floor[threshold])
        score = answer["labels"]["255"]["score"]
        assert answer["notes"] == ([] if score >= answer["score_threshold"] else [
            f"'polyp': no query scored >= {answer['score_threshold']:g} (best {score:.3f}), so the top_query_floor "
            "mask is empty: send a lower params.score_threshold"])
    assert not floor[1].any() and np.array_equal(floor[0.0], unboxed_mask) and unboxed_mask.any()
    # a threshold the request's 2D protocol does not read changes nothing, and the answer says so
    status, headers, body = _infer(server, data, "x.jpeg", {"prompts": ["polyp"], "score_threshold": 0.9},
                                   query="?output=image")
    assert status == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(body))), unboxed_mask)
    assert json.loads(headers["x-medsam3-result"])["notes"] == [
        "params.score_threshold 0.9 is not read by protocol top_query, so it changed nothing: send it with protocol "
        "top_query_floor or threshold"]
    assert np.array_equal(floor[None], unboxed_mask if score >= 0.5 else np.zeros_like(unboxed_mask))
    # STARE's PPM pictures upload as what they are
    ppm = io.BytesIO()
    Image.open(io.BytesIO(data)).save(ppm, format="PPM")
    status, headers, body = _infer(server, ppm.getvalue(), "im0001.ppm", {"prompts": ["polyp"]}, query="?output=image")
    assert status == 200 and np.asarray(Image.open(io.BytesIO(body))).shape == (height, width)


def test_infer_volume(tmp_path):
    import nibabel as nib
    import torch

    from medsam3_monai.transforms.intensity import unscaled_volume_note

    from medsam3_monai.deploy.cli import main

    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    volume = np.random.default_rng(0).normal(size=(20, 24, 5)).astype(np.float32)
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    # the tiny network scores volumes about 0.25: below the default 0.5 every mask would be empty
    with running_server("--token", TOKEN, "--score-threshold", "0.2") as port:
        server = "127.0.0.1", port
        status, headers, body = _infer(server, path.read_bytes(), "v.nii.gz", {"prompts": ["liver"]})
        assert status == 200, body
        filename, _, data = _parts(headers, body)["image"]
        # axial slices, a mask: only that nothing named the volume's modality, so it was min-max scaled
        assert json.loads(_parts(headers, body)["params"][2])["notes"] == [unscaled_volume_note(torch.tensor(volume))]
        params = {"prompts": ["liver"], "result_extension": ".nrrd", "result_dtype": "uint16",
                  "result_compress": True, "restore_label_idx": False}
        status, headers, nrrd_body = _infer(server, path.read_bytes(), "v.nii.gz", params, query="?output=image")
        # the same volume uploaded as NRRD (what 3D Slicer may send), prompts as one text (Slicer's options table),
        # and with largest_cc: the NIfTI upload's labels, then one component per label
        import itk

        nrrd_in = tmp_path / "v.nrrd"
        itk.imwrite(itk.imread(str(path)), str(nrrd_in))
        # a request's own detection threshold: above every slice's score, no mask, and the note says what to send
        strict = _infer(server, path.read_bytes(), "v.nii.gz", {"prompts": ["liver"], "score_threshold": 0.99},
                        query="?output=json")
        answer = json.loads(strict[2])
        assert strict[0] == 200 and answer["labels"]["1"]["voxels"] == 0 and answer["score_threshold"] == 0.99
        assert any(note.endswith("the mask is empty: send a lower params.score_threshold")
                   for note in answer["notes"])
        two = {}
        for name, data_in, prompts, largest in (("nifti", path.read_bytes(), ["liver", "spleen"], False),
                                                ("nrrd", nrrd_in.read_bytes(), "liver, spleen", False),
                                                ("largest", nrrd_in.read_bytes(), "liver, spleen", True)):
            answer = _infer(server, data_in, f"in{len(two)}.{'nii.gz' if name == 'nifti' else 'nrrd'}",
                            {"prompts": prompts, "largest_cc": largest}, query="?output=image")
            assert answer[0] == 200, answer[2]
            result = json.loads(answer[1]["x-medsam3-result"])
            assert result["label_names"] == {"liver": 1, "spleen": 2} and result["largest_cc"] is largest
            (tmp_path / f"{name}.nii.gz").write_bytes(answer[2])
            two[name] = np.asarray(nib.load(str(tmp_path / f"{name}.nii.gz")).dataobj)
    from scipy import ndimage

    assert np.array_equal(two["nifti"], two["nrrd"]) and set(np.unique(two["nifti"])) >= {1, 2}
    for value in (1, 2):
        kept = two["largest"] == value
        assert ndimage.label(kept, np.ones((3, 3, 3)))[1] == 1 and not (kept & (two["nifti"] != value)).any()
        assert ndimage.label(two["nifti"] == value, np.ones((3, 3, 3)))[1] >= 1
    assert filename.endswith(".nii.gz")
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(data)
    mask = nib.load(str(out))
    assert mask.shape == (20, 24, 5) and np.allclose(mask.affine, affine)
    labels = np.asarray(mask.dataobj)
    assert 0 < np.count_nonzero(labels) < labels.size, "a mask with both labels, so that a flip or a scale shows"
    assert not np.array_equal(labels, labels[::-1]) and not np.array_equal(labels, labels[:, ::-1])
    # the labels `medsam3 segment` writes for that volume and prompt
    assert main(["segment", str(path), "--prompt", "liver", "--out", str(tmp_path / "segment.nii.gz"),
                 "--checkpoint", "tiny", "--device", "cpu", "--score-threshold", "0.2", "--no-progress"]) == 0
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "segment.nii.gz")).dataobj), labels)

    # MONAI Label's result params: another format and data type (OHIF reads NRRD), the same labels
    assert status == 200 and headers["content-disposition"] == 'attachment; filename="mask.nrrd"', nrrd_body
    header = nrrd_body.split(b"\n\n", 1)[0].decode()
    assert "type: unsigned short" in header and "encoding: gzip" in header and "sizes: 20 24 5" in header
    import itk

    nrrd = tmp_path / "mask.nrrd"
    nrrd.write_bytes(nrrd_body)
    assert np.array_equal(itk.array_from_image(itk.imread(str(nrrd))).transpose(), labels)


@pytest.mark.parametrize("case", [
    "no_token", "bad_token", "oversized", "too_many_pixels", "empty_prompt", "long_prompt", "too_many_prompts",
    "box_outside", "unsupported_format", "traversal_filename", "truncated", "garbage", "traversal_model",
    "traversal_model_encoded", "bad_json", "unknown_route", "unknown_param", "bad_box", "no_image",
    "unknown_image_id", "unknown_session", "bad_output", "dicom_seg", "bad_result_extension", "png_of_volume",
    "bad_result_dtype", "wrong_password", "deep_json", "two_files", "truncated_volume", "truncated_volume_stored",
    "truncated_picture_stored", "truncated_nrrd", "bad_score_threshold", "external_data_mha",
    "external_data_nrrd", "external_data_stored", "nifti_far_offset",
])
def test_bad_requests(server, case, kvasir_jpeg, tmp_path):
    small = _png(32, 24)
    params = {"prompts": ["polyp"]}
    if case in ("no_token", "bad_token"):
        status, _, body = _infer(server, small, "a.png", params, token=None if case == "no_token" else "wrong")
        expected = 401
    elif case == "oversized":  # the declared length is refused before the body is read
        conn = http.client.HTTPConnection(*server, timeout=30)
        conn.putrequest("POST", "/infer/medsam3")
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader("Content-Type", "multipart/form-data; boundary=x")
        conn.putheader("Content-Length", str(MAX_MB * 2**20 + 1))
        conn.endheaders(b"--x\r\n" + b"0" * 1000)
        response = conn.getresponse()
        status, body = response.status, response.read()
        conn.close()
        expected = 413
    elif case == "too_many_pixels":  # a 2000 x 1200 blank PNG: tiny upload, too many pixels
        buffer = io.BytesIO()
        Image.new("L", (2000, 1200)).save(buffer, format="PNG")
        status, _, body = _infer(server, buffer.getvalue(), "big.png", params)
        expected = 413
    elif case == "empty_prompt":
        status, _, body = _infer(server, small, "a.png", {"prompts": ["  "]})
        expected = 422
    elif case == "long_prompt":
        status, _, body = _infer(server, small, "a.png", {"prompts": ["polyp " * 20]})
        expected = 422
    elif case == "too_many_prompts":
        status, _, body = _infer(server, small, "a.png", {"prompts": ["a", "b", "c", "d", "e"]})
        expected = 422
    elif case == "box_outside":
        status, _, body = _infer(server, small, "a.png", {"prompts": ["polyp"], "box": [0, 0, 40, 20]})
        expected = 422
    elif case == "unsupported_format":
        status, _, body = _infer(server, b"II*\x00....", "a.svs", params)  # a slide scanner file
        expected = 415
    elif case == "traversal_filename":  # only a whitelisted extension of the name is used; none here
        status, _, body = _infer(server, small, "../../etc/passwd", params)
        expected = 415
    elif case == "truncated":
        data = kvasir_jpeg.read_bytes()
        status, _, body = _infer(server, data[: len(data) // 3], "t.jpg", params)
        expected = 422
    elif case == "garbage":
        status, _, body = _infer(server, b"\x00not an image at all" * 10, "g.png", params)
        expected = 422
    elif case == "traversal_model":
        status, _, body = _infer(server, small, "a.png", params, model="../../etc/passwd")
        expected = 404
    elif case == "traversal_model_encoded":
        status, _, body = _infer(server, small, "a.png", params, model="..%2F..%2Fetc%2Fpasswd")
        expected = 404
    elif case == "bad_json":
        status, _, body = _infer(server, small, "a.png", "{prompts: polyp")
        expected = 422
    elif case == "unknown_param":  # a typo is refused, not ignored
        status, _, body = _infer(server, small, "a.png", {"prompts": ["polyp"], "promtp": "x"})
        expected = 422
    elif case == "bad_score_threshold":
        status, _, body = _infer(server, small, "a.png", {"prompts": ["polyp"], "score_threshold": 1.5})
        assert json.loads(body)["error"] == "'score_threshold' must be a number in [0, 1]"
        expected = 422
    elif case == "bad_box":
        status, _, body = _infer(server, small, "a.png", {"prompts": ["polyp"], "box": ["1", 2, 3, 4]})
        expected = 422
    elif case == "no_image":  # neither a file nor an image id nor a session
        body, content_type = _multipart({"params": (None, json.dumps(params).encode())})
        status, _, body = _request(server, "POST", "/infer/medsam3", body, {"Content-Type": content_type})
        expected = 422
    elif case in ("unknown_image_id", "unknown_session"):
        body, content_type = _multipart({"params": (None, json.dumps(params).encode())})
        query = "?image=..%2Fetc%2Fpasswd" if case == "unknown_image_id" else "?session_id=nope"
        status, _, body = _request(server, "POST", f"/infer/medsam3{query}", body, {"Content-Type": content_type})
        expected = 404
    elif case == "bad_output":
        status, _, body = _infer(server, small, "a.png", params, query="?output=zip")
        expected = 422
    elif case == "dicom_seg":  # needs a DICOMweb datastore
        status, _, body = _infer(server, small, "a.png", params, query="?output=dicom_seg")
        expected = 422
    elif case == "bad_result_extension":
        status, _, body = _infer(server, small, "a.png", {"prompts": ["polyp"], "result_extension": ".exe"})
        expected = 422
    elif case == "png_of_volume":
        import nibabel as nib

        path = tmp_path / "v.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4)), str(path))
        status, _, body = _infer(server, path.read_bytes(), "v.nii.gz", {"prompts": ["x"], "result_extension": ".png"})
        expected = 422
    elif case == "bad_result_dtype":
        status, _, body = _infer(server, small, "a.png", {"prompts": ["polyp"], "result_dtype": "uint16"})
        expected = 422  # a PNG mask is uint8 (other types: .nrrd or .nii.gz)
    elif case == "deep_json":  # json.loads' recursion limit, under the params size limit
        status, _, body = _infer(server, small, "a.png", '{"prompts": ["p"], "box": ' + "[" * 30000 + "]" * 30000 + "}")
        expected = 422
    elif case == "two_files":  # one would be ignored
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'.encode()
                 + small + b"\r\n" for name in ("a.png", "b.png")]
        body = b"".join(parts) + f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n'.encode() \
            + json.dumps(params).encode() + f"\r\n--{boundary}--\r\n".encode()
        status, _, body = _request(server, "POST", "/infer/medsam3", body,
                                   {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        expected = 422
    elif case in ("truncated_volume", "truncated_volume_stored"):  # its header reads; the data stops halfway
        import nibabel as nib

        path = tmp_path / "v.nii.gz"
        nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(30, 30, 9)).astype(np.float32), np.eye(4)),
                 str(path))
        data = path.read_bytes()[: path.stat().st_size // 2]
        if case == "truncated_volume":
            status, _, body = _infer(server, data, "v.nii.gz", params)
        else:  # the datastore keeps no unreadable volume ("Next sample" would hand it to a client)
            body, content_type = _multipart({"file": ("v.nii.gz", data)})
            status, _, body = _request(server, "PUT", "/datastore/?image=half", body, {"Content-Type": content_type})
        assert "upload.nii.gz is truncated" in json.loads(body)["error"]
        expected = 422
    elif case == "truncated_picture_stored":  # decoded at upload: not kept for a later failure
        data = kvasir_jpeg.read_bytes()
        body, content_type = _multipart({"file": ("t.jpg", data[: len(data) // 3])})
        status, _, body = _request(server, "PUT", "/datastore/?image=cut", body, {"Content-Type": content_type})
        assert "upload.jpg cannot be read" in json.loads(body)["error"]
        expected = 422
    elif case == "truncated_nrrd":  # ITK's multi-line message is not passed on
        import itk

        path = tmp_path / "v.nrrd"
        itk.imwrite(itk.image_from_array(np.random.default_rng(0).normal(size=(9, 30, 30)).astype(np.float32)),
                    str(path))
        status, _, body = _infer(server, path.read_bytes()[: path.stat().st_size // 2], "v.nrrd", params)
        error = json.loads(body)["error"]
        assert error.startswith("upload.nrrd cannot be read: ITK could not read its data") and "\n" not in error
        expected = 422
    elif case.startswith("external_data"):  # a header naming a file on the server's disk: never read
        secret = tmp_path / "other_patient.raw"
        secret.write_bytes(bytes(32 * 32 * 8))
        header = {"mha": f"ObjectType = Image\nNDims = 3\nDimSize = 32 32 8\nElementType = MET_UCHAR\n"
                         f"ElementDataFile = {secret}\n",
                  "nrrd": f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 32 32 8\nencoding: raw\n"
                          f"data file: {secret}\n\n"}
        suffix = "nrrd" if case == "external_data_nrrd" else "mha"
        if case == "external_data_stored":
            body, content_type = _multipart({"file": (f"v.{suffix}", header[suffix].encode())})
            status, _, body = _request(server, "PUT", "/datastore/?image=ext", body, {"Content-Type": content_type})
        else:
            status, _, body = _infer(server, header[suffix].encode(), f"v.{suffix}", {"prompts": ["liver"]})
        assert f"upload.{suffix} keeps its data in another file" in json.loads(body)["error"]
        expected = 422
    elif case == "nifti_far_offset":  # vox_offset 4 GiB: every reader would inflate a .nii.gz that far
        import gzip

        import nibabel as nib

        header = nib.Nifti1Image(np.zeros((8, 8, 3), np.uint8), np.eye(4)).header
        header["vox_offset"] = 2**32
        status, _, body = _infer(server, gzip.compress(header.binaryblock + bytes(4 + 192)), "v.nii.gz", params)
        assert "upload.nii.gz puts its voxels 4294967296 bytes into the file" in json.loads(body)["error"]
        expected = 422
    elif case == "wrong_password":
        form = b"grant_type=password&username=u&password=wrong"
        status, _, body = _request(server, "POST", "/auth/token", form,
                                   {"Content-Type": "application/x-www-form-urlencoded"}, token=None)
        expected = 401
    else:
        status, _, body = _request(server, "GET", "/../../etc/passwd")
        expected = 404
    assert status == expected, (status, body)
    error = json.loads(body)["error"]
    assert "medsam3-serve-" not in error and "medsam3-store-" not in error  # no server paths in messages
    _alive(server)


def test_a_nii_gz_is_inflated_only_as_far_as_its_header_needs(server, tmp_path):
    """A gzip bomb (a small .nii.gz whose stream goes on for gigabytes past the voxels its header describes) costs
    the server no more than the voxels: the check stops there. Here the tail is a cut-off gzip member, which
    inflating the whole file would refuse as truncated."""
    import gzip
    import zlib

    import nibabel as nib

    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(0, 255, (24, 20, 3), dtype=np.uint8), np.eye(4)),
             str(path))
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # a gzip member of 32 MiB of zeros, its end cut off
    tail = packer.compress(bytes(32 * 2**20)) + packer.flush()
    data = path.read_bytes() + tail[: len(tail) // 2]
    assert len(gzip.decompress(path.read_bytes())) < 2000
    status, _, body = _infer(server, data, "v.nii.gz", {"prompts": ["liver"]}, query="?output=json")
    assert status == 200, body
    assert json.loads(body)["shape"] == [24, 20, 3]


@pytest.mark.parametrize("header", [
    pytest.param("{base}elementdatafile = LOCAL\nElementDataFile = {secret}\n", id="lower_case_local_first"),
    pytest.param("{base}ElementDataFile: {secret}\nElementDataFile = LOCAL\n", id="colon_separator_first"),
    pytest.param("{base}Junk\nElementDataFile = LOCAL\nElementDataFile = {secret}\n", id="line_without_separator"),
    pytest.param("{base}ElementDataFile\0x = {secret}\nElementDataFile = LOCAL\n", id="nul_in_the_name"),
    pytest.param("{nrrd}data file: {secret}\r\r\n\n", id="nrrd_cr_line_ends"),
    pytest.param("{base}Comment = x\rElementDataFile = LOCAL\nElementDataFile = {secret}\n", id="cr_in_a_value"),
])
def test_a_header_itk_reads_as_naming_another_file_is_refused(tmp_path, header):
    """Each header makes ITK read ``secret`` (MetaIO: names end at '=' or ':' or a NUL, are case-sensitive, a line
    without a separator takes the next line as its value, a value runs on past a CR; teem ends a line at a lone CR):
    the check must read it as ITK does, not find a 'LOCAL' or a blank line ITK never sees."""
    import itk

    from medsam3_monai.deploy.server import external_data_file

    secret = tmp_path / "other_patient.raw"
    secret.write_bytes(bytes(range(256)) * 2)
    base = "ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\n"
    nrrd = "NRRD0004\rtype: uint8\rdimension: 3\rsizes: 8 8 8\rencoding: raw\r"
    path = tmp_path / ("v.nrrd" if header.startswith("{nrrd}") else "v.mha")
    path.write_bytes(header.format(base=base, nrrd=nrrd, secret=secret).encode() + bytes(512))
    assert itk.array_from_image(itk.imread(str(path))).ravel()[:6].tolist() == [0, 1, 2, 3, 4, 5]  # the secret
    assert external_data_file(path) is not None


def test_volumes_as_itk_writes_them_are_one_file(tmp_path):
    """ITK's own NRRD / MetaImage files (raw and compressed, with metadata fields holding ':' and '=', a Windows
    editor's CRLF) pass the external-data check."""
    import itk

    from medsam3_monai.deploy.server import external_data_file

    image = itk.image_from_array(np.zeros((3, 8, 8), np.uint8))
    image["Segment0_Name"] = "liver: left lobe"
    image["Comment"] = "a=b: c"
    for name, compression in (("r.mha", False), ("c.mha", True), ("r.nrrd", False), ("c.seg.nrrd", True)):
        itk.imwrite(image, str(tmp_path / name), compression=compression)
        assert external_data_file(tmp_path / name) is None, name
    crlf = tmp_path / "crlf.mha"
    crlf.write_bytes((tmp_path / "r.mha").read_bytes().replace(b"\n", b"\r\n", 11))
    assert external_data_file(crlf) is None


@pytest.mark.parametrize("vox_offset", [0, 2**30])
def test_a_nifti_offset_is_checked_before_nibabel_reads_its_extensions(tmp_path, monkeypatch, vox_offset):
    """nibabel's loader reads a NIfTI's extensions into memory up to its vox_offset (to the end of the file when
    the offset leaves no room): a small .nii.gz whose extension inflates to gigabytes. The offset is checked from
    the fixed header first, the extensions never read."""
    import gzip

    import nibabel as nib

    from medsam3_monai.deploy.server import RequestError, ServerLimits, check_image

    def never(*args, **kwargs):
        raise AssertionError("the extensions were read")

    monkeypatch.setattr(nib.nifti1.Nifti1Extensions, "from_fileobj", classmethod(never))
    header = nib.Nifti1Image(np.zeros((8, 8, 3), np.uint8), np.eye(4)).header
    header["vox_offset"] = vox_offset
    path = tmp_path / "v.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\x01\0\0\0" + np.array([2**30, 0], "<i4").tobytes()))
    with pytest.raises(RequestError, match="vox_offset"):
        check_image(path, ServerLimits())


def test_gzip_data_size_stops_at_its_limit(tmp_path):
    import gzip

    from medsam3_monai.transforms.io import gzip_data_size

    path = tmp_path / "z.gz"
    path.write_bytes(gzip.compress(bytes(10 * 2**20)))
    assert gzip_data_size(path) == 10 * 2**20
    assert gzip_data_size(path, limit=5 * 2**20 + 7) == 5 * 2**20 + 7
    assert gzip_data_size(path, limit=11 * 2**20) == 10 * 2**20


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


def test_concurrent_requests_bounded_memory(server):
    data = _png(48, 40, seed=3)

    def one(i: int) -> tuple[int, tuple[int, ...]]:
        status, _, body = _infer(server, data, f"c{i}.png", {"prompts": ["polyp" if i % 2 else "nucleus"]},
                                 query="?output=image")
        return status, np.asarray(Image.open(io.BytesIO(body))).shape if status == 200 else ()

    for i in range(3):  # warm-up (allocator pools, thread pool)
        assert one(i)[0] == 200
    before = _rss_mb()
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(one, range(50)))
    after = _rss_mb()
    assert [r[0] for r in results] == [200] * 50
    assert all(r[1] == (40, 48) for r in results)
    assert after - before < 300, f"RSS grew {after - before:.0f} MB over 50 requests"
    _alive(server)


@pytest.fixture()
def upload(tmp_path):
    """``upload(name, size)``: a file of ``size`` bytes, as a request's upload arrives in the datastore."""
    def write(name: str, size: int = 1) -> Path:
        path = tmp_path / name
        path.write_bytes(b"x" * size)
        return path

    return write


def test_datastore_limits_and_cleanup(tmp_path, monkeypatch, upload):
    """The temporary datastore: server-chosen file names, replacement, 507 when full, session expiry, removal."""
    from medsam3_monai.deploy.datastore import Datastore, StoreError

    store = Datastore(max_files=3, max_bytes=1000, session_expiry=60)
    store.add_image("../../etc/passwd", upload("a.png", 100), ".png", {})
    folder = store._folder
    assert [len(p.name) for p in folder.iterdir()] == [len(uuid.uuid4().hex) + len(".png")]  # a server-chosen name
    store.add_image("../../etc/passwd", upload("b.png", 200), ".png", {})  # replaced, not added
    assert store.status()["total"] == 1 and len(list(folder.iterdir())) == 1
    store.save_label("../../etc/passwd", upload("l.nii.gz", 100), ".nii.gz", "final", {"label_info": []})
    assert store.status() == {"total": 1, "completed": 1, "label_tags": {"final": 1}}
    with pytest.raises(StoreError) as raised:  # 300 + 800 bytes > 1000
        store.add_image("big", upload("c.png", 800), ".png", {})
    assert raised.value.status == 507
    session_id, info = store.add_session(upload("s.nii.gz", 100), ".nii.gz", expiry=10_000)
    assert info["expiry"] == 60 and info["path"] == ""  # capped; no server path
    with pytest.raises(StoreError) as raised:  # 3 files at most
        store.add_image("other", upload("d.png", 10), ".png", {})
    assert raised.value.status == 507
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 61)
    with pytest.raises(StoreError) as raised:
        store.session_info(session_id)
    assert raised.value.status == 404  # expired, and its file is gone
    store.add_image("other", upload("d.png", 10), ".png", {})
    with pytest.raises(StoreError) as raised:
        store.link_image("missing", tmp_path)
    assert raised.value.status == 404
    store.close()
    assert not folder.exists()


# ------------------------------------------------------------------------------------------------ limits, results
def test_the_limits_are_inclusive(tmp_path):
    """An image of exactly ``--max-image-pixels`` and exactly ``--max-prompts`` prompts are served; one more is
    refused ("larger than", "at most")."""
    from medsam3_monai.deploy.monailabel_protocol import ParamsError, parse_infer_params
    from medsam3_monai.deploy.server import RequestError, ServerLimits, check_image

    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((10, 20), np.uint8)).save(path)  # 200 pixels
    assert check_image(path, ServerLimits(max_image_pixels=200)) == ("image", (10, 20))
    with pytest.raises(RequestError) as refused:
        check_image(path, ServerLimits(max_image_pixels=199))
    assert refused.value.status == 413
    three = parse_infer_params('{"prompts": ["liver", "spleen", "kidney"]}', max_prompts=3, max_prompt_chars=200)
    assert three.prompts == ["liver", "spleen", "kidney"]
    with pytest.raises(ParamsError, match="at most 3"):
        parse_infer_params('{"prompts": ["a", "b", "c", "d"]}', max_prompts=3, max_prompt_chars=200)


@pytest.mark.parametrize("dtype", ["uint16", "int32", "float32"])
def test_a_nifti_result_has_the_requested_dtype(tmp_path, dtype):
    import types

    import nibabel as nib
    import torch

    from medsam3_monai.deploy.monailabel_protocol import parse_infer_params, write_result

    labels = np.zeros((4, 5, 3), np.uint8)
    labels[1, 2, 0], labels[3, 4, 2] = 1, 2
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64))
    params = parse_infer_params(json.dumps({"prompts": ["a", "b"], "result_extension": ".nii.gz",
                                            "result_dtype": dtype}), max_prompts=16, max_prompt_chars=200)
    out = tmp_path / "label.nii.gz"
    prediction = types.SimpleNamespace(is_volume=True, affine=affine)
    assert write_result(labels, prediction, params, out, reference=tmp_path / "missing.nii.gz") == "application/gzip"
    written = nib.load(str(out))
    assert written.get_data_dtype() == np.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
    np.testing.assert_allclose(written.affine, affine.numpy())


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_serve_refuses_a_score_threshold_outside_0_1(value):
    from medsam3_monai.deploy.cli import build_parser
    from medsam3_monai.deploy.serve import build_server

    args = build_parser().parse_args(["serve", "--checkpoint", "tiny", "--device", "cpu", "--score-threshold", value])
    with pytest.raises(ValueError, match=r"--score-threshold must be in \[0, 1\]"):
        build_server(args)


def test_serve_refuses_a_tracker_that_is_not_there_at_start():
    """Not at the first volume request (a bare 500 there), and before the network is loaded."""
    from medsam3_monai.deploy.cli import build_parser
    from medsam3_monai.deploy.serve import build_server
    from medsam3_monai.networks.checkpoints import CheckpointError

    args = build_parser().parse_args(["serve", "--checkpoint", "tiny", "--device", "cpu", "--tracker", "bogus",
                                      "--port", str(free_port())])  # the address is checked first: a free one
    with pytest.raises(CheckpointError, match="tracker checkpoint bogus does not exist. Give 'tiny'"):
        build_server(args)


def test_datastore_replacing_a_label_counts_only_the_net_bytes(upload):
    """Saving a label again under the same tag replaces the old file: the byte limit is checked against the
    store without the replaced label (10 + 60 held, 60 replaced by 60 -> 70 of 100 bytes, admitted), while a
    new label of 60 bytes would exceed it (10 + 60 + 60 = 130 > 100 -> 507)."""
    from medsam3_monai.deploy.datastore import Datastore, StoreError

    store = Datastore(max_files=10, max_bytes=100)
    try:
        store.add_image("img", upload("a.png", 10), ".png", {})
        store.save_label("img", upload("l1.png", 60), ".png", "final", {})
        store.save_label("img", upload("l2.png", 60), ".png", "final", {})  # replaces: admitted
        assert store.label_info("img", "final")["size"] == 60
        with pytest.raises(StoreError) as err:
            store.save_label("img", upload("l3.png", 60), ".png", "other", {})  # a new tag: over the limit
        assert err.value.status == 507
        # re-uploading the image replaces it and its labels: 10 + 60 held, 80 new -> admitted
        store.add_image("img", upload("b.png", 80), ".png", {})
        assert store.status()["total"] == 1 and store.status()["completed"] == 0
    finally:
        store.close()


def test_session_expires_after_its_last_use_not_its_creation(tmp_path):
    """A session lives ``expiry`` seconds after its last use (MONAI Label's last_access_ts): created at 0, used
    at 100, expiry 50 -> alive at 120 (though 120 > 0 + 50), expired after 150."""
    from medsam3_monai.deploy.datastore import SessionRecord, StoredFile

    record = SessionRecord(StoredFile(tmp_path / "s.nii.gz", ".nii.gz", 1), create_ts=0, last_access_ts=100,
                           expiry=50)
    assert not record.expired(120)
    assert not record.expired(150)
    assert record.expired(151)


def test_datastore_completed_counts_only_final_labels(upload):
    """MONAI Label's stats: ``completed`` = images with a final label; a label under another tag (a draft, the
    server's own ``original``) does not complete an image, nor does it enter the training list or stop
    next_sample from offering the image."""
    from medsam3_monai.deploy.datastore import FINAL_TAG, Datastore

    store = Datastore()
    try:
        store.add_image("a", upload("a.png"), ".png", {})
        store.add_image("b", upload("b.png"), ".png", {})
        store.save_label("a", upload("la.png"), ".png", "draft", {})
        assert store.status() == {"total": 2, "completed": 0, "label_tags": {"draft": 1}}
        assert store.datalist() == []
        store.save_label("b", upload("lb.png"), ".png", FINAL_TAG, {})
        assert store.status() == {"total": 2, "completed": 1, "label_tags": {"draft": 1, FINAL_TAG: 1}}
        assert store.datalist() == [{"image": "b", "label": "b"}]
        assert store.next_sample("first")["id"] == "a"
    finally:
        store.close()


def test_a_loopback_server_without_a_token_answers_only_requests_that_name_it_so(server):
    """DNS rebinding: a web page of attacker.example whose name comes to resolve to 127.0.0.1 calls the user's
    loopback server as its own origin (and reads the answers: the datastore's images). Without a token such a server
    answers only ``Host: 127.0.0.1 / localhost / [::1]``; a server with a token (which no page can send) any."""
    def get(port: int, host: str, path: str = "/datastore/?output=all", token: str | None = None) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            headers = {"Host": host} | ({"Authorization": f"Bearer {token}"} if token else {})
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    with running_server(start_timeout_s=30) as port:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
            assert get(port, host) == 200, host
        for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.attacker.example:{port}", ""):
            assert get(port, host) == 403, host
            assert get(port, host, "/auth/") == 403, host
    assert get(server[1], f"attacker.example:{server[1]}", token=TOKEN) == 200


def test_a_server_on_another_loopback_address_answers_its_own_address():
    """``--host 127.0.0.2`` (any of 127.0.0.0/8): the start line's URL names that address, so that ``Host`` is
    answered like 127.0.0.1's (an address is no name a web page's DNS can rebind); and no warning that anyone who
    reaches the machine can use it."""
    from medsam3_monai.deploy.serve import open_server_warnings

    assert open_server_warnings("127.0.0.2", False, []) == []
    with running_server("--host", "127.0.0.2", start_timeout_s=30) as port:
        for host, expected in ((f"127.0.0.2:{port}", 200), (f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200),
                               (f"attacker.example:{port}", 403), (f"127.0.0.2.attacker.example:{port}", 403)):
            conn = http.client.HTTPConnection("127.0.0.2", port, timeout=30)
            try:
                conn.request("GET", "/info/", headers={"Host": host})
                response = conn.getresponse()
                response.read()
                assert response.status == expected, host
            finally:
                conn.close()


def test_an_open_server_says_so_at_start():
    """No token: a warning when others can use the server -- beyond the loopback, or with ``--cors-origin '*'``,
    which lets any web page in the user's browser read the answers and the datastore's images."""
    from medsam3_monai.deploy.serve import open_server_warnings

    assert open_server_warnings("127.0.0.1", False, ["http://localhost:3000"]) == []
    assert open_server_warnings("0.0.0.0", True, ["*"]) == []
    assert [line.split(":")[0] for line in open_server_warnings("0.0.0.0", False, [])] == [
        "listening on 0.0.0.0 without --token"]
    assert open_server_warnings("127.0.0.1", False, ["*"])[0].startswith("--cors-origin '*' without --token: any "
                                                                          "web page")


def test_a_post_without_a_body_is_an_empty_body_and_chunked_uploads_are_refused(server):
    """``curl -X POST URL`` sends neither Content-Length nor Transfer-Encoding: a request without a body (HTTP/1.1),
    answered like one with ``-d '{}'``'s empty fields; a chunked body is refused with 411."""
    import socket

    def status_of(head: str, body: bytes = b"") -> int:
        with socket.create_connection(server, timeout=60) as sock:
            sock.sendall(f"POST /activelearning/first HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                         f"Connection: close\r\n{head}\r\n".encode() + body)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return int(answer.split(b" ", 2)[1])

    empty = status_of("")
    assert empty != 411 and empty == _request(server, "POST", "/activelearning/first", b"{}",
                                              {"Content-Type": "application/json"})[0]
    assert status_of("Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n") == 411


def test_an_over_limit_upload_sent_whole_is_answered_413_not_a_broken_pipe(server):
    """MONAI Label's client (and 3D Slicer) sends the whole body without ``Expect: 100-continue``: the server reads
    and drops it before answering, so the client reads the 413 instead of a reset connection (helper-92)."""
    body = b"0" * (32 * MAX_MB * 2**20)  # more than the sockets buffer: the client is still writing
    conn = http.client.HTTPConnection(*server, timeout=120)  # as monailabel.client.MONAILabelClient sends
    conn.request("POST", "/infer/medsam3", body, {"Authorization": f"Bearer {TOKEN}",
                                                   "Content-Type": "multipart/form-data; boundary=x"})
    answer = conn.getresponse()
    assert answer.status == 413 and "--max-request-mb" in json.loads(answer.read())["error"]
    conn.close()
    conn = http.client.HTTPConnection(*server, timeout=120)  # the same without the token: the 401 is read too
    conn.request("POST", "/infer/medsam3", body, {"Content-Type": "multipart/form-data; boundary=x"})
    assert conn.getresponse().status == 401
    conn.close()
    _alive(server)


def test_a_stalled_upload_is_let_go(server, monkeypatch):
    """A body that stops arriving (a client gone quiet, or slowloris) is a disconnect after ``BODY_IDLE_SECONDS``:
    the connection is answered or closed, not held, so it neither occupies the server nor blocks its shutdown."""
    import socket

    from medsam3_monai.deploy import server as server_module

    monkeypatch.setattr(server_module, "BODY_IDLE_SECONDS", 0.5)
    with socket.create_connection(server, timeout=120) as sock:
        sock.sendall(f"POST /infer/medsam3 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 5000\r\n\r\n--x\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):  # the server answers, or closes (b""), instead of waiting for ever
            answer += chunk
    assert answer == b"" or int(answer.split(b" ", 2)[1]) >= 400
    _alive(server)


@pytest.mark.parametrize("sent, taken", [(0.1, 0.1), ("0.1", 0.1), (" 0.3 ", 0.3), (1, 1.0), (-0.0, 0.0), ("", None),
                                         (None, None), ("abc", "error"), (True, "error"), (1.5, "error"),
                                         ("nan", "error")])
def test_a_requests_score_threshold_is_a_number_in_0_1(sent, taken):
    """``params.score_threshold``: a number, or one written as text (as a viewer may send an option back); blank or
    null: the server's; anything else refused with the field's hint."""
    from medsam3_monai.deploy.monailabel_protocol import ParamsError, parse_infer_params

    text = json.dumps({"prompts": ["polyp"], "score_threshold": sent})
    if taken == "error":
        with pytest.raises(ParamsError, match=r"^'score_threshold' must be a number in \[0, 1\]$"):
            parse_infer_params(text, 4, 50)
    else:
        value = parse_infer_params(text, 4, 50).score_threshold
        assert value == taken and (value is None or str(value) == str(float(taken)))  # 0.0, not -0.0
