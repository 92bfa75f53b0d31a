"""The texts the planner reads: the system prompt (with or without native function calling), the first user
message, the per-round notes and the corrections."""

from __future__ import annotations

from typing import Sequence

from .tools import tools_as_text

__all__ = ["first_message", "round_note", "system_prompt", "TEXT_MODE_REMINDER"]

_SYSTEM = """\
You plan segmentations of medical images. Your tool is MedSAM3, a text-prompted medical segmentation model: \
given a short noun phrase (e.g. "polyp", "breast tumor", "liver", "optic disc") it returns one mask of what \
matches the phrase, with a confidence score in [0, 1].

{subject}

Work in rounds:
1. Call segment_phrase with a short noun phrase: 1-4 words naming the structure only (no location, no verb, \
no "the"). Each call adds one numbered mark; you then see the image with every mark so far drawn in its colour \
with its number, and each mark's score, size, position and number of separate parts.
2. Inspect the marks. examine_each_mask shows marks one by one, zoomed in, without and with the mark.
3. When marks answer the request, call select_masks_and_return with their numbers (final_answer_masks); the \
answer is their union. Choose only marks whose region is what was asked for, where it was asked for.
4. If the marks are wrong or missing, try another phrase: a synonym, a more specific or a more general term. A \
phrase already tried is refused. You have at most {max_rounds} segment_phrase calls in all.
5. If nothing in the image matches the request, call report_no_mask with a short reason.

Call exactly one tool per reply."""

_SUBJECT_IMAGE = "You see one 2D image (its pixels as given; x runs left to right, y top to bottom)."
_SUBJECT_VOLUME = ("The input is a 3D volume. You see a few representative {plane} slices side by side, in the "
                   "radiological convention ({convention} of each slice). The phrase you choose is segmented through "
                   "the whole volume (every slice, with tracking between slices); the slices shown follow the marks.")

_TEXT_MODE = """

This server cannot pass tool calls, so call a tool by replying with exactly one JSON object and nothing else:
{{"tool": "<tool name>", "arguments": {{...}}}}
The tools:
{tools}"""

TEXT_MODE_REMINDER = ('reply with one JSON object and nothing else, e.g. {"tool": "segment_phrase", "arguments": '
                      '{"text_prompt": "polyp"}}')


def system_prompt(max_rounds: int, is_volume: bool, text_mode: bool, plane: str = "axial") -> str:
    """The planner's system prompt; ``plane``: the anatomical plane of a volume's slices (``View.plane``)."""
    from ..metrics.plots import VIEW_CONVENTIONS

    subject = (_SUBJECT_VOLUME.format(plane=plane, convention=VIEW_CONVENTIONS[plane]) if is_volume
               else _SUBJECT_IMAGE)
    text = _SYSTEM.format(subject=subject, max_rounds=max_rounds)
    if text_mode:
        text += _TEXT_MODE.format(tools=tools_as_text())
    return text


def first_message(request: str, is_volume: bool, shape: Sequence[int]) -> str:
    size = " x ".join(str(s) for s in shape)
    what = f"a volume of {size} voxels (x, y, z)" if is_volume else f"an image of {shape[1]} x {shape[0]} pixels"
    return (f"Request: {request}\n\nThe input is {what}; it is shown below without marks. Start with segment_phrase.")


def round_note(round_number: int, max_rounds: int, descriptions: Sequence[str], tried: Sequence[str]) -> str:
    left = max_rounds - round_number
    lines = [f"Round {round_number} of {max_rounds}. The image with every mark so far:", *descriptions,
             f"Phrases tried: {', '.join(repr(p) for p in tried)}."]
    if left > 0:
        lines.append(f"{left} segment_phrase call{'s' if left != 1 else ''} left. Select the marks that answer the "
                     "request, examine them, try another phrase, or report no mask.")
    else:
        lines.append("That was the last segment_phrase call: now call select_masks_and_return or report_no_mask.")
    return "\n".join(lines)
