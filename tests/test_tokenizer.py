"""The offline CLIP tokenizer built from open_clip's BPE file."""

import torch

from medsam3_monai.networks import build_clip_tokenizer, load_tokenizer, tokenize_prompts


def test_known_ids_and_padding():
    tokenizer = build_clip_tokenizer()
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids, mask = tokenize_prompts(tokenizer, ["a photo of a cat"])
    assert ids.shape == (1, 32) and mask.shape == (1, 32)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all(), "padding is <|endoftext|>"
    assert mask[0].tolist() == [1] * 7 + [0] * 25
    assert len(tokenizer) == 49408


def test_folder_tokenizer_is_preferred(tmp_path):
    build_clip_tokenizer().save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    ids, _ = tokenize_prompts(tokenizer, ["Retinal Blood Vessel"])
    expected, _ = tokenize_prompts(build_clip_tokenizer(), ["Retinal Blood Vessel"])
    assert torch.equal(ids, expected)
