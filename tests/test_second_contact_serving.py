"""A new user's second walk through serving, the agent and inference: each bad input is refused the same way on
every path (one clear line, exit 2 / a 4xx JSON error, nothing written) and the answers say what is true.

Multi-frame pictures, duplicate prompts, the agent's planner URL (malformed, unreachable, never shown to clients),
pictures over PIL's decompression-bomb limit under ``--max-image-pixels``, the agent's size line and the hints
that name each path's own option."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _server_helpers import free_port, running_server
from PIL import Image

from medsam3_monai.deploy.cli import main
from medsam3_monai.transforms.errors import DataError
from medsam3_monai.transforms.io import load_medical_image

REPO_ROOT = Path(__file__).resolve().parents[1]


def _frames(path: Path, count: int = 3, size: tuple[int, int] = (32, 24)) -> Path:
    """A multi-page TIFF / animated GIF of ``count`` grey frames (width, height = ``size``)."""
    frames = [Image.fromarray(np.full(size[::-1], 40 * i, np.uint8)) for i in range(count)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    return path


def _picture(path: Path, width: int = 40, height: int = 24) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _four_d(path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), dtype=np.float32), np.eye(4)), str(path))
    return path


def _error(capsys) -> str:
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ multi-frame
@pytest.mark.parametrize("name", ["multi.tif", "multi.gif"])
def test_the_loader_refuses_a_multi_frame_picture_naming_file_and_frames(tmp_path, name):
    path = _frames(tmp_path / name)
    with pytest.raises(DataError, match=r"multi\.(tif|gif): is a multi-frame picture \(3 frames / pages\).*save the "
                                        r"frame / page you want as its own file"):
        load_medical_image(path)
    single = _frames(tmp_path / f"one{Path(name).suffix}", count=1)
    assert tuple(load_medical_image(single).shape[1:]) == (24, 32)  # one frame: loaded as before


@pytest.mark.parametrize("name", ["multi.tif", "multi.gif"])
def test_segment_and_agent_refuse_a_multi_frame_picture(tmp_path, capsys, name):
    path = _frames(tmp_path / name)
    out = tmp_path / "out.png"
    assert main(["segment", str(path), "--prompt", "polyp", "--out", str(out), "--no-progress"]) == 2
    assert "is a multi-frame picture (3 frames / pages)" in _error(capsys)
    assert main(["agent", str(path), "--request", "segment the polyp", "--llm", "none", "--out", str(out),
                 "--no-progress"]) == 2
    assert "is a multi-frame picture (3 frames / pages)" in _error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


# ------------------------------------------------------------------------------------------------ duplicate prompts
def test_segment_refuses_duplicate_prompts_after_cleaning(tmp_path, capsys):
    image = _picture(tmp_path / "a.png")
    out = tmp_path / "mask.png"
    assert main(["segment", str(image), "--prompt", "polyp", "--prompt", "  POLYP ", "--out", str(out)]) == 2
    assert "prompt '  POLYP ' is given twice (as 'polyp')" in _error(capsys)
    assert main(["segment", str(image), "--prompt", "polyp", "--prompt", "polyp", "--out-dir",
                 str(tmp_path / "many")]) == 2
    assert "'polyp' is given twice" in _error(capsys)
    assert not out.exists() and not (tmp_path / "many").exists()


def test_a_datalist_item_with_two_classes_of_one_text_is_refused_naming_it(tmp_path):
    from medsam3_monai.inferers.inputs import inference_items

    image = _picture(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"a\.png: prompt 'Liver' is given twice \(as 'liver'\)"):
        inference_items([{"image": str(image), "prompts": {"1": "liver", "2": "Liver"}}])
    with pytest.raises(ValueError, match=r"a\.png: prompt 'liver' is given twice"):
        inference_items([{"image": str(image), "prompts": ["liver", "liver"]}])
    assert inference_items([{"image": str(image), "prompts": {"1": "liver", "2": "spleen"}}])[0]["prompts"] == {
        "1": "liver", "2": "spleen"}


def test_the_monailabel_app_refuses_two_labels_of_one_prompt_at_start():
    spec = importlib.util.spec_from_file_location("medsam3_app_configs_2", REPO_ROOT / "apps" / "monailabel_medsam3"
                                                  / "lib" / "configs.py")
    configs = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = configs  # dataclasses look the module up
    spec.loader.exec_module(configs)
    with pytest.raises(configs.ConfError, match="prompt 'polyp' is given twice"):
        configs.parse_conf({"labels": "polyp,lesion", "prompts": '{"lesion": "polyp"}'})
    assert configs.parse_conf({"labels": "polyp,lesion"}).prompts == {"polyp": "polyp", "lesion": "lesion"}


# ------------------------------------------------------------------------------------------------ hints
def test_the_agent_names_its_own_channel_option_on_a_4d_volume(tmp_path, capsys):
    volume = _four_d(tmp_path / "four_d.nii.gz")
    assert main(["agent", str(volume), "--request", "segment the liver", "--llm", "none", "--out",
                 str(tmp_path / "a.nii.gz"), "--no-progress"]) == 2
    err = _error(capsys)
    assert "is a 4D volume with 3 channels" in err and "--channel N" in err and "LoadMedicalImaged" not in err
    assert not (tmp_path / "a.nii.gz").exists()


def test_the_bundle_hints_name_its_settings(tmp_path, capsys):
    """The inference bundle reads with LoadMedicalImaged(channel=@channel): its 4D error names --channel N, which
    is that top-level setting's override; an item without prompts names the bundle's --prompts, and the same
    datalist in ``medsam3 segment`` names segment's --prompt."""
    from medsam3_monai.inferers.inputs import inference_items
    from medsam3_monai.transforms.io import CHANNEL_HINT

    config = json.loads((REPO_ROOT / "bundles" / "medsam3" / "configs" / "inference.json").read_text())
    assert "channel" in config and config["preprocessing"]["transforms"][0]["channel"] == "@channel"
    assert "--channel N" in CHANNEL_HINT
    with pytest.raises(ValueError, match=r"no prompts; give --prompts \"\['TEXT', \.\.\.\]\" or 'prompts'"):
        inference_items(["x.png"])
    datalist = tmp_path / "dl.json"
    datalist.write_text(json.dumps([{"image": str(_picture(tmp_path / "a.png"))}]))
    assert main(["segment", "--datalist", str(datalist), "--out-dir", str(tmp_path / "out")]) == 2
    assert "no prompts; give --prompt TEXT (repeat it for several)" in _error(capsys)
    lists = {"training": [{"image": "t.png"}], "validation": [], "test": [{"image": "s.png"}]}
    assert [Path(i["image"]).name for i in inference_items(lists, ["x"], split="all")] == ["t.png", "s.png"]
    with pytest.raises(ValueError, match=r"no 'val' list \(it has \['test', 'training', 'validation'\]\); choose "
                                         r"--split \(or all\)"):
        inference_items(lists, ["x"], split="val")


# ------------------------------------------------------------------------------------------------ agent CLI
@pytest.mark.parametrize("url", ["notaurl", "localhost:8000/v1", "ftp://host/v1", "http://"])
def test_a_malformed_llm_url_is_a_configuration_error(tmp_path, capsys, url):
    image = _picture(tmp_path / "a.png")
    out = tmp_path / "a_mask.png"
    assert main(["agent", str(image), "--request", "segment the polyp", "--llm-url", url, "--llm-model", "m",
                 "--out", str(out)]) == 2
    err = _error(capsys)
    assert "--llm-url must be an http:// or https:// URL, e.g. http://localhost:8000/v1" in err
    assert "FALLING BACK" not in err and not out.exists()
    assert main(["serve", "--checkpoint", "tiny", "--llm-url", url, "--llm-model", "m"]) == 2
    assert "--llm-url must be an http:// or https:// URL" in _error(capsys)


def test_the_agent_prints_a_pictures_size_as_width_x_height(tmp_path, capsys):
    image = _picture(tmp_path / "wide.png", width=40, height=24)
    out = tmp_path / "mask.png"
    assert main(["agent", str(image), "--request", "segment the polyp", "--llm", "none", "--out", str(out),
                 "--no-progress"]) == 0
    line = capsys.readouterr().out
    assert f"wrote {out} 40x24 [" in line, line
    assert Image.open(out).size == (40, 24)


# ------------------------------------------------------------------------------------------------ serve
MAX_PIXELS = 5000  # over PIL's limit while the tests lower it to 2 x 1000 pixels
DEAD_URL = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there


def _server_packages() -> None:
    for name in ("fastapi", "uvicorn", "multipart"):
        pytest.importorskip(name)


@pytest.fixture(scope="module")
def server():
    _server_packages()
    with running_server("--max-image-pixels", str(MAX_PIXELS), "--llm-url", DEAD_URL, "--llm-model", "good",
                        start_timeout_s=60) as port:
        yield port


def _infer(port: int, data: bytes, filename: str, params: dict, model: str = "medsam3",
           output: str = "json") -> tuple[int, bytes]:
    import http.client
    import uuid

    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode() + value + b"\r\n"
        for name, extra, value in (("file", f'; filename="{filename}"', data),
                                   ("params", "", json.dumps(params).encode()))) + f"--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", f"/infer/{model}?output={output}", body,
                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def test_serve_refuses_multi_frame_pictures_and_4d_volumes_with_the_loaders_words(server, tmp_path):
    status, body = _infer(server, _frames(tmp_path / "m.tif").read_bytes(), "m.tif", {"prompts": ["polyp"]})
    assert status == 422, body
    error = json.loads(body)["error"]
    assert error.startswith("upload.tif: is a multi-frame picture (3 frames / pages)") and str(tmp_path) not in error
    status, body = _infer(server, _four_d(tmp_path / "v.nii.gz").read_bytes(), "v.nii.gz", {"prompts": ["liver"]})
    assert status == 422, body
    error = json.loads(body)["error"]
    assert "4D volume" in error and "--channel" not in error


def test_serve_notes_a_ct_window_on_a_picture_as_segment_does(server):
    status, body = _infer(server, _png_bytes(32, 24), "a.png", {"prompts": ["liver"], "modality": "CT"})
    assert status == 200, body
    notes = json.loads(body)["notes"]
    assert any(note.startswith("modality 'CT' scales the picture with a CT window") for note in notes), notes
    assert not any(tempfile.gettempdir() in note for note in notes), notes  # no server path


def test_serve_segments_a_dicom_picture_as_the_png_of_its_pixels(server, tmp_path):
    """A single-frame DICOM upload is a picture (a PNG mask, the PNG twin's); a multi-frame one is refused, naming
    what to upload instead."""
    from test_transforms_io import _write_dicom_picture

    pixels = np.asarray(Image.open(io.BytesIO(_png_bytes(32, 24))).convert("L")).copy()
    pixels[4:12, 6:20] = 230
    Image.fromarray(pixels).save(tmp_path / "p.png")
    dicom = _write_dicom_picture(tmp_path / "p.dcm", pixels)
    answers = [_infer(server, path.read_bytes(), path.name, {"prompts": ["lesion"]}, output="image")
               for path in (tmp_path / "p.png", dicom)]
    assert [status for status, _ in answers] == [200, 200], answers
    masks = [np.asarray(Image.open(io.BytesIO(body))) for _, body in answers]
    assert masks[0].shape == (24, 32) and np.array_equal(masks[0], masks[1])
    frames = _write_dicom_picture(tmp_path / "cine.dcm", np.stack([pixels] * 3), frames=3)
    status, body = _infer(server, frames.read_bytes(), "cine.dcm", {"prompts": ["lesion"]})
    assert status == 422 and "upload.dcm is not a single-frame DICOM picture" in json.loads(body)["error"], body


def test_serve_refuses_duplicate_prompts(server):
    status, body = _infer(server, _png_bytes(32, 24), "a.png", {"prompts": ["polyp", "Polyp"]})
    assert status == 422, body
    assert "prompt 'Polyp' is given twice (as 'polyp')" in json.loads(body)["error"]


def test_serve_applies_max_image_pixels_not_pils_bomb_limit(server, monkeypatch):
    """PIL's limit lowered to 2 x 1000 pixels: a 64 x 64 picture (4096) is over it but under --max-image-pixels
    (5000) and is segmented; 80 x 80 (6400) is over ours: 413 with our message, not PIL's."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    status, body = _infer(server, _png_bytes(64, 64), "ok.png", {"prompts": ["polyp"]})
    assert status == 200, body
    assert json.loads(body)["shape"] == [64, 64]
    status, body = _infer(server, _png_bytes(80, 80), "big.png", {"prompts": ["polyp"]})
    assert status == 413, body
    error = json.loads(body)["error"]
    assert "exceeds the server's limit of 5000 (--max-image-pixels)" in error and "decompression" not in error


def test_serve_fallback_note_is_one_plain_line_without_the_url(server):
    status, body = _infer(server, _png_bytes(32, 24), "a.png", {"request": "segment the polyp", "trace": True},
                          model="medsam3_agent")
    assert status == 200, body
    answer = json.loads(body)
    notes = answer["agent"]["notes"]
    fallback = [note for note in notes if "offline planner answered instead" in note]
    assert len(fallback) == 1, notes
    assert "\n" not in fallback[0] and "!!!" not in fallback[0] and "--no-fallback" not in fallback[0]
    assert fallback[0].startswith("cannot reach the planner (")
    assert answer["agent"]["planner"] == "offline (fallback)"
    assert "127.0.0.1:" not in body.decode() and DEAD_URL not in body.decode()  # the trace included


def test_serve_no_fallback_answers_502_without_the_url():
    _server_packages()
    with running_server("--llm-url", DEAD_URL, "--llm-model", "good", "--no-fallback", start_timeout_s=60) as port:
        status, body = _infer(port, _png_bytes(32, 24), "a.png", {"request": "segment the polyp"},
                              model="medsam3_agent")
    assert status == 502, body
    error = json.loads(body)["error"]
    assert error.startswith("the agent's planner failed: cannot reach the planner (") and DEAD_URL not in error


def test_serve_answers_502_when_the_planner_misbehaves():
    """A planner whose replies are not JSON, or whose calls stay unusable, failed: 502 (the request was fine), not
    422 (which tells a client to change its request)."""
    from test_agent import ScriptedServer, call

    _server_packages()
    broken = {"raw": b"{this is not json"}
    unusable = [call("select_masks_and_return", {"final_answer_masks": [1]}, f"c{i}") for i in range(6)]
    with ScriptedServer([broken] * 3 + unusable) as planner, running_server(
            "--llm-url", planner.url, "--llm-model", "scripted-vlm", "--no-fallback", start_timeout_s=60) as port:
        answers = [_infer(port, _png_bytes(32, 24), "a.png", {"request": "segment the polyp"}, model="medsam3_agent")
                   for _ in range(2)]
    (status, body), (status_2, body_2) = answers
    assert status == 502 and "a reply that is not JSON" in json.loads(body)["error"], body
    assert status_2 == 502 and "unusable calls" in json.loads(body_2)["error"], body_2
    assert planner.url not in (body + body_2).decode()


def test_serve_names_its_options_and_refuses_a_busy_port_before_loading(capsys):
    """Option errors use the flags' names; a port something listens on is refused (status 3, as uvicorn's failure
    to bind) before the model loads and before the banner claims the address."""
    import socket

    assert main(["serve", "--checkpoint", "tiny", "--max-prompts", "0"]) == 2
    assert "--max-prompts must be positive, got 0" in _error(capsys)
    assert main(["serve", "--checkpoint", "tiny", "--session-expiry", "-5"]) == 2
    assert "--session-expiry must be positive, got -5" in _error(capsys)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--checkpoint", "tiny", "--port", str(port)]) == 3
        captured = capsys.readouterr()
    assert f"cannot listen on 127.0.0.1:{port}" in captured.err and "choose another --port" in captured.err
    assert "http://" not in captured.out  # no banner
