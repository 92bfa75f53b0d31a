"""Original SAM3 (Meta) <-> transformers Sam3Model key conversion."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import Sam3Config, Sam3Model
from transformers.models.sam3.modeling_sam3 import Sam3ViTLayer, Sam3ViTRotaryEmbedding

from medsam3_monai.networks.key_mapping import (
    RULES,
    _rope_freqs_cis,
    KeyMappingError,
    convert_hf_to_original,
    convert_original_to_hf,
    dropped_original_keys,
    map_hf_shapes,
    map_original_shapes,
    TRACKER_NECK_PREFIX,
    split_sam3_checkpoint,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
VIT = "backbone.vision_backbone.trunk."


def _load(name: str) -> dict[str, list[int]]:
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"checkpoint key reference {path} not found")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def original_shapes() -> dict[str, list[int]]:
    return _load("sam3_original_image_keys.json")


@pytest.fixture(scope="module")
def hf_shapes() -> dict[str, list[int]]:
    return _load("hf_sam3_keys.json")


def _tiny_config() -> Sam3Config:
    width, heads = 32, 2
    layer = dict(hidden_size=width, num_attention_heads=heads, intermediate_size=2 * width)
    return Sam3Config(
        vision_config=dict(
            backbone_config=dict(
                model_type="sam3_vit_model", hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                num_attention_heads=heads, image_size=112, pretrain_image_size=112, patch_size=14, window_size=4,
                global_attn_indexes=[1],
            ),
            fpn_hidden_size=width,
            scale_factors=[4.0, 2.0, 1.0, 0.5],
            backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]],
        ),
        text_config=dict(
            model_type="clip_text_model", vocab_size=64, hidden_size=width, intermediate_size=2 * width,
            projection_dim=24, num_hidden_layers=2, num_attention_heads=heads, max_position_embeddings=32,
        ),
        geometry_encoder_config=dict(num_layers=1, **layer),
        detr_encoder_config=dict(num_layers=1, **layer),
        detr_decoder_config=dict(num_layers=2, num_queries=8, **layer),
        mask_decoder_config=dict(hidden_size=width, num_attention_heads=heads),
    )


@pytest.fixture(scope="module")
def tiny() -> tuple[Sam3Config, dict[str, torch.Tensor]]:
    """A tiny Sam3Model state dict with every tensor random (so no two tensors coincide by init)."""
    config = _tiny_config()
    torch.manual_seed(0)
    model = Sam3Model(config)
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    return config, state


# ------------------------------------------------------------------------------- full-size reference
def test_meta_model_matches_hf_reference(hf_shapes):
    with torch.device("meta"):
        model = Sam3Model(Sam3Config())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == hf_shapes


def test_reference_original_shapes_map_exactly_onto_hf(original_shapes, hf_shapes):
    mapped = map_original_shapes(original_shapes)
    assert set(mapped) == set(hf_shapes)
    assert {k: v for k, v in mapped.items() if v != hf_shapes[k]} == {}

    # element counts agree once the documented dropped tensors are accounted for
    dropped = dropped_original_keys(original_shapes)
    freqs = {k for k in dropped if k.endswith(".attn.freqs_cis")}
    points = {k for k in dropped if k.startswith("geometry_encoder.points_")}
    assert freqs == {k for k in original_shapes if k.endswith("freqs_cis")} and len(freqs) == 32
    assert len(points) == 6 and set(dropped) == freqs | points
    width = original_shapes[f"{VIT}pos_embed"][-1]
    dropped_numel = width + sum(math.prod(original_shapes[k]) for k in dropped)  # + class-token position
    assert sum(map(math.prod, original_shapes.values())) - dropped_numel == sum(map(math.prod, hf_shapes.values()))


def test_reference_hf_shapes_map_back_exactly(original_shapes, hf_shapes):
    assert map_hf_shapes(hf_shapes, Sam3Config()) == original_shapes
    without_config = map_hf_shapes(hf_shapes)
    assert set(original_shapes) - set(without_config) == {k for k in original_shapes if k.endswith("freqs_cis")}


def test_every_original_key_has_exactly_one_rule_and_every_rule_is_used(original_shapes):
    used = set()
    for key in original_shapes:
        hits = [i for i, rule in enumerate(RULES) if rule.original.match(key) is not None]
        assert len(hits) == 1, (key, [RULES[i].original for i in hits])
        used.update(hits)
    assert [RULES[i].original for i in range(len(RULES)) if i not in used] == []


# ------------------------------------------------------------------------------------- tiny round trip
def test_tiny_round_trip_is_exact_and_loads_strictly(tiny):
    config, state = tiny
    original = convert_hf_to_original(state, config)
    assert not any(k.startswith(("vision_encoder.", "detr_", "mask_decoder.")) for k in original)

    pos = original[f"{VIT}pos_embed"]
    assert pos.shape == (1, 1 + 64, 32) and torch.all(pos[:, 0] == 0)
    qkv = original[f"{VIT}blocks.1.attn.qkv.weight"]
    prefix = "vision_encoder.backbone.layers.1.attention."
    assert torch.equal(qkv, torch.cat([state[f"{prefix}{x}_proj.weight"] for x in "qkv"]))
    projection = original["backbone.language_backbone.encoder.text_projection"]
    assert torch.equal(projection, state["text_encoder.text_projection.weight"].t())
    assert original[f"{VIT}blocks.0.attn.freqs_cis"].shape == (16, 8)  # 4x4 window, head_dim 16
    assert original[f"{VIT}blocks.1.attn.freqs_cis"].shape == (64, 8)  # global 8x8 grid
    assert original["geometry_encoder.points_direct_project.weight"].shape == (32, 2)

    back = convert_original_to_hf(original)
    assert set(back) == set(state)
    assert [k for k in state if not torch.equal(back[k], state[k])] == []
    model = Sam3Model(config)
    model.load_state_dict(back, strict=True)
    # split/sliced tensors own their storage (safetensors refuses shared tensors)
    q, k = (back[f"{prefix}{x}_proj.weight"] for x in "qk")
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()


def test_inverse_without_config_omits_only_rope_buffers(tiny):
    config, state = tiny
    original = convert_hf_to_original(state)
    assert not any(k.endswith("freqs_cis") for k in original)
    assert set(convert_hf_to_original(state, config)) - set(original) == {
        f"{VIT}blocks.{i}.attn.freqs_cis" for i in range(2)
    }
    assert set(convert_original_to_hf(original)) == set(state)


@pytest.mark.parametrize("which", ["tiny", "full"])
def test_rope_buffers_equal_transformers_rotary_embedding(which):
    """The freqs_cis the inverse writes are the angles transformers recomputes (so dropping them is lossless)."""
    config = _tiny_config() if which == "tiny" else Sam3Config()
    vit = config.vision_config.backbone_config
    layers = range(vit.num_hidden_layers) if which == "tiny" else (0, 7)
    rotary = Sam3ViTRotaryEmbedding(vit)
    for i in layers:
        freqs = _rope_freqs_cis([vit.hidden_size], {"i": str(i)}, config)
        window = vit.window_size if i not in vit.global_attn_indexes else 0
        cos, sin = rotary(torch.zeros(1), Sam3ViTLayer.precompute_positions(vit, window))
        torch.testing.assert_close(cos[0, :, 0::2], freqs.real, rtol=0, atol=1e-5)
        torch.testing.assert_close(sin[0, :, 0::2], freqs.imag, rtol=0, atol=1e-5)
        torch.testing.assert_close(cos[0, :, 1::2], freqs.real, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_keys_are_all_named(tiny):
    config, state = tiny
    original = convert_hf_to_original(state, config)
    original["backbone.vision_backbone.sam2_convs.0.conv_1x1.weight"] = torch.zeros(1)
    original["some_head.weight"] = torch.zeros(1)
    with pytest.raises(KeyMappingError) as info:
        convert_original_to_hf(original)
    assert isinstance(info.value, ValueError)
    assert "some_head.weight" in str(info.value) and "sam2_convs.0.conv_1x1.weight" in str(info.value)
    assert info.value.keys == ["backbone.vision_backbone.sam2_convs.0.conv_1x1.weight", "some_head.weight"]
    with pytest.raises(KeyMappingError, match="not_a_sam3_key"):
        map_original_shapes({"not_a_sam3_key": [1]})


def test_bad_shapes_and_incomplete_hf_state_are_rejected(tiny):
    _, state = tiny
    with pytest.raises(KeyMappingError, match="pos_embed"):
        map_original_shapes({f"{VIT}pos_embed": [1, 64, 32]})  # no class-token position
    with pytest.raises(KeyMappingError, match="divisible by 3"):
        map_original_shapes({f"{VIT}blocks.0.attn.qkv.weight": [10, 32]})
    partial = {k: v for k, v in state.items() if k != "vision_encoder.backbone.layers.0.attention.k_proj.weight"}
    with pytest.raises(KeyMappingError, match="k_proj.weight"):
        convert_hf_to_original(partial)
    with pytest.raises(KeyMappingError, match="extra.weight"):
        convert_hf_to_original({**state, "extra.weight": torch.zeros(1)})


def test_split_sam3_checkpoint():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    detector, tracker = split_sam3_checkpoint(
        {"model": {"detector.transformer.x": a, "tracker.maskmem_tpos_enc": b, "dot_prod_scoring.y": c}}
    )
    assert detector == {"transformer.x": a, "dot_prod_scoring.y": c}
    assert tracker == {"maskmem_tpos_enc": b}
    assert split_sam3_checkpoint({"geometry_encoder.z": a}) == ({"geometry_encoder.z": a}, {})
    # the tracker's neck, kept among the detector's keys by SAM3's video model, belongs to the tracker
    neck = "backbone.vision_backbone.sam2_convs.0.conv_1x1.weight"
    assert neck.startswith(TRACKER_NECK_PREFIX)
    assert split_sam3_checkpoint({f"detector.{neck}": a, "detector.transformer.x": b}) == \
        ({"transformer.x": b}, {neck: a})
    assert split_sam3_checkpoint({neck: a, "transformer.x": b}) == ({"transformer.x": b}, {neck: a})
