"""`medsam3 convert-checkpoint SRC DST`: any supported SAM3 checkpoint -> transformers folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers and the networks import torch: only the run needs them (fast `--help`)
    from transformers import Sam3Config


def resolve_config(spec: str | None, image_size: int | None) -> Sam3Config | None:
    """``full``, ``tiny`` or a config.json path -> Sam3Config; None keeps the checkpoint's own or the default."""
    if spec is None:
        return None
    from transformers import Sam3Config

    from ..networks.checkpoints import CheckpointError
    from ..networks.presets import full_sam3_config, tiny_sam3_config

    if spec == "full":
        return full_sam3_config(image_size or 1008)
    if spec == "tiny":
        return tiny_sam3_config(image_size or 112)
    path = Path(spec)
    if not path.is_file():
        raise CheckpointError(f"--config {spec!r} is neither 'full', 'tiny' nor an existing config.json")
    config = Sam3Config.from_json_file(str(path))
    return config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-checkpoint",
        help="convert sam3.pt / Medical-SAM3 / medsam3-monai checkpoints into a transformers Sam3Model folder",
        description=(
            "Read SRC (Meta's sam3.pt, the Medical-SAM3 release, a medsam3-monai .pt or training checkpoint, a "
            "bare state dict with --config, or an HF folder), map the "
            "original keys onto transformers' Sam3Model, load strictly, and write DST: config.json, "
            "model.safetensors and the tokenizer (and, for a medsam3-monai model file that records its training "
            "preprocessing, medsam3_preprocessing.json, which this project's commands read). "
            "`transformers.Sam3Model.from_pretrained(DST)` loads it. A "
            "sam3.pt's tracker comes along: DST is then laid out as facebook/sam3 (model_type sam3_video; "
            "detector_model.*, tracker_model.*, tracker_neck.*), the 3D tracker of --tracker DST."
        ),
    )
    parser.add_argument("src", help="checkpoint file or folder")
    parser.add_argument("dst", help="output folder (must not exist or be empty)")
    parser.add_argument(
        "--config", default=None, help="architecture for checkpoints without one: 'full' (default), 'tiny' or config.json"
    )
    parser.add_argument("--image-size", type=int, default=None,
                        help="slice-space side S (multiple of 14): the size a file without a configuration (sam3.pt, "
                             "a Medical-SAM3 file; default 1008, 504 for the release's 3D checkpoint) or --config "
                             "full / tiny is built at; a checkpoint with a configuration must already work at S")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..networks.checkpoints import checkpoint_keys, load_sam3, save_hf_folder
    from ..networks.presets import check_image_size
    from .arguments import check_writable
    from ..networks.tracker import build_tracker, has_tracker_weights, save_sam3_video_folder, tracker_config_for

    dst = Path(args.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        what = "a file" if not dst.is_dir() else "a folder that is not empty"
        raise FileExistsError(f"output {dst} exists and is {what}; the output is a new folder: choose a new path")
    check_writable(dst, "DST", folder=True)  # before a checkpoint of gigabytes is read
    size = args.image_size
    if size is not None:
        check_image_size(size)
    loaded = load_sam3(args.src, config=resolve_config(args.config, size), image_size=size)
    built = int(loaded.model.config.vision_config.backbone_config.image_size)
    if size is not None and built != size:  # a checkpoint's own architecture: its size is not ours to change
        raise ValueError(f"{args.src} works at {built} px, not --image-size {size}: leave --image-size out (a "
                         "checkpoint keeps its own size), or, for a file without a configuration (sam3.pt), give "
                         f"--config full --image-size {size}")
    params = sum(p.numel() for p in loaded.model.parameters())
    if Path(args.src).is_file() and has_tracker_weights(args.src):  # Meta's sam3.pt: the tracker comes along
        tracker = build_tracker(args.src, config=tracker_config_for(loaded.model.config))
        save_sam3_video_folder(loaded.model, tracker, loaded.tokenizer, dst)
        params += sum(p.numel() for name, p in tracker.named_parameters()
                      if not name.startswith("vision_encoder.backbone."))
        what = "detector and tracker, facebook/sam3 layout"
    else:
        save_hf_folder(loaded.model, loaded.tokenizer, dst, loaded.preprocessing)
        what = "detector"
    print(f"converted {args.src} ({loaded.source_format}, {what}, {params:,} parameters) -> {dst}")
    if loaded.preprocessing and what == "detector":
        print("the model's training preprocessing goes with it (" + ", ".join(
            f"{key} {value if isinstance(value, str) else ','.join(map(str, value))}"
            for key, value in loaded.preprocessing.items()) + f"; {dst / 'medsam3_preprocessing.json'}): this "
            "project's commands and bundles repeat it; other readers of the folder (transformers) do not")
    if loaded.source_format == "tiny":
        print(f"note: tiny is a random-init network (for tests and demos): {dst} holds random weights, not a trained "
              "model", file=sys.stderr)
    if what == "detector" and Path(args.src).is_dir() and has_tracker_weights(args.src):
        print(f"note: the tracker of {args.src} is not in {dst}; that folder is one transformers reads already: give "
              f"it itself as --checkpoint, or as --tracker {args.src}", file=sys.stderr)
    elif loaded.source_format == "sam3_video_weights" and any(
            key.startswith("tracker_model.") for key in checkpoint_keys(args.src) or []):
        print(f"note: the tracker weights in {args.src} (tracker_model.*) are not in {dst}: give the facebook/sam3 "
              "folder it came from (with its config.json) as --checkpoint or --tracker", file=sys.stderr)
    return 0
