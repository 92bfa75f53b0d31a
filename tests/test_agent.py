"""`medsam3 agent`: the MedSAM3 agent against a real HTTP server on loopback that speaks OpenAI's chat-completions
protocol with scripted replies, reached through the real ``openai`` client; and the offline planner (``--llm
none``) on the shared data.

The scripted server records every request body, so the tests check what the agent sent (pictures present, tools
offered, phrases not repeated, corrections) as well as what it wrote (the mask equals what ``medsam3 segment``
writes for the chosen phrase with the same checkpoint). No test measures time: the time-out case uses a client
time-out (0.5 s) shorter than the scripted server's delay (3 s), a protocol behaviour.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medsam3_monai.deploy.cli import main

pytestmark = pytest.mark.usefixtures("one_thread", "no_configured_endpoint")

TOOLS = {"segment_phrase", "examine_each_mask", "select_masks_and_return", "report_no_mask"}
MODEL = "scripted-vlm"


# ------------------------------------------------------------------------------------------------ the server
def completion(message: dict[str, Any], finish_reason: str, tokens: int = 110) -> dict[str, Any]:
    return {"id": "chatcmpl-scripted", "object": "chat.completion", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": tokens - 10, "completion_tokens": 10, "total_tokens": tokens}}


def call(name: str, arguments: Any, call_id: str = "call_1") -> dict[str, Any]:
    """A reply calling one tool (``arguments``: a dict, or a string sent as it is, e.g. broken JSON)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"body": completion({"content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}]}, "tool_calls")}


def text(content: str) -> dict[str, Any]:
    return {"body": completion({"content": content}, "stop")}


def error(status: int, message: str) -> dict[str, Any]:
    return {"status": status, "body": {"error": {"message": message, "type": "server_error", "code": status}}}


class ScriptedServer:
    """POST /v1/chat/completions answered from a script; every request body (and its headers) recorded.

    ``script``: replies in order, each ``{"body": ..., "status": 200, "delay": seconds}`` (``"raw": bytes`` in place of
    ``"body"``: sent as they are, e.g. a body that is not JSON); ``refuse_tools``: answer
    a request that offers tools with HTTP 400 (a server without function calling), without using the script.
    """

    def __init__(self, script: list[dict[str, Any]], refuse_tools: bool = False) -> None:
        self.script = list(script)
        self.refuse_tools = refuse_tools
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    server.requests.append(body)
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    if not self.path.endswith("/chat/completions"):
                        reply = error(404, f"no route {self.path}")
                    elif server.refuse_tools and body.get("tools"):
                        reply = error(400, "this model does not support tools")
                    elif server.script:
                        reply = server.script.pop(0)
                    else:
                        reply = error(500, "the test script is exhausted")
                if reply.get("delay"):
                    threading.Event().wait(reply["delay"])
                payload = reply["raw"] if "raw" in reply else json.dumps(reply["body"]).encode()
                try:
                    self.send_response(reply.get("status", 200))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (time-out test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # what the agent sent
    @staticmethod
    def pictures(body: dict[str, Any]) -> list[str]:
        return [part["image_url"]["url"] for message in body["messages"] if isinstance(message.get("content"), list)
                for part in message["content"] if part.get("type") == "image_url"]

    def tool_results(self, index: int) -> list[str]:
        """The tool messages (and text-mode result messages) added since request ``index - 1``."""
        before = len(self.requests[index - 1]["messages"]) + 1 if index else 0
        return [m["content"] if isinstance(m["content"], str) else " ".join(p.get("text", "") for p in m["content"])
                for m in self.requests[index]["messages"][before:] if m["role"] in ("tool", "user")]


# ------------------------------------------------------------------------------------------------ helpers
def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def segment_reference(tmp_path_factory) -> Callable[..., np.ndarray]:
    """What `medsam3 segment INPUT --prompt P ... [extra]` writes (cached per call); ``run.sidecar(...)`` with the
    same arguments gives its JSON sidecar."""
    cache: dict[tuple, tuple[np.ndarray, dict[str, Any]]] = {}

    def written(path: Path, *prompts: str, extra: tuple[str, ...] = ()) -> tuple[np.ndarray, dict[str, Any]]:
        key = (str(path), prompts, extra)
        if key not in cache:
            suffix = ".nii.gz" if str(path).endswith(".nii.gz") else ".png"
            out = tmp_path_factory.mktemp("reference") / f"ref{suffix}"
            args = ["segment", str(path), *[a for p in prompts for a in ("--prompt", p)], "--out", str(out),
                    "--no-progress", *extra]
            assert main(args) == 0
            array = np.asarray(nib.load(str(out)).dataobj) if suffix == ".nii.gz" else png(out)
            cache[key] = array, json.loads(Path(f"{out}.json").read_text())
        return cache[key]

    def run(path: Path, *prompts: str, extra: tuple[str, ...] = ()) -> np.ndarray:
        return written(path, *prompts, extra=extra)[0]

    run.sidecar = lambda path, *prompts, extra=(): written(path, *prompts, extra=extra)[1]
    return run


def kept_by_the_rule(sidecar: dict[str, Any], keep_ratio: float = 0.5) -> dict[int, str]:
    """Label value -> phrasing of a reference sidecar's phrasings that the offline fusion keeps (agent/fusion.py:
    score >= keep_ratio x the best score; min_score 0)."""
    best = max(entry["score"] for entry in sidecar["labels"].values())
    return {int(value): entry["prompt"] for value, entry in sidecar["labels"].items()
            if entry["score"] >= keep_ratio * best}


def agent(image: Path, out: Path, server: ScriptedServer | None, *extra: str,
          request: str = "segment the polyp") -> int:
    llm = ["--llm-url", server.url, "--llm-model", MODEL] if server is not None else []
    return main(["agent", str(image), "--request", request, "--out", str(out), *llm, "--no-progress",
                 "--llm-retries", "1", *extra])


def trace_of(out: Path) -> dict[str, Any]:
    path = Path(f"{out}.trace.json")
    text_ = path.read_text()
    assert "base64," not in text_ and "data:image" not in text_  # no image payloads in the trace
    return json.loads(text_)


# ------------------------------------------------------------------------------------------------ MLLM planner
def test_happy_path_writes_what_segment_writes_for_the_chosen_phrase(kvasir, tmp_path, monkeypatch, capsys,
                                                                      segment_reference):
    monkeypatch.setenv("MEDSAM3_TEST_PLANNER_KEY", "sk-test-123")
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    script = [call("segment_phrase", {"text_prompt": "polyp"}), call("select_masks_and_return",
                                                                      {"final_answer_masks": [1]}, "call_2")]
    with ScriptedServer(script) as server:
        code = agent(kvasir, out, server, "--overlay", str(overlay), "--api-key-env", "MEDSAM3_TEST_PLANNER_KEY",
                     request="segment the polyp in the upper left quadrant")
    assert code == 0
    assert np.array_equal(png(out), segment_reference(kvasir, "polyp"))
    assert png(overlay).ndim == 3
    # what the server received
    first, second = server.requests
    assert first["model"] == MODEL and second["model"] == MODEL
    assert {t["function"]["name"] for t in first["tools"]} == TOOLS
    assert all(t["type"] == "function" and t["function"]["parameters"]["type"] == "object" for t in first["tools"])
    assert first["messages"][0]["role"] == "system" and "segment_phrase" in first["messages"][0]["content"]
    assert "upper left quadrant" in json.dumps(first["messages"][1])
    assert len(ScriptedServer.pictures(first)) == 1  # the input
    assert all(url.startswith(("data:image/png;base64,", "data:image/jpeg;base64,"))
               for url in ScriptedServer.pictures(second))
    assert len(ScriptedServer.pictures(second)) == 2  # the input and the marks of round 1
    tool_message = next(m for m in second["messages"] if m["role"] == "tool")
    assert tool_message["tool_call_id"] == "call_1" and "mark 1: 'polyp'" in tool_message["content"]
    assert second["messages"][-1]["role"] == "user" and "score" in json.dumps(second["messages"][-1])
    assert all(h.get("authorization") == "Bearer sk-test-123" for h in server.headers)
    # trace and sidecar
    trace = trace_of(out)
    assert trace["status"] == "selected" and trace["planner"]["kind"] == "llm"
    assert trace["planner"]["model"] == MODEL and trace["planner"]["tool_mode"] == "tools"
    assert [r["phrase"] for r in trace["rounds"]] == ["polyp"] and trace["rounds"][0]["mark"]["mark"] == 1
    assert [c["name"] for c in trace["tool_calls"]] == ["segment_phrase", "select_masks_and_return"]
    assert len(trace["llm_calls"]) == 2 and trace["tokens"]["total"] == 220
    assert any("<image: image/" in json.dumps(m) for m in trace["messages"])
    assert "sk-test-123" not in json.dumps(trace)
    assert {"load_model", "planner", "segmentation", "total"} <= set(trace["timings"])
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["labels"]["255"]["prompt"] == "polyp" and sidecar["agent"]["status"] == "selected"
    assert sidecar["labels"]["255"]["pixels"] == int((png(out) == 255).sum())
    assert str(out) in capsys.readouterr().out


def test_malformed_and_unknown_calls_get_corrections_then_the_run_recovers(kvasir, tmp_path, segment_reference):
    out = tmp_path / "mask.png"
    script = [call("segment_phrase", '{"text_prompt": "polyp"'),  # broken JSON
              call("draw_box", {"x": 1}, "call_2"),  # no such tool
              call("segment_phrase", {"prompt": "polyp"}, "call_3"),  # wrong argument name
              call("segment_phrase", {"text_prompt": "polyp"}, "call_4"),
              call("select_masks_and_return", {"final_answer_masks": [7]}, "call_5"),  # no mark 7
              call("select_masks_and_return", {"final_answer_masks": ["1"]}, "call_6")]
    with ScriptedServer(script) as server:
        assert agent(kvasir, out, server, "--max-corrections", "4") == 0
    assert len(server.requests) == 6
    results = [server.tool_results(i) for i in range(1, 6)]
    assert "not valid JSON" in results[0][0] and results[0][0].startswith("error:")
    assert "unknown tool 'draw_box'" in results[1][0] and "segment_phrase" in results[1][0]
    assert "text_prompt" in results[2][0]
    assert "no mark 7" in results[4][0] and "1 = 'polyp'" in results[4][0]
    assert np.array_equal(png(out), segment_reference(kvasir, "polyp"))
    trace = trace_of(out)
    assert [c["ok"] for c in trace["tool_calls"]] == [False, False, False, True, False, True]
    assert trace["decision"]["details"]["corrections"] == 4


def test_too_many_bad_calls_fail_with_nothing_written(kvasir, tmp_path, capsys):
    out = tmp_path / "mask.png"
    with ScriptedServer([call("nonsense", {}, f"c{i}") for i in range(3)]) as server:
        assert agent(kvasir, out, server, "--max-corrections", "2") == 2
    assert len(server.requests) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("medsam3 agent: error: the planner made 3 unusable calls")
    assert list(tmp_path.iterdir()) == []


def test_a_repeated_phrase_is_refused_with_the_phrases_tried(kvasir, tmp_path, segment_reference):
    out = tmp_path / "mask.png"
    script = [call("segment_phrase", {"text_prompt": "polyp"}),
              call("examine_each_mask", {"masks": [1]}, "call_2"),
              call("segment_phrase", {"text_prompt": " Polyp "}, "call_3"),
              call("segment_phrase", {"text_prompt": "colon polyp"}, "call_4"),
              call("select_masks_and_return", {"final_answer_masks": [1, 2]}, "call_5")]
    with ScriptedServer(script) as server:
        assert agent(kvasir, out, server) == 0
    examined = server.requests[2]
    assert len(ScriptedServer.pictures(examined)) == 2  # the input + mark 1 zoomed
    refusal = server.tool_results(3)[0]
    assert "'Polyp' was already tried" in refusal and "phrases tried: 'polyp'" in refusal
    trace = trace_of(out)
    phrases = [r["phrase"] for r in trace["rounds"]]
    assert phrases == ["polyp", "colon polyp"]  # MedSAM3 never ran a phrase twice
    expected = (segment_reference(kvasir, "polyp") > 0) | (segment_reference(kvasir, "colon polyp") > 0)
    assert np.array_equal(png(out), expected.astype(np.uint8) * 255)
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["agent"]["phrases"] == ["polyp", "colon polyp"]
    assert sidecar["labels"]["255"]["prompt"] == "polyp + colon polyp"


def test_rounds_are_capped(kvasir, tmp_path):
    out = tmp_path / "mask.png"
    script = [call("segment_phrase", {"text_prompt": "polyp"}),
              call("segment_phrase", {"text_prompt": "lesion"}, "call_2"),
              call("select_masks_and_return", {"final_answer_masks": [1]}, "call_3")]
    with ScriptedServer(script) as server:
        assert agent(kvasir, out, server, "--max-rounds", "1") == 0
    assert "last segment_phrase call" in json.dumps(server.requests[1]["messages"][-1])
    assert "no segment_phrase calls left" in server.tool_results(2)[0]
    assert [r["phrase"] for r in trace_of(out)["rounds"]] == ["polyp"]


def test_the_token_budget_is_a_hard_cap(kvasir, tmp_path, capsys):
    out = tmp_path / "mask.png"
    script = [call("segment_phrase", {"text_prompt": "polyp"}), call("segment_phrase", {"text_prompt": "mass"}),
              call("select_masks_and_return", {"final_answer_masks": [1]}, "call_3")]
    with ScriptedServer(script) as server:
        assert agent(kvasir, out, server, "--max-tokens", "150") == 2
    assert len(server.requests) == 2 and server.requests[1]["max_tokens"] == 40  # what was left of the budget
    assert "token budget is spent (220 of --max-tokens 150)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_http_500_is_retried(kvasir, tmp_path, segment_reference):
    out = tmp_path / "mask.png"
    script = [error(500, "model is loading"), call("segment_phrase", {"text_prompt": "polyp"}),
              call("select_masks_and_return", {"final_answer_masks": [1]}, "call_2")]
    with ScriptedServer(script) as server:
        assert agent(kvasir, out, server) == 0
    assert len(server.requests) == 3 and server.requests[0] == server.requests[1]  # the same request again
    assert np.array_equal(png(out), segment_reference(kvasir, "polyp"))
    first_call = trace_of(out)["llm_calls"][0]
    assert first_call["attempts"] == 2 and "HTTP 500: model is loading" in first_call["retried_errors"][0]


def test_a_reply_that_is_not_json_is_retried_then_named_with_the_url_to_check(kvasir, tmp_path, capsys,
                                                                            segment_reference):
    """A body that is not JSON (a proxy's page, a half-written reply) is a failed attempt like an HTTP 500: retried,
    and after the retries named with the planner's URL and what to check (was: a bare JSONDecodeError text)."""
    out = tmp_path / "mask.png"
    broken = {"raw": b"{this is not json"}
    script = [broken, call("segment_phrase", {"text_prompt": "polyp"}),
              call("select_masks_and_return", {"final_answer_masks": [1]}, "call_2")]
    with ScriptedServer(script) as server:
        assert agent(kvasir, out, server) == 0
    assert np.array_equal(png(out), segment_reference(kvasir, "polyp"))
    first_call = trace_of(out)["llm_calls"][0]
    assert first_call["attempts"] == 2 and "a reply that is not JSON" in first_call["retried_errors"][0]
    out.unlink()
    for sidecar in tmp_path.iterdir():
        sidecar.unlink()
    with ScriptedServer([broken] * 3) as server:
        assert agent(kvasir, out, server, "--llm-retries", "2") == 2
    assert len(server.requests) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"medsam3 agent: error: the planner at {server.url} failed (3 attempts; last: a reply that "
                          "is not JSON (") and err.endswith("check that --llm-url is the OpenAI-compatible base URL "
                                                            "(e.g. http://host:8000/v1)")
    assert list(tmp_path.iterdir()) == []


def test_a_timeout_fails_with_one_line_and_nothing_written(kvasir, tmp_path, capsys):
    out = tmp_path / "mask.png"
    late = call("segment_phrase", {"text_prompt": "polyp"})
    with ScriptedServer([dict(late, delay=3.0), dict(late, delay=3.0)]) as server:
        code = agent(kvasir, out, server, "--llm-timeout", "0.5", "--overlay", str(tmp_path / "o.png"))
    assert code == 2
    assert len(server.requests) == 2  # the first attempt and one retry
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"medsam3 agent: error: no answer from the planner at {server.url} within 0.5 s (2 attempts); "
                       "raise --llm-timeout or check the server")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_writes_its_trace_only_where_asked(kvasir, tmp_path):
    out, trace = tmp_path / "mask.png", tmp_path / "debug" / "trace.json"
    with ScriptedServer([error(401, "invalid api key")]) as server:
        assert agent(kvasir, out, server, "--trace", str(trace)) == 2
    assert len(server.requests) == 1  # 401 is not retried
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["debug", "trace.json"]
    failed = json.loads(trace.read_text())
    assert failed["status"] == "failed" and "HTTP 401: invalid api key" in failed["error"]
    # no call was answered: no tool mode (agent.md), and the failed request is in llm_calls with its error
    assert failed["planner"]["tool_mode"] is None
    (call,) = failed["llm_calls"]
    assert "HTTP 401: invalid api key" in call["error"] and call["error"] in failed["error"]


def test_report_no_mask_writes_an_empty_mask(kvasir, tmp_path, capsys):
    out = tmp_path / "mask.png"
    script = [call("segment_phrase", {"text_prompt": "polyp"}),
              call("report_no_mask", {"reason": "no polyp is visible"}, "call_2")]
    with ScriptedServer(script) as server:
        assert agent(kvasir, out, server) == 0
    mask = png(out)
    assert mask.shape == png(kvasir).shape[:2] and not mask.any()
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["agent"]["status"] == "no_mask" and sidecar["agent"]["reason"] == "no polyp is visible"
    assert sidecar["labels"]["255"]["pixels"] == 0
    assert trace_of(out)["status"] == "no_mask"
    assert "no match: no polyp is visible" in capsys.readouterr().out


def test_report_no_mask_before_any_phrase(kvasir, tmp_path):
    out = tmp_path / "mask.png"
    with ScriptedServer([call("report_no_mask", {})]) as server:
        assert agent(kvasir, out, server) == 0
    assert not png(out).any() and png(out).shape == png(kvasir).shape[:2]
    assert json.loads(Path(f"{out}.json").read_text())["agent"]["status"] == "no_mask"


def test_a_server_without_tool_support_gets_the_text_protocol(kvasir, tmp_path, capsys, segment_reference):
    out = tmp_path / "mask.png"
    fenced = '```json\n{"tool": "segment_phrase", "arguments": {"text_prompt": "polyp"}}\n```'
    script = [text(f"I will segment it.\n{fenced}"),
              text('<tool_call>{"name": "select_masks_and_return", "arguments": {"final_answer_masks": [1]}}'
                   '</tool_call>')]
    with ScriptedServer(script, refuse_tools=True) as server:
        assert agent(kvasir, out, server) == 0
    assert "tools" in server.requests[0]
    assert len(server.requests) == 3 and not any("tools" in body for body in server.requests[1:])
    assert "exactly one JSON object" in server.requests[1]["messages"][0]["content"]
    result = server.requests[2]["messages"][-1]
    assert result["role"] == "user" and "Result of segment_phrase" in json.dumps(result)
    assert len(ScriptedServer.pictures(server.requests[2])) == 2
    assert np.array_equal(png(out), segment_reference(kvasir, "polyp"))
    assert trace_of(out)["planner"]["tool_mode"] == "text"
    assert "continuing without native tool calls" in capsys.readouterr().err


def test_an_unreachable_endpoint_falls_back_to_the_offline_planner_loudly(kvasir, tmp_path, capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "mask.png"
    code = main(["agent", str(kvasir), "--request", "polyp", "--out", str(out), "--llm-url",
                 f"http://127.0.0.1:{port}/v1", "--llm-model", MODEL, "--llm-retries", "0", "--no-progress"])
    assert code == 0 and png(out).shape == png(kvasir).shape[:2]
    assert "FALLING BACK TO THE OFFLINE PLANNER" in capsys.readouterr().err
    trace = trace_of(out)
    assert trace["planner"]["kind"] == "offline (fallback)" and "cannot reach" in trace["planner"]["fallback"]
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["agent"]["planner"] == trace["decision"]["planner"] == "offline (fallback)"
    out2 = tmp_path / "strict.png"
    assert main(["agent", str(kvasir), "--request", "polyp", "--out", str(out2), "--llm-url",
                 f"http://127.0.0.1:{port}/v1", "--llm-model", MODEL, "--llm-retries", "0", "--no-fallback"]) == 2
    assert "cannot reach the planner" in capsys.readouterr().err and not out2.exists()


def test_volume_with_the_mllm_planner(hippocampus, tmp_path, segment_reference):
    out = tmp_path / "mask.nii.gz"
    script = [call("segment_phrase", {"text_prompt": "anterior hippocampus"}),
              call("select_masks_and_return", {"final_answer_masks": [1]}, "call_2")]
    with ScriptedServer(script) as server:
        assert agent(hippocampus, out, server, "--score-threshold", "0.25",
                     request="segment the anterior hippocampus") == 0
    assert "axial slices" in server.requests[0]["messages"][0]["content"]
    assert len(ScriptedServer.pictures(server.requests[1])) == 2
    written = nib.load(str(out))
    reference = segment_reference(hippocampus, "anterior hippocampus", extra=("--score-threshold", "0.25"))
    assert np.array_equal(np.asarray(written.dataobj), reference)
    assert np.allclose(written.affine, nib.load(str(hippocampus)).affine)
    assert trace_of(out)["rounds"][0]["mark"]["slices"]


def test_a_volume_stored_in_sagittal_slices_is_described_as_such():
    """The planner is told the plane it sees: a volume whose third axis runs left-right is shown in sagittal slices
    (head up, anterior on the left), and its system prompt, captions and mark lines say "sagittal", not "axial"."""
    import torch

    from medsam3_monai.agent.marks import Mark
    from medsam3_monai.agent.prompts import system_prompt
    from medsam3_monai.agent.render import View

    volume = torch.rand(1, 20, 24, 16)
    sagittal, axial = (View(volume, affine=torch.eye(4)[:, order], is_volume=True)
                       for order in ([2, 1, 0, 3], [0, 1, 2, 3]))
    assert (sagittal.plane, axial.plane, View(volume[..., 0]).plane) == ("sagittal", "axial", "axial")
    prompt = system_prompt(4, True, False, sagittal.plane)
    assert "representative sagittal slices" in prompt and "(the head up, anterior on the left of each slice)" in prompt
    assert "representative axial slices" in system_prompt(4, True, False)
    mask = np.zeros((20, 24, 16), bool)
    mask[5:9, 6:12, 3:7] = True
    mark = Mark(number=1, phrase="liver", round=1, mask=mask, score=0.9, prediction=None, is_volume=True)
    assert "sagittal slices 3-6 of 0-15" in mark.describe(sagittal.plane)
    assert "axial slices 3-6 of 0-15" in mark.describe()


@pytest.mark.parametrize("reply, model, says", [
    ({"body": {"error": {"message": "model overloaded"}}}, MODEL, "answered with an error: model overloaded"),
    ({"body": {}}, MODEL, "sent no chat completion (an empty reply); check that --llm-url is the OpenAI-compatible"),
    (error(401, "invalid api key"), MODEL, "no key was sent: if the server needs one, name the variable holding it "
                                           "with --api-key-env"),
    # LiteLLM's proxy: a 400 for a missing key, and for a model it does not serve
    (error(400, "No connected db."), MODEL, "HTTP 400: No connected db.; no key was sent: if the server needs one"),
    (error(400, "Invalid model name passed in model=gpt-5"), MODEL, "; check --llm-model (GET <url>/models lists"),
    # OpenAI's context-length wording names "functions": a request too long, not a server refusing the tools
    (error(400, "This model's maximum context length is 128000 tokens. However, you requested 130500 tokens "
                "(129000 in the messages, 1500 in the functions). Please reduce the length of the messages or "
                "functions."), MODEL, "answered HTTP 400: This model's maximum context length is 128000 tokens"),
    (error(400, "max_tokens is too large: 2048 > 1024"), MODEL, "; lower --max-reply-tokens to what the server"),
    # a model whose name holds 'tool' is not a server refusing the tools
    (error(404, "The model `llama3-groq-tool-use` does not exist."), "llama3-groq-tool-use",
     "answered HTTP 404: The model `llama3-groq-tool-use` does not exist.; check --llm-url (the OpenAI-compatible"),
])
def test_planner_errors_say_what_to_change(reply, model, says):
    from medsam3_monai.agent.errors import PlannerError
    from medsam3_monai.agent.llm import ChatClient, ToolSupportMissing
    from medsam3_monai.agent.tools import tool_schemas

    with ScriptedServer([reply]) as server:
        client = ChatClient(server.url, model, retries=0)
        with pytest.raises(PlannerError) as raised:
            client.complete([{"role": "user", "content": "segment the polyp"}], tools=tool_schemas())
    assert says in str(raised.value) and not isinstance(raised.value, ToolSupportMissing)


def test_missing_key_variable_and_missing_model_are_one_line_errors(kvasir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MEDSAM3_TEST_NO_SUCH_KEY", raising=False)
    out = tmp_path / "mask.png"
    base = ["agent", str(kvasir), "--request", "polyp", "--out", str(out), "--llm-url", "http://127.0.0.1:9/v1"]
    assert main([*base, "--llm-model", MODEL, "--api-key-env", "MEDSAM3_TEST_NO_SUCH_KEY"]) == 2
    assert "MEDSAM3_TEST_NO_SUCH_KEY: that environment variable is not set" in capsys.readouterr().err
    assert main(base) == 2
    assert "needs --llm-model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ offline planner
@pytest.fixture(scope="module")
def predictor():
    from medsam3_monai.inferers.predict import Predictor

    return Predictor.from_checkpoint("tiny", score_threshold=0.25)


def _vision_calls(predictor) -> tuple[list[int], Any]:
    calls: list[int] = []
    handle = predictor.network.sam3.vision_encoder.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_offline_planner_runs_the_catalogue_phrasings_in_one_batch(kvasir, tmp_path, predictor, segment_reference):
    from medsam3_monai.agent import AgentSettings, SegmenterSettings, run_agent
    from medsam3_monai.agent.segmenter import PhraseSegmenter

    out = tmp_path / "mask.png"
    segmenter = PhraseSegmenter(predictor, str(kvasir), SegmenterSettings(score_threshold=0.25))
    calls, handle = _vision_calls(predictor)
    try:
        line = run_agent(str(kvasir), "segment the polyps", str(out), AgentSettings(llm="none"),
                         segmenter=segmenter, log=lambda _: None)
    finally:
        handle.remove()
    assert len(calls) == 1  # every phrasing in one network call: the vision encoder ran once
    trace = trace_of(out)
    details = trace["decision"]["details"]
    phrasings = details["concept"]["phrasings"]
    assert phrasings[0] == "polyp" and {"polyps", "colon polyp"} <= set(phrasings)  # catalogue + synonyms.json
    assert [row["phrase"] for row in details["fusion"]] == phrasings
    assert trace["planner"]["kind"] == "offline" and trace["llm_calls"] == []
    kept = kept_by_the_rule(segment_reference.sidecar(kvasir, *phrasings))  # from `medsam3 segment`'s scores
    assert sorted(kept.values()) == sorted(details["kept"])
    assert sorted(kept.values()) == sorted(row["phrase"] for row in details["fusion"] if row["kept"])
    # the answer: the union of the kept phrasings' masks, what `medsam3 segment` with those phrasings alone covers
    # (the others were silenced before the merge: they take no pixel from a kept one)
    expected = (segment_reference(kvasir, *[p for p in phrasings if p in kept.values()]) != 0).astype(np.uint8) * 255
    assert expected.any() and np.array_equal(png(out), expected)
    assert str(out) in line
    # --keep-ratio 1: the best phrasing alone, its own mask
    best = max(segment_reference.sidecar(kvasir, *phrasings)["labels"].values(), key=lambda e: e["score"])["prompt"]
    run_agent(str(kvasir), "segment the polyps", str(tmp_path / "best.png"), AgentSettings(llm="none", keep_ratio=1.0),
              segmenter=segmenter, log=lambda _: None)
    assert trace_of(tmp_path / "best.png")["decision"]["details"]["kept"] == [best]
    own = segment_reference(kvasir, best)
    assert own.any() and np.array_equal(png(tmp_path / "best.png") != 0, own != 0)


def test_offline_planner_answers_the_union_of_the_concepts_a_request_joins(kvasir, tmp_path, predictor,
                                                                          segment_reference):
    """'polyp and tumor': each concept's phrasings in their own predictor call, fused on their own (what
    `medsam3 segment` with that concept's phrasings gives), one mark per concept, the answer their union."""
    from medsam3_monai.agent import AgentSettings, SegmenterSettings, run_agent
    from medsam3_monai.agent.segmenter import PhraseSegmenter

    out, notes = tmp_path / "mask.png", []
    segmenter = PhraseSegmenter(predictor, str(kvasir), SegmenterSettings(score_threshold=0.25))
    calls, handle = _vision_calls(predictor)
    try:
        run_agent(str(kvasir), "segment the polyp and the tumor", str(out),
                  AgentSettings(llm="none", max_phrasings=2), segmenter=segmenter, log=notes.append)
    finally:
        handle.remove()
    assert len(calls) == 2  # one network call per concept
    assert any("names 2 concepts ('polyp', 'tumor')" in line for line in notes)
    trace = trace_of(out)
    details = trace["decision"]["details"]
    assert [entry["concept"]["concept"] for entry in details["concepts"]] == ["polyp", "tumor"]
    assert details["batch"] == {"phrasings": 4, "predictor_calls": 2}
    expected = np.zeros(png(out).shape, dtype=bool)
    for entry in details["concepts"]:
        phrasings = entry["concept"]["phrasings"]
        kept = kept_by_the_rule(segment_reference.sidecar(kvasir, *phrasings))
        assert sorted(kept.values()) == sorted(entry["kept"])
        expected |= segment_reference(kvasir, *[p for p in phrasings if p in kept.values()]) != 0
    marks = trace["decision"]["marks"]
    assert [mark["phrase"] for mark in marks] == ["polyp", "tumor"]
    assert expected.any() and np.array_equal(png(out), expected.astype(np.uint8) * 255)
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["labels"]["255"]["prompt"] == "polyp + tumor"
    assert sorted(sidecar["agent"]["fused_phrasings"]) == sorted(details["kept"])


def test_offline_planner_is_the_default_without_an_endpoint(kvasir, tmp_path, capsys):
    out = tmp_path / "mask.png"
    assert main(["agent", str(kvasir), "--request", "segment the lesion in the upper left quadrant", "--out",
                 str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "using the offline planner" in err and "does not apply location words (upper left quadrant)" in err
    trace = trace_of(out)
    concept = trace["decision"]["details"]["concept"]
    assert concept["concept"] == "tumor" and "lesion" in concept["phrasings"]
    assert any("does not apply location words (upper left quadrant)" in note for note in trace["notes"])


def test_offline_planner_on_a_volume(hippocampus, tmp_path, predictor, segment_reference):
    from medsam3_monai.agent import AgentSettings, SegmenterSettings, run_agent
    from medsam3_monai.agent.segmenter import PhraseSegmenter

    segmenter = PhraseSegmenter(predictor, str(hippocampus), SegmenterSettings(score_threshold=0.25))
    calls, handle = _vision_calls(predictor)
    try:
        segmenter.segment("anterior hippocampus")
        one_phrase = len(calls)
        calls.clear()
        out = tmp_path / "mask.nii.gz"
        run_agent(str(hippocampus), "segment the anterior hippocampus", str(out), AgentSettings(llm="none"),
                  segmenter=segmenter, log=lambda _: None)
    finally:
        handle.remove()
    details = trace_of(out)["decision"]["details"]
    assert len(details["concept"]["phrasings"]) >= 2
    assert len(calls) == one_phrase  # all phrasings share each slice's vision pass
    written, source = nib.load(str(out)), nib.load(str(hippocampus))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}
    # the phrasings through `medsam3 segment` at the same threshold, merged; the kept ones' voxels are the mask
    phrasings, extra = details["concept"]["phrasings"], ("--score-threshold", "0.25")
    kept = kept_by_the_rule(segment_reference.sidecar(hippocampus, *phrasings, extra=extra))
    assert sorted(kept.values()) == sorted(details["kept"])
    expected = segment_reference(hippocampus, *[p for p in phrasings if p in kept.values()], extra=extra) != 0
    assert expected.any() and np.array_equal(np.asarray(written.dataobj), expected.astype(np.uint8))
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["kind"] == "volume" and sidecar["agent"]["planner"] == "offline"
    assert sorted(sidecar["agent"]["fused_phrasings"]) == sorted(details["kept"])
    assert "tracker" in sidecar


# ------------------------------------------------------------------------------------------------ units
def test_text_calls_are_parsed_in_the_usual_shapes():
    from medsam3_monai.agent.tools import ToolCallError, parse_call, parse_text_call

    assert parse_text_call('{"tool": "segment_phrase", "arguments": {"text_prompt": "liver"}}') == (
        "segment_phrase", {"text_prompt": "liver"})
    assert parse_text_call('ok <tool_call>{"name": "report_no_mask", "arguments": {}}</tool_call>') == (
        "report_no_mask", {})
    assert parse_text_call('{"function": {"name": "examine_each_mask", "arguments": "{}"}}')[0] == "examine_each_mask"
    assert parse_text_call('{"select_masks_and_return": {"final_answer_masks": [2]}}')[0] == "select_masks_and_return"
    assert parse_text_call("I think the polyp is mark 1.") is None
    assert parse_call("select_masks_and_return", '{"final_answer_masks": 2}').arguments == {"final_answer_masks": [2]}
    with pytest.raises(ToolCallError, match="not valid JSON"):
        parse_call("segment_phrase", '{"text_prompt": ')
    with pytest.raises(ToolCallError, match="at least one mark"):
        parse_call("select_masks_and_return", '{"final_answer_masks": []}')


def test_requests_resolve_to_catalogue_concepts():
    from medsam3_monai.agent.concepts import resolve_request

    plan = resolve_request("find the breast lesion")
    assert plan.concept == "breast tumor" and plan.phrasings[:2] == ["breast tumor", "breast lesion"]
    assert any("MedSAM3 phrase table" in s or "Medical SAM3" in s for s in plan.sources.values())
    plan = resolve_request("Segment all polyps, please")
    assert plan.concept == "polyp" and plan.in_catalogue
    plan = resolve_request("segment the weird blob on the left")
    assert not plan.in_catalogue and plan.phrasings == ["weird blob"] and plan.location == ["left"]
    with pytest.raises(ValueError, match="names nothing"):
        resolve_request("segment the upper left")
    # the head of a noun phrase names the concept, not its modifier (an organ where a lesion is asked for)
    plan = resolve_request("segment the brain tumor")
    assert plan.concept == "tumor" and plan.phrasings[:2] == ["tumor", "brain tumor"] and plan.unused == ["brain"]
    plan = resolve_request("the tumor in the left kidney")
    assert plan.concept == "tumor" and plan.phrasings[1] == "tumor in the left kidney"
    plan = resolve_request("lesion in the liver")  # the qualifier and the head together: what the catalogue knows
    assert plan.concept == "liver tumor" and plan.phrasings[:2] == ["liver tumor", "liver lesion"]
    plan = resolve_request("segment the left ventricle")  # left / right before a name are part of it
    assert plan.phrasings == ["left ventricle"] and plan.location == []
    plan = resolve_request("liver cyst")  # a known organ modifying an unknown head: the request as written
    assert not plan.in_catalogue and plan.phrasings == ["liver cyst"]
    plan = resolve_request("segment the polyps and show them")  # pronouns are not part of a name
    assert plan.concept == "polyp"
    # letters of any script are letters: not dropped ('tum r', helper-87), not a request naming nothing
    assert resolve_request("segment the tumör").phrasings == ["tumör"]
    assert resolve_request("segmente la tumeur rénale").phrasings[-1].endswith("tumeur rénale")
    assert resolve_request("分割乳腺肿瘤").phrasings == ["分割乳腺肿瘤"]


def test_a_request_joining_concepts_resolves_to_each():
    from medsam3_monai.agent.concepts import resolve_requests

    def concepts(request: str) -> list[str]:
        return [plan.concept for plan in resolve_requests(request)]

    assert concepts("segment the liver and the spleen") == ["liver", "spleen"]
    assert concepts("liver & liver tumor") == ["liver", "liver tumor"]  # MedSAM3's LiTS phrase
    assert concepts("optic cup & optic disc") == ["optic cup", "optic disc"]
    assert concepts("liver, spleen and kidney") == ["liver", "spleen", "kidney"]
    assert concepts("the lesion in the liver and the spleen") == ["liver tumor", "spleen"]
    assert concepts("portal vein and splenic vein") == ["portal vein and splenic vein"]  # one catalogue text
    assert concepts("Segment all polyps, please") == ["polyp"]  # a part of instructions only
    assert concepts("the polyp and the weird blob") == ["polyp and the weird blob"]  # a part it does not know: whole
    assert concepts("tumor and lesion") == ["tumor"]  # two names of one concept
    plans = resolve_requests("liver and spleen")
    assert [plan.request for plan in plans] == ["liver", "spleen"] and plans[0].phrasings[0] == "liver"


# ---------------------------------------------------------------- units: fusion, tool calls, marks, the answer
def _phrasings(scores, label_map):
    """What ``fuse_by_confidence`` reads of a prediction of phrasings p0, p1, ... (label value i + 1)."""
    from types import SimpleNamespace

    import torch

    n = len(scores)
    return SimpleNamespace(label_map=torch.as_tensor(label_map), scores=list(scores),
                           prompts=[f"p{i}" for i in range(n)], label_values=list(range(1, n + 1)))


LABELS = np.array([[1, 1, 2, 2],
                   [1, 1, 2, 2],
                   [0, 0, 0, 3]])


def test_fusion_keeps_a_phrasing_exactly_at_the_ratio_bar():
    from medsam3_monai.agent.fusion import fuse_by_confidence

    # best 0.8, keep_ratio 0.5 -> bar 0.4 (exact in binary): 0.4 >= 0.4 is kept ("at least keep_ratio x best")
    fusion = fuse_by_confidence(_phrasings([0.8, 0.4, 0.3], LABELS), keep_ratio=0.5)
    assert fusion.kept == ["p0", "p1"]
    assert fusion.mask.tolist() == (np.isin(LABELS, [1, 2])).tolist()
    assert [row["kept"] for row in fusion.table] == [True, True, False]


def test_fusion_min_score_raises_the_bar_above_the_ratio():
    from medsam3_monai.agent.fusion import fuse_by_confidence

    # bar = max(0.5 * 0.3, 0.25) = 0.25: only p0 (0.3) passes; p1 (0.2) would pass the ratio bar alone (0.15)
    fusion = fuse_by_confidence(_phrasings([0.3, 0.2], LABELS[:2, :]), keep_ratio=0.5, min_score=0.25)
    assert fusion.kept == ["p0"]
    assert fusion.mask.tolist() == (LABELS[:2, :] == 1).tolist()
    # every score below min_score: nothing kept, empty mask, score = the best overall
    none = fuse_by_confidence(_phrasings([0.3, 0.2], LABELS[:2, :]), keep_ratio=0.5, min_score=0.35)
    assert none.kept == [] and not none.mask.any() and none.score == 0.3


def test_fusion_score_is_the_best_kept_phrasing_and_kept_is_best_first():
    from medsam3_monai.agent.fusion import fuse_by_confidence

    # the best phrasing is not the first one given
    fusion = fuse_by_confidence(_phrasings([0.6, 0.9, 0.1], LABELS), keep_ratio=0.5)
    assert fusion.kept == ["p1", "p0"]
    assert fusion.score == 0.9


def test_text_calls_take_parameters_args_and_input_as_the_arguments_key():
    from medsam3_monai.agent.tools import parse_text_call

    for key in ("parameters", "args", "input"):
        assert parse_text_call(f'{{"name": "segment_phrase", "{key}": {{"text_prompt": "liver"}}}}') == (
            "segment_phrase", {"text_prompt": "liver"})


def test_a_tagged_call_wins_over_other_json_in_the_reply():
    from medsam3_monai.agent.tools import parse_text_call

    content = ('The earlier call was {"tool": "segment_phrase", "arguments": {"text_prompt": "polyp"}}. Now: '
               '<tool_call>{"name": "select_masks_and_return", "arguments": {"final_answer_masks": [1]}}</tool_call>')
    assert parse_text_call(content) == ("select_masks_and_return", {"final_answer_masks": [1]})


def test_integral_float_and_hash_string_mark_numbers_are_accepted():
    from medsam3_monai.agent.tools import ToolCallError, parse_call

    assert parse_call("select_masks_and_return", '{"final_answer_masks": [1.0, "#2"]}').arguments == {
        "final_answer_masks": [1, 2]}
    with pytest.raises(ToolCallError, match="mark numbers"):
        parse_call("select_masks_and_return", '{"final_answer_masks": [1.5]}')


def test_mark_zero_does_not_exist():
    from medsam3_monai.agent.loop import LoopSettings, PlannerLoop
    from medsam3_monai.agent.marks import Mark
    from medsam3_monai.agent.tools import ToolCallError

    loop = PlannerLoop(None, None, None, "the polyp", LoopSettings(), None)
    loop.marks = [Mark(1, "polyp", 1, np.ones((2, 2), bool), 0.9), Mark(2, "lesion", 2, np.zeros((2, 2), bool), 0.2)]
    with pytest.raises(ToolCallError, match="no mark 0"):
        loop._numbers([0], "select_masks_and_return")
    assert [m.number for m in loop._numbers([2, 1, 2], "select_masks_and_return")] == [2, 1]


def test_the_answer_score_is_the_best_selected_marks_not_the_first_named():
    from types import SimpleNamespace

    from medsam3_monai.agent.decision import Decision
    from medsam3_monai.agent.marks import Mark, union_of
    from medsam3_monai.agent.output import _answer_prediction

    a = np.zeros((4, 4), bool)
    a[0, 0] = True
    b = np.zeros((4, 4), bool)
    b[3, 3] = True
    decision = Decision("selected", [Mark(2, "lesion", 2, b, 0.3), Mark(1, "polyp", 1, a, 0.9)])
    view = SimpleNamespace(affine=None, is_volume=False)
    settings = SimpleNamespace(checkpoint="tiny", modality="endoscopy", score_threshold=0.5)
    prediction = _answer_prediction(decision, None, view, "x.png", union_of(decision.marks), settings)
    assert prediction.scores == [0.9] and prediction.prompts == ["lesion + polyp"]
    assert int(prediction.label_map.sum()) == 2


def test_a_request_naming_nothing_says_so_in_words_a_server_client_can_use():
    from medsam3_monai.agent.concepts import resolve_request
    from medsam3_monai.agent.errors import AgentError

    with pytest.raises(AgentError, match=r"names nothing to segment; name the structure in it, e.g. 'polyp'") as err:
        resolve_request("please segment")
    assert "--request" not in str(err.value)  # the server's clients send params.request, not a flag
