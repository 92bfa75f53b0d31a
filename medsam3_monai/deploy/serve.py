"""``medsam3 serve --checkpoint SRC [--host 127.0.0.1] [--port 8000] [--token TOKEN] ...``: a MONAI-Label-shaped
inference server (``GET /info``, ``POST /infer/{model}``); see :mod:`medsam3_monai.deploy.server`."""

from __future__ import annotations

import argparse
import os
from typing import Any

__all__ = ["add_parser", "build_server", "run"]

_EPILOG = """\
Routes: GET /info (app, version, models, limits); POST /infer/medsam3 with multipart 'file' (PNG, JPEG, BMP,
TIFF, NIfTI .nii/.nii.gz) and 'params' = JSON {"prompts": ["polyp"], "box": [x1, y1, x2, y2], "protocol": ...}.
Default answer: the mask file (PNG for 2D, NIfTI for volumes, in the input's geometry) with the result JSON in
the X-MedSAM3-Result header; ?output=json: JSON with the result and the base64 mask.
Example:
  curl -F file=@image.jpg -F 'params={"prompts": ["polyp"]}' -o mask.png http://127.0.0.1:8000/infer/medsam3
Errors are JSON {"error": ...} with a 4xx status. --token (or MEDSAM3_SERVE_TOKEN) requires
'Authorization: Bearer TOKEN' on every request. Listens on 127.0.0.1 unless --host says otherwise.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="serve the model over HTTP (MONAI-Label-shaped: GET /info, POST /infer/{model})",
        description="HTTP inference server: text-prompted segmentation of uploaded images and NIfTI volumes.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", default="tiny", metavar="SRC",
                        help="'tiny' (random init, default), an HF folder, sam3.pt, a Medical-SAM3 or medsam3-monai "
                             "checkpoint")
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help="slice-space size of the tiny network (default 112); must match a real checkpoint")
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
    parser.add_argument("--score-threshold", type=float, default=0.5, metavar="F",
                        help="query score of the threshold protocol and of volume detections (0.5)")
    parser.add_argument("--tracker", default="auto", metavar="SRC|none",
                        help="volumes: auto (default), none (detector only), tiny or an HF folder")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn log level (default info)")
    parser.set_defaults(func=run)
    return parser


def build_server(args: argparse.Namespace) -> Any:
    """The ``uvicorn.Server`` for the parsed arguments (model loaded); ``.run()`` serves until interrupted."""
    import torch
    import uvicorn

    from ..inferers.predict import Predictor
    from .server import ServerLimits, create_app

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_request_mb <= 0:
        raise ValueError(f"--max-request-mb must be positive, got {args.max_request_mb}")
    if not 0.0 <= args.score_threshold <= 1.0:
        raise ValueError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    limits = ServerLimits(int(args.max_request_mb * 2**20), args.max_image_pixels, args.max_prompt_chars,
                          args.max_prompts)
    token = args.token if args.token is not None else os.environ.get("MEDSAM3_SERVE_TOKEN") or None
    if token is not None and not token.strip():
        raise ValueError("--token is empty: give a secret, or leave it out for an open server")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    predictor = Predictor.from_checkpoint(args.checkpoint, args.image_size, torch.device(device),
                                          tracker=args.tracker, score_threshold=args.score_threshold)
    app = create_app(predictor, token=token, limits=limits)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=True,
                            limit_concurrency=256, timeout_keep_alive=5)
    return uvicorn.Server(config)


def run(args: argparse.Namespace) -> int:
    server = build_server(args)
    print(f"medsam3 serve: checkpoint {args.checkpoint}, http://{args.host}:{args.port} "
          f"(GET /info, POST /infer/medsam3){' with token' if server.config.app.token else ''}")
    server.run()
    return 0
