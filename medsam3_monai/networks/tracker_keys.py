"""Meta's tracker keys -> transformers ``Sam3TrackerVideoModel`` keys.

A ``sam3.pt`` holds the tracker under ``tracker.*`` (sam3's ``Sam3TrackerPredictor``: memory encoder, memory
attention, SAM prompt encoder and mask decoder, object pointers); its neck lives with the detector
(``detector.backbone.vision_backbone.sam2_convs.*``) and its ViT is the detector's. :func:`convert_original_tracker`
renames the tracker part of :func:`~.key_mapping.split_sam3_checkpoint` (``tracker.*`` prefix stripped, the neck
under its own name) to the keys of a ``Sam3TrackerVideoModel``: the 309 tracker tensors become 307 (the four point
embeddings are one tensor; the prompt encoder's random Fourier matrix is also the model's shared image embedding)
and the neck's 22 are its ``vision_encoder.neck.*``, by the detector neck's rules (the same modules).
``tests/test_official_tracker.py`` loads the official tracker and neck through it, strictly, and propagates.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .key_mapping import TRACKER_NECK_PREFIX, convert_original_to_hf

__all__ = ["convert_original_tracker"]

#: the three-layer MLPs: official ``layers.0/1/2`` are transformers' ``proj_in``, ``layers.0``, ``proj_out``
_THREE_LAYER_MLPS = r"(iou_prediction_head|output_hypernetworks_mlps\.\d+|pred_obj_score_head|obj_ptr_proj)"
_MLP_LAYERS = {"0": "proj_in", "1": "layers.0", "2": "proj_out"}
#: conv, LayerNorm, activation per stage of the memory mask downsampler; its last entry is the final 1 x 1 conv
_DOWNSAMPLER_STAGE = ("conv", "layer_norm")

#: (pattern, replacement) applied in order to each key
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^sam_prompt_encoder\.", "prompt_encoder."),
    (r"^sam_mask_decoder\.", "mask_decoder."),
    (r"^transformer\.encoder\.", "memory_attention."),
    (r"^maskmem_backbone\.fuser\.", "memory_encoder.memory_fuser."),
    (r"^maskmem_backbone\.pix_feat_proj\.", "memory_encoder.feature_projection."),
    (r"^maskmem_backbone\.out_proj\.", "memory_encoder.projection."),
    (r"^obj_ptr_proj\.", "object_pointer_proj."),
    (r"^obj_ptr_tpos_proj\.", "temporal_positional_encoding_projection_layer."),
    (r"^maskmem_tpos_enc$", "memory_temporal_positional_encoding"),
    (r"^no_mem_embed$", "no_memory_embedding"),
    (r"^no_mem_pos_enc$", "no_memory_positional_encoding"),
    (r"^no_obj_ptr$", "no_object_pointer"),
    (r"^no_obj_embed_spatial$", "occlusion_spatial_embedding_parameter"),
    (r"\.dwconv\.", ".depthwise_conv."),
    (r"\.pwconv(\d)\.", r".pointwise_conv\1."),
    (r"\.gamma$", ".scale"),
    (r"\.out_proj\.", ".o_proj."),
    (r"\.norm(\d?)\.", r".layer_norm\1."),
    (r"\.norm_final_attn\.", ".layer_norm_final_attn."),
    (r"\.mlp\.lin1\.", ".mlp.proj_in."),
    (r"\.mlp\.lin2\.", ".mlp.proj_out."),
    (r"\.pe_layer\.positional_encoding_gaussian_matrix$", ".shared_embedding.positional_embedding"),
    (r"\.mask_downscaling\.0\.", ".mask_embed.conv1."),
    (r"\.mask_downscaling\.1\.", ".mask_embed.layer_norm1."),
    (r"\.mask_downscaling\.3\.", ".mask_embed.conv2."),
    (r"\.mask_downscaling\.4\.", ".mask_embed.layer_norm2."),
    (r"\.mask_downscaling\.6\.", ".mask_embed.conv3."),
    (r"\.output_upscaling\.0\.", ".upscale_conv1."),
    (r"\.output_upscaling\.1\.", ".upscale_layer_norm."),
    (r"\.output_upscaling\.3\.", ".upscale_conv2."),
)


def _renamed(key: str, downsampler_entries: int) -> str:
    """One official tracker key -> its transformers name."""
    mlp = re.match(rf"^(.*\.)?{_THREE_LAYER_MLPS}\.layers\.(\d)\.(weight|bias)$", key)
    if mlp:
        key = f"{mlp.group(1) or ''}{mlp.group(2)}.{_MLP_LAYERS[mlp.group(3)]}.{mlp.group(4)}"
    stage = re.match(r"^maskmem_backbone\.mask_downsampler\.encoder\.(\d+)\.(weight|bias)$", key)
    if stage:
        index = int(stage.group(1))
        name = "final_conv" if index == downsampler_entries - 1 else \
            f"layers.{index // 3}.{_DOWNSAMPLER_STAGE[index % 3]}"
        return f"memory_encoder.mask_downsampler.{name}.{stage.group(2)}"
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def convert_original_tracker(state_dict: Mapping[str, torch.Tensor],
                             origins: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The tracker part of a ``sam3.pt`` (:func:`~.key_mapping.split_sam3_checkpoint`: the ``tracker.*`` tensors,
    prefix stripped, and the neck's ``backbone.vision_backbone.sam2_convs.*``) -> a ``Sam3TrackerVideoModel``
    state dict without the ViT (``vision_encoder.backbone.*``, the detector's). Raises
    :class:`~.key_mapping.KeyMappingError` for a neck key no rule covers. ``origins``, when given, receives each
    output key's name in the ``sam3.pt`` (``tracker.*``, ``detector.backbone.vision_backbone.sam2_convs.*``), for
    key reports in the file's words."""
    neck_convs = {"backbone.vision_backbone.convs." + k[len(TRACKER_NECK_PREFIX):]: v
                  for k, v in state_dict.items() if k.startswith(TRACKER_NECK_PREFIX)}
    out: dict[str, torch.Tensor] = dict(convert_original_to_hf(neck_convs))  # vision_encoder.neck.fpn_layers.*
    if origins is not None:
        for key, value in neck_convs.items():  # one by one: which file key each neck tensor came from
            (converted,) = convert_original_to_hf({key: value})
            origins[converted] = "detector." + TRACKER_NECK_PREFIX + key[len("backbone.vision_backbone.convs."):]
    entries = {int(m.group(1)) for k in state_dict
               if (m := re.match(r"^maskmem_backbone\.mask_downsampler\.encoder\.(\d+)\.", k))}
    downsampler_entries = max(entries) + 1 if entries else 0
    points = {}
    for key, value in state_dict.items():
        if key.startswith(TRACKER_NECK_PREFIX):
            continue
        point = re.match(r"^sam_prompt_encoder\.point_embeddings\.(\d+)\.weight$", key)
        if point:
            points[int(point.group(1))] = value
            continue
        renamed = _renamed(key, downsampler_entries)
        out[renamed] = value
        if origins is not None:
            origins[renamed] = "tracker." + key
    if points:
        out["prompt_encoder.point_embed.weight"] = torch.cat([points[i] for i in sorted(points)], dim=0)
        if origins is not None:
            origins["prompt_encoder.point_embed.weight"] = (
                f"tracker.sam_prompt_encoder.point_embeddings.{{{','.join(map(str, sorted(points)))}}}.weight, stacked")
    fourier = out.get("prompt_encoder.shared_embedding.positional_embedding")
    if fourier is not None:
        out["shared_image_embedding.positional_embedding"] = fourier
        if origins is not None:
            origins["shared_image_embedding.positional_embedding"] = origins.get(
                "prompt_encoder.shared_embedding.positional_embedding", "")
    return out
