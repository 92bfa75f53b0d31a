"""The agent in evaluation and serving: `medsam3 evaluate --agent` (plain vs agent Dice side by side, traces as
MLflow artifacts) with the offline planner and with the scripted OpenAI-compatible server of test_agent.py, and the
server's second model `medsam3_agent` (request text as a param). Tiny network, shared data, no timing."""

from __future__ import annotations

import csv
import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from _server_helpers import running_server
from PIL import Image

from medsam3_monai.deploy.cli import main

pytestmark = pytest.mark.usefixtures("one_thread", "no_configured_endpoint")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def kvasir_datalist(shared_data, tmp_path_factory) -> Path:
    from medsam3_monai.data import build_datalist, write_datalist

    folder = tmp_path_factory.mktemp("datalists")
    return write_datalist(build_datalist("Kvasir-SEG_sample", shared_data / "Kvasir-SEG_sample").datalist,
                          folder / "kvasir.json")


def evaluate(*argv: str) -> int:
    return main(["evaluate", *argv, "--no-progress", "--protocol", "semantic", "--overlays", "0"])


def test_requests_are_clinical_sentences():
    from medsam3_monai.engines.evaluation import agent_request

    assert agent_request("breast tumor", "ultrasound") == "Segment the breast tumor in this ultrasound image."
    assert agent_request("polyp", "endoscopy") == "Segment the polyp in this endoscopy image."
    assert agent_request("anterior hippocampus", "MRI") == "Segment the anterior hippocampus in this MRI scan."
    assert agent_request("lung", None) == "Segment the lung in this image."
    assert agent_request("polyp", "endoscopy", "Kvasir-SEG", "Outline every {concept} ({dataset}).") == (
        "Outline every polyp (Kvasir-SEG).")
    with pytest.raises(ValueError, match="must contain"):
        agent_request("polyp", template="segment it")
    with pytest.raises(ValueError, match="placeholders"):
        agent_request("polyp", template="{concept} {organ}")


@pytest.mark.slow
def test_offline_agent_against_plain_evaluation(kvasir_datalist, tmp_path, capsys):
    from mlflow import MlflowClient

    out = tmp_path / "agent"
    rc = evaluate("--datalist", str(kvasir_datalist), "--checkpoint", "tiny", "--out", str(out), "--split", "all",
                  "--max-cases", "2", "--agent", "--llm", "none")
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "== comparison" in printed and "agent vs plain (Δ = agent − plain" in printed

    rows = {row["name"]: row for row in read_csv(out / "comparison.csv")}
    assert set(rows) == {"Kvasir-SEG", "internal", "overall"}
    plain = {row["name"]: row for row in read_csv(out / "plain" / "table.csv")}
    agent = {row["name"]: row for row in read_csv(out / "agent" / "table.csv")}
    for name, row in rows.items():
        assert float(row["dice_a"]) == pytest.approx(float(plain[name]["dice"]))
        assert float(row["dice_b"]) == pytest.approx(float(agent[name]["dice"]))
        assert float(row["dice_delta"]) == pytest.approx(float(row["dice_b"]) - float(row["dice_a"]))
    assert "plain: protocol semantic; agent: protocol agent/semantic." in (out / "comparison.md").read_text()

    requests = read_csv(out / "agent" / "agent_cases.csv")
    cases = read_csv(out / "agent" / "cases.csv")
    assert len(requests) == len(cases) == 2
    for request, case in zip(requests, cases):
        assert request["request"] == "Segment the polyp in this endoscopy image."
        assert request["planner"] == "offline" and request["status"] == "selected"
        assert float(request["dice"]) == pytest.approx(float(case["dice"]))
        trace = json.loads((out / "agent" / request["trace"]).read_text())
        assert trace["status"] == "selected" and trace["request"] == request["request"]
        assert trace["evaluation"]["dataset"] == "Kvasir-SEG" and trace["evaluation"]["case"] == case["case"]
        assert trace["decision"]["details"]["concept"]["concept"] == "polyp"

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("medsam3-evaluate").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "tiny: plain vs agent")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"plain", "agent"}
    agent_run = children["agent"].info.run_id
    assert {"traces", "agent_cases.csv", "table.md"} <= {a.path for a in client.list_artifacts(agent_run)}
    assert len(client.list_artifacts(agent_run, "traces")) == 2
    assert "Kvasir-SEG/dice_delta" in parent.data.metrics and parent.data.params["llm"] == "none"
    assert {"comparison.csv", "comparison.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.slow
def test_agent_evaluation_with_a_scripted_openai_compatible_planner(kvasir_datalist, tmp_path, monkeypatch, capsys):
    """One case: the planner segments 'polyp' and selects it, so the agent's mask is the plain evaluation's (Δ = 0);
    the request reached the server with the picture, the key came from the environment."""
    from test_agent import MODEL, ScriptedServer, call

    monkeypatch.setenv("MEDSAM3_TEST_EVAL_KEY", "sk-eval-42")
    out = tmp_path / "llm"
    script = [call("segment_phrase", {"text_prompt": "polyp"}),
              call("select_masks_and_return", {"final_answer_masks": [1]}, "call_2")]
    with ScriptedServer(script) as server:
        rc = evaluate("--datalist", str(kvasir_datalist), "--checkpoint", "tiny", "--out", str(out), "--split", "all",
                      "--max-cases", "1", "--agent", "--llm-url", server.url, "--llm-model", MODEL,
                      "--api-key-env", "MEDSAM3_TEST_EVAL_KEY", "--llm-retries", "0", "--no-mlflow",
                      "--agent-request", "Please segment the {concept} in this {image}.")
    assert rc == 0, capsys.readouterr().err
    assert len(server.requests) == 2
    assert "Please segment the polyp in this endoscopy image." in json.dumps(server.requests[0]["messages"])
    assert len(ScriptedServer.pictures(server.requests[0])) == 1
    assert all(h.get("authorization") == "Bearer sk-eval-42" for h in server.headers)
    (row,) = read_csv(out / "comparison.csv")[:1]
    assert float(row["dice_delta"]) == pytest.approx(0.0, abs=1e-9)
    (request,) = read_csv(out / "agent" / "agent_cases.csv")
    assert request["planner"] == "llm" and request["phrases"] == "polyp" and request["tokens"] == "220"
    trace_text = (out / "agent" / request["trace"]).read_text()
    assert "sk-eval-42" not in trace_text and "base64," not in trace_text
    trace = json.loads(trace_text)
    assert trace["planner"]["model"] == MODEL and [r["phrase"] for r in trace["rounds"]] == ["polyp"]


def test_failed_agent_requests_scored_empty_are_counted_and_warned_about(kvasir_datalist, tmp_path, capsys):
    """--agent-on-error empty: the planner's HTTP 500 does not stop the run, and the run says how many requests
    failed (stderr and comparison.md), not only agent_cases.csv."""
    from test_agent import MODEL, ScriptedServer, error

    out = tmp_path / "failing"
    with ScriptedServer([error(500, "model crashed")] * 2) as server:
        rc = evaluate("--datalist", str(kvasir_datalist), "--checkpoint", "tiny", "--out", str(out), "--split", "all",
                      "--max-cases", "1", "--agent", "--llm-url", server.url, "--llm-model", MODEL,
                      "--llm-retries", "0", "--no-mlflow", "--agent-on-error", "empty")
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "WARNING: 1 of 1 agent request(s) failed and were scored as empty masks" in err and "HTTP 500" in err
    assert "**1 failed request scored as empty masks**" in (out / "comparison.md").read_text()
    (request,) = read_csv(out / "agent" / "agent_cases.csv")
    assert request["status"] == "failed" and "model crashed" in request["reason"]


def test_agent_evaluation_input_errors_write_nothing(kvasir_datalist, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MEDSAM3_TEST_NO_SUCH_KEY", raising=False)
    out = tmp_path / "never"
    base = ["--datalist", str(kvasir_datalist), "--out", str(out), "--agent"]
    cases = [
        (["--checkpoint", "tiny", "--checkpoint", "tiny"], "--agent evaluates one checkpoint"),
        (["--checkpoint", "tiny", "--llm", "openai"], "needs --llm-url"),
        (["--checkpoint", "tiny", "--llm-url", "http://127.0.0.1:9/v1"], "needs --llm-model"),
        (["--checkpoint", "tiny", "--llm-url", "http://127.0.0.1:9/v1", "--llm-model", "m", "--api-key-env",
          "MEDSAM3_TEST_NO_SUCH_KEY"], "MEDSAM3_TEST_NO_SUCH_KEY: that environment variable is not set"),
        (["--checkpoint", "tiny", "--agent-request", "segment it"], "must contain {concept}"),
        (["--checkpoint", "tiny", "--box-prompts"], "leave out --box-prompts"),
    ]
    for extra, message in cases:
        assert evaluate(*base, *extra) == 2
        err = capsys.readouterr().err
        assert "medsam3 evaluate: error:" in err and message in err, err
        assert not out.exists()


# ------------------------------------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def server():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    with running_server() as port:
        yield "127.0.0.1", port


def _infer(server, data: bytes, filename: str, params: dict, model: str = "medsam3_agent", query: str = ""):
    import http.client

    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\r\n".encode()
            + data + f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n".encode()
            + json.dumps(params).encode() + f"\r\n--{boundary}--\r\n".encode())
    conn = http.client.HTTPConnection(*server, timeout=300)
    try:
        conn.request("POST", f"/infer/{model}{query}", body=body,
                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_the_server_offers_the_agent_as_a_second_model(server, shared_data, tmp_path):
    import http.client

    conn = http.client.HTTPConnection(*server, timeout=60)
    conn.request("GET", "/info/")
    info = json.loads(conn.getresponse().read())
    conn.close()
    assert {"medsam3", "medsam3_agent"} <= set(info["models"])
    model = info["models"]["medsam3_agent"]
    assert model["config"] == {"request": "", "protocol": ["top_query", "top_query_floor", "threshold", "semantic"],
                               "score_threshold": 0.5, "modality": "", "largest_cc": False}
    assert model["planner"]["kind"] == "offline"
    assert model["type"] == "segmentation" and isinstance(model["labels"], dict)

    image = sorted((shared_data / "Kvasir-SEG_sample" / "images").glob("*.jpg"))[0]
    status, _, body = _infer(server, image.read_bytes(), "case.jpg", {"request": "segment the polyp", "trace": True},
                             query="?output=json")
    assert status == 200, body
    result = json.loads(body)
    assert result["model"] == "medsam3_agent" and result["agent"]["status"] == "selected"
    assert result["agent"]["planner"] == "offline" and result["label_names"] == {"polyp": 255}
    trace = result["agent"]["trace"]
    assert trace["request"] == "segment the polyp" and trace["input"] == "upload.jpg"
    assert "medsam3-serve-" not in body.decode()  # no server paths in the answer
    status, headers, mask = _infer(server, image.read_bytes(), "case.jpg", {"request": "segment the polyp"},
                                   query="?output=image")
    assert status == 200 and headers["content-type"] == "image/png"
    served = np.asarray(Image.open(io.BytesIO(mask)))
    out = tmp_path / "agent.png"  # what `medsam3 agent --llm none` writes for the same request
    assert main(["agent", str(image), "--request", "segment the polyp", "--out", str(out), "--llm", "none",
                 "--no-progress"]) == 0
    assert np.array_equal(served, np.asarray(Image.open(out)))
    # the request's own threshold reaches MedSAM3's calls: above every query's score nothing is selected; the
    # agent entry says so (no empty-label notes about the answer's placeholder label)
    strict = {"request": "segment the polyp", "protocol": "threshold", "score_threshold": 0.99}
    status, _, body = _infer(server, image.read_bytes(), "case.jpg", strict, query="?output=json")
    result = json.loads(body)
    assert status == 200 and result["agent"]["status"] == "no_mask" and not result.get("notes"), body
    assert result["agent"]["reason"].startswith("the phrasings of 'polyp' segmented nothing: no query (protocol "
                                                "threshold) scored >= the score threshold 0.99 (best 0.")

    for params, message in (({"prompts": ["polyp"]}, "free-text 'request'"), ({"request": "  "}, "is empty"),
                            ({"request": "polyp", "llm_url": "http://x"}, "unknown params"),
                            ({"request": "segment the upper left"}, "names nothing")):
        status, _, body = _infer(server, image.read_bytes(), "case.jpg", params)
        assert status == 422 and message in json.loads(body)["error"], body
