"""Optimiser parameter groups of Medical SAM3 §4.2 on the full SAM3 configuration (meta device)."""

from __future__ import annotations

import pytest
import torch
from transformers import Sam3Model

from medsam3_monai.networks import LearningRates, full_sam3_config, sam3_param_groups, vit_layer_id

FULL_PARAMETERS = 840_376_374


@pytest.fixture(scope="module")
def full_model_on_meta() -> Sam3Model:
    with torch.device("meta"):
        return Sam3Model(full_sam3_config())


def test_every_parameter_lands_in_exactly_one_group(full_model_on_meta):
    groups = sam3_param_groups(full_model_on_meta)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)), "a parameter is in two groups"
    assert set(seen) == {id(p) for p in full_model_on_meta.parameters()}
    assert sum(p.numel() for g in groups for p in g["params"]) == FULL_PARAMETERS


def test_learning_rates_and_vit_layer_decay(full_model_on_meta):
    rates = LearningRates()
    lr_of = {}
    for group in sam3_param_groups(full_model_on_meta, rates):
        for param in group["params"]:
            lr_of[id(param)] = group["lr"]
    named = dict(full_model_on_meta.named_parameters())
    num_layers = 32
    for i in range(num_layers):
        expected = 5e-5 * 0.85 ** (num_layers - i)  # layer i has id i + 1: 0.85^(L + 1 - (i + 1))
        for name in (f"vision_encoder.backbone.layers.{i}.mlp.fc1.weight", f"vision_encoder.backbone.layers.{i}.layer_norm1.bias"):
            assert lr_of[id(named[name])] == pytest.approx(expected, rel=1e-12), name
    assert lr_of[id(named["vision_encoder.backbone.embeddings.position_embeddings"])] == pytest.approx(5e-5 * 0.85**33)
    assert lr_of[id(named["vision_encoder.backbone.layer_norm.weight"])] == pytest.approx(5e-5 * 0.85**33)
    neck = next(n for n in named if n.startswith("vision_encoder.neck."))
    assert lr_of[id(named[neck])] == pytest.approx(5e-5)
    expectations = {
        "text_encoder.": 5e-5, "text_projection.": 5e-5, "geometry_encoder.": 1e-4,
        "detr_encoder.": 3e-4, "detr_decoder.": 3e-4, "mask_decoder.": 3e-4, "dot_product_scoring.": 3e-4,
    }
    for prefix, lr in expectations.items():
        names = [n for n in named if n.startswith(prefix)]
        assert names, prefix
        assert all(lr_of[id(named[n])] == pytest.approx(lr) for n in names), prefix


def test_vit_layer_ids():
    assert vit_layer_id("vision_encoder.backbone.embeddings.patch_embeddings.projection.weight", 32) == 0
    assert vit_layer_id("vision_encoder.backbone.layers.0.attention.q_proj.weight", 32) == 1
    assert vit_layer_id("vision_encoder.backbone.layers.31.mlp.fc2.bias", 32) == 32
    assert vit_layer_id("vision_encoder.neck.fpn_layers.0.proj1.weight", 32) == 33


def test_frozen_parameters_are_left_out(tiny_net):
    for p in tiny_net.sam3.vision_encoder.parameters():
        p.requires_grad_(False)
    try:
        groups = sam3_param_groups(tiny_net)
        assert {g["component"] for g in groups} == {"language", "geometry", "detector"}
    finally:
        for p in tiny_net.sam3.vision_encoder.parameters():
            p.requires_grad_(True)
    biases = [g for g in sam3_param_groups(tiny_net) if g["name"].endswith("no_decay")]
    assert biases and all(g["weight_decay"] == 0.0 for g in biases)


def test_weight_decay_spares_biases_and_layernorms_only(full_model_on_meta):
    decay_of = {}
    for group in sam3_param_groups(full_model_on_meta, weight_decay=0.1):
        for param in group["params"]:
            decay_of[id(param)] = group["weight_decay"]
    named = dict(full_model_on_meta.named_parameters())
    assert decay_of[id(named["vision_encoder.backbone.layers.0.layer_norm1.weight"])] == 0.0
    assert decay_of[id(named["detr_decoder.layers.0.self_attn.q_proj.bias"])] == 0.0
    assert decay_of[id(named["detr_decoder.layers.0.self_attn.q_proj.weight"])] == 0.1
    assert decay_of[id(named["vision_encoder.backbone.embeddings.position_embeddings"])] == 0.1


def test_optional_position_embedding_override(full_model_on_meta):
    groups = sam3_param_groups(full_model_on_meta, LearningRates(position_embedding_scale=1.0))
    pos = next(g for g in groups if any(p is dict(full_model_on_meta.named_parameters())[
        "vision_encoder.backbone.embeddings.position_embeddings"] for p in g["params"]))
    assert pos["lr"] == pytest.approx(5e-5) and len(pos["params"]) == 1
