"""SAM3 configurations: the full model (real weights, 1008 px) and a tiny random-init preset.

The tiny preset keeps every architectural feature of SAM3 (windowed + global ViT attention with RoPE,
FPN neck, CLIP text encoder, geometry encoder, DETR encoder/decoder with presence token, pixel decoder,
semantic head) at widths small enough for CPU tests and the demo (about 1.85 M parameters, most of them
the 49408-token text embedding).
"""

from __future__ import annotations

from transformers import Sam3Config

from .official_numerics import OFFICIAL_VIT_LAYER_NORM_EPS, set_official_config

PATCH_SIZE = 14
FULL_IMAGE_SIZE = 1008
TINY_IMAGE_SIZE = 112


def check_image_size(image_size: int, patch_size: int = PATCH_SIZE) -> int:
    """Validate the slice-space side S: a positive multiple of the ViT patch size."""
    if not isinstance(image_size, int) or image_size <= 0 or image_size % patch_size:
        raise ValueError(f"image size must be a positive multiple of {patch_size} (the ViT's patch size; e.g. 112, "
                         f"224, 1008), got {image_size!r}")
    if image_size < 2 * patch_size:  # the FPN's 0.5x level of a one-patch grid has no pixel
        raise ValueError(f"image size must be at least {2 * patch_size} (two ViT patches; e.g. 112, 224, 1008), "
                         f"got {image_size}")
    return image_size


def _feature_sizes(image_size: int, scale_factors: list[float]) -> list[list[int]]:
    """FPN feature-map sizes of the levels the detector uses (all but the last, 0.5x, level)."""
    grid = image_size // PATCH_SIZE
    return [[int(grid * s)] * 2 for s in scale_factors[:-1]]


def full_sam3_config(image_size: int = FULL_IMAGE_SIZE) -> Sam3Config:
    """The released SAM3 detector configuration (840,376,374 parameters); 1008 px for real weights.

    transformers' defaults with the official ViT LayerNorm eps (1e-5, see :mod:`.official_numerics`).
    """
    config = set_official_config(Sam3Config())
    if image_size != FULL_IMAGE_SIZE:
        check_image_size(image_size)
        config.image_size = image_size
        config.vision_config.backbone_feature_sizes = _feature_sizes(
            image_size, config.vision_config.scale_factors
        )
    return config


def tiny_sam3_config(
    image_size: int = TINY_IMAGE_SIZE,
    hidden_size: int = 32,
    num_queries: int = 8,
    vit_layers: int = 2,
    text_layers: int = 2,
    decoder_layers: int = 2,
    window_size: int = 4,
) -> Sam3Config:
    """A random-init SAM3 for tests and the demo.

    Args:
        image_size: slice-space side S (multiple of 14); the ViT is "pretrained" at S so its position
            embedding needs no tiling.
        hidden_size: width shared by ViT, FPN, text encoder and detector (divisible by 8).
        num_queries: DETR object queries Q.
        vit_layers: ViT depth; the last layer attends globally, the others in windows of ``window_size``.
        text_layers: CLIP text encoder depth.
        decoder_layers: DETR decoder depth (>= 2 so auxiliary layers exist for the set loss).
    """
    check_image_size(image_size)
    if hidden_size % 8:
        raise ValueError(f"hidden_size must be divisible by 8, got {hidden_size}")
    heads = 2
    scale_factors = [4.0, 2.0, 1.0, 0.5]
    return Sam3Config(
        vision_config=dict(
            backbone_config=dict(
                model_type="sam3_vit_model",
                layer_norm_eps=OFFICIAL_VIT_LAYER_NORM_EPS,
                hidden_size=hidden_size,
                intermediate_size=2 * hidden_size,
                num_hidden_layers=vit_layers,
                num_attention_heads=heads,
                image_size=image_size,
                patch_size=PATCH_SIZE,
                window_size=window_size,
                global_attn_indexes=[vit_layers - 1],
                pretrain_image_size=image_size,
            ),
            fpn_hidden_size=hidden_size,
            scale_factors=scale_factors,
            backbone_feature_sizes=_feature_sizes(image_size, scale_factors),
        ),
        text_config=dict(
            model_type="clip_text_model",
            vocab_size=49408,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            projection_dim=hidden_size,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            max_position_embeddings=32,
            hidden_act="gelu",
        ),
        geometry_encoder_config=dict(
            hidden_size=hidden_size, num_layers=1, num_attention_heads=heads, intermediate_size=2 * hidden_size
        ),
        detr_encoder_config=dict(
            hidden_size=hidden_size, num_layers=1, num_attention_heads=heads, intermediate_size=2 * hidden_size
        ),
        detr_decoder_config=dict(
            hidden_size=hidden_size,
            num_layers=decoder_layers,
            num_attention_heads=heads,
            intermediate_size=2 * hidden_size,
            num_queries=num_queries,
        ),
        mask_decoder_config=dict(hidden_size=hidden_size, num_attention_heads=heads),
    )
