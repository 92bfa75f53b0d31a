"""The MLLM planner's loop (MedSAM3 §3.3 / Fig. 3; Meta's SAM3 Agent): the planner calls MedSAM3 with short
noun phrases, looks at the masks drawn as numbered marks, and refines until it selects marks or reports that
nothing matches.

One *round* is one ``segment_phrase`` call: the phrase is segmented (a new mark), the tool result describes the
mark, and a user message shows the image with every mark so far (the legend gives each mark's phrase and score).
``examine_each_mask`` shows marks one by one, zoomed. ``select_masks_and_return`` and ``report_no_mask`` end the
run. Only the input's picture (first message) and the newest picture travel with each request; older pictures are
replaced by a line of text, so the requests stay small.

Robustness (every limit ends the run with one clear line and nothing written):

* an unknown tool, arguments that are not JSON or not what the tool takes, a mark number that does not exist, a
  reply without any call, a ``segment_phrase`` past the round limit: a correction goes back to the planner
  (``max_corrections`` in all);
* a phrase already tried is refused with the list of phrases tried;
* one call per reply: further calls in the same reply are answered "not executed";
* at most ``max_calls`` requests and ``max_tokens`` tokens (as the server counts them) in all;
* HTTP errors and time-outs: :class:`~.llm.ChatClient` (retries with back-off, then one line);
* a server that refuses tools: the loop continues in text mode, where a call is one JSON object in the reply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from .concepts import phrase_key
from .decision import Decision
from .errors import AgentError, PlannerError, ToolSupportMissing
from .marks import Mark
from .prompts import TEXT_MODE_REMINDER, first_message, round_note, system_prompt
from .render import data_url
from .tools import TOOL_NAMES, ToolCall, ToolCallError, parse_call, parse_text_call, tool_schemas

__all__ = ["LoopSettings", "PlannerLoop"]

_OMITTED = "[an earlier picture, omitted: see the newest one]"


@dataclass
class LoopSettings:
    """Limits and modes of the loop.

    Attributes:
        max_rounds: ``segment_phrase`` calls (the paper's three rounds).
        max_corrections: corrective messages before the run fails.
        max_calls: requests to the planner; None = 3 x max_rounds + max_corrections + 2.
        max_tokens: total tokens (prompt + completion, as reported by the server).
        tool_mode: ``auto`` (native tools; text mode if the server refuses them), ``tools`` or ``text``.
    """

    max_rounds: int = 3
    max_corrections: int = 4
    max_calls: int | None = None
    max_tokens: int = 200_000
    tool_mode: str = "auto"

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise AgentError(f"--max-rounds must be >= 1, got {self.max_rounds}")
        if self.max_corrections < 0:
            raise AgentError(f"--max-corrections must be >= 0, got {self.max_corrections}")
        if self.max_tokens < 1:
            raise AgentError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.tool_mode not in ("auto", "tools", "text"):
            raise AgentError(f"unknown tool mode {self.tool_mode!r}: auto, tools or text")
        if self.max_calls is None:
            self.max_calls = 3 * self.max_rounds + self.max_corrections + 2


@dataclass
class _Outcome:
    text: str
    pictures: list[tuple[str, Any]] | None = None  # (caption, PIL image) shown after the result
    decision: Decision | None = None
    error: bool = False


class PlannerLoop:
    """Runs the conversation for one request.

    Args:
        client: a :class:`~.llm.ChatClient`.
        segmenter: a :class:`~.segmenter.PhraseSegmenter` bound to the input.
        view: the input's :class:`~.render.View`.
        request: the user's request.
        settings: :class:`LoopSettings`.
        trace: the run's :class:`~.trace.Trace`.
        log: where progress lines go (stderr in the CLI).
    """

    def __init__(self, client: Any, segmenter: Any, view: Any, request: str, settings: LoopSettings, trace: Any,
                 log: Callable[[str], None] = lambda line: None) -> None:
        self.client, self.segmenter, self.view = client, segmenter, view
        self.request, self.settings, self.trace, self.log = request, settings, trace, log
        self.text_mode = settings.tool_mode == "text"
        self.marks: list[Mark] = []
        self.tried: dict[str, int] = {}  # phrase key -> mark number
        self.rounds = 0
        self.corrections = 0
        self.calls = 0
        self.tokens = 0
        self.messages: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------ messages
    def _system(self) -> dict[str, Any]:
        return {"role": "system",
                "content": system_prompt(self.settings.max_rounds, self.view.is_volume, self.text_mode,
                                         self.view.plane)}

    @staticmethod
    def _user(text: str, pictures: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
        if not pictures:
            return {"role": "user", "content": text}
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        for caption, picture in pictures:
            if caption:
                content.append({"type": "text", "text": caption})
            content.append({"type": "image_url", "image_url": {"url": data_url(picture)}})
        return {"role": "user", "content": content}

    def _outgoing(self) -> list[dict[str, Any]]:
        """The messages to send: pictures only in the first user message and in the newest message that has any."""
        with_pictures = [i for i, m in enumerate(self.messages) if isinstance(m.get("content"), list)]
        keep = {with_pictures[0], with_pictures[-1]} if with_pictures else set()
        out = []
        for i, message in enumerate(self.messages):
            if i in with_pictures and i not in keep:
                parts = [p if p.get("type") != "image_url" else {"type": "text", "text": _OMITTED}
                         for p in message["content"]]
                message = {**message, "content": parts}
            out.append(message)
        return out

    # ------------------------------------------------------------------------------------------ the loop
    def _complete(self, tools: Any, max_tokens: int) -> Any:
        """One planner request; one that fails is recorded in the trace's ``llm_calls`` with its error."""
        try:
            return self.client.complete(self._outgoing(), tools=tools, max_tokens=max_tokens)
        except ToolSupportMissing as err:
            self.trace.llm_call(tools=True, error=str(err), mode="tools")
            raise
        except PlannerError as err:
            self.trace.llm_call(mode="text" if tools is None else "tools", messages=len(self.messages),
                                error=str(err))
            raise

    def run(self) -> Decision:
        """Converse until the planner decides; raises AgentError / PlannerError on failure."""
        start = time.perf_counter()
        self.messages = [self._system(),
                         self._user(first_message(self.request, self.view.is_volume, self.view.shape),
                                    [("", self.view.picture([]))])]
        self.trace.data["planner"]["tool_mode"] = None  # (set by the first answered call: agent.md, the trace)
        try:
            while True:
                reply = self._ask()
                self.messages.append(reply.assistant_message())
                decision = self._handle(reply)
                if decision is not None:
                    decision.details.update(rounds=self.rounds, corrections=self.corrections, llm_calls=self.calls,
                                            tried_phrases=[m.phrase for m in self.marks])
                    return decision
        finally:
            self.trace.set_messages(self.messages)
            self.trace.time("planner", time.perf_counter() - start)

    def _ask(self) -> Any:
        if self.calls >= self.settings.max_calls:
            raise AgentError(f"the planner did not finish within {self.settings.max_calls} requests "
                             f"({self.rounds} rounds, {self.corrections} corrections); raise --max-rounds or try "
                             "another model")
        remaining = self.settings.max_tokens - self.tokens
        if remaining <= 0:
            raise AgentError(f"the token budget is spent ({self.tokens} of --max-tokens {self.settings.max_tokens}) "
                             "before the planner finished; raise --max-tokens, or lower --max-rounds")
        self.calls += 1
        tools = None if self.text_mode else tool_schemas()
        try:
            reply = self._complete(tools, remaining)
        except ToolSupportMissing as err:
            if self.settings.tool_mode == "tools":
                raise AgentError(f"{err}; enable function calling on the server (vLLM: --enable-auto-tool-choice "
                                 "--tool-call-parser ...) or use --tool-mode text") from None
            self.log(f"note: {err}; continuing without native tool calls (text mode)")
            self.trace.note(f"text mode: {err}")
            self.text_mode = True
            self.messages[0] = self._system()
            reply = self._complete(None, remaining)
        self.trace.data["planner"]["tool_mode"] = "text" if self.text_mode else "tools"
        used = reply.usage.get("total_tokens", 0)
        self.tokens += used
        self.trace.llm_call(mode="text" if self.text_mode else "tools", messages=len(self.messages),
                            pictures=sum(1 for m in self._outgoing() if isinstance(m.get("content"), list)
                                         for p in m["content"] if p.get("type") == "image_url"),
                            attempts=reply.attempts, retried_errors=reply.errors, finish_reason=reply.finish_reason,
                            usage=reply.usage, seconds=round(reply.seconds, 4),
                            tool_calls=[{"name": n, "arguments": a} for _, n, a in reply.tool_calls],
                            content=reply.content)
        if self.tokens > self.settings.max_tokens:
            raise AgentError(f"the token budget is spent ({self.tokens} of --max-tokens {self.settings.max_tokens}) "
                             "before the planner finished; raise --max-tokens, or lower --max-rounds")
        return reply

    def _handle(self, reply: Any) -> Decision | None:
        native = [(call_id, name, raw) for call_id, name, raw in reply.tool_calls]
        if native:
            first, rest = native[0], native[1:]
            try:
                call = parse_call(first[1], first[2], call_id=first[0])
            except ToolCallError as err:
                outcome = self._correction(str(err), first[1], first[2])
                call = ToolCall(str(first[1]), {}, first[2] or "", first[0])
            else:
                outcome = self._execute(call)
            self._respond(call, outcome, [c[0] for c in rest])
        else:
            written = parse_text_call(reply.content)
            if written is None:
                hint = TEXT_MODE_REMINDER if self.text_mode else "call one of the tools"
                why = "the reply was cut off (finish_reason length)" if reply.finish_reason == "length" else \
                    "the reply called no tool"
                outcome = self._correction(f"{why}: {hint} ({', '.join(TOOL_NAMES)})", None, reply.content)
                call = ToolCall("", from_text=True)
            else:
                try:
                    call = parse_call(written[0], written[1], from_text=True)
                except ToolCallError as err:
                    outcome = self._correction(str(err), written[0], written[1])
                    call = ToolCall(str(written[0]), from_text=True)
                else:
                    outcome = self._execute(call)
            self._respond(call, outcome, [])
        if outcome.error:
            self.corrections += 1
            if self.corrections > self.settings.max_corrections:
                hint = ("; its replies were cut off: raise --max-reply-tokens (the server may cap it too)"
                        if reply.finish_reason == "length" else "")
                raise PlannerError(f"the planner made {self.corrections} unusable calls (limit "
                                 f"{self.settings.max_corrections}); last: {outcome.text}{hint}")
        return outcome.decision

    def _respond(self, call: ToolCall, outcome: _Outcome, skipped_ids: list[str]) -> None:
        prefix = "error: " if outcome.error else ""
        if call.call_id is not None and not call.from_text:
            self.messages.append({"role": "tool", "tool_call_id": call.call_id, "content": prefix + outcome.text})
            for call_id in skipped_ids:
                self.messages.append({"role": "tool", "tool_call_id": call_id,
                                      "content": "not executed: call one tool per reply"})
            if outcome.pictures:
                self.messages.append(self._user("The pictures for the result above.", outcome.pictures))
        elif outcome.decision is None:
            label = f"Result of {call.name}: " if call.name in TOOL_NAMES else ""
            self.messages.append(self._user(f"{label}{prefix}{outcome.text}", outcome.pictures))

    def _correction(self, text: str, name: Any, raw: Any) -> _Outcome:
        self.log(f"planner: correction: {text}")
        self.trace.tool_call(name=name, arguments=raw if isinstance(raw, str) or raw is None else str(raw), ok=False,
                             result=text)
        return _Outcome(text, error=True)

    # ------------------------------------------------------------------------------------------ tools
    def _execute(self, call: ToolCall) -> _Outcome:
        try:
            outcome = getattr(self, f"_tool_{call.name}")(**call.arguments)
        except ToolCallError as err:
            return self._correction(str(err), call.name, call.raw)
        self.trace.tool_call(name=call.name, arguments=call.raw, parsed=call.arguments, ok=True,
                             from_text=call.from_text, result=outcome.text)
        return outcome

    def _numbers(self, numbers: list[int], tool: str) -> list[Mark]:
        if not self.marks:
            raise ToolCallError(f"{tool}: there are no marks yet; call segment_phrase first")
        unknown = [n for n in numbers if not 1 <= n <= len(self.marks)]
        if unknown:
            which = "the only mark is 1" if len(self.marks) == 1 else f"the marks are 1-{len(self.marks)}"
            raise ToolCallError(f"{tool}: no mark {', '.join(map(str, unknown))}; {which}: "
                                + "; ".join(f"{m.number} = {m.phrase!r}" for m in self.marks))
        chosen: list[Mark] = []
        for n in numbers:
            if self.marks[n - 1] not in chosen:
                chosen.append(self.marks[n - 1])
        return chosen

    def _tool_segment_phrase(self, text_prompt: str) -> _Outcome:
        key = phrase_key(text_prompt)
        tried = ", ".join(repr(m.phrase) for m in self.marks) or "none"
        if key in self.tried:
            raise ToolCallError(f"{text_prompt!r} was already tried (mark {self.tried[key]}); phrases tried: {tried}. "
                                "Use a different phrase, or select marks, or report no mask")
        if self.rounds >= self.settings.max_rounds:
            raise ToolCallError(f"no segment_phrase calls left (all {self.settings.max_rounds} used; phrases tried: "
                                f"{tried}); call select_masks_and_return or report_no_mask")
        try:
            phrase = self.segmenter.check_phrase(text_prompt)
        except ValueError as err:
            raise ToolCallError(f"segment_phrase {text_prompt!r}: {err}; use a shorter noun phrase") from None
        self.rounds += 1
        self.log(f"planner: round {self.rounds}: segment_phrase {phrase!r}")
        start = time.perf_counter()
        mask, score, prediction = self.segmenter.segment(phrase)
        seconds = time.perf_counter() - start
        self.trace.time("segmentation", seconds)
        mark = Mark(len(self.marks) + 1, phrase, self.rounds, mask, score, prediction, self.view.is_volume)
        self.marks.append(mark)
        self.tried[key] = mark.number
        self.trace.round(round=self.rounds, phrase=phrase, mark=mark.facts(), seconds=round(seconds, 4),
                         marks=[m.number for m in self.marks])
        note = round_note(self.rounds, self.settings.max_rounds, [m.describe(self.view.plane) for m in self.marks],
                          [m.phrase for m in self.marks])
        picture = self.view.picture(self.marks, header=f"round {self.rounds}: marks 1-{len(self.marks)}"
                                    if not self.view.is_volume else None)
        described = mark.describe(self.view.plane)
        return _Outcome(f"{described}. " + ("The picture follows." if not self.text_mode else "\n" + note),
                        [(note if not self.text_mode else "", picture)])

    def _tool_examine_each_mask(self, masks: list[int] | None) -> _Outcome:
        chosen = self._numbers(masks, "examine_each_mask") if masks else [m for m in self.marks if not m.empty]
        if not chosen:
            raise ToolCallError("examine_each_mask: every mark is empty; try another phrase or report no mask")
        pictures = [(m.describe(self.view.plane), self.view.examine(m)) for m in chosen]
        return _Outcome(f"examining mark{'s' if len(chosen) > 1 else ''} "
                        f"{', '.join(str(m.number) for m in chosen)}: each shown without and with the mark.", pictures)

    def _tool_select_masks_and_return(self, final_answer_masks: list[int]) -> _Outcome:
        chosen = self._numbers(final_answer_masks, "select_masks_and_return")
        self.log(f"planner: selected mark{'s' if len(chosen) > 1 else ''} "
                 f"{', '.join(f'{m.number} ({m.phrase!r})' for m in chosen)}")
        return _Outcome("selected " + ", ".join(str(m.number) for m in chosen), decision=Decision("selected", chosen))

    def _tool_report_no_mask(self, reason: str | None) -> _Outcome:
        self.log(f"planner: reports no matching region{': ' + reason if reason else ''}")
        return _Outcome("no mask", decision=Decision("no_mask", reason=reason or "the planner reported no match"))
