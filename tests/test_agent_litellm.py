"""`medsam3 agent` against LiteLLM's proxy: a real OpenAI-compatible server that nobody here wrote.

The proxy (litellm[proxy] 1.108.7) runs from its own environment (``make litellm``; skipped when it is not built),
with a master key, on a free loopback port. Its models answer with LiteLLM's own mock replies (no upstream model is
ever reached); ``tests/litellm_proxy/medsam3_scripted_planner.py``, a pre-call hook, records every request as the
proxy received it and scripts the conversation (segment "polyp", then select mark 1). What LiteLLM adds over
tests/test_agent.py's scripted loopback server: its validation of the OpenAI request for the deployment's provider
(a ``predibase/...`` deployment refuses ``tools`` with its own 400), its error bodies and status codes (429 after
``litellm.RateLimitError``, 400 for an unknown model or a missing key), and its response serialisation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from _server_helpers import answers_200, free_port
from PIL import Image

from medsam3_monai.deploy.cli import main

pytestmark = pytest.mark.usefixtures("one_thread", "no_configured_endpoint")

LITELLM_VENV = Path(os.environ.get("MEDSAM3_LITELLM_VENV")
                    or Path.home() / ".cache" / "medsam3-monai" / "litellm-venv")
HOOK = Path(__file__).resolve().parent / "litellm_proxy" / "medsam3_scripted_planner.py"
MASTER_KEY = "sk-medsam3-litellm-test"
KEY_VARIABLE = "MEDSAM3_TEST_LITELLM_KEY"
START_DEADLINE_S = 600  # generous: the proxy imports for 6-15 s on an idle 2-core machine
TOOLS = {"segment_phrase", "examine_each_mask", "select_masks_and_return", "report_no_mask"}
NOWHERE = {"api_key": "not-used", "api_base": "http://127.0.0.1:9/v1"}  # mock replies never reach it


def _models() -> list[dict]:
    """The proxy's model list: LiteLLM mock replies, scripted by the hook or fixed here."""
    return [
        {"model_name": "scripted", "litellm_params": {"model": "openai/gpt-4o", **NOWHERE}},
        # LiteLLM itself refuses `tools` for this provider (400 UnsupportedParamsError): a server without tools
        {"model_name": "scripted-no-tools",
         "litellm_params": {"model": "predibase/planner", "tenant_id": "t", **NOWHERE}},
        {"model_name": "rate-limited",
         "litellm_params": {"model": "openai/gpt-4o", "mock_response": "litellm.RateLimitError", **NOWHERE}},
        {"model_name": "ctx-functions", "litellm_params": {"model": "openai/gpt-4o", **NOWHERE}},
    ]


class Proxy:
    """A running ``litellm --config ...``: its URL, and the requests its hook recorded."""

    def __init__(self, url: str, log: Path) -> None:
        self.url, self.log = url, log

    def requests(self) -> list[dict]:
        """Every request the proxy received so far, in order, as the hook recorded it."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text(encoding="utf-8").splitlines()]

    def requests_since(self, count: int) -> list[dict]:
        return self.requests()[count:]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    litellm = LITELLM_VENV / "bin" / "litellm"
    if not litellm.exists():
        pytest.skip(f"LiteLLM's proxy is not built at {LITELLM_VENV} (no bin/litellm): run `make litellm` "
                    "(scripts/setup_litellm_env.sh) to run this test")
    root = tmp_path_factory.mktemp("litellm")
    shutil.copy(HOOK, root / HOOK.name)
    config = {"model_list": _models(),
              "litellm_settings": {"callbacks": f"{HOOK.stem}.planner", "num_retries": 0}}
    (root / "config.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML
    log, server_log = root / "requests.jsonl", root / "proxy.log"
    env = {**os.environ, "PYTHONPATH": str(root), "MEDSAM3_PLANNER_LOG": str(log), "LITELLM_MASTER_KEY": MASTER_KEY,
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # no download of the cost map (there is no internet)
    for attempt in range(3):  # the free port is found seconds before the proxy binds it: another process may take it
        port = free_port()
        with open(server_log, "wb") as output:
            process = subprocess.Popen([str(litellm), "--config", str(root / "config.yaml"), "--host", "127.0.0.1",
                                        "--port", str(port)], cwd=root, env=env, stdout=output,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_DEADLINE_S
        while not answers_200(port, "/health/liveliness") and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        text = server_log.read_text(errors="replace")
        if process.poll() is None and answers_200(port, "/health/liveliness"):
            break
        _stop(process)
        if "address already in use" not in text.lower() or attempt == 2:
            tail = "\n".join(text.splitlines()[-40:])
            pytest.fail(f"LiteLLM's proxy did not start (exit {process.poll()}):\n{tail}")
    try:
        yield Proxy(f"http://127.0.0.1:{port}/v1", log)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """End the proxy and what it started (its own process group)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _agent(proxy: Proxy, image: Path, out: Path, model: str, *extra: str, key: bool = True) -> int:
    """`medsam3 agent IMAGE --request ... --llm-url PROXY --llm-model MODEL` (the CLI's own entry point)."""
    key_option = ["--api-key-env", KEY_VARIABLE] if key else []
    return main(["agent", str(image), "--request", "segment the polyp", "--out", str(out), "--llm-url", proxy.url,
                 "--llm-model", model, *key_option, "--no-progress", "--trace", f"{out}.trace.json", *extra])


@pytest.fixture()
def key(monkeypatch):
    monkeypatch.setenv(KEY_VARIABLE, MASTER_KEY)


@pytest.fixture(scope="module")
def polyp_mask(kvasir, tmp_path_factory) -> np.ndarray:
    """What `medsam3 segment KVASIR --prompt polyp` writes: the mask the scripted planner's choice must give."""
    out = tmp_path_factory.mktemp("segment") / "polyp.png"
    assert main(["segment", str(kvasir), "--prompt", "polyp", "--out", str(out), "--no-progress"]) == 0
    return _png(out)


def _trace(out: Path) -> dict:
    text = Path(f"{out}.trace.json").read_text()
    assert "base64," not in text and MASTER_KEY not in text
    return json.loads(text)


def test_tool_calls_through_litellm(proxy, kvasir, tmp_path, key, polyp_mask):
    before = len(proxy.requests())
    out = tmp_path / "mask.png"
    assert _agent(proxy, kvasir, out, "scripted") == 0
    assert np.array_equal(_png(out), polyp_mask)
    first, second = proxy.requests_since(before)
    # what LiteLLM received and accepted for an OpenAI deployment
    assert {tool["function"]["name"] for tool in first["tools"]} == TOOLS
    assert first["messages"][0]["role"] == "system"
    pictures = [part["image_url"]["url"] for part in first["messages"][1]["content"] if part["type"] == "image_url"]
    assert len(pictures) == 1 and pictures[0].startswith("data:image/")
    tool_result = next(message for message in second["messages"] if message["role"] == "tool")
    assert tool_result["tool_call_id"] == "call_1" and "mark 1" in tool_result["content"]
    # what the agent made of LiteLLM's replies
    trace = _trace(out)
    assert trace["status"] == "selected" and trace["planner"]["tool_mode"] == "tools"
    assert [call["name"] for call in trace["tool_calls"]] == ["segment_phrase", "select_masks_and_return"]
    assert len(trace["llm_calls"]) == 2 and trace["tokens"]["total"] > 0  # LiteLLM's usage block was read


def test_litellm_refusing_tools_gets_the_text_protocol(proxy, kvasir, tmp_path, key, polyp_mask, capsys):
    before = len(proxy.requests())
    out = tmp_path / "mask.png"
    assert _agent(proxy, kvasir, out, "scripted-no-tools") == 0
    assert "continuing without native tool calls" in capsys.readouterr().err
    assert np.array_equal(_png(out), polyp_mask)
    offered, *rest = proxy.requests_since(before)
    assert offered.get("tools") and rest and not any(request.get("tools") for request in rest)
    trace = _trace(out)
    assert trace["status"] == "selected" and trace["planner"]["tool_mode"] == "text"
    assert "UnsupportedParamsError" in json.dumps(trace["llm_calls"][0])  # LiteLLM's own refusal, recorded


@pytest.mark.parametrize("model, use_key, says, not_says", [
    # LiteLLM's 429 for litellm.RateLimitError: retried (--llm-retries 1), then the run fails
    ("rate-limited", True, "failed (2 attempts; last: HTTP 429", "refused the tools"),
    # OpenAI's context-length wording names "functions": not a server refusing the tools
    ("ctx-functions", True, "maximum context length", "refused the tools"),
    # LiteLLM answers an unknown model with 400, not 404
    ("no-such-model", True, "check --llm-model", "refused the tools"),
    # a proxy with a master key, asked without one
    ("scripted", False, "no key was sent", "refused the tools"),
])
def test_litellm_errors_fail_in_one_line_with_nothing_written(proxy, kvasir, tmp_path, key, capsys, model, use_key,
                                                                says, not_says):
    out = tmp_path / "mask.png"
    assert _agent(proxy, kvasir, out, model, "--llm-retries", "1", key=use_key) == 2
    err = capsys.readouterr().err
    assert says in err and not_says not in err and "Traceback" not in err
    assert not out.exists() and not Path(f"{out}.json").exists()
    trace = _trace(out)  # asked for with --trace: written for a failed run
    assert trace["status"] == "failed" and trace["planner"]["tool_mode"] is None
