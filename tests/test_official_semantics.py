"""Where transformers' SAM3 differs from Meta's official code, our network follows the official one.

The geometry token of text-only prompts is pinned in test_network_forward.py and the tokenizer in
test_tokenizer.py; here: the ViT LayerNorm eps, unclamped presence logits, the DAC training forward and the
training dropout. ``scripts/check_official.py`` compares the full model with sam3 0.1.4 itself.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import Sam3VideoConfig

from medsam3_monai.deploy.cli import main as cli_main
from medsam3_monai.networks import MedSAM3Net, tiny_sam3_config
from medsam3_monai.networks.official_numerics import (
    OFFICIAL_VIT_LAYER_NORM_EPS,
    OfficialNumericsWarning,
    vit_layer_norms,
)
from medsam3_monai.networks.presets import full_sam3_config
from medsam3_monai.networks.tracker import sam3_tracker_config
from medsam3_monai.networks.regularization import _with_weight_dropout

PROMPTS = ["polyp", "left kidney"]
NO_DROPOUT = {"dropout": 0.0, "drop_path": 0.0}


# ------------------------------------------------------------------------------------ ViT LayerNorm eps
def test_vit_layer_norms_use_the_official_eps(tiny_net):
    norms = vit_layer_norms(tiny_net.sam3)
    assert len(norms) == 2 * tiny_net.config.vision_config.backbone_config.num_hidden_layers + 1  # 65 in full SAM3
    assert all(norm.eps == 1e-5 for norm in norms)
    assert full_sam3_config().vision_config.backbone_config.layer_norm_eps == OFFICIAL_VIT_LAYER_NORM_EPS
    assert sam3_tracker_config().vision_config.backbone_config.layer_norm_eps == OFFICIAL_VIT_LAYER_NORM_EPS
    assert tiny_net.config.vision_config.backbone_config.layer_norm_eps == OFFICIAL_VIT_LAYER_NORM_EPS


def test_folder_with_transformers_eps_warns_and_uses_the_official_value(tmp_path, tiny_net, tiny_images):
    config = tiny_sam3_config().to_dict()
    config["vision_config"]["backbone_config"]["layer_norm_eps"] = 1e-6  # as facebook/sam3's config.json
    Sam3VideoConfig(detector_config=config).save_pretrained(tmp_path)
    tensors = {f"detector_model.{k}": v.contiguous() for k, v in tiny_net.sam3.state_dict().items()}
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.warns(OfficialNumericsWarning, match="layer_norm_eps to 1e-06"):
        net = MedSAM3Net(tmp_path).eval()
    assert all(norm.eps == 1e-5 for norm in vit_layer_norms(net.sam3))
    with torch.no_grad():
        assert torch.equal(net(tiny_images, PROMPTS).pred_masks, tiny_net(tiny_images, PROMPTS).pred_masks)
    saved = net.save_pretrained(tmp_path / "saved")
    assert json.loads((saved / "config.json").read_text())["vision_config"]["backbone_config"]["layer_norm_eps"] == 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error", OfficialNumericsWarning)
        MedSAM3Net(saved)  # what we saved is official: no warning


def test_convert_checkpoint_writes_the_official_eps(tmp_path, tiny_net):
    from medsam3_monai.networks.key_mapping import convert_hf_to_original

    detector = convert_hf_to_original(tiny_net.sam3.state_dict())
    torch.save({"model": {f"detector.{k}": v for k, v in detector.items()}}, tmp_path / "sam3.pt")
    assert cli_main(["convert-checkpoint", str(tmp_path / "sam3.pt"), str(tmp_path / "hf"), "--config", "tiny"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vision_config"]["backbone_config"]["layer_norm_eps"] == OFFICIAL_VIT_LAYER_NORM_EPS


# ------------------------------------------------------------------------------------ presence logits
def test_presence_logits_are_not_clamped(tiny_images):
    net = MedSAM3Net("tiny").eval()
    with torch.no_grad():
        net.sam3.detr_decoder.presence_head.layer3.bias.fill_(40.0)
        out = net(tiny_images, PROMPTS)
    assert (out.all_presence_logits > 30).all(), "transformers clamps to 10; the official decoder does not"


# ------------------------------------------------------------------------------------ DAC
@pytest.fixture(scope="module")
def deterministic_net():
    return MedSAM3Net("tiny", seed=5, training_dropout=NO_DROPOUT)


def test_eval_forward_has_no_one_to_many_queries(deterministic_net, tiny_images):
    with torch.no_grad():
        assert deterministic_net.eval()(tiny_images, PROMPTS).one_to_many is None
        assert MedSAM3Net("tiny", dac=False).train()(tiny_images, PROMPTS).one_to_many is None


def test_dac_first_half_is_the_eval_forward(deterministic_net, tiny_images):
    with torch.no_grad():
        evaluated = deterministic_net.eval()(tiny_images, PROMPTS)
        trained = deterministic_net.train()(tiny_images, PROMPTS)
    deterministic_net.eval()
    for field in ("all_pred_logits", "all_pred_boxes", "all_presence_logits", "pred_masks", "semantic_seg"):
        assert torch.allclose(getattr(trained, field), getattr(evaluated, field), atol=1e-5), field
    o2m = trained.one_to_many
    q, layers = deterministic_net.num_queries, deterministic_net.num_decoder_layers
    assert o2m.all_pred_logits.shape == (layers, 2, q) and o2m.all_pred_boxes_cxcywh.shape == (layers, 2, q, 4)
    assert o2m.pred_masks.shape == trained.pred_masks.shape


def test_dac_second_half_skips_self_attention(deterministic_net, tiny_images):
    """The one-to-many queries equal the same queries run through decoder layers whose self-attention is zeroed
    (transformers' plain decoder, no DAC): they pass self-attention unchanged and share everything else."""
    no_self_attention = copy.deepcopy(deterministic_net).eval()
    for layer in no_self_attention.sam3.detr_decoder.layers:
        nn.init.zeros_(layer.self_attn.o_proj.weight)
        nn.init.zeros_(layer.self_attn.o_proj.bias)
    with torch.no_grad():
        o2m = deterministic_net.train()(tiny_images, PROMPTS).one_to_many
        expected = no_self_attention(tiny_images, PROMPTS)
    deterministic_net.eval()
    assert torch.allclose(o2m.all_pred_logits, expected.all_pred_logits, atol=1e-5)
    assert torch.allclose(o2m.all_pred_boxes_cxcywh, expected.all_pred_boxes_cxcywh, atol=1e-5)
    assert torch.allclose(o2m.pred_masks, expected.pred_masks, atol=1e-4)
    with torch.no_grad():
        plain = deterministic_net(tiny_images, PROMPTS)
    assert not torch.allclose(o2m.all_pred_logits, plain.all_pred_logits, atol=1e-6), "the halves must differ"


def test_dac_restores_the_decoder_and_reaches_the_shared_parameters(tiny_images):
    net = MedSAM3Net("tiny").train()
    decoder = net.sam3.detr_decoder
    before = dict(decoder.named_modules())
    out = net(tiny_images, PROMPTS)
    assert dict(decoder.named_modules()).keys() == before.keys()
    assert all(module is before[name] for name, module in decoder.named_modules())
    out.one_to_many.all_pred_logits.sum().backward()  # the one-to-many half alone
    assert decoder.query_embed.weight.grad.abs().sum() > 0
    assert decoder.reference_points.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ training dropout
def test_dropout_rates_sit_where_the_official_model_drops():
    net = MedSAM3Net("tiny", training_dropout={"dropout": 0.3, "drop_path": 0.2})
    for part in ("geometry_encoder", "detr_encoder", "detr_decoder"):
        module = getattr(net.sam3, part)
        rates = {name: d.p for name, d in module.named_modules() if isinstance(d, nn.Dropout)}
        assert rates and set(rates.values()) == {0.3}, (part, rates)  # residual branches and MLP hidden layers
        assert module.config._attn_implementation.startswith("medsam3_weight_dropout_")
    assert net.sam3.dot_product_scoring.text_mlp_dropout.p == 0.0  # moved to the prompt MLP's hidden layer
    assert net.sam3.mask_decoder.prompt_cross_attn_dropout.p == 0.0
    with pytest.raises(ValueError, match="dropout must lie in"):
        MedSAM3Net("tiny", training_dropout={"dropout": 1.0})


def test_attention_weights_are_dropped_in_training_only():
    net = MedSAM3Net("tiny", training_dropout={"dropout": 0.5, "drop_path": 0.0}, dac=False)
    decoder_config = net.sam3.detr_decoder.config
    decoder_config._attn_implementation = _with_weight_dropout("eager")  # eager returns the dropped weights
    attention = net.sam3.detr_decoder.layers[0].text_cross_attn
    seen = []
    attention.register_forward_hook(lambda m, i, out: seen.append(out[1].detach()))
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)  # 90 weights: unseeded, their zero fraction fell outside (0.35, 0.65) in 1 run of 240
        images = torch.rand(1, 3, 112, 112)
        net.train()(images, ["polyp"])
        net.eval()(images, ["polyp"])
    dropped, kept = seen
    valid = kept > 0  # the prompt's valid tokens
    zero_fraction = (dropped[valid] == 0).float().mean().item()
    assert 0.35 < zero_fraction < 0.65
    # kept weights are rescaled by 1 / (1 - 0.5); earlier dropout moves the inputs a little, hence the tolerance
    assert torch.allclose(dropped[valid & (dropped > 0)], 2 * kept[valid & (dropped > 0)], rtol=0.05)
    assert torch.allclose(kept.sum(-1), torch.ones_like(kept.sum(-1)), atol=1e-5), "eval: plain softmax"


def test_vit_stochastic_depth_drops_whole_images_linearly_over_depth():
    net = MedSAM3Net("tiny", training_dropout={"dropout": 0.0, "drop_path": 0.5})
    layers = net.sam3.vision_encoder.backbone.layers  # layer 0 windowed (rate 0), layer 1 global (rate 0.5)
    calls: dict[int, list] = {0: [], 1: []}
    for index, layer in enumerate(layers):  # registered after the drop-path hook: sees the branch as dropped
        layer.mlp.register_forward_hook(lambda m, i, out, index=index: calls[index].append((i[0], out)))
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)  # unseeded, all 8 images or none dropped the branch in one run of 128 (2 x 0.5 ** 8)
        images = torch.rand(8, 3, 112, 112)
        net.train().sam3.vision_encoder(images)
        net.eval()
        (first_input, first_out), (last_input, last_out) = calls[0][0], calls[1][0]
        first_plain, last_plain = layers[0].mlp(first_input), layers[1].mlp(last_input)
    assert torch.equal(first_out, first_plain), "rate 0 in the first block"
    dropped = [bool((last_out[i] == 0).all()) for i in range(8)]
    for i in range(8):
        expected = torch.zeros_like(last_plain[i]) if dropped[i] else 2 * last_plain[i]
        assert torch.allclose(last_out[i], expected, atol=1e-5), "an image's branch is dropped whole or scaled by 2"
    assert 0 < sum(dropped) < 8, dropped


def _check_official_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "check_official.py"
    spec = importlib.util.spec_from_file_location("check_official_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_official_check_gates_each_output_kind_at_its_own_tolerance(tmp_path):
    """A deviation such as transformers' LayerNorm eps (logits +2e-5) fails the check although it is far below
    the masks' tolerance; a missing official loss term fails it too; the measured differences pass."""
    script = _check_official_script()

    def run(logits: float, masks: float, lacking: list[str], gradient: float = 1e-6, one_side: tuple = (),
            zero_diff: float = 1e-9) -> dict:
        result = {"seed": 0, "perturbed_parameters": 1, "versions": {"sam3": "0.1.4"},
                  "columns": {"sam3.pt": {"text_only/logits": logits, "train/o2m_masks": masks},
                              "Sam3Model.forward (last layer)": {"text_only/masks": 0.7}},
                  "losses": {"loss_ce": 4.9e-7, "loss": 1.4e-7, "(terms without an official counterpart)": 0.0,
                             "(official loss terms without one of ours)": lacking,
                             "(total: ours, official)": (786.98, 786.98)},
                  "gradients": {"compared": 3, "only_one_side": list(one_side),
                                "tensors": {"detr_decoder.x.weight": [2.0, 2.0 * gradient],
                                            "detr_decoder.y.weight": [1.0, 1e-7],
                                            "detr_decoder.layers.0.self_attn.k_proj.bias": [1e-9, zero_diff]}}}
        return script.write_report([result], [0], True, tmp_path / "official_check")

    assert run(5.1e-7, 8.9e-6, [])["within_tolerance"]  # what official_check.md measured
    failed = run(2e-5, 8.9e-6, [])
    assert not failed["within_tolerance"] and failed["outputs_over_tolerance"] == ["text_only/logits"]
    assert "EXCEEDED: text_only/logits" in (tmp_path / "official_check.md").read_text()
    assert not run(5.1e-7, 3e-5, [])["within_tolerance"]
    assert not run(5.1e-7, 8.9e-6, ["loss_bbox_extra"])["within_tolerance"]
    assert run(5.1e-7, 8.9e-6, [], gradient=1.7e-4)["within_tolerance"]  # the measured worst tensor
    assert not run(5.1e-7, 8.9e-6, [], gradient=1e-2)["within_tolerance"]  # a tensor 1 % off
    assert not run(5.1e-7, 8.9e-6, [], zero_diff=1e-5)["within_tolerance"]  # a zero gradient that is not
    assert not run(5.1e-7, 8.9e-6, [], one_side=("mask_decoder.x.bias",))["within_tolerance"]
    assert "EXCEEDED: gradients" in (tmp_path / "official_check.md").read_text()


def test_the_official_check_compares_gradients_through_the_checkpoint_conversion(tiny_net, tiny_images):
    """Our gradients against ones in sam3's layout (here ours, converted back with the checkpoint conversion: fused
    q/k/v, transposes): equal gives 0; one tensor off, or a gradient on one side only, is named."""
    from medsam3_monai.networks.key_mapping import convert_hf_to_original

    script = _check_official_script()
    net = copy.deepcopy(tiny_net).train()
    out = net(tiny_images[:1], ["polyp"])
    (out.pred_logits.sum() + out.pred_masks.float().mean() + out.pred_boxes.sum()).backward()
    ours = {name: p.grad for name, p in net.sam3.named_parameters() if p.grad is not None}
    official = convert_hf_to_original(ours)
    assert any(k.endswith("in_proj_weight") for k in official)  # fused q/k/v on sam3's side: the split is exercised
    same = script.compare_gradients(ours, official)
    assert same["compared"] == len(ours) and same["max_rel_diff"] == 0.0 and same["only_one_side"] == []
    name = next(k for k in official if k.endswith("in_proj_weight") and bool(official[k].abs().max() > 0))
    off = dict(official, **{name: official[name] * 1.01})
    worse = script.compare_gradients(ours, off)
    assert 0.0098 < worse["max_rel_diff"] < 0.0102 and worse["worst"].rsplit(".", 1)[0].endswith(
        ("q_proj", "k_proj", "v_proj"))
    # a tensor whose exact gradient is 0 (a key bias) holds rounding noise on both sides: compared to the whole
    # gradient, not to itself
    noise = dict(ours)
    key_bias = next(k for k in ours if k.endswith("k_proj.bias"))
    noise[key_bias] = torch.full_like(ours[key_bias], 1e-12)
    quiet = script.compare_gradients(noise, convert_hf_to_original(dict(ours, **{key_bias: -noise[key_bias]})))
    assert quiet["max_rel_diff"] == 0.0 and quiet["numerically_zero"] >= 1 and quiet["max_diff_of_zero_ones"] < 1e-9
    extra = next(k for k in ours if bool(ours[k].abs().max() > 0))
    lacking = script.compare_gradients({k: v for k, v in ours.items() if k != extra}, official)
    assert lacking["only_one_side"] == [extra]


def test_the_official_check_refuses_a_size_ours_cannot_build_before_the_official_stage(tmp_path, capsys):
    import pytest

    script = _check_official_script()
    with pytest.raises(SystemExit) as stop:
        script.main(["--official-python", str(tmp_path / "python"), "--image-size", "500"])
    assert stop.value.code == 2 and "--image-size 500: give a positive multiple of 14" in capsys.readouterr().err
