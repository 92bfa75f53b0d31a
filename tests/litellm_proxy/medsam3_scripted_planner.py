"""A LiteLLM proxy pre-call hook (loaded by the proxy in its own environment, never by the tests' python).

Every request is appended, as the proxy received it (pictures shortened to their data-URL header), to the JSON-lines
file named by ``MEDSAM3_PLANNER_LOG``. For the ``scripted*`` models the hook then sets LiteLLM's mock reply from the
conversation: with tools offered, a ``segment_phrase("polyp")`` tool call and, once a tool result is back,
``select_masks_and_return([1])``; without tools (the agent's text protocol) the same two steps as JSON text. The
``ctx-functions`` model raises OpenAI's context-length error, whose wording names "functions".
"""

from __future__ import annotations

import json
import os

import litellm
from litellm.integrations.custom_logger import CustomLogger

RECORDED = ("model", "messages", "tools", "tool_choice", "max_tokens", "temperature")


def _shorten(value):
    """``value`` with each picture's data URL cut to its header (the log stays small)."""
    if isinstance(value, dict):
        return {key: _shorten(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shorten(item) for item in value]
    if isinstance(value, str) and value.startswith("data:image/"):
        return value.split(",", 1)[0] + ",..."
    return value


def _tool_call(name: str, arguments: dict, index: int) -> list[dict]:
    return [{"id": f"call_{index}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(arguments)}}]


STEPS = (("segment_phrase", {"text_prompt": "polyp"}), ("select_masks_and_return", {"final_answer_masks": [1]}))


class ScriptedPlanner(CustomLogger):
    async def async_pre_call_hook(self, user_api_key_dict, cache, data, call_type):
        with open(os.environ["MEDSAM3_PLANNER_LOG"], "a", encoding="utf-8") as log:
            log.write(json.dumps(_shorten({key: data[key] for key in RECORDED if key in data}), default=str) + "\n")
        model = data.get("model", "")
        messages = data.get("messages") or []
        if model == "ctx-functions":
            raise litellm.ContextWindowExceededError(
                message="This model's maximum context length is 128000 tokens. However, your messages resulted in "
                        "130500 tokens (129000 in the messages, 1500 in the functions). Please reduce the length of "
                        "the messages or functions.", model="gpt-4o", llm_provider="openai")
        if model.startswith("scripted"):
            step = min(sum(message.get("role") == "assistant" for message in messages), len(STEPS) - 1)
            name, arguments = STEPS[step]
            if data.get("tools"):
                data["mock_tool_calls"] = _tool_call(name, arguments, step + 1)
                data["mock_response"] = ""
            else:
                data["mock_response"] = json.dumps({"tool": name, "arguments": arguments})
        return data


planner = ScriptedPlanner()
