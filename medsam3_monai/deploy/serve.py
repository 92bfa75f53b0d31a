"""``medsam3 serve --checkpoint SRC [--host 127.0.0.1] [--port 8000] [--token TOKEN] [--cors-origin URL] ...``: an
inference server speaking MONAI Label's REST protocol (``/info/``, ``/infer/{model}``, ``/datastore/``,
``/session/``, ``/auth/``), for the MONAI Label client, 3D Slicer and OHIF; see :mod:`medsam3_monai.deploy.server`."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from .arguments import (add_ct_window_option, add_detector_chunk_option, add_model_options,
                        add_score_threshold_option, add_tracker_batch_option, ct_window, random_weights_notes)

__all__ = ["add_parser", "build_server", "open_server_warnings", "run"]

_EPILOG = """\
Routes (MONAI Label's protocol): GET /info/; POST /infer/medsam3 with multipart 'params' = JSON
{"prompts": ["polyp"], "box": [x1, y1, x2, y2], "protocol": ..., "score_threshold": ..., "modality": ...,
"largest_cc": false} (a text
of prompts is split at commas) and the image as 'file' (PNG, JPEG, BMP, TIFF, GIF, PPM, a single-frame DICOM
.dcm, NIfTI .nii/.nii.gz, NRRD, MetaImage .mha), or ?image=ID of an image uploaded with PUT /datastore/?image=ID, or
?session_id= from PUT /session/. Answer (?output=all, the default): multipart 'params' (result JSON) + 'image'
(the mask: PNG for 2D, NIfTI for volumes, in the input's geometry, as medsam3 segment writes it);
?output=image: the mask file alone (result JSON in the X-MedSAM3-Result header); ?output=json: the result JSON.
Example:
  curl -F file=@image.jpg -F 'params={"prompts": ["polyp"]}' -o mask.png \\
       'http://127.0.0.1:8000/infer/medsam3?output=image'
The MedSAM3 agent is the second model: POST /infer/medsam3_agent with params {"request": "segment the lesion in
the upper left quadrant"}; its planner is --llm-url URL --llm-model NAME (any OpenAI-compatible server: vLLM,
Ollama, ...; key from the environment variable --api-key-env names), else the offline planner. An endpoint that
cannot be reached falls back to the offline planner (said in the answer's agent.notes); --no-fallback: 502 instead.
Errors are JSON {"error": ...} with a 4xx status (502: the agent's planner failed; 507: the datastore is full).
--token (or MEDSAM3_SERVE_TOKEN) requires 'Authorization: Bearer TOKEN' on every request but GET /auth/ and POST
/auth/token (the OAuth2 password form with the token as password, for MONAI Label clients). Uploads kept by
/datastore/ and /session/ live in a temporary folder until the server stops. Listens on 127.0.0.1 unless --host
says otherwise; there, without --token, it answers only requests addressed to localhost or a loopback address (403).
Guide: bundles/medsam3/docs/monailabel.md
"""

_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="serve the model over HTTP with MONAI Label's protocol (MONAI Label client, 3D Slicer, OHIF)",
        description="HTTP inference server: text-prompted segmentation of uploaded images and NIfTI volumes.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(parser)
    add_ct_window_option(parser)
    add_detector_chunk_option(parser)
    add_tracker_batch_option(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    parser.add_argument("--token", default=None,
                        help="require 'Authorization: Bearer TOKEN' (default: $MEDSAM3_SERVE_TOKEN, else none)")
    parser.add_argument("--max-request-mb", type=float, default=64.0, metavar="N",
                        help="largest request body in MiB (default 64; larger -> 413)")
    parser.add_argument("--max-image-pixels", type=int, default=50_000_000, metavar="N",
                        help="largest image / volume in pixels or voxels (default 50,000,000; larger -> 413)")
    parser.add_argument("--max-prompt-chars", type=int, default=200, metavar="N",
                        help="longest prompt text in characters (default 200; longer -> 422)")
    parser.add_argument("--max-prompts", type=int, default=16, metavar="N",
                        help="most prompts per request (default 16; more -> 422)")
    parser.add_argument("--cors-origin", action="append", default=None, metavar="URL",
                        help="let browser apps on this origin call the server, e.g. http://localhost:3000 for OHIF "
                             "(repeat for several; '*' for any)")
    parser.add_argument("--datastore-max-mb", type=float, default=2048.0, metavar="N",
                        help="most MiB kept for uploaded images, labels and sessions (default 2048; more -> 507)")
    parser.add_argument("--datastore-max-files", type=int, default=1000, metavar="N",
                        help="most files kept for uploaded images, labels and sessions (default 1000)")
    parser.add_argument("--session-expiry", type=int, default=3600, metavar="S",
                        help="seconds a session lives after its last use (default 3600; also the longest a client "
                             "may ask for)")
    add_score_threshold_option(parser, also="; a request's params.score_threshold replaces it",
                               protocol="a request's params.protocol")
    parser.add_argument("--tracker", default="auto", metavar="SRC|none",
                        help="volumes: auto (default), none (detector only), tiny, an HF folder or a sam3.pt")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn log level (default info)")
    agent = parser.add_argument_group("the agent model (/infer/medsam3_agent)")
    agent.add_argument("--llm-url", default=os.environ.get("MEDSAM3_LLM_URL") or None, metavar="URL",
                       help="the agent's planner: an OpenAI-compatible base URL, e.g. http://localhost:8000/v1 (env "
                            "MEDSAM3_LLM_URL; default: the offline planner)")
    agent.add_argument("--llm-model", default=os.environ.get("MEDSAM3_LLM_MODEL") or None, metavar="NAME",
                       help="the model name the planner server serves (env MEDSAM3_LLM_MODEL)")
    agent.add_argument("--api-key-env", default=None, metavar="VAR",
                       help="name of the environment variable holding the planner's API key (default: none sent)")
    agent.add_argument("--max-rounds", type=int, default=3, metavar="N", help="segment_phrase calls per request (3)")
    agent.add_argument("--llm-timeout", type=float, default=120.0, metavar="S", help="seconds per planner request (120)")
    agent.add_argument("--no-fallback", action="store_true",
                       help="answer 502 instead of falling back to the offline planner when the planner endpoint "
                            "cannot be reached (default: fall back, and say so in the answer's agent.notes)")
    parser.set_defaults(func=run)
    return parser


def build_server(args: argparse.Namespace) -> Any:
    """The ``uvicorn.Server`` for the parsed arguments (model loaded); ``.run()`` serves until interrupted."""
    import uvicorn

    from ..inferers.predict import Predictor
    from .server import ServerLimits, create_app

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_request_mb <= 0:
        raise ValueError(f"--max-request-mb must be positive, got {args.max_request_mb}")
    if not 0.0 <= args.score_threshold <= 1.0:
        raise ValueError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    if args.datastore_max_mb <= 0:
        raise ValueError(f"--datastore-max-mb must be positive, got {args.datastore_max_mb}")
    for flag in ("max_image_pixels", "max_prompt_chars", "max_prompts", "datastore_max_files", "session_expiry"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    limits = ServerLimits(int(args.max_request_mb * 2**20), args.max_image_pixels, args.max_prompt_chars,
                          args.max_prompts, max_stored_files=args.datastore_max_files,
                          max_stored_bytes=int(args.datastore_max_mb * 2**20), session_expiry=args.session_expiry)
    origins = [origin.rstrip("/") for origin in args.cors_origin or []]
    for origin in origins:
        if origin != "*" and not _ORIGIN.match(origin):
            raise ValueError(f"--cors-origin {origin!r}: give an origin such as http://localhost:3000 (scheme, host "
                             "and port, no path) or '*'")
    token = args.token if args.token is not None else os.environ.get("MEDSAM3_SERVE_TOKEN") or None
    if token is not None and not token.strip():
        raise ValueError("--token is empty: give a secret, or leave it out for an open server")
    agent = agent_settings(args)
    _check_port_free(args.host, args.port)
    from ..tensors import resolve_device

    predictor = Predictor.from_checkpoint(args.checkpoint, args.image_size, resolve_device(args.device),
                                          detector_chunk=args.detector_chunk, tracker=args.tracker,
                                          score_threshold=args.score_threshold, tracker_batch=args.tracker_batch,
                                          resize_kernel=args.resize_kernel,
                                          ct_window=None if args.ct_window is None else ct_window(args.ct_window),
                                          max_pixels=args.max_image_pixels)  # the header check's limit, not PIL's
    for line in predictor.preprocessing_notes:
        print(f"medsam3 serve: note: {line}", file=sys.stderr)
    app = create_app(predictor, token=token, limits=limits, cors_origins=origins, agent=agent, host=args.host)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=True,
                            limit_concurrency=256, timeout_keep_alive=5,
                            timeout_graceful_shutdown=30)  # a stalled client does not hold the stop for ever
    return uvicorn.Server(config)


def _check_port_free(host: str, port: int) -> None:
    """Refuse an address that cannot be listened on (port in use, host not this machine's) before the model loads
    and the banner claims the address; uvicorn binds it again when it starts (exit status 3)."""
    import errno
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ServeAddressError(f"--host {host}: {err.strerror or err}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no obstacle
        try:
            probe.bind(address)
        except OSError as err:
            hint = "; choose another --port (or stop what listens there)" if err.errno == errno.EADDRINUSE else ""
            raise ServeAddressError(f"cannot listen on {host}:{port}: {err.strerror or err}{hint}") from None


class ServeAddressError(OSError):
    """The server's address cannot be listened on (exit status 3, as uvicorn's own failure to bind)."""


def agent_settings(args: argparse.Namespace) -> Any:
    """The agent model's planner from the command line (nothing built in; the key variable must be set)."""
    from ..agent.loop import LoopSettings
    from ..agent.runner import AgentSettings, check_planner

    if args.llm_timeout <= 0:
        raise ValueError(f"--llm-timeout must be positive, got {args.llm_timeout}")
    settings = AgentSettings(llm="auto", llm_url=args.llm_url, llm_model=args.llm_model, api_key_env=args.api_key_env,
                             timeout=args.llm_timeout, fallback=not args.no_fallback,
                             loop=LoopSettings(max_rounds=args.max_rounds))
    check_planner(settings)
    return settings


def open_server_warnings(host: str, token: bool, cors_origins: list[str]) -> list[str]:
    """What the start says of a server without a token that others can use: one listening beyond the loopback, or
    one whose CORS lets any web page read its answers (its datastore's images included)."""
    from .server import is_loopback

    lines = []
    if not token and not is_loopback(host):
        lines.append(f"listening on {host} without --token: anyone who can reach this machine can upload images and "
                     "run the model; give --token (or MEDSAM3_SERVE_TOKEN)")
    if not token and "*" in cors_origins:
        lines.append("--cors-origin '*' without --token: any web page open in a browser on this machine can call "
                     "the server and read its answers and its datastore's images; name the viewer's origin (e.g. "
                     "--cors-origin http://localhost:3000) or give --token")
    return lines


def run(args: argparse.Namespace) -> int:
    try:
        server = build_server(args)
    except ServeAddressError as err:  # status 3, as when uvicorn itself cannot bind
        print(f"medsam3 serve: error: {err}", file=sys.stderr)
        return 3
    app = server.config.app
    extras = [" with token" if app.state.auth.enabled else "",
              f", CORS for {', '.join(app.state.cors_origins)}" if app.state.cors_origins else ""]
    planner = f"{args.llm_model} at {args.llm_url}" if args.llm_url else "the offline planner"
    for line in open_server_warnings(args.host, app.state.auth.enabled, app.state.cors_origins):
        print(f"medsam3 serve: WARNING: {line}", file=sys.stderr)
    for line in random_weights_notes(args.checkpoint):
        print(f"medsam3 serve: note: {line}", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address in a URL
    print(f"medsam3 serve: checkpoint {args.checkpoint}, http://{host}:{args.port} "
          f"(MONAI Label protocol: GET /info/, POST /infer/medsam3, POST /infer/medsam3_agent with {planner})"
          f"{''.join(extras)}")
    server.run()
    return 0
