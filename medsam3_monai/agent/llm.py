"""The planner endpoint: any OpenAI-compatible chat-completions server (vLLM, SGLang, Ollama, LM Studio, OpenAI,
Gemini's OpenAI-compatible endpoint), reached with the ``openai`` client package.

* Nothing is built in: the base URL, the model name and the name of the environment variable holding the key all
  come from the caller. Without a key the client sends a placeholder (local servers ignore it).
* Time-outs, connection failures, HTTP 408/409/429 and 5xx are retried ``retries`` times with exponential back-off
  (``backoff`` x 2^k seconds, at most 8 s; a ``Retry-After`` header of up to 30 s is honoured), then fail with one
  clear line. Other HTTP errors fail at once. The client's own retries are off, so every attempt is counted here.
* A request with ``tools`` that the server refuses because of the tools (HTTP 400/404/422 naming tools or
  functions, e.g. vLLM without ``--enable-auto-tool-choice``, an Ollama model without tool support) raises
  :class:`~.errors.ToolSupportMissing`: the agent then continues without native function calling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import EndpointUnreachable, PlannerError, ToolSupportMissing

__all__ = ["ChatClient", "Reply"]

MAX_BACKOFF = 8.0
MAX_RETRY_AFTER = 30.0


@dataclass
class Reply:
    """One assistant reply.

    Attributes:
        content: its text (None when it only calls tools).
        tool_calls: ``(id, name, arguments JSON string)`` of its native tool calls.
        finish_reason: as the server said (``stop``, ``tool_calls``, ``length``, ...).
        usage: ``prompt_tokens``, ``completion_tokens``, ``total_tokens`` (empty when the server gives none).
        attempts: HTTP attempts it took.
        seconds: wall time of those attempts (back-off included).
        errors: the errors of the failed attempts (one line each).
    """

    content: str | None
    tool_calls: list[tuple[str, str, str]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    attempts: int = 1
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def assistant_message(self) -> dict[str, Any]:
        """The reply as a message of the conversation (as it is sent back to the server)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [{"id": call_id, "type": "function",
                                      "function": {"name": name, "arguments": arguments}}
                                     for call_id, name, arguments in self.tool_calls]
        return message


def _one_line(text: Any, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _status_message(err: Any) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return _one_line(inner["message"])
        if isinstance(inner, str):
            return _one_line(inner)
        if isinstance(body.get("detail"), str):  # FastAPI servers: {"detail": "Not Found"}
            return _one_line(body["detail"])
    return _one_line(getattr(err, "message", None) or err)


def _about_tools(message: str, model: str) -> bool:
    """Whether an error message refuses the request's tools (function calling), not e.g. a model whose name holds
    'tool' (``llama3-groq-tool-use does not exist``)."""
    text = message.lower().replace(model.lower(), "")
    if any(word in text for word in ("context", "too long", "reduce the length", "maximum length")):
        return False  # a request too long for the model ("... in the functions. Please reduce the length ...")
    return any(word in text for word in ("tool", "function"))


def _retry_after(err: Any) -> float | None:
    response = getattr(err, "response", None)
    value = None if response is None else response.headers.get("retry-after")
    try:
        return min(float(value), MAX_RETRY_AFTER) if value is not None else None
    except ValueError:
        return None


class ChatClient:
    """Chat completions against one endpoint and model.

    Args:
        url: the server's OpenAI-compatible base URL, e.g. ``http://localhost:8000/v1``.
        model: the model name the server serves.
        api_key: the key, or None (a placeholder is sent).
        timeout: seconds per HTTP attempt.
        retries: further attempts after a retryable failure.
        backoff: the first back-off delay in seconds (doubling).
        max_reply_tokens: ``max_tokens`` of each request.
        temperature: sent when given (some models accept only their default).
        sleep: the back-off's sleep function.
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, *, timeout: float = 120.0,
                 retries: int = 2, backoff: float = 0.5, max_reply_tokens: int = 2048,
                 temperature: float | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        import openai

        if not url:
            raise PlannerError("no planner endpoint: give --llm-url (an OpenAI-compatible base URL, e.g. "
                               "http://host:8000/v1)")
        if not model:
            raise PlannerError(f"no model name for the planner at {url}: give --llm-model (the server lists its "
                               f"models at {url.rstrip('/')}/models)")
        if timeout <= 0 or retries < 0 or backoff < 0 or max_reply_tokens < 1:
            raise PlannerError("the planner's timeout and max reply tokens must be > 0, its retries and back-off "
                               ">= 0")
        self._openai = openai
        self.url, self.model = url, model
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.max_reply_tokens = int(max_reply_tokens)
        self.temperature = temperature
        self._sleep = sleep
        self.api_key_given = bool(api_key)
        self.client = openai.OpenAI(base_url=url, api_key=api_key or "no-key-given", timeout=self.timeout,
                                    max_retries=0)
        self.answered = 0  # replies received so far

    def complete(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                 max_tokens: int | None = None) -> Reply:
        """Send one request (with back-off retries) and return the reply."""
        openai = self._openai
        request: dict[str, Any] = {"model": self.model, "messages": messages,
                                   "max_tokens": min(max_tokens or self.max_reply_tokens, self.max_reply_tokens)}
        if tools:
            request["tools"] = tools
        if self.temperature is not None:
            request["temperature"] = self.temperature
        start = time.perf_counter()
        errors: list[str] = []
        attempts = self.retries + 1
        for attempt in range(attempts):
            delay = min(self.backoff * 2 ** attempt, MAX_BACKOFF)
            try:
                response = self.client.chat.completions.create(**request)
            except openai.APITimeoutError:
                errors.append(f"timed out after {self.timeout:g} s")
                kind = "timeout"
            except openai.APIConnectionError as err:
                cause = err.__cause__ or err
                errors.append(f"connection failed: {_one_line(cause)}")
                kind = "connection"
            except openai.APIStatusError as err:
                status, message = err.status_code, _status_message(err)
                errors.append(f"HTTP {status}: {message}")
                if status in (408, 409, 429) or status >= 500:
                    kind = "status"
                    delay = _retry_after(err) or delay
                elif tools and status in (400, 404, 422) and _about_tools(message, self.model):
                    raise ToolSupportMissing(f"the planner at {self.url} refused the tools (HTTP {status}: "
                                             f"{message})") from None
                else:
                    raise PlannerError(f"the planner at {self.url} answered HTTP {status}: {message}"
                                       f"{self._status_hint(status, message)}") from None
            except openai.OpenAIError as err:
                raise PlannerError(f"the planner at {self.url} failed: {_one_line(err)}") from None
            except ValueError as err:  # a body that is not JSON (a proxy's page, a half-written reply): retried
                errors.append(f"a reply that is not JSON ({_one_line(err)})")
                kind = "malformed"
            else:
                reply = self._reply(response)
                reply.attempts, reply.errors = attempt + 1, errors
                reply.seconds = time.perf_counter() - start
                self.answered += 1
                return reply
            if attempt + 1 < attempts:
                self._sleep(delay)
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        if kind == "timeout":
            raise PlannerError(f"no answer from the planner at {self.url} within {self.timeout:g} s ({tries}); "
                               "raise --llm-timeout or check the server")
        if kind == "connection":
            error = EndpointUnreachable if self.answered == 0 else PlannerError
            raise error(f"cannot reach the planner at {self.url} ({tries}; {errors[-1]})")
        hint = ("; check that --llm-url is the OpenAI-compatible base URL (e.g. http://host:8000/v1)"
                if kind == "malformed" else "")
        raise PlannerError(f"the planner at {self.url} failed ({tries}; last: {errors[-1]}){hint}")

    def _status_hint(self, status: int, message: str) -> str:
        """What to change for an HTTP error the client cannot retry."""
        text = message.lower()
        no_key = "" if self.api_key_given else "; no key was sent: if the server needs one, name the variable " \
                                                 "holding it with --api-key-env"
        if status == 401:
            return "; check the key (--api-key-env)" if self.api_key_given else no_key
        if status == 403:
            return "; check the key's permissions" + no_key
        if status == 404:
            return ("; check --llm-url (the OpenAI-compatible base URL, e.g. http://host:8000/v1, whose "
                    "/chat/completions answers) and --llm-model (GET <url>/models lists what the server serves)")
        if status == 400 and "max_tokens" in text.replace(" ", "_"):
            return "; lower --max-reply-tokens to what the server allows"
        if status == 400 and "model" in text and any(w in text for w in ("invalid", "not found", "does not exist",
                                                                           "unknown")):
            return "; check --llm-model (GET <url>/models lists what the server serves)" + no_key
        return no_key if status == 400 else ""

    def _reply(self, response: Any) -> Reply:
        choices = getattr(response, "choices", None) or []
        if not choices or getattr(choices[0], "message", None) is None:
            error = getattr(response, "error", None) or (getattr(response, "model_extra", None) or {}).get("error")
            if error:
                message = error.get("message", error) if isinstance(error, dict) else error
                raise PlannerError(f"the planner at {self.url} answered with an error: {_one_line(message)}")
            if hasattr(response, "model_dump"):  # a parsed ChatCompletion without choices: what it did hold
                fields = response.model_dump(exclude_none=True)
                text = _one_line(fields) if fields else ""
            else:  # the body as text (an HTML page, ...)
                text = _one_line(response) if response else ""
            raise PlannerError(f"the planner at {self.url} sent no chat completion "
                               f"({'an empty reply' if not text.strip() else 'got: ' + text[:200]}); check that "
                               "--llm-url is the OpenAI-compatible base URL (e.g. http://host:8000/v1)")
        choice = choices[0]
        message = choice.message
        calls = []
        for index, call in enumerate(getattr(message, "tool_calls", None) or []):
            function = getattr(call, "function", None)
            name = getattr(function, "name", None)
            arguments = getattr(function, "arguments", None)
            if arguments is not None and not isinstance(arguments, str):  # a server sending an object
                import json

                arguments = json.dumps(arguments)
            calls.append((getattr(call, "id", None) or f"call_{self.answered}_{index}", name, arguments or ""))
        usage = {}
        if getattr(response, "usage", None) is not None:
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                value = getattr(response.usage, key, None)
                if isinstance(value, int):
                    usage[key] = value
            if "total_tokens" not in usage and {"prompt_tokens", "completion_tokens"} <= set(usage):
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        content = getattr(message, "content", None)
        return Reply(content if isinstance(content, str) else None, calls, getattr(choice, "finish_reason", None),
                     usage)
