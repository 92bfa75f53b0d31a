"""Where transformers' SAM3 computes differently from Meta's official ``sam3`` code, and the fixes we apply.

Measured against sam3 0.1.4 on random weights (``scripts/check_official.py``):

* **ViT LayerNorm epsilon.** The official ViT builds its 65 LayerNorms (``ln_pre`` and two per block) with
  eps 1e-5 (``vitdet.py``); transformers' ``Sam3ViTConfig.layer_norm_eps`` defaults to 1e-6 and the released
  ``facebook/sam3`` ``config.json`` keeps it. Alone it moves ``pred_masks`` by ~1.8e-4.
* **Presence logits.** transformers clamps the decoder's presence logits to [-10, 10]; the official decoder
  computes the same clamp but discards its result, so its presence logits (scores and the presence loss, with
  its gradient) are unclamped.
* **The geometry token of text-only prompts** is handled in :meth:`MedSAM3Net.forward` (the geometry encoder
  always runs, as in ``Sam3Image._encode_prompt``), the DAC training forward in :mod:`.dac` and the training
  dropout in :mod:`.regularization`.

:func:`match_official_numerics` is applied to every model :func:`load_sam3` builds, whatever the source.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from transformers import Sam3Config, Sam3Model
from transformers.modeling_outputs import BaseModelOutputWithPooling

OFFICIAL_VIT_LAYER_NORM_EPS = 1e-5


class OfficialNumericsWarning(UserWarning):
    """A checkpoint's configuration differs from the official SAM3 numerics; the official value is used."""


def set_official_config(config: Sam3Config) -> Sam3Config:
    """Write the official ViT LayerNorm eps into ``config`` (in place) and return it."""
    config.vision_config.backbone_config.layer_norm_eps = OFFICIAL_VIT_LAYER_NORM_EPS
    return config


def vit_layer_norms(model: Sam3Model) -> list[nn.LayerNorm]:
    """The ViT's LayerNorms: ``layer_norm`` (the official ``ln_pre``) and two per block (65 in the full model)."""
    return [m for m in model.vision_encoder.backbone.modules() if isinstance(m, nn.LayerNorm)]


def match_official_numerics(model: Sam3Model, source: str = "model") -> Sam3Model:
    """Make ``model`` compute what the official SAM3 computes (in place): ViT eps 1e-5, unclamped presence.

    Warns (:class:`OfficialNumericsWarning`) when ``source``'s configuration asked for another ViT epsilon, e.g.
    the ``facebook/sam3`` folder's 1e-6: the official value is used and saved with the model from then on.
    """
    vit_config = model.config.vision_config.backbone_config
    if not math.isclose(vit_config.layer_norm_eps, OFFICIAL_VIT_LAYER_NORM_EPS, rel_tol=1e-9):
        warnings.warn(
            f"{source}: its config sets the ViT layer_norm_eps to {vit_config.layer_norm_eps:g}; Meta's official "
            f"SAM3 uses {OFFICIAL_VIT_LAYER_NORM_EPS:g}, which is what we use (and save from now on).",
            OfficialNumericsWarning,
            stacklevel=3,
        )
        set_official_config(model.config)
    for norm in vit_layer_norms(model):
        norm.eps = OFFICIAL_VIT_LAYER_NORM_EPS
    # the official decoder's clamp of the presence logits is a no-op (its result is discarded)
    model.detr_decoder.clamp_presence_logit_max_val = math.inf
    return model


def sam3model_text_only_forward(model: Sam3Model, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                                attention_mask: torch.Tensor):
    """transformers' ``Sam3Model.forward`` on SAM3's official text-only prompt: text tokens + geometry CLS token.

    ``Sam3Model.forward`` drops the geometry token when there are no boxes; here the geometry encoder runs on the
    empty box set and its token is appended to the text embedding that ``Sam3Model.forward`` is given. A
    reference for tests and benchmarks: (B, 3, S, S) normalised pixels, (B, T) ids and mask, one prompt per image.
    """
    num = input_ids.shape[0]
    device = pixel_values.device
    text = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    vision = model.vision_encoder(pixel_values)
    geometry = model.geometry_encoder(
        box_embeddings=torch.zeros(num, 0, 4, device=device, dtype=pixel_values.dtype),
        box_mask=torch.zeros(num, 0, dtype=torch.bool, device=device),
        box_labels=torch.zeros(num, 0, dtype=torch.long, device=device),
        img_feats=vision.fpn_hidden_states[:-1],
        img_pos_embeds=vision.fpn_position_encoding[:-1],
    )
    prompt = torch.cat([text.pooler_output, geometry.last_hidden_state], dim=1)
    mask = torch.cat([attention_mask, geometry.attention_mask.to(attention_mask.dtype)], dim=1)
    return model(vision_embeds=vision, text_embeds=BaseModelOutputWithPooling(pooler_output=prompt),
                 attention_mask=mask)
