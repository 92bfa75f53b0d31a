"""Two prompts are one concept when SAM3 reads the same token ids ("polyp." and "polyp .", "kidney(left)" and
"Kidney (left)"), not only when their cleaned texts are equal; and a prompt's own token of id 0 is hidden from the
detector as SAM3's text mask (``ids != 0``) hides it."""
from __future__ import annotations

import json
import re

import pytest
import torch

from medsam3_monai.data.datalist import load_datalist
from medsam3_monai.data.pairs import DatalistError
from medsam3_monai.data.selection import evaluation_items
from medsam3_monai.inferers.inputs import check_distinct_prompts
from medsam3_monai.networks.tokenizer import PromptError, prompt_reading
from medsam3_monai.transforms import RandNegativePromptsd

SAME_READINGS = [("polyp.", "polyp ."), ("lesion 12", "lesion 1 2"), ("kidney(left)", "Kidney (left)"),
                 ("a &amp; b", "a & b")]


@pytest.mark.parametrize("first, second", SAME_READINGS)
def test_prompts_that_read_the_same_are_refused_as_one_concept(first, second):
    assert prompt_reading(first) == prompt_reading(second)
    with pytest.raises(PromptError, match=re.escape(f"prompt {second!r} is given twice (as {first!r})")):
        check_distinct_prompts([first, second], "a.png")
    check_distinct_prompts(["polyp", "polyps"])  # different readings pass


def _datalist(tmp_path, prompts: dict) -> str:
    item = {"image": "a.nii.gz", "label": "a_seg.nii.gz", "prompts": prompts, "modality": "MRI"}
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [item], "validation": [], "test": [item]}))
    return str(path)


def test_a_datalist_item_whose_two_labels_read_the_same_is_refused_for_training_and_evaluation(tmp_path):
    """Evaluated, the second label could never get a pixel (Dice 0 in the dataset's mean); trained, one text would
    be taught two masks."""
    path = _datalist(tmp_path, {"1": "hippocampus", "2": "Hippocampus"})
    message = r"labels 1 \('hippocampus'\) and 2 \('Hippocampus'\) have one concept as SAM3 reads it"
    with pytest.raises(DatalistError, match=message):
        load_datalist(path, "training")
    with pytest.raises(DatalistError, match=message):
        evaluation_items(path, check_files=False)
    distinct = _datalist(tmp_path, {"1": "anterior hippocampus", "2": "posterior hippocampus"})
    assert len(evaluation_items(distinct, check_files=False)) == 1


def test_a_negative_is_not_sampled_when_it_reads_as_a_present_concept():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 2:5, 2:5] = True
    present = {"label": 1, "text": "Kidney (left)", "boxes": torch.tensor([[0.4, 0.4, 0.4, 0.4]]), "masks": mask,
               "is_negative": False}
    d = {"targets": [present], "image": torch.zeros(3, 8, 8)}
    out = RandNegativePromptsd(concepts=["kidney(left)", "spleen"], num_negatives=2, seed=0)(d)["targets"]
    assert [t["text"] for t in out] == ["Kidney (left)", "spleen"]
    assert out[1]["masks"].shape[0] == 0  # spleen: an empty (negative) target


def test_a_prompt_token_of_id_0_is_hidden_from_the_detector_as_sam3s_text_mask_hides_it(tiny_net):
    prompts = ["polyp !/ lesion", "polyp / lesion"]
    ids = [prompt_reading(text) for text in prompts]
    assert 0 in ids[0] and 0 not in ids[1]  # '!' before '/' is a word piece of id 0
    with torch.no_grad():
        _, mask = tiny_net.encode_text(prompts)
    assert mask[0].tolist() == [i < len(ids[0]) and ids[0][i] != 0 for i in range(mask.shape[1])]
    assert mask[1].tolist() == [i < len(ids[1]) for i in range(mask.shape[1])]


def test_segment_notes_that_a_prompt_with_a_comma_is_one_concept(capsys, tmp_path):
    from medsam3_monai.deploy.cli import main as cli_main

    assert cli_main(["segment", str(tmp_path / "missing.png"), "--prompt", "polyp, liver",
                     "--out", str(tmp_path / "m.png")]) != 0
    assert "prompt 'polyp, liver' holds a comma; SAM3 reads it as one concept" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_the_inference_bundles_prompts_text_is_split_at_its_commas(kvasir):
    """As the server splits it: Fire hands the bundle "left kidney, spleen" as one text (it makes a tuple of
    one-word lists only), which is two prompts; a list keeps a prompt holding a comma."""
    from medsam3_monai.inferers.inputs import inference_items

    [item] = inference_items(str(kvasir), "left kidney, spleen")
    assert item["prompts"] == {"1": "left kidney", "2": "spleen"}
    [item] = inference_items(str(kvasir), ["kidney, left"])
    assert item["prompts"] == {"1": "kidney, left"}
    with pytest.raises(ValueError, match="--prompts names no concept"):
        inference_items(str(kvasir), " , ")
    with pytest.raises(ValueError, match=re.escape("--prompts 1 is not a text: give concept texts, e.g. \"['TEXT'")):
        inference_items(str(kvasir), 1)  # Fire reads --prompts 1 as a number


def test_two_spellings_of_one_concept_in_the_pool_are_one_negative():
    """Two datalists may spell one concept differently ("polyp." and "polyp ."): it is sampled once at most, as the
    first spelling, not as two negatives of one reading."""
    d = {"targets": [], "image": torch.zeros(3, 8, 8)}
    out = RandNegativePromptsd(concepts=["polyp.", "liver", "polyp ."], num_negatives=3, seed=0)(d)["targets"]
    assert [t["text"] for t in out] == ["polyp.", "liver"]
