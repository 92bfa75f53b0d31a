"""Every checkpoint format loads strictly into MedSAM3Net; bad checkpoints fail loudly with a key report."""

from __future__ import annotations

import json
import re
import stat
import warnings

import pytest
import torch
from _model_helpers import same_weights, tracker_neck
from safetensors.torch import save_file
from transformers import Sam3Model, Sam3VideoConfig

from medsam3_monai.deploy.cli import main as cli_main
from medsam3_monai.networks import CheckpointError, MedSAM3Net, save_checkpoint_file, tiny_sam3_config
from medsam3_monai.networks.key_mapping import convert_hf_to_original


@pytest.fixture(scope="module")
def trained_like():
    """A tiny net with seed 7 weights (different from the default seed), standing in for real weights."""
    return MedSAM3Net("tiny", seed=7).eval()


def _original_detector(net) -> dict[str, torch.Tensor]:
    return convert_hf_to_original(net.sam3.state_dict())


def test_facebook_hf_folder_layout(tmp_path, trained_like):
    Sam3VideoConfig(detector_config=tiny_sam3_config().to_dict()).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "sam3_video"
    tensors = {f"detector_model.{k}": v.contiguous() for k, v in trained_like.sam3.state_dict().items()}
    tensors["tracker_model.memory_encoder.projection.weight"] = torch.zeros(4, 4)
    tensors["tracker_neck.fpn_layers.0.proj1.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    net = MedSAM3Net(tmp_path)
    assert net.source_format == "hf_folder"
    assert same_weights(net.sam3, trained_like.sam3)
    # its weights file alone: the detector part, as any weights file without a configuration
    alone = MedSAM3Net(tmp_path / "model.safetensors", config=tiny_sam3_config())
    assert alone.source_format == "sam3_video_weights" and same_weights(alone.sam3, trained_like.sam3)


def test_original_sam3_pt(tmp_path, trained_like):
    detector = _original_detector(trained_like)
    neck = tracker_neck(detector)
    assert len(neck) == 22
    payload = {"model": {**{f"detector.{k}": v for k, v in {**detector, **neck}.items()},
                         "tracker.maskmem_tpos_enc": torch.zeros(7, 1, 1, 64)}}
    torch.save(payload, tmp_path / "sam3.pt")
    net = MedSAM3Net(tmp_path / "sam3.pt", config=tiny_sam3_config())
    assert net.source_format == "sam3_original"
    assert same_weights(net.sam3, trained_like.sam3)


def test_full_sam3_weights_fit_every_image_size():
    """SAM3's weights hold nothing of the image size (RoPE and the tiled position embedding are computed from the
    configuration; the RoPE tables of a sam3.pt are dropped on loading): the full architecture at 504 px, the
    Medical-SAM3 release's 3D size, has the very tensors of the 1008-px one, so one sam3.pt loads at either."""
    from medsam3_monai.networks.presets import full_sam3_config

    def shapes(size: int) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            return {name: tuple(t.shape) for name, t in Sam3Model(full_sam3_config(size)).state_dict().items()}

    at_1008 = shapes(1008)
    assert len(at_1008) > 1000 and shapes(504) == at_1008


def test_weights_without_a_configuration_build_at_the_requested_size(tmp_path, trained_like, monkeypatch):
    """A sam3.pt (or Medical-SAM3 file) carries no configuration: ``image_size`` chooses the size SAM3's
    architecture is built at (1008 when not given); a file with a configuration keeps its own size."""
    from medsam3_monai.networks import checkpoints

    built_at: list[int] = []

    def architecture(size: int = 1008):  # the tiny one stands in for the full one, its pretraining size fixed as
        built_at.append(size)            # SAM3's is (336 px), so that its weights too hold nothing of the size
        config = tiny_sam3_config(size)
        config.vision_config.backbone_config.pretrain_image_size = 112
        return config

    monkeypatch.setattr(checkpoints, "full_sam3_config", architecture)
    detector = _original_detector(trained_like)
    torch.save({"model": {f"detector.{k}": v for k, v in {**detector, **tracker_neck(detector)}.items()}},
               tmp_path / "sam3.pt")
    net = MedSAM3Net(tmp_path / "sam3.pt", image_size=224)
    assert built_at == [224] and net.image_size == 224 and same_weights(net.sam3, trained_like.sam3)
    assert MedSAM3Net(tmp_path / "sam3.pt").image_size == 1008 and built_at == [224, 1008]
    save_checkpoint_file(trained_like, tmp_path / "model.pt")  # carries its configuration (112 px)
    with pytest.raises(ValueError, match="works at 112 px, not 224"):
        MedSAM3Net(tmp_path / "model.pt", image_size=224)


@pytest.mark.parametrize("wrapped", [True, False])
def test_medical_sam3_release(tmp_path, trained_like, wrapped):
    detector = _original_detector(trained_like)
    if wrapped:  # saved from SAM3's video model: its tracker neck comes along, and stays out of the detector
        detector = {**detector, **tracker_neck(detector)}
    torch.save({"model": detector} if wrapped else detector, tmp_path / "medical_sam3.pt")
    net = MedSAM3Net(tmp_path / "medical_sam3.pt", config=tiny_sam3_config())
    assert net.source_format == "medical_sam3"
    assert same_weights(net.sam3, trained_like.sam3)


@pytest.mark.parametrize("prefix", ["module.", "model.", "_orig_mod.module."])
def test_a_wrapper_prefix_on_every_key_is_taken_off_whatever_the_layout(tmp_path, trained_like, prefix):
    """DDP's ``module.``, Lightning's ``model.`` and torch.compile's ``_orig_mod.`` on Meta's layout (a sam3.pt saved
    from a wrapped model): loaded; "not a SAM3 checkpoint" before, the prefix hid the original keys."""
    detector = {f"detector.{k}": v for k, v in _original_detector(trained_like).items()}
    torch.save({"model": {prefix + k: v for k, v in detector.items()}}, tmp_path / "wrapped.pt")
    net = MedSAM3Net(tmp_path / "wrapped.pt", config=tiny_sam3_config())
    assert net.source_format == "sam3_original" and same_weights(net.sam3, trained_like.sam3)


def test_ema_weights_beside_the_models_are_named_and_alone_are_told_how_to_load(tmp_path, trained_like):
    detector = _original_detector(trained_like)
    torch.save({"model": detector, "ema": {k: v + 1 for k, v in detector.items()}}, tmp_path / "both.pt")
    with pytest.warns(UserWarning, match=r"also holds EMA weights \('ema'\), which are not loaded"):
        net = MedSAM3Net(tmp_path / "both.pt", config=tiny_sam3_config())
    assert same_weights(net.sam3, trained_like.sam3)
    # Lightning: model.* and ema_model.* side by side (it was "not a SAM3 checkpoint"); a number named ema: no warning
    both = {**{f"model.{k}": v for k, v in detector.items()}, **{f"ema_model.{k}": v + 1 for k, v in detector.items()}}
    torch.save({"state_dict": both}, tmp_path / "lightning.pt")
    with pytest.warns(UserWarning, match=r"also holds EMA weights \(the ema_model\.\* keys\)"):
        net = MedSAM3Net(tmp_path / "lightning.pt", config=tiny_sam3_config())
    assert same_weights(net.sam3, trained_like.sam3)
    torch.save({"model": detector, "ema": 0.999}, tmp_path / "decay.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        MedSAM3Net(tmp_path / "decay.pt", config=tiny_sam3_config())
    torch.save({"model_ema": detector, "epoch": 3}, tmp_path / "ema_only.pt")
    with pytest.raises(CheckpointError, match=r"holds no state dict.*Its 'model_ema' looks like EMA weights: save "
                                              r"them alone to load them"):
        MedSAM3Net(tmp_path / "ema_only.pt", config=tiny_sam3_config())


def test_nan_weights_are_refused_naming_them_and_a_nan_score_is_json_null(tmp_path, trained_like):
    """A folder saved from a model with a NaN text position embedding (sam3 0.1.4's builder leaves it
    ``torch.empty``): refused at load; it loaded, and segment wrote "score": NaN, which is not JSON."""
    import json

    from medsam3_monai.deploy.segment_cli import sidecar_json

    broken = MedSAM3Net("tiny", seed=7).eval()
    with torch.no_grad():
        broken.sam3.text_encoder.text_model.embeddings.position_embedding.weight.fill_(float("nan"))
    broken.sam3.save_pretrained(tmp_path / "nan")
    with pytest.raises(CheckpointError, match=r"holds NaN or infinite values in 1 SAM3 weight\(s\) \(e\.g\. "
                                              r"text_encoder\.text_model\.embeddings\.position_embedding\.weight\)"):
        MedSAM3Net(tmp_path / "nan")
    text = sidecar_json({"prompts": [{"score": float("nan"), "pixels": 3}], "best": float("inf")})
    assert json.loads(text) == {"prompts": [{"score": None, "pixels": 3}], "best": None}


def test_our_checkpoint_and_saved_folder_round_trip(tmp_path, trained_like, tiny_images):
    save_checkpoint_file(trained_like.sam3, tmp_path / "model.pt")
    from_file = MedSAM3Net(tmp_path / "model.pt")  # the config travels inside
    assert from_file.source_format == "medsam3_monai" and same_weights(from_file.sam3, trained_like.sam3)

    torch.save({"network": trained_like.state_dict()}, tmp_path / "ignite.pt")  # "sam3." prefixed keys
    assert same_weights(MedSAM3Net(tmp_path / "ignite.pt", config=tiny_sam3_config()).sam3, trained_like.sam3)

    trained_like.save_pretrained(tmp_path / "folder")
    plain = Sam3Model.from_pretrained(tmp_path / "folder")  # plain transformers reads it
    assert same_weights(plain, trained_like.sam3)
    reloaded = MedSAM3Net(tmp_path / "folder").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tiny_images, ["liver", "kidney"]).pred_masks,
                           trained_like(tiny_images, ["liver", "kidney"]).pred_masks)


def test_missing_truncated_and_foreign_checkpoints_fail_loudly(tmp_path, trained_like):
    with pytest.raises(CheckpointError, match="does not exist"):
        MedSAM3Net(tmp_path / "nope.pt")
    save_checkpoint_file(trained_like.sam3, tmp_path / "model.pt")
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        MedSAM3Net(tmp_path / "truncated.pt")
    torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / "linear.pt")
    with pytest.raises(CheckpointError, match="not a SAM3 checkpoint"):
        MedSAM3Net(tmp_path / "linear.pt")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "sam2"}))
    with pytest.raises(CheckpointError, match="not SAM3"):
        MedSAM3Net(tmp_path / "other")


def test_architecture_mismatch_reports_keys(tmp_path, trained_like):
    detector = _original_detector(trained_like)
    del detector[next(k for k in detector if "transformer.decoder" in k)]
    detector["segmentation_head.extra.weight"] = torch.zeros(1)
    torch.save({"model": detector}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as info:
        MedSAM3Net(tmp_path / "broken.pt", config=tiny_sam3_config())
    assert "nothing was loaded" in str(info.value) and "segmentation_head.extra.weight" in str(info.value)
    del detector["segmentation_head.extra.weight"]
    torch.save({"model": detector}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        MedSAM3Net(tmp_path / "missing.pt", config=tiny_sam3_config())
    # a key of Meta's layout missing: named as the file names it too
    del detector["transformer.decoder.bbox_embed.layers.0.bias"]
    torch.save({"model": detector}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError) as info:
        MedSAM3Net(tmp_path / "missing.pt", config=tiny_sam3_config())
    assert "(original name: transformer.decoder.bbox_embed.layers.0.bias)" in str(info.value)
    # a fused tensor missing: its parts name it
    fused = next(k for k in detector if k.endswith("blocks.0.attn.qkv.weight"))
    del detector[fused]
    torch.save({"model": detector}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError) as info:
        MedSAM3Net(tmp_path / "missing.pt", config=tiny_sam3_config())
    assert f"layers.0.attention.q_proj.weight (original name: part of {fused})" in str(info.value)
    assert f"layers.0.attention.v_proj.weight (original name: part of {fused})" in str(info.value)
    torch.save({"model": {f"detector.{k}": v for k, v in detector.items()}}, tmp_path / "sam3.pt")  # Meta's layout
    with pytest.raises(CheckpointError) as info:
        MedSAM3Net(tmp_path / "sam3.pt", config=tiny_sam3_config())
    assert f"(original name: part of detector.{fused})" in str(info.value)  # the key as that file names it
    bogus = fused.replace("qkv", "bogus")
    torch.save({"model": {f"detector.{k}": v for k, v in {**detector, bogus: torch.zeros(1)}.items()}},
               tmp_path / "sam3.pt")
    with pytest.raises(CheckpointError, match=f"match no conversion rule:\n  detector.{re.escape(bogus)}"):
        MedSAM3Net(tmp_path / "sam3.pt", config=tiny_sam3_config())

    save_checkpoint_file(trained_like.sam3, tmp_path / "tiny.pt")
    wider = tiny_sam3_config(hidden_size=48)
    with pytest.raises(CheckpointError) as info:
        MedSAM3Net(tmp_path / "tiny.pt", config=wider)
    message = str(info.value)
    assert "shape mismatch" in message and "(32,) vs (48,)" in message and "nothing was loaded" in message


def test_weights_without_a_configuration_say_how_to_give_one(tmp_path, trained_like):
    """A bare state dict (e.g. torch.save(net.state_dict())) of a tiny net: the full architecture is assumed, and
    the error says so and names config=; with the configuration it loads."""
    torch.save(trained_like.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError) as info:
        MedSAM3Net(tmp_path / "bare.pt")
    assert "without a configuration" in str(info.value) and "config=tiny_sam3_config" in str(info.value)
    assert same_weights(MedSAM3Net(tmp_path / "bare.pt", config=tiny_sam3_config()), trained_like)
    # the command-line route the error names: a folder that carries the configuration, for any --checkpoint
    from medsam3_monai.deploy.cli import main

    assert f"medsam3 convert-checkpoint {tmp_path / 'bare.pt'} FOLDER --config tiny" in str(info.value)
    assert main(["convert-checkpoint", str(tmp_path / "bare.pt"), str(tmp_path / "folder"), "--config", "tiny"]) == 0
    assert same_weights(MedSAM3Net(tmp_path / "folder"), trained_like)


def test_a_transformers_folder_with_a_tensor_too_many_or_too_few_is_refused(tmp_path, trained_like):
    import shutil

    from safetensors.torch import load_file

    trained_like.save_pretrained(tmp_path / "saved")
    for name, edit in (("extra", lambda t: t.update({"detr_decoder.extra_head.weight": torch.zeros(3)})),
                       ("missing", lambda t: t.pop("detr_decoder.layers.0.self_attn.q_proj.weight"))):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "saved", folder)
        (weights,) = folder.glob("*.safetensors")
        tensors = load_file(str(weights))
        edit(tensors)
        save_file(tensors, str(weights), metadata={"format": "pt"})
        with pytest.raises(CheckpointError) as info:
            MedSAM3Net(folder)
        report = str(info.value)
        if name == "extra":
            assert "unexpected in the checkpoint" in report and "detr_decoder.extra_head.weight" in report
        else:
            assert "missing from the checkpoint" in report and "detr_decoder.layers.0.self_attn.q_proj" in report
    # a config.json of another size than its weights: the keys are named (transformers' own error names none)
    other = tmp_path / "other_config"
    shutil.copytree(tmp_path / "saved", other)
    config = json.loads((other / "config.json").read_text())
    width = config["detr_decoder_config"]["intermediate_size"]
    config["detr_decoder_config"]["intermediate_size"] = width + 16
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"does not match the SAM3 detector; nothing was loaded:\n  shape "
                                              rf"mismatch \(checkpoint vs model\): \d+: \['detr_decoder\.layers\.0\."
                                              rf"[\w.]+ \({width},?.*\) vs \({width + 16},?"):
        MedSAM3Net(other)
    broken = tmp_path / "broken_tokenizer"  # a tokenizer file that does not parse: named, as a CheckpointError
    shutil.copytree(tmp_path / "saved", broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"vocab": {"\x01')
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(broken))}: its tokenizer files do not read"):
        MedSAM3Net(broken)


def test_weights_load_as_float32_and_integer_weights_are_refused(tmp_path, trained_like):
    """Every source loads float32 (a folder whose config.json says bfloat16 too); weights stored as integers would be
    copied in truncated, so they are refused with the keys named."""
    trained_like.save_pretrained(tmp_path / "bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    (tmp_path / "bf16" / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert {p.dtype for p in MedSAM3Net(tmp_path / "bf16").parameters()} == {torch.float32}
    save_checkpoint_file(trained_like, tmp_path / "model.pt")
    stored = torch.load(tmp_path / "model.pt", weights_only=True)
    half = {**stored, "model": {k: v.half() if v.is_floating_point() else v for k, v in stored["model"].items()}}
    torch.save(half, tmp_path / "half.pt")
    assert {p.dtype for p in MedSAM3Net(tmp_path / "half.pt").parameters()} == {torch.float32}
    newer = {**stored, "format_version": 99}  # a file of a later version: read, with a warning
    torch.save(newer, tmp_path / "newer.pt")
    with pytest.warns(UserWarning, match="format version 99 of medsam3-monai's model file, written by a newer"):
        MedSAM3Net(tmp_path / "newer.pt")
    save_file({k: v.contiguous() for k, v in trained_like.sam3.state_dict().items()}, str(tmp_path / "weights_noext"))
    assert same_weights(MedSAM3Net(tmp_path / "weights_noext", config=tiny_sam3_config()).sam3, trained_like.sam3)
    key = next(k for k in stored["model"] if k.endswith("box_head.layer1.weight"))
    stored["model"][key] = stored["model"][key].to(torch.int64)
    torch.save(stored, tmp_path / "int.pt")
    with pytest.raises(CheckpointError, match=r"holds 1 weight\(s\) as integers where the model's are floating "
                                              r"point \(e.g. detr_decoder.box_head.layer1.weight \(torch.int64\)\); "
                                              r"nothing was loaded"):
        MedSAM3Net(tmp_path / "int.pt")


def test_convert_checkpoint_cli(tmp_path, trained_like, capsys):
    detector = _original_detector(trained_like)
    torch.save({"model": {f"detector.{k}": v for k, v in detector.items()}}, tmp_path / "sam3.pt")
    dst = tmp_path / "hf"
    assert cli_main(["convert-checkpoint", str(tmp_path / "sam3.pt"), str(dst), "--config", "tiny"]) == 0
    assert same_weights(Sam3Model.from_pretrained(dst), trained_like.sam3)
    # the folder and its files get what mkdir and open give under the user's umask, not private 0700 / 0600 modes
    (tmp_path / "made_by_mkdir").mkdir()
    (tmp_path / "made_by_open").write_bytes(b"")
    assert stat.S_IMODE(dst.stat().st_mode) == stat.S_IMODE((tmp_path / "made_by_mkdir").stat().st_mode)
    for path in dst.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "made_by_open").stat().st_mode), path
    assert (dst / "tokenizer_config.json").is_file() or (dst / "tokenizer.json").is_file()

    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert cli_main(["convert-checkpoint", str(tmp_path / "bad.pt"), str(tmp_path / "out"), "--config", "tiny"]) == 2
    assert not (tmp_path / "out").exists(), "no partial output folder"
    assert "corrupt" in capsys.readouterr().err
    assert cli_main(["convert-checkpoint", str(tmp_path / "sam3.pt"), str(dst), "--config", "tiny"]) == 2
    assert "exists and is a folder that is not empty" in capsys.readouterr().err
    onto_a_file = ["convert-checkpoint", str(tmp_path / "sam3.pt"), str(tmp_path / "bad.pt"), "--config", "tiny"]
    assert cli_main(onto_a_file) == 2
    assert "bad.pt exists and is a file; the output is a new folder" in capsys.readouterr().err


def test_a_facebook_weights_file_without_tracker_tensors_gets_no_tracker_note(tmp_path, trained_like, capsys):
    """A sam3_video weights file holding the detector only: no "the tracker weights in it are not converted" note,
    which it had whatever the file held; with tracker tensors the note stays."""
    detector = {f"detector_model.{k}": v.contiguous() for k, v in trained_like.sam3.state_dict().items()}
    save_file(detector, tmp_path / "detector_only.safetensors")
    save_file({**detector, "tracker_model.memory_encoder.projection.weight": torch.zeros(4, 4)},
              tmp_path / "with_tracker.safetensors")
    for name, noted in (("detector_only", False), ("with_tracker", True)):
        assert cli_main(["convert-checkpoint", str(tmp_path / f"{name}.safetensors"), str(tmp_path / name),
                         "--config", "tiny"]) == 0
        assert ("the tracker weights in" in capsys.readouterr().err) == noted


def test_a_training_runs_folder_given_as_checkpoint_points_at_its_model(tmp_path, trained_like):
    save_checkpoint_file(trained_like, tmp_path / "run" / "models" / "model.pt")
    with pytest.raises(CheckpointError, match=r"it looks like a training run: give its model, .*run/models/model\.pt"):
        MedSAM3Net(tmp_path / "run")


def test_an_old_training_checkpoint_says_what_it_is_and_how_to_convert_it(tmp_path, trained_like):
    """A checkpoint_iterN.pt written before training checkpoints carried the configuration (network, optimiser,
    trainer; no network_config) of a tiny network: named as a training checkpoint, with the conversion to run."""
    torch.save({"network": trained_like.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "trainer": {"epoch": 1, "iteration": 4}}, tmp_path / "checkpoint_iter4.pt")
    with pytest.raises(CheckpointError) as info:
        MedSAM3Net(tmp_path / "checkpoint_iter4.pt")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'checkpoint_iter4.pt'} is a training checkpoint written before")
    assert "medsam3 convert-checkpoint" in message and "missing" in message  # the key report follows
    assert same_weights(MedSAM3Net(tmp_path / "checkpoint_iter4.pt", config=tiny_sam3_config()), trained_like)
