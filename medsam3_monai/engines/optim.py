"""AdamW over Medical SAM3's parameter groups, and the MedSAM3 freezing mode."""

from __future__ import annotations

import logging

from torch import nn
from torch.optim import AdamW

from ..networks.param_groups import LearningRates, sam3_param_groups
from ..networks.outputs import unwrap

logger = logging.getLogger(__name__)


def freeze_encoders(network: nn.Module, vision: bool = True, text: bool = True) -> int:
    """MedSAM3 mode: freeze the vision and/or text encoder (CLIP + its projection); returns frozen parameter count."""
    network = unwrap(network)
    sam3 = network.sam3 if hasattr(network, "sam3") else network
    modules = ([sam3.vision_encoder] if vision else []) + ([sam3.text_encoder, sam3.text_projection] if text else [])
    frozen = 0
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(False)
            frozen += param.numel()
    network.train(network.training)  # MedSAM3Net keeps frozen encoders in eval mode (no stochastic depth)
    names = " and ".join(name for name, chosen in (("vision", vision), ("text", text)) if chosen) or "no"
    logger.info("MedSAM3 mode: %s encoder(s) frozen, %d parameters out of the optimiser", names, frozen)
    return frozen


#: the training bundle's ``mode``: what each trains
TRAINING_MODES = {"full": "Medical SAM3, every part fine-tuned", "medsam3": "MedSAM3, the encoders frozen"}


def freeze_for_mode(network: nn.Module, mode: str) -> int:
    """The training bundle's ``mode`` applied to ``network``: ``full`` trains every parameter, ``medsam3`` freezes
    the vision and text encoders (:func:`freeze_encoders`). Returns the frozen parameter count; another mode is a
    ValueError (it would otherwise train in full mode without a word)."""
    check_training_mode(mode)
    return freeze_encoders(network) if mode == "medsam3" else 0


def check_training_mode(mode: str) -> str:
    """``mode`` when it is a training mode (``full``, ``medsam3``), else a ValueError naming the choices; the
    training bundles check it first, before they cache their data."""
    if mode not in TRAINING_MODES:
        choices = "; ".join(f"{name} ({what})" for name, what in TRAINING_MODES.items())
        raise ValueError(f"unknown training mode {mode!r}: choose {choices}")
    return mode


def build_optimizer(
    network: nn.Module,
    detector_lr: float = 3e-4,
    vision_lr: float = 5e-5,
    language_lr: float = 5e-5,
    geometry_lr: float = 1e-4,
    layer_decay: float = 0.85,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.999),
    position_embedding_scale: float | None = None,
) -> AdamW:
    """AdamW with β = (0.9, 0.999) over :func:`sam3_param_groups` (frozen parameters left out).

    On CUDA (every parameter there when this is called: move the network first) the fused implementation runs:
    layer decay gives each ViT layer its own groups, and the default multi-tensor update launches a dozen kernels
    per group, the fused one two; the arithmetic is AdamW's either way. Elsewhere PyTorch's default."""
    for name, value in (("detector", detector_lr), ("vision", vision_lr), ("language", language_lr),
                        ("geometry", geometry_lr), ("weight_decay", weight_decay)):
        if not value >= 0:  # NaN too
            raise ValueError(f"lr#{name} must be >= 0, got {value}")
    if not 0 < layer_decay <= 1:
        raise ValueError(f"lr#layer_decay must be in (0, 1] (1: no decay), got {layer_decay}")
    rates = LearningRates(detector_lr, vision_lr, language_lr, geometry_lr, layer_decay, position_embedding_scale)
    groups = sam3_param_groups(network, rates, weight_decay=weight_decay)
    if not groups:
        raise ValueError("no trainable parameters: every parameter is frozen")
    params = [p for group in groups for p in group["params"]]
    fused = all(p.is_cuda and p.is_floating_point() for p in params) or None
    return AdamW(groups, betas=tuple(betas), fused=fused)
