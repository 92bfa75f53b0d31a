"""``medsam3 agent INPUT --request TEXT --out PATH [...]``: the MedSAM3 agent (MedSAM3 §3.3). A planner turns the
request into MedSAM3 calls with short noun phrases, looks at the masks drawn as numbered marks and refines over
up to ``--max-rounds`` rounds, then selects marks (their union is written) or reports that nothing matches (an
empty mask is written). Documentation: ``bundles/medsam3/docs/agent.md``.

This module imports only the standard library: ``medsam3 --help`` builds its parser; the agent (torch, the
``openai`` client, ...) is imported by :func:`run`.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..protocol_registry import PROTOCOLS
from .arguments import (INPUT_HELP, add_ct_window_option, add_detector_chunk_option, add_model_options,
                        add_score_threshold_option, checked_threshold_option, ct_window_for, pixels,
                        random_weights_notes)

__all__ = ["add_parser", "add_planner_options", "run"]

_EPILOG = """\
Planners:
  --llm-url URL --llm-model NAME   any OpenAI-compatible chat-completions server (vLLM, SGLang, Ollama, LM Studio,
                                   OpenAI, Gemini's OpenAI-compatible endpoint); images go as base64 data URLs, the
                                   tools (segment_phrase, examine_each_mask, select_masks_and_return,
                                   report_no_mask) as function calls, or as JSON in the reply text when the server
                                   has no tool support. Keys only from the environment: --api-key-env VAR.
  --llm none                       the offline planner: the request's concept through the catalogue (canonical
                                   phrase, synonyms, MedSAM3's phrase table), all phrasings in one batch, fused by
                                   confidence. The default when no endpoint is configured, and the fallback
                                   (announced) when the endpoint cannot be reached.
Outputs (as `medsam3 segment` writes one prompt): 2D -> 0/255 mask picture; volume -> 0/1 NIfTI with the input's
affine; <out>.json sidecar; <out>.trace.json (messages without image data, tool calls, marks per round, timings).
A failed run writes nothing (its trace only when --trace names a file). No match: an empty mask, status no_mask.
Examples:
  medsam3 agent polyp.jpg --request "segment the polyp" --out mask.png --llm none
  medsam3 agent us.png --request "segment the lesion in the upper left quadrant" --out mask.png \\
      --llm-url http://localhost:8000/v1 --llm-model Qwen/Qwen2.5-VL-7B-Instruct --overlay overlay.png
"""


def add_planner_options(group: argparse._ActionsContainer) -> None:
    """``--llm``, ``--llm-url``, ``--llm-model`` and ``--api-key-env`` (the agent's planner), on ``group`` (a parser
    or argument group); shared by ``medsam3 agent``, ``medsam3 evaluate --agent`` and ``medsam3 reproduce --agent``."""
    group.add_argument("--llm", choices=("auto", "openai", "none"), default="auto",
                       help="auto (default): the MLLM when --llm-url is set, else the offline planner; openai: an "
                            "OpenAI-compatible endpoint; none: the offline planner")
    group.add_argument("--llm-url", default=os.environ.get("MEDSAM3_LLM_URL") or None, metavar="URL",
                       help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1 (env MEDSAM3_LLM_URL)")
    group.add_argument("--llm-model", default=os.environ.get("MEDSAM3_LLM_MODEL") or None, metavar="NAME",
                       help="the model name the server serves (env MEDSAM3_LLM_MODEL)")
    group.add_argument("--api-key-env", default=None, metavar="VAR",
                       help="name of the environment variable holding the API key (default: no key sent)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "agent",
        help="segment what a free-text request asks for: an MLLM (or the offline planner) drives MedSAM3",
        description="The MedSAM3 agent: a planner calls MedSAM3 with short noun phrases, inspects the masks as "
                    "numbered marks and refines until it selects marks or reports that nothing matches.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT",
                        help=INPUT_HELP)
    parser.add_argument("--request", required=True, metavar="TEXT",
                        help="what to segment, in words, e.g. 'segment the lesion in the upper left quadrant'")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="mask to write: .png (2D) or .nii.gz (volumes); <PATH>.json and <PATH>.trace.json beside")
    parser.add_argument("--overlay", default=None, metavar="PNG", help="also write an overlay picture of the answer")
    parser.add_argument("--trace", default=None, metavar="JSON",
                        help="where the trace goes (default <out>.trace.json); given, a failed run writes it too")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")

    planner = parser.add_argument_group("planner")
    add_planner_options(planner)
    planner.add_argument("--max-rounds", type=int, default=3, metavar="N",
                         help="segment_phrase calls the planner may make (3, as in the paper)")
    planner.add_argument("--max-tokens", type=int, default=200_000, metavar="N",
                         help="token budget of the whole run, as the server counts them (200000)")
    planner.add_argument("--max-reply-tokens", type=int, default=2048, metavar="N",
                         help="max_tokens per request (2048; lower it to what the server allows)")
    planner.add_argument("--max-corrections", type=int, default=4, metavar="N",
                         help="unusable calls (bad JSON, unknown tool, repeated phrase, ...) before failing (4)")
    planner.add_argument("--llm-timeout", type=float, default=120.0, metavar="S", help="seconds per HTTP attempt (120)")
    planner.add_argument("--llm-retries", type=int, default=2, metavar="N",
                         help="retries after a time-out, connection error, 429 or 5xx, with back-off (2)")
    planner.add_argument("--tool-mode", choices=("auto", "tools", "text"), default="auto",
                         help="auto: native function calling, JSON in the text if the server refuses tools")
    planner.add_argument("--temperature", type=float, default=None, help="sampling temperature (server default)")
    planner.add_argument("--view-size", type=int, default=768, metavar="PX",
                         help="longest side of the image in the pictures sent to the planner (768); a volume's "
                              "montage and the examine views lay several such panels side by side")
    planner.add_argument("--no-fallback", action="store_true",
                         help="fail instead of falling back to the offline planner when the endpoint is unreachable")

    offline = parser.add_argument_group("offline planner (--llm none)")
    offline.add_argument("--max-phrasings", type=int, default=6, metavar="N",
                         help="phrasings of the concept run in the batch (6)")
    offline.add_argument("--keep-ratio", type=float, default=0.5, metavar="F",
                         help="phrasings scoring >= F x the best score add their pixels (0.5)")
    offline.add_argument("--min-score", type=float, default=0.0, metavar="F",
                         help="below this best score the answer is 'no match' (0: as medsam3 segment)")

    model = parser.add_argument_group("MedSAM3 (as medsam3 segment)")
    add_model_options(model)
    model.add_argument("--protocol", default=None, choices=tuple(PROTOCOLS),
                       help=f"2D protocol: {', '.join(PROTOCOLS)} (default top_query)")
    add_score_threshold_option(model, default=None, also=" (refused where nothing would read it)")
    model.add_argument("--tracker", default="auto", metavar="SRC|none",
                       help="volumes: auto (default), none (detector only), tiny, an HF folder or a sam3.pt")
    model.add_argument("--modality", default=None, help="intensity rule: CT, MRI, X-ray, ultrasound, endoscopy, ...")
    add_ct_window_option(model)
    model.add_argument("--channel", type=int, default=None, metavar="N", help="4D volumes: the channel to segment")
    model.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    model.add_argument("--no-progress", action="store_true", help="no progress bars")
    model.add_argument("--max-pixels", type=pixels, default=None, metavar="N",
                       help="accept 2D pictures up to N pixels (default: PIL's limit and the available memory)")
    add_detector_chunk_option(model)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..agent.loop import LoopSettings
    from ..agent.runner import AgentSettings, check_agent_limits, check_planner, run_agent
    from ..agent.segmenter import SegmenterSettings

    from ..inferers.inputs import input_kind

    # refused outside [0, 1], and where nothing would read it (a picture whose protocol reads no threshold)
    args.score_threshold = checked_threshold_option(args.score_threshold, [args.protocol],
                                                    input_kind(args.input) == "volume")
    settings = AgentSettings(
        llm=args.llm, llm_url=args.llm_url, llm_model=args.llm_model, api_key_env=args.api_key_env,
        timeout=args.llm_timeout, retries=args.llm_retries, max_reply_tokens=args.max_reply_tokens,
        temperature=args.temperature, view_size=args.view_size, fallback=not args.no_fallback,
        max_phrasings=args.max_phrasings, keep_ratio=args.keep_ratio, min_score=args.min_score,
        loop=LoopSettings(max_rounds=args.max_rounds, max_corrections=args.max_corrections,
                          max_tokens=args.max_tokens, tool_mode=args.tool_mode))
    # the planner's settings before MONAI and torch are imported (seconds): a bad URL or limit fails at once
    check_agent_limits(settings)
    check_planner(settings)
    from ..transforms.io import input_modality

    modality = input_modality(args.input, args.modality)  # a DICOM series' own when --modality is not given
    settings = dataclasses.replace(
        settings,
        segmenter=SegmenterSettings(
            checkpoint=args.checkpoint, image_size=args.image_size, device=args.device, tracker=args.tracker,
            protocol=args.protocol or "top_query", score_threshold=args.score_threshold,
            ct_window=ct_window_for(args.ct_window, [modality]), resize_kernel=args.resize_kernel,
            modality=modality, channel=args.channel,
            progress=not args.no_progress, max_pixels=args.max_pixels or "auto",
            detector_chunk=args.detector_chunk,
        ),
    )
    line = run_agent(args.input, args.request, args.out, settings, overlay=args.overlay, trace_path=args.trace,
                     overwrite=args.overwrite)
    print(line)
    for line in random_weights_notes(args.checkpoint):  # after the outputs: its masks are no results
        print(f"note: {line}", file=sys.stderr)
    return 0
