"""SAM3's video tracker for 3D propagation: transformers' ``Sam3TrackerVideoModel``, built tiny or loaded from a
folder, with the detector's ViT tied in (one trunk, two necks, as in SAM3's video model). The propagation itself
is ``medsam3_monai.inferers.volume``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Sam3TrackerVideoConfig, Sam3TrackerVideoModel

from .checkpoints import (
    CheckpointError,
    atomic_dir,
    check_finite_weights,
    checkpoint_keys,
    load_pretrained_folder,
    load_state_dict_strict,
    read_sam3_tracker,
    tracker_key_name,
)
from .presets import FULL_IMAGE_SIZE, TINY_IMAGE_SIZE, check_image_size, full_sam3_config, tiny_sam3_config

logger = logging.getLogger(__name__)

__all__ = ["TRACKER_MODEL_TYPES", "backbone_signature", "build_tracker", "detector_backbone", "detector_config",
           "has_tracker_weights", "resolve_tracker", "sam3_tracker_config", "save_sam3_video_folder", "tie_backbone",
           "tiny_tracker_config", "tracker_choice", "tracker_config_for"]

TRACKER_MODEL_TYPES = ("sam3_video", "sam3_tracker_video")
# transformers' memory attention hard-codes 64 key/value channels (kv_in_dim=64), and its object-pointer
# code only works when the tracker width is a multiple of 64 larger than 64: 128 is the smallest that runs.
TINY_TRACKER_HIDDEN_SIZE = 128
MEMORY_CHANNELS = 64


def tiny_tracker_config(
    image_size: int = TINY_IMAGE_SIZE,
    vision_config: Any = None,
    hidden_size: int = TINY_TRACKER_HIDDEN_SIZE,
    memory_layers: int = 1,
    num_maskmem: int = 7,
) -> Sam3TrackerVideoConfig:
    """A small random-init SAM3 tracker for tests and the demo (about 1.8 M parameters).

    Args:
        image_size: slice-space side S (multiple of 14), the detector's.
        vision_config: the detector's ``Sam3VisionConfig`` (or dict) whose ViT the tracker uses; default the
            tiny detector preset's. Only its FPN width changes, to ``hidden_size`` (the tracker's neck).
        hidden_size: tracker width (FPN, prompt encoder, mask decoder, memory attention); a multiple of 64
            above 64 (transformers' memory attention takes 64-channel memories and splits wider pointers).
        memory_layers: memory-attention layers (4 in SAM3).
        num_maskmem: memory slots (7 in SAM3).
    """
    check_image_size(image_size)
    if hidden_size % MEMORY_CHANNELS or hidden_size <= MEMORY_CHANNELS:
        raise ValueError(f"hidden_size must be a multiple of {MEMORY_CHANNELS} above it (128, 256); got {hidden_size}")
    if vision_config is None:
        vision_config = tiny_sam3_config(image_size).vision_config
    vision = vision_config.to_dict() if hasattr(vision_config, "to_dict") else dict(vision_config)
    vision["fpn_hidden_size"] = hidden_size
    h = hidden_size
    return Sam3TrackerVideoConfig(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=h, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=h, mlp_dim=2 * h, num_attention_heads=2, iou_head_hidden_dim=h),
        image_size=image_size,
        num_maskmem=num_maskmem,
        memory_attention_hidden_size=h,
        memory_attention_num_layers=memory_layers,
        memory_attention_feed_forward_hidden_size=2 * h,
        memory_encoder_hidden_size=h,
        memory_encoder_output_channels=MEMORY_CHANNELS,
        mask_downsampler_embed_dim=h,
        memory_fuser_embed_dim=h,
        memory_fuser_intermediate_dim=2 * h,
        memory_fuser_num_layers=1,
    )


def tracker_config_for(detector_config: Any) -> Sam3TrackerVideoConfig:
    """The tracker of SAM3's video model around a detector of ``detector_config`` (a ``Sam3Config``): the same ViT
    and slice size (one trunk), a neck of the detector's FPN shape, transformers' (facebook/sam3's) tracker."""
    vision = detector_config.vision_config
    return Sam3TrackerVideoConfig(image_size=int(vision.backbone_config.image_size), vision_config=vision.to_dict())


def sam3_tracker_config(image_size: int = FULL_IMAGE_SIZE) -> Sam3TrackerVideoConfig:
    """SAM3's tracker (1008 px by default), around SAM3's detector (:func:`~.presets.full_sam3_config`: its ViT's
    LayerNorm eps the official 1e-5): the architecture of the tracker in Meta's ``sam3.pt``."""
    return tracker_config_for(full_sam3_config(image_size))


def detector_backbone(detector: nn.Module) -> nn.Module:
    sam3 = getattr(detector, "sam3", detector)
    return sam3.vision_encoder.backbone


def backbone_signature(config: Any) -> dict[str, Any]:
    backbone = config.backbone_config
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
            "patch_size", "window_size", "global_attn_indexes", "pretrain_image_size")
    return {k: getattr(backbone, k, None) for k in keys}


def detector_config(detector: nn.Module) -> Any:
    """The ``Sam3Config`` of a :class:`~medsam3_monai.networks.MedSAM3Net` or ``Sam3Model``."""
    return getattr(detector, "config", None) or detector.sam3.config


def tie_backbone(tracker: Sam3TrackerVideoModel, detector: nn.Module) -> Sam3TrackerVideoModel:
    """Make the tracker's ViT *the* detector's ViT module (one trunk, two necks, as SAM3's video model)."""
    theirs = backbone_signature(detector_config(detector).vision_config)
    ours = backbone_signature(tracker.config.vision_config)
    if theirs != ours:
        diff = {k: (theirs[k], ours[k]) for k in theirs if theirs[k] != ours[k]}
        raise ValueError(f"the tracker's ViT differs from the detector's (detector vs tracker): {diff}")
    tracker.vision_encoder.backbone = detector_backbone(detector)
    return tracker


def same_backbone(detector: nn.Module, tracker: Sam3TrackerVideoModel) -> bool:
    """Whether the tracker's ViT is the detector's: the same module (:func:`tie_backbone`) or equal tensors (one
    facebook/sam3 folder loaded twice)."""
    ours, theirs = tracker.vision_encoder.backbone, detector_backbone(detector)
    if ours is theirs:
        return True
    a, b = ours.state_dict(), theirs.state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape or a[k].dtype != b[k].dtype for k in a):
        return False
    return all(a[k].data_ptr() == b[k].data_ptr() or torch.equal(a[k], b[k].to(a[k].device)) for k in a)


def _load_tracker_folder(folder: Path) -> Sam3TrackerVideoModel:
    # detector_model.* (other than the ViT, which the tracker copies) is skipped by transformers by design
    return load_pretrained_folder(
        folder, Sam3TrackerVideoModel, TRACKER_MODEL_TYPES, "SAM3 tracker",
        "{folder} holds a '{model_type}' model with no tracker: give a facebook/sam3 folder "
        "(model_type sam3_video) or a saved Sam3TrackerVideoModel (sam3_tracker_video)",
    )


TRACKER_KEYWORDS = ("auto", "none", "tiny")


def check_tracker_source(source: str | Path | None) -> None:
    """Refuse a tracker source that is neither ``auto`` / ``none`` / ``tiny`` nor an existing file or folder
    (:class:`CheckpointError`), before any volume needs it: servers check it at start."""
    if source is None or str(source) in TRACKER_KEYWORDS:
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"tracker checkpoint {path} does not exist. Give 'tiny', a local HF folder (facebook/sam3 layout, "
            "or a saved Sam3TrackerVideoModel) or Meta's sam3.pt (medsam3 commands also take 'auto': the "
            "checkpoint's own tracker, and 'none': detector only); nothing is downloaded."
        )


def build_tracker(
    source: str | Path = "tiny",
    image_size: int | None = None,
    seed: int = 0,
    *,
    detector: nn.Module | None = None,
    config: Sam3TrackerVideoConfig | None = None,
) -> Sam3TrackerVideoModel:
    """SAM3's video tracker (transformers ``Sam3TrackerVideoModel``) in eval mode.

    Args:
        source: ``"tiny"`` (random init, reproducible by ``seed``; see :func:`tiny_tracker_config`), a local
            HF folder: facebook/sam3 (``sam3_video``: the tracker, its neck and a copy of the detector's ViT
            are loaded) or a saved ``Sam3TrackerVideoModel``, or Meta's ``sam3.pt`` (its ``tracker.*`` tensors,
            the tracker's neck and the detector's ViT: :func:`~.checkpoints.read_sam3_tracker`). Loading is
            strict (a key report on any mismatch) and never downloads.
        image_size: slice side S. Tiny: default the detector's, else 112. A loaded tracker keeps its own
            size; a different ``image_size`` is an error.
        seed: initialisation seed of the tiny tracker.
        detector: a :class:`~medsam3_monai.networks.MedSAM3Net` (or ``Sam3Model``) whose ViT becomes the
            tracker's (the same module: SAM3's video model has one trunk). The tiny tracker then takes the
            detector's ViT configuration. :func:`segment_volume` shares the ViT pass of such a pair.
        config: the architecture a ``sam3.pt`` is loaded into (default: :func:`tracker_config_for` the
            ``detector``, else SAM3's at ``image_size``, 1008 px by default: :func:`sam3_tracker_config`).
    """
    if str(source) == "tiny":
        if detector is not None:
            vision_config = detector_config(detector).vision_config
            size = int(vision_config.backbone_config.image_size)
            if image_size is not None and image_size != size:
                raise ValueError(f"image_size {image_size} differs from the detector's {size}")
            image_size = size
        else:
            image_size = image_size or TINY_IMAGE_SIZE
            vision_config = tiny_sam3_config(image_size).vision_config
        config = tiny_tracker_config(image_size, vision_config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tracker = Sam3TrackerVideoModel(config)
    else:
        check_tracker_source(source)
        path = Path(source).expanduser()
        if path.is_dir():
            tracker = _load_tracker_folder(path)
        else:
            origins: dict[str, str] = {}
            try:
                state = read_sam3_tracker(path, origins)
            except CheckpointError as err:  # "cannot read checkpoint X": say it is the tracker's
                raise CheckpointError(f"the tracker (--tracker): {err}") from None
            if config is None:  # a sam3.pt carries none: SAM3's tracker (at image_size), or the one around detector
                config = (sam3_tracker_config(image_size or FULL_IMAGE_SIZE) if detector is None
                          else tracker_config_for(detector_config(detector)))
            tracker = Sam3TrackerVideoModel(config)
            load_state_dict_strict(tracker, state, str(path), "SAM3 tracker",
                                   key_name=lambda key: tracker_key_name(key, origins))
        if image_size is not None and image_size != tracker.config.image_size:
            raise ValueError(f"the tracker in {path} works at {tracker.config.image_size} px, not {image_size}")
        check_finite_weights(tracker, str(path), "SAM3 tracker")
    if detector is not None:
        tie_backbone(tracker, detector)
    return tracker.eval()


def has_tracker_weights(source: str) -> bool:
    """Whether ``source`` holds SAM3 tracker weights: a transformers folder (facebook/sam3, a saved tracker) or a
    ``sam3.pt`` with ``tracker.*`` keys (read memory-mapped: only its keys)."""
    path = Path(source)
    if path.is_file():
        keys = checkpoint_keys(path)
        return keys is not None and any(str(key).startswith("tracker.") for key in keys)
    config = path / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") in TRACKER_MODEL_TYPES
    except (OSError, json.JSONDecodeError):
        return False


def tracker_choice(spec: str | None, checkpoint: str) -> tuple[str, str]:
    """What :func:`resolve_tracker` builds for ``spec`` and ``checkpoint``, without building it: ``(source, text)``
    -- ``auto`` resolved (tiny for the tiny checkpoint, the checkpoint's own tracker when it has one, else none)
    and the description reports and logs print."""
    if spec in (None, "none"):
        return "none", "none"
    if spec == "auto":
        if str(checkpoint) == "tiny":
            spec = "tiny"
        elif has_tracker_weights(str(checkpoint)):
            spec = str(checkpoint)
        else:
            return "none", "none (the checkpoint has no tracker weights)"
    if spec == "tiny":
        return "tiny", "tiny (random init, ViT shared with the detector)"
    return str(spec), str(spec)


def resolve_tracker(spec: str | None, checkpoint: str, network: nn.Module, needed: bool = True,
                    described: bool = False):
    """The volume path's tracker: ``none``/None (detector only), ``tiny`` (random init, sharing the detector's
    ViT), an HF folder, Meta's ``sam3.pt``, or ``auto``: tiny for the tiny checkpoint, the checkpoint's own tracker
    for a facebook/sam3 folder (``sam3_video``) or a ``sam3.pt``, else none. ``needed=False`` (no volume to
    segment) builds none. ``described=True`` returns (tracker, description). A tracker whose ViT weights equal the
    detector's (one facebook/sam3 folder or sam3.pt) is given the detector's ViT module (:func:`tie_backbone`): one
    copy in memory, and the volume path knows the ViT is shared without comparing the weights again."""
    tracker = None
    spec, text = tracker_choice(spec if needed else "none", checkpoint)
    if spec == "tiny":
        tracker = build_tracker("tiny", detector=network)
    elif spec != "none":
        # a sam3.pt carries no configuration: its tracker is the one around this detector (SAM3's for SAM3's)
        config = tracker_config_for(detector_config(network)) if Path(spec).is_file() else None
        tracker = build_tracker(spec, image_size=int(network.image_size), config=config)
    if tracker is not None:
        tracker = tracker.to(next(network.parameters()).device)
        if tracker.vision_encoder is not None and not same_backbone(network, tracker):
            text += (" (its own ViT: its weights are not the detector's, e.g. a fine-tuned detector with the original "
                     "tracker, so every slice also goes through the tracker's ViT, as it was trained)")
        elif tracker.vision_encoder is not None and (backbone_signature(tracker.config.vision_config)
                                                     == backbone_signature(detector_config(network).vision_config)):
            tie_backbone(tracker, network)
    if needed:  # what the volumes will be propagated with, in a bundle's log (the CLI prints its own line)
        logger.info("tracker for the volumes: %s", text)
    return (tracker, text) if described else tracker


def save_sam3_video_folder(detector: nn.Module, tracker: Sam3TrackerVideoModel, tokenizer: Any,
                           directory: str | Path) -> Path:
    """Write a detector and its tracker as facebook/sam3 ships them: ``config.json`` of a ``Sam3VideoConfig``
    (``model_type`` ``sam3_video``), ``model.safetensors`` with ``detector_model.*``, ``tracker_model.*`` (the
    tracker but its ViT, which is the detector's) and ``tracker_neck.*``, and the tokenizer; written atomically.
    ``MedSAM3Net`` and :func:`build_tracker` load it back, as does transformers' ``Sam3VideoModel``."""
    from safetensors.torch import save_file
    from transformers import Sam3VideoConfig

    sam3 = getattr(detector, "sam3", detector)
    tensors = {f"detector_model.{k}": v for k, v in sam3.state_dict().items()}
    for key, value in tracker.state_dict().items():
        if key.startswith("vision_encoder.neck."):
            tensors["tracker_neck." + key[len("vision_encoder.neck."):]] = value
        elif not key.startswith("vision_encoder.backbone."):
            tensors["tracker_model." + key] = value
    config = Sam3VideoConfig(detector_config=sam3.config.to_dict(), tracker_config=tracker.config.to_dict())

    def write(folder: Path) -> None:
        config.save_pretrained(str(folder))
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))

    return atomic_dir(Path(directory), write)
