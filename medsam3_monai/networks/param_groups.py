"""Optimiser parameter groups of Medical SAM3 (§4.2) with Meta's ViTDet layer-wise learning-rate decay.

Learning rates: DETR encoder/decoder, segmentation head and dot-product scoring 3e-4; vision backbone
5e-5 x 0.85^(L + 1 - layer_id) with L ViT layers (32 in the full model), layer_id 0 for the patch/position
embeddings and the pre-norm, i + 1 for ViT layer i, L + 1 for the FPN neck; language backbone (CLIP text
encoder and its projection to the detector width) 5e-5; geometry encoder 1e-4. Meta's ViTDet code
gives the same ids (ln_pre / pos_embed / patch_embed 0, block i -> i + 1, everything else L + 1).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from torch import nn
from transformers import Sam3Model

from .outputs import unwrap

_VIT_LAYER = re.compile(r"^vision_encoder\.backbone\.layers\.(\d+)\.")
_VIT_POSITION_EMBEDDING = "vision_encoder.backbone.embeddings.position_embeddings"
_VIT_STEM = ("vision_encoder.backbone.embeddings.", "vision_encoder.backbone.layer_norm.")
_DETECTOR_HEADS = ("detr_encoder.", "detr_decoder.", "mask_decoder.", "dot_product_scoring.")
_LANGUAGE = ("text_encoder.", "text_projection.")


@dataclass(frozen=True)
class LearningRates:
    """Base learning rates per component (Medical SAM3 §4.2) and the ViT layer decay."""

    detector: float = 3e-4
    vision: float = 5e-5
    language: float = 5e-5
    geometry: float = 1e-4
    layer_decay: float = 0.85
    position_embedding_scale: float | None = None  # Meta's fine-tuning configs override pos_embed to 1.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _sam3_of(model: nn.Module) -> Sam3Model:
    model = unwrap(model)
    return model if isinstance(model, Sam3Model) else model.sam3  # MedSAM3Net


def vit_layer_id(name: str, num_layers: int) -> int:
    """ViTDet layer id of a vision parameter (transformers names, without the model prefix)."""
    if name.startswith(_VIT_STEM):
        return 0
    match = _VIT_LAYER.match(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1  # the FPN neck


def component_of(name: str) -> str:
    """Which learning-rate component a Sam3Model parameter belongs to."""
    if name.startswith("vision_encoder."):
        return "vision"
    if name.startswith(_LANGUAGE):
        return "language"
    if name.startswith("geometry_encoder."):
        return "geometry"
    if name.startswith(_DETECTOR_HEADS):
        return "detector"
    raise KeyError(f"parameter {name!r} belongs to no known SAM3 component; update param_groups.component_of")


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters SAM3's training configs exempt from weight decay: every bias and every LayerNorm parameter."""
    names = {name for name, _ in model.named_parameters() if name.endswith("bias")}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            names.update(f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters(recurse=False))
    return names


def sam3_param_groups(
    model: nn.Module,
    rates: LearningRates | None = None,
    weight_decay: float = 0.1,
    trainable_only: bool = True,
) -> list[dict]:
    """AdamW parameter groups: one per (component, ViT layer id, decay / no decay).

    Weight decay follows SAM3's training configs: ``weight_decay`` everywhere except biases and LayerNorm
    parameters (0). Each group carries ``lr`` (already scaled), ``name``, ``component``, ``lr_scale`` and ``weight_decay``,
    so a scheduler that multiplies ``initial_lr`` keeps the ratios. Frozen parameters are skipped when
    ``trainable_only`` (MedSAM3 mode). Parameters a subclass or wrapper of ``MedSAM3Net`` adds outside its SAM3
    model (a head of one's own) form the component ``extra``, at the detector's rate, with the same decay rule.
    """
    rates = rates or LearningRates()
    sam3 = _sam3_of(model)
    num_layers = sam3.config.vision_config.backbone_config.num_hidden_layers
    base = {"vision": rates.vision, "language": rates.language, "geometry": rates.geometry, "detector": rates.detector}
    groups: dict[tuple, dict] = {}
    no_decay = _no_weight_decay_names(sam3)
    for name, param in sam3.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        component = component_of(name)
        scale = 1.0
        layer_id = None
        if component == "vision":
            layer_id = vit_layer_id(name, num_layers)
            scale = rates.layer_decay ** (num_layers + 1 - layer_id)
            if rates.position_embedding_scale is not None and name.endswith(_VIT_POSITION_EMBEDDING):
                layer_id, scale = "pos_embed", rates.position_embedding_scale
        decay = 0.0 if name in no_decay else weight_decay
        key = (component, layer_id, decay)
        if key not in groups:
            suffix = "" if layer_id is None else f".{layer_id}" if isinstance(layer_id, str) else f".layer{layer_id}"
            groups[key] = {
                "params": [],
                "name": f"{component}{suffix}{'' if decay else '.no_decay'}",
                "component": component,
                "lr": base[component] * scale,
                "lr_scale": scale,
                "weight_decay": decay,
            }
        groups[key]["params"].append(param)
    extra = _extra_parameters(model, sam3, trainable_only)
    exempt = _no_weight_decay_names(unwrap(model)) if extra else set()
    for decay in (weight_decay, 0.0):
        params = [param for name, param in extra if (0.0 if name in exempt else weight_decay) == decay]
        if params:
            groups[("extra", None, decay)] = {"params": params, "name": f"extra{'' if decay else '.no_decay'}",
                                              "component": "extra", "lr": rates.detector, "lr_scale": 1.0,
                                              "weight_decay": decay}
    return list(groups.values())


def _extra_parameters(model: nn.Module, sam3: Sam3Model, trainable_only: bool) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of ``model``'s parameters that are not its SAM3 model's (names as ``model`` gives them)."""
    model = unwrap(model)
    if model is sam3:
        return []
    inside = {id(param) for param in sam3.parameters()}
    return [(name, param) for name, param in model.named_parameters()
            if id(param) not in inside and (param.requires_grad or not trainable_only)]
