"""Optimiser parameter groups of Medical SAM3 §4.2 on the full SAM3 configuration (meta device), the optimiser
built from them, and the learning-rate schedule (Meta's inverse square root) by hand."""

from __future__ import annotations

import math

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
    assert pos["lr"] == pytest.approx(5e-5) and len(pos["params"]) == 1 and pos["name"] == "vision.pos_embed"


def test_build_optimizer_gives_each_component_its_rate_and_the_weight_decay():
    from medsam3_monai.engines import build_optimizer
    from medsam3_monai.networks import MedSAM3Net

    rates = {"detector": 1.0, "vision": 2.0, "language": 3.0, "geometry": 4.0}  # all different
    optimizer = build_optimizer(MedSAM3Net("tiny"), detector_lr=1.0, vision_lr=2.0, language_lr=3.0, geometry_lr=4.0,
                                layer_decay=1.0, weight_decay=0.25)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(rates[group["component"]]), group["name"]
        assert group["weight_decay"] == (0.0 if group["name"].endswith(".no_decay") else 0.25), group["name"]
    assert {group["component"] for group in optimizer.param_groups} == set(rates)


@pytest.mark.parametrize("step, factor", [
    (0, 0.0), (5, 0.25), (10, 0.5), (20, 1.0),  # linear warm-up over 20 steps
    (40, 1 / math.sqrt(2)), (80, 0.5), (200, 1 / math.sqrt(10)),  # then 1 / sqrt((step + 20 - 20) / 20)
])
def test_inverse_sqrt_factor_by_hand(step, factor):
    from medsam3_monai.engines.schedulers import inverse_sqrt_factor

    assert inverse_sqrt_factor(step, warmup_steps=20, timescale=20) == pytest.approx(factor, abs=1e-12)


def test_cool_down_and_the_scheduler_scale_every_group_by_the_factor():
    from medsam3_monai.engines.schedulers import WarmupInverseSqrtLR, inverse_sqrt_factor

    # the last 20 of 100 steps go linearly to 0: step 90 is half-way
    assert inverse_sqrt_factor(90, 20, 20, cooldown_steps=20, total_steps=100) == pytest.approx(0.5 / math.sqrt(4.5))
    assert inverse_sqrt_factor(100, 20, 20, cooldown_steps=20, total_steps=100) == 0.0
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])
    scheduler = WarmupInverseSqrtLR(optimizer, warmup_steps=4, timescale=4)
    rates = []
    for _ in range(9):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    expected = [0, 0.25, 0.5, 0.75, 1] + [1 / math.sqrt(1 + k / 4) for k in range(1, 5)]
    assert [first for first, _ in rates] == pytest.approx(expected)
    assert [second for _, second in rates] == pytest.approx([0.1 * x for x in expected])  # each group's own rate


def test_the_bundles_lr_block_pins_the_position_embeddings_scale():
    """``--lr#position_embedding_scale 1.0`` (sam3's fine-tuning configs): the ViT position embedding gets the vision
    rate itself; it was refused as a key of ``lr`` (only ``optimizer#...`` reached it). Default: the layer decay."""
    from medsam3_monai.bundle import check_setting_keys, config_parser

    def position_rate(**overrides) -> float:
        optimizer = config_parser("train.json", checkpoint="tiny", image_size=112, **overrides).get_parsed_content(
            "optimizer")
        return next(g["lr"] for g in optimizer.param_groups if g["name"] == "vision.pos_embed" or
                    any("pos_embed" in n for n in g.get("param_names", [])))

    check_setting_keys(lr={"position_embedding_scale": 1.0})
    check_setting_keys(lr={"position_embedding_scale": None})
    assert position_rate(**{"lr#position_embedding_scale": 1.0}) == pytest.approx(5e-5)


def test_the_bundles_cool_down_reaches_the_scheduler_with_the_trainings_optimiser_steps(shared_data, tmp_path):
    """``--scheduler#cooldown_steps 20`` (SAM3's fine-tuning configs set 20) goes linearly to 0 over the last 20
    optimiser steps of the training; it was not a key, and ``lr_scheduler#cooldown_steps`` changed nothing without
    the total. A cool-down without a total is refused; a resume keeps this run's total (more epochs: a later end)."""
    import json

    from medsam3_monai.bundle import config_parser
    from medsam3_monai.engines.schedulers import WarmupInverseSqrtLR, inverse_sqrt_factor, optimizer_steps

    assert optimizer_steps(10, 3, accumulation_steps=4) == 9  # 3 steps an epoch: after 4, 8 and the epoch's end
    kvasir = shared_data / "Kvasir-SEG_sample"
    items = [{"image": str(image), "label": str(kvasir / "masks" / image.name), "prompts": {"1": "polyp"},
              "mask_encoding": "binary"} for image in sorted((kvasir / "images").glob("*.jpg"))]
    (tmp_path / "list.json").write_text(json.dumps({"training": items, "validation": items[:1]}))
    parser = config_parser("train.json", datalists=[str(tmp_path / "list.json")], checkpoint="tiny", image_size=112,
                           batch_size=2, max_epochs=5, accumulation_steps=1, cache="none",
                           **{"scheduler#cooldown_steps": 4, "bundle_root": str(tmp_path / "run")})
    scheduler = parser.get_parsed_content("lr_scheduler")
    total = math.ceil(len(items) / 2) * 5  # 2 items a step, 5 epochs
    assert (scheduler.cooldown_steps, scheduler.total_steps) == (4, total)
    assert scheduler._factor(total - 2) == pytest.approx(inverse_sqrt_factor(total - 2, 20, 20) * 2 / 4)  # half-way
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="cooldown_steps 4 needs total_steps"):
        WarmupInverseSqrtLR(optimizer, cooldown_steps=4)
    longer = WarmupInverseSqrtLR(scheduler.optimizer, cooldown_steps=4, total_steps=total + 20)
    longer.load_state_dict(scheduler.state_dict())
    assert longer.total_steps == total + 20 and longer.cooldown_steps == 4
    # a run started without a cool-down and resumed with one: this run's settings, the checkpoint's step
    plain = WarmupInverseSqrtLR(scheduler.optimizer)
    plain.last_epoch = 7
    cooled = WarmupInverseSqrtLR(scheduler.optimizer, cooldown_steps=6, total_steps=12)
    cooled.load_state_dict(plain.state_dict())
    assert (cooled.last_epoch, cooled.cooldown_steps, cooled.total_steps) == (7, 6, 12)
    assert cooled._factor(12) == 0.0


def test_the_full_preset_sizes_and_a_smaller_slice_space():
    full = full_sam3_config()
    backbone = full.vision_config.backbone_config
    assert (backbone.image_size, backbone.patch_size) == (1008, 14)
    assert full.vision_config.backbone_feature_sizes[0] == [288, 288]  # masks at 4 x 1008 / 14
    assert full.text_config.max_position_embeddings == 32  # SAM3's context: 32 tokens
    half = full_sam3_config(504)  # 504 / 14 = 36: FPN levels at 4x, 2x, 1x
    assert half.vision_config.backbone_config.image_size == 504
    assert half.vision_config.backbone_feature_sizes == [[144, 144], [72, 72], [36, 36]]

