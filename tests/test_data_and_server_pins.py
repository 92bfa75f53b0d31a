"""Pinned by hand-made mutants, round 3 (each test fails on a plausible one-line bug the rest of the suite let pass):
the data path, the converters, datalist loading, negative prompts, the server's options and the HF folder's record."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor


def test_max_instances_0_means_no_cap_in_label_to_instances():
    """The bundle's ``--max_instances 0`` is documented as "no cap" (LabelToInstancesd: None or 0 disables it);
    taking 0 literally would silently turn every training prompt into a negative."""
    from medsam3_monai.transforms import LabelToInstancesd

    classes = np.zeros((20, 20), np.uint8)
    classes[1:4, 1:4] = 1
    classes[10:15, 10:15] = 1
    d = {"label": MetaTensor(torch.from_numpy(classes)[None]), "prompts": {"1": "x"}, "instance_rule": "components"}
    assert len(LabelToInstancesd(max_instances=0)(d)["instances"]) == 2
    assert len(LabelToInstancesd(max_instances=None)(d)["instances"]) == 2


def test_an_item_without_instance_rule_is_split_into_components():
    """README, "Data": left out, ``instance_rule`` is ``components`` (each connected component one instance)."""
    from medsam3_monai.transforms import LabelToInstancesd

    classes = np.zeros((20, 20), np.uint8)
    classes[1:4, 1:4] = 1
    classes[10:15, 10:15] = 1
    d = {"label": MetaTensor(torch.from_numpy(classes)[None]), "prompts": {"1": "x"}}
    assert len(LabelToInstancesd()(d)["instances"]) == 2


def test_a_second_mask_named_like_the_first_is_a_problem_not_silently_dropped(tmp_path):
    """pair_by_name: "Images without a mask and masks without an image become problems (never silently dropped)";
    a case with two masks (a.png and a.jpg) must be named too, not one of them ignored."""
    from PIL import Image

    from medsam3_monai.data.converters._common import pair_by_name

    for folder, name in (("images", "a.jpg"), ("masks", "a.png"), ("masks", "a.jpg")):
        (tmp_path / folder).mkdir(exist_ok=True)
        Image.new("L", (4, 4)).save(tmp_path / folder / name)
    result = pair_by_name(tmp_path / "images", tmp_path / "masks", "X")
    assert len(result.pairs) == 1
    assert [p.path.name for p in result.problems] == ["a.png"] and "second mask" in result.problems[0].reason


def test_hidden_files_beside_the_images_are_not_read(tmp_path):
    """listing() leaves out hidden files: a macOS copy's AppleDouble '._x.jpg' beside each picture is not an image
    without a mask (the datalist would fail on every one)."""
    from PIL import Image

    from medsam3_monai.data.datalist import build_datalist

    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
        Image.new("L", (8, 6)).save(tmp_path / folder / "a.jpg")
        (tmp_path / folder / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    result = build_datalist("Kvasir-SEG", tmp_path)
    assert sum(len(v) for v in result.datalist.values()) == 1


def test_an_hc18_training_image_without_its_annotation_is_a_problem_not_unlabelled(tmp_path):
    """HC18: only test_set/ is unlabelled by design; a training_set image without its annotation is bad input."""
    from PIL import Image

    from medsam3_monai.data.converters.ultrasound import convert_hc18

    training = tmp_path / "training_set"
    training.mkdir()
    for name in ("001_HC.png", "001_HC_Annotation.png", "002_HC.png"):
        Image.new("L", (8, 6)).save(training / name)
    result = convert_hc18(tmp_path, None, None)
    assert [p.image.name for p in result.pairs] == ["001_HC.png"]
    assert [p.path.name for p in result.problems] == ["002_HC.png"] and result.unlabelled == []


def test_an_image_left_out_of_idx_csv_is_named(tmp_path):
    """ChestXray_lung_sample: pairs come from idx.csv; an image the CSV does not list must be a problem, not left
    out of the datalist silently."""
    from PIL import Image

    from medsam3_monai.data.converters.samples import convert_chest

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("1.jpg", "2.jpg"):
        Image.new("L", (8, 6)).save(tmp_path / "images" / name)
    Image.new("L", (8, 6)).save(tmp_path / "masks" / "1-mask.png")
    (tmp_path / "idx.csv").write_text("img,mask\n1.jpg,1-mask.png\n")
    result = convert_chest(tmp_path, None, None)
    assert [p.image.name for p in result.pairs] == ["1.jpg"]
    assert [(p.path.name, p.reason) for p in result.problems] == [("2.jpg", "image not listed in idx.csv")]


def test_text_flags_and_blank_options_of_a_client():
    """MONAI Label clients send config flags as text: "false" must be False (not a truthy string), and an option
    left blank with spaces means "not given" (3D Slicer sends blanks for options left empty)."""
    from medsam3_monai.deploy.monailabel_protocol import parse_infer_params

    for word, value in (("false", False), ("False", False), ("0", False), ("no", False), ("true", True),
                        ("on", True)):
        assert parse_infer_params(f'{{"prompts": ["x"], "largest_cc": "{word}"}}', 16, 200).largest_cc is value
    params = parse_infer_params('{"prompts": ["x"], "protocol": "  ", "modality": " ", "score_threshold": " "}',
                                16, 200)
    assert params.protocol is None and params.modality is None and params.score_threshold is None


def test_negative_prompts_are_distinct():
    """RandNegativePromptsd draws without replacement: an item never gets the same absent concept twice."""
    from medsam3_monai.transforms.targets import RandNegativePromptsd

    pool = ["kidney", "spleen", "pancreas", "stomach"]
    for seed in range(20):
        out = RandNegativePromptsd(pool, num_negatives=4, seed=seed)({"image": torch.zeros(3, 8, 8), "targets": []})
        texts = [t["text"] for t in out["targets"]]
        assert sorted(texts) == sorted(pool) and all(t["is_negative"] for t in out["targets"])


def test_prompts_are_stripped_and_the_length_limit_is_exact():
    """params.prompts: stripped (" polyp " names the segment "polyp" in label_names), at most max_prompt_chars."""

    from medsam3_monai.deploy.monailabel_protocol import ParamsError, parse_infer_params

    assert parse_infer_params('{"prompts": [" polyp ", "liver\\n"]}', 16, 200).prompts == ["polyp", "liver"]
    assert parse_infer_params('{"prompts": ["' + "a" * 10 + '"]}', 16, 10).prompts == ["a" * 10]
    with pytest.raises(ParamsError, match="at most 10"):
        parse_infer_params('{"prompts": ["' + "a" * 11 + '"]}', 16, 10)


def test_an_items_own_negative_pool_replaces_the_transforms():
    """RandNegativePromptsd: "an item may give its own pool under concepts_key"."""
    from medsam3_monai.transforms.targets import RandNegativePromptsd

    out = RandNegativePromptsd(["kidney"], num_negatives=2, seed=0)(
        {"image": torch.zeros(3, 8, 8), "targets": [], "negative_concepts": ["spleen"]})
    assert [t["text"] for t in out["targets"]] == ["spleen"]


def test_negative_prompt_probability_is_honoured():
    """RandNegativePromptsd(prob=0) adds no negatives; prob=0.5 adds them to about half the items."""
    from medsam3_monai.transforms.targets import RandNegativePromptsd

    item = {"image": torch.zeros(3, 8, 8), "targets": []}
    assert RandNegativePromptsd(["kidney"], prob=0.0, seed=0)(item)["targets"] == []
    half = RandNegativePromptsd(["kidney"], prob=0.5, seed=0)
    given = sum(bool(half(item)["targets"]) for _ in range(200))
    assert 60 < given < 140


def test_the_summary_of_several_prompts_says_how_overlaps_are_resolved():
    from medsam3_monai.inferers.predict import Prediction

    def summary(prompts):
        label_map = torch.zeros(4, 4, dtype=torch.uint8)
        return Prediction(label_map, prompts, list(range(1, len(prompts) + 1)), [0.5] * len(prompts), "top_query",
                          False, torch.eye(4), "x.png").summary()

    assert summary(["a"])["overlaps"] is None
    assert summary(["a", "b"])["overlaps"] == "pixel-wise maximum of score x sigmoid(mask logit)"


def test_serve_takes_an_origin_written_with_a_trailing_slash(monkeypatch):
    """--cors-origin http://localhost:3000/ (as a browser's address bar shows it) is the origin
    http://localhost:3000, not refused as an origin with a path."""

    from medsam3_monai.deploy.cli import build_parser
    from medsam3_monai.deploy.serve import build_server
    from medsam3_monai.inferers.predict import Predictor

    class Reached(Exception):
        pass

    def stop(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(Predictor, "from_checkpoint", stop)
    args = build_parser().parse_args(["serve", "--checkpoint", "tiny", "--device", "cpu", "--port", "0",
                                      "--cors-origin", "http://localhost:3000/"])
    with pytest.raises(Reached):
        build_server(args)


def test_a_stratum_of_two_or_more_keeps_a_training_item_whatever_the_fraction():
    from medsam3_monai.data.splits import split_items, validation_count

    assert validation_count(2, 0.8) == 1 and validation_count(4, 0.9) == 3 and validation_count(1, 0.5) == 0
    training, validation = split_items([{"case": c} for c in "ab"], val_fraction=0.9)
    assert len(training) == 1 and len(validation) == 1


def test_serve_reads_its_token_from_the_environment(monkeypatch):
    """--token's default is $MEDSAM3_SERVE_TOKEN: a server started with the variable set must require it."""
    import types

    from medsam3_monai.deploy import server as server_module
    from medsam3_monai.deploy.cli import build_parser
    from medsam3_monai.deploy.serve import build_server
    from medsam3_monai.inferers.predict import Predictor

    class Built(Exception):
        pass

    def create_app(predictor, *, token=None, **kwargs):
        raise Built(token)

    monkeypatch.setattr(Predictor, "from_checkpoint",
                        classmethod(lambda cls, *a, **k: types.SimpleNamespace(preprocessing_notes=[])))
    monkeypatch.setattr(server_module, "create_app", create_app)
    monkeypatch.setenv("MEDSAM3_SERVE_TOKEN", "s3cret")
    args = build_parser().parse_args(["serve", "--checkpoint", "tiny", "--device", "cpu", "--port", "0"])
    with pytest.raises(Built) as built:
        build_server(args)
    assert built.value.args == ("s3cret",)


def test_an_hf_folders_unknown_resize_kernel_is_named_when_loaded(tmp_path):
    """A hand-edited medsam3_preprocessing.json with an unknown resize_kernel is refused when the folder loads,
    naming the file (as an unknown ct_window is), not later at the first picture."""

    from medsam3_monai.networks import MedSAM3Net
    from medsam3_monai.networks.checkpoints import CheckpointError

    folder = tmp_path / "hf"
    MedSAM3Net("tiny").save_pretrained(folder)
    (folder / "medsam3_preprocessing.json").write_text('{"resize_kernel": "lanczos"}')
    with pytest.raises(CheckpointError, match=r"medsam3_preprocessing.json does not read .*lanczos"):
        MedSAM3Net(str(folder))


def test_a_binary_mask_takes_the_value_of_its_one_prompt():
    """A 0/255 mask whose one prompt is label 3 ({"3": "tumor"}) decodes to class 3, so the prompt finds its
    instances (class 1 would leave label 3 empty: the item would train as a negative)."""
    from medsam3_monai.transforms import DecodeLabeld, LabelToInstancesd

    mask = np.zeros((1, 10, 10), np.uint8)
    mask[0, 2:6, 2:6] = 255
    d = DecodeLabeld()({"label": MetaTensor(torch.from_numpy(mask)), "prompts": {"3": "tumor"}})
    assert sorted(torch.unique(d["label"]).tolist()) == [0, 3]
    assert LabelToInstancesd()(d)["instance_labels"].tolist() == [3]


def test_a_prompt_key_0_is_refused_when_the_datalist_is_read(tmp_path):
    """items_of_split refuses prompt keys that are not label values >= 1 (0 is background) at load, not at the
    first training step."""
    import json

    from medsam3_monai.data.datalist import load_datalist
    from medsam3_monai.data.pairs import DatalistError

    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": [{"image": "a.png", "label": "b.png", "prompts": {"0": "x"}}]}))
    with pytest.raises(DatalistError, match="are not label values"):
        load_datalist(path, "training")


def test_a_prompt_of_33_tokens_is_refused_when_the_datalist_is_read(tmp_path):
    import json

    from medsam3_monai.data.datalist import load_datalist
    from medsam3_monai.data.pairs import DatalistError
    from medsam3_monai.networks.tokenizer import CONTEXT_LENGTH, prompt_reading

    text = " ".join(["cell"] * (CONTEXT_LENGTH - 1))  # 31 words + start + end = 33 tokens
    assert len(prompt_reading(text)) == CONTEXT_LENGTH + 1
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": [{"image": "a.png", "label": "b.png", "prompts": {"1": text}}]}))
    with pytest.raises(DatalistError, match="33 tokens"):
        load_datalist(path, "training")


def test_a_label_map_with_many_similar_levels_is_not_a_soft_edged_binary_mask():
    """An instance-id picture of 40 ids, 255 the largest only by a little, is not a soft-edged binary mask (a soft
    edge's inside, 255, outnumbers each edge level several times)."""
    from medsam3_monai.transforms.labels import _nonzero_values, _soft_edged

    array = np.zeros((100, 100), np.uint8)
    for k, value in enumerate(list(range(200, 239)) + [255]):
        array[k * 2:k * 2 + 2, :] = value  # 200 pixels each
    array[80:82, :50] = 255  # 255: 300 pixels, 1.5x the others
    assert not _soft_edged(_nonzero_values(array), array)


def test_max_pixels_must_be_positive():
    import argparse

    from medsam3_monai.deploy.arguments import pixels

    assert pixels("2e8") == 200_000_000
    for bad in ("0", "-5", "0.4"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive"):
            pixels(bad)
