"""The MedSAM3 agent (MedSAM3 §3.3, Fig. 3; Meta's "SAM3 Agent"): a planner turns a free-text request into
MedSAM3 calls with short noun phrases, inspects the masks drawn as numbered marks, refines over up to three rounds
and selects the marks that answer the request, or reports that nothing matches.

Modules, one role each:

* :mod:`.runner` -- one run end to end (``run_agent``, ``AgentSettings``): planner choice and fallback, outputs.
* :mod:`.llm` -- the OpenAI-compatible chat-completions endpoint (``openai`` client; retries, back-off, errors).
* :mod:`.loop` -- the MLLM planner's conversation: rounds, corrections, limits, the tools' execution.
* :mod:`.tools` -- the tool names and schemas (``segment_phrase``, ``examine_each_mask``,
  ``select_masks_and_return``, ``report_no_mask``) and the parsing of native and text-written calls.
* :mod:`.prompts` -- the texts the planner reads.
* :mod:`.segmenter` -- phrases -> masks through ``medsam3 segment``'s predictor.
* :mod:`.marks` -- numbered masks and their descriptions; :mod:`.render` -- the pictures with numbered marks.
* :mod:`.concepts` -- the offline planner's catalogue lookup; :mod:`.fusion` -- its confidence fusion;
  :mod:`.offline` -- the offline planner (``--llm none``).
* :mod:`.decision` -- a planner's answer; :mod:`.output` -- the files; :mod:`.trace` -- the JSON trace;
  :mod:`.errors` -- the errors (all ``ValueError``: one line, exit 2 on the command line).

Documentation: ``bundles/medsam3/docs/agent.md``. Importing this package is light (no torch); the modules import
what they need when used.
"""

from __future__ import annotations

from ..lazy import lazy_exports

__all__ = ["AgentError", "AgentSettings", "LoopSettings", "PlannerError", "SegmenterSettings", "resolve_request",
           "run_agent"]

_WHERE = {"AgentError": "errors", "PlannerError": "errors", "AgentSettings": "runner", "run_agent": "runner",
          "LoopSettings": "loop", "SegmenterSettings": "segmenter", "resolve_request": "concepts"}

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
