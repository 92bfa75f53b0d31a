"""One agent run, end to end: check the outputs, load MedSAM3, pick the planner (an OpenAI-compatible MLLM, or
the offline planner), let it decide, write the files.

Planner choice (:func:`choose_planner`): ``llm="none"`` is the offline planner; ``llm="openai"`` needs an endpoint;
``llm="auto"`` (the default) is the MLLM planner when an endpoint is configured (``llm_url``), else the offline
planner. When the endpoint cannot be reached at all (connection refused, unknown host: no reply ever received),
the run falls back to the offline planner and says so loudly (stderr and the trace), unless ``fallback=False``.
Every other planner failure (time-outs, HTTP errors, a planner that never finishes) ends the run with one clear
line and nothing written.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from .decision import Decision
from .errors import AgentError, EndpointUnreachable
from .loop import LoopSettings
from .segmenter import SegmenterSettings

__all__ = ["AgentSettings", "check_planner", "check_url", "choose_planner", "decide", "planner_name", "run_agent",
           "without_url"]


@dataclass
class AgentSettings:
    """Everything a run needs besides the input, the request and the output paths.

    Attributes:
        llm: ``auto``, ``openai`` or ``none``.
        llm_url, llm_model: the endpoint's base URL and model name (no default: nothing is built in).
        api_key_env: the name of the environment variable holding the key (None: no key).
        timeout, retries: per HTTP attempt; further attempts after a retryable failure.
        max_reply_tokens, temperature: per request.
        view_size: the longest side of the pictures sent.
        fallback: fall back to the offline planner when the endpoint is unreachable.
        max_phrasings, keep_ratio, min_score: the offline planner (:mod:`.offline`).
        loop: the MLLM loop's limits (:class:`~.loop.LoopSettings`).
        segmenter: the predictor's options (:class:`~.segmenter.SegmenterSettings`).
    """

    llm: str = "auto"
    llm_url: str | None = None
    llm_model: str | None = None
    api_key_env: str | None = None
    timeout: float = 120.0
    retries: int = 2
    max_reply_tokens: int = 2048
    temperature: float | None = None
    view_size: int = 768
    fallback: bool = True
    max_phrasings: int = 6
    keep_ratio: float = 0.5
    min_score: float = 0.0
    loop: LoopSettings = field(default_factory=LoopSettings)
    segmenter: SegmenterSettings = field(default_factory=SegmenterSettings)


def choose_planner(settings: AgentSettings) -> str:
    """``"llm"`` or ``"offline"`` (see the module docstring); raises AgentError for an incomplete endpoint."""
    if settings.llm not in ("auto", "openai", "none"):
        raise AgentError(f"--llm {settings.llm!r}: auto, openai or none")
    if settings.llm == "none":
        return "offline"
    if not settings.llm_url:
        if settings.llm == "openai":
            raise AgentError("--llm openai needs --llm-url (an OpenAI-compatible base URL, e.g. "
                             "http://localhost:8000/v1) and --llm-model")
        return "offline"
    check_url(settings.llm_url)
    if not settings.llm_model:
        raise AgentError(f"--llm-url {settings.llm_url} needs --llm-model (the model the server serves; it lists "
                         f"them at {settings.llm_url.rstrip('/')}/models)")
    return "llm"


def check_url(url: str) -> str:
    """The planner's base URL if it is an http(s) URL with a host; else AgentError (a configuration error, not an
    unreachable endpoint: no fallback to the offline planner)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(str(url).strip())
        valid = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - a bad port raises ValueError
    except ValueError:
        valid = False
    if not valid:
        raise AgentError(f"--llm-url must be an http:// or https:// URL, e.g. http://localhost:8000/v1 (got "
                         f"{str(url)[:80]!r}, from --llm-url or MEDSAM3_LLM_URL)")
    return url


def without_url(text: str, settings: AgentSettings) -> str:
    """``text`` without the planner's URL, for the server's clients (they are never shown the endpoint)."""
    url = settings.llm_url
    if not url:
        return text
    return text.replace(f" at {url}", "").replace(url, "(the planner endpoint)")


def check_planner(settings: AgentSettings) -> str:
    """:func:`choose_planner`, and the key's environment variable set when ``api_key_env`` names one (whichever
    planner runs): what a command checks before anything is loaded. Raises AgentError."""
    planner = choose_planner(settings)
    _api_key(settings)
    return planner


def planner_name(settings: AgentSettings) -> str:
    """The planner in words, for reports: the MLLM (model at URL) or the offline planner."""
    if choose_planner(settings) == "offline":
        return "offline (catalogue phrasings, confidence fusion)"
    return f"{settings.llm_model} at {settings.llm_url}"


def _api_key(settings: AgentSettings) -> str | None:
    if not settings.api_key_env:
        return None
    value = os.environ.get(settings.api_key_env, "").strip()
    if not value:
        raise AgentError(f"--api-key-env {settings.api_key_env}: that environment variable is not set or empty")
    return value


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_agent(input_path: str, request: str, out: str, settings: AgentSettings | None = None, *,
              overlay: str | None = None, trace_path: str | None = None, overwrite: bool = False,
              log: Callable[[str], None] = _stderr, segmenter: Any = None) -> str:
    """Run the agent on one image or volume; returns the summary line. Raises ValueError subclasses
    (:class:`~.errors.AgentError`, ``PromptError``, ...) and ``FileExistsError`` / ``FileNotFoundError`` on bad
    input or failure, having written nothing (but the trace, when ``trace_path`` is given).

    ``segmenter``: an already loaded :class:`~.segmenter.PhraseSegmenter` for ``input_path`` (default: loaded from
    ``settings.segmenter``).
    """
    from ..inferers.inputs import input_kind
    from .output import plan_outputs, write_failed_trace, write_outputs
    from .trace import Trace

    settings = settings or AgentSettings()
    _check_request(request)
    kind = input_kind(input_path)  # a missing input or unsupported format: before anything is loaded
    _check_settings(settings, kind)
    plan = plan_outputs(input_path, kind, out, overlay, trace_path, overwrite)
    planner = choose_planner(settings)
    api_key = _api_key(settings) if planner == "llm" else None
    trace = _start_trace(Trace(), request, input_path, kind, settings, planner, log)
    try:
        start = time.perf_counter()
        if segmenter is None:
            from .segmenter import PhraseSegmenter

            segmenter = PhraseSegmenter.load(input_path, settings.segmenter)
            for line in segmenter.predictor.preprocessing_notes:
                log(f"medsam3 agent: note: {line}")
        _trace_applied_settings(trace, segmenter)
        trace.time("load_model", time.perf_counter() - start)
        view = _view(input_path, settings, kind, segmenter)
        decision = _decide(planner, request, settings, segmenter, view, api_key, trace, log)
        return write_outputs(plan, decision, view, segmenter, request, trace)
    except BaseException as err:
        write_failed_trace(plan, trace, _failure(err))
        raise


def decide(input_path: str, request: str, settings: AgentSettings, segmenter: Any, *,
           log: Callable[[str], None] = _stderr, trace: Any = None, plain_notes: bool = False) -> Decision:
    """The planner's decision on one request, with an already loaded segmenter and no files written (``medsam3
    evaluate --agent`` and the server's agent model call this for each request).

    ``trace`` (a :class:`~.trace.Trace`, e.g. a fresh ``Trace()``) receives the run: header, planner, calls, the
    decision and the final status; a failed run leaves it with ``"status": "failed"`` and the error before the
    exception propagates. ``plain_notes``: ``log`` gets notes for a remote client (the server's answer): the
    fallback to the offline planner is one plain line, without the stderr banner, the endpoint's URL or the
    command-line advice.
    """
    from ..inferers.inputs import input_kind
    from .trace import Trace

    trace = trace if trace is not None else Trace()
    _check_request(request)
    kind = input_kind(input_path)
    _check_settings(settings, kind)
    planner = choose_planner(settings)
    api_key = _api_key(settings) if planner == "llm" else None
    _start_trace(trace, request, input_path, kind, settings, planner, log)
    _trace_applied_settings(trace, segmenter)
    try:
        view = _view(input_path, settings, kind, segmenter)
        decision = _decide(planner, request, settings, segmenter, view, api_key, trace, log, plain_notes)
    except BaseException as err:
        trace.finish("failed", _failure(err))
        raise
    trace.data["decision"] = decision.as_json()
    trace.finish(decision.status)
    return decision


def _check_request(request: str) -> None:
    if not request or not request.strip():
        raise AgentError("--request is empty: say what to segment, e.g. 'segment the polyp'")


def _start_trace(trace: Any, request: str, input_path: str, kind: str, settings: AgentSettings, planner: str,
                 log: Callable[[str], None]) -> Any:
    """Fill the trace's header (the key's environment variable by name only) and announce the offline default."""
    if planner == "offline" and settings.llm == "auto":
        log("note: no planner endpoint configured (--llm-url); using the offline planner (--llm none)")
    header = {"request": request, "input": str(input_path), "kind": kind, "settings": asdict(settings)}
    first = ("format", "status")
    trace.data = {**{k: trace.data[k] for k in first}, **header,
                  **{k: v for k, v in trace.data.items() if k not in first and k not in header}}
    trace.data["planner"] = {"kind": planner, "url": settings.llm_url if planner == "llm" else None,
                             "model": settings.llm_model if planner == "llm" else None, "fallback": None}
    return trace


def _trace_applied_settings(trace: Any, segmenter: Any) -> None:
    """The trace's segmenter settings as they apply once the model is loaded: its own CT window and resize kernel
    where none was given (the settings say None, "the model's own")."""
    applied = getattr(segmenter, "settings", None)
    recorded = trace.data.get("settings", {}).get("segmenter")
    if applied is not None and isinstance(recorded, dict):
        for key in ("ct_window", "resize_kernel"):
            value = getattr(applied, key, None)
            if value is not None:
                recorded[key] = list(value) if isinstance(value, tuple) else value


def _check_settings(settings: AgentSettings, kind: str) -> None:
    """Bad option values, before the model is loaded."""
    s = settings.segmenter
    if kind == "volume" and s.protocol != "top_query":
        raise AgentError(f"--protocol {s.protocol} applies to 2D images; volumes use the top query per slice with "
                         "tracker propagation")
    if not 0.0 <= s.score_threshold <= 1.0:
        raise AgentError(f"--score-threshold must be in [0, 1], got {s.score_threshold}")
    check_agent_limits(settings)


def check_agent_limits(settings: AgentSettings) -> None:
    """The planner's numeric options in range (each named with its value); nothing is imported or loaded."""
    for name, value in (("--keep-ratio", settings.keep_ratio), ("--min-score", settings.min_score)):
        if not 0.0 <= value <= 1.0:
            raise AgentError(f"{name} must be in [0, 1], got {value}")
    if settings.max_phrasings < 1:
        raise AgentError(f"--max-phrasings must be >= 1, got {settings.max_phrasings}")
    if settings.view_size < 64:
        raise AgentError(f"--view-size must be >= 64 px, got {settings.view_size}")
    check_llm_limits(settings.timeout, settings.retries, settings.max_reply_tokens)


def _failure(err: BaseException) -> str:
    """A failed run's error for its trace (an interruption has no message of its own)."""
    if isinstance(err, KeyboardInterrupt):
        return "KeyboardInterrupt: interrupted (Ctrl-C or SIGINT)"
    return f"{type(err).__name__}: {err}"


def check_llm_limits(timeout: float, retries: int, max_reply_tokens: int = 1) -> None:
    """Refuse a planner request limit out of range, naming the option and the value given."""
    for name, value, ok, rule in (("--llm-timeout", timeout, timeout > 0, "> 0 seconds"),
                                  ("--llm-retries", retries, retries >= 0, ">= 0"),
                                  ("--max-reply-tokens", max_reply_tokens, max_reply_tokens >= 1, ">= 1")):
        if not ok:
            raise AgentError(f"{name} must be {rule}, got {value:g}")


def _view(input_path: str, settings: AgentSettings, kind: str, segmenter: Any) -> Any:
    """The input as the planner sees it (:class:`~.render.View`), read with the predictor's intensity rule (the
    segmenter's settings as they apply: its model's own CT window where none was given)."""
    from .render import View

    s = getattr(segmenter, "settings", None) or settings.segmenter
    return View.load(input_path, s.modality, s.ct_window, s.channel, kind == "volume", settings.view_size,
                     s.max_pixels)


def _decide(planner: str, request: str, settings: AgentSettings, segmenter: Any, view: Any, api_key: str | None,
            trace: Any, log: Callable[[str], None], plain_notes: bool = False) -> Decision:
    from .offline import plan_offline

    def offline() -> Decision:
        start = time.perf_counter()
        try:
            def noted(line: str) -> None:  # the planner's notes: on stderr and in the trace
                trace.note(line.removeprefix("note: "))
                log(line)

            return plan_offline(request, segmenter, max_phrasings=settings.max_phrasings,
                                keep_ratio=settings.keep_ratio, min_score=settings.min_score, log=noted)
        finally:
            trace.time("offline_planner", time.perf_counter() - start)

    if planner == "offline":
        return offline()
    from .llm import ChatClient
    from .loop import PlannerLoop

    client = ChatClient(settings.llm_url, settings.llm_model, api_key, timeout=settings.timeout,
                        retries=settings.retries, max_reply_tokens=settings.max_reply_tokens,
                        temperature=settings.temperature)
    loop = PlannerLoop(client, segmenter, view, request, settings.loop, trace, log)
    try:
        return loop.run()
    except EndpointUnreachable as err:
        if not settings.fallback:
            raise
        if plain_notes:
            log(f"{without_url(str(err), settings)}: the offline planner answered instead (no MLLM looked at the "
                "image; the request's concept was resolved through the catalogue)")
        else:
            banner = "!" * 78
            log(f"{banner}\nWARNING: {err}.\nWARNING: FALLING BACK TO THE OFFLINE PLANNER (--llm none): no MLLM "
                "looks at the image; the request's concept is resolved through the catalogue.\n"
                f"WARNING: pass --no-fallback to fail instead.\n{banner}")
        trace.data["planner"]["fallback"] = str(err)
        trace.data["planner"]["kind"] = "offline (fallback)"
        trace.data["planner"]["tool_mode"] = None  # no planner call was answered
        trace.note(f"fallback to the offline planner: {err}")
        decision = offline()
        decision.planner = "offline (fallback)"  # the sidecar and the trace's decision say so too
        return decision
