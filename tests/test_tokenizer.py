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


def _save_folder_tokenizer(folder) -> None:
    """A checkpoint folder's tokenizer that tells itself apart from the built-in one: "zzqx" is one word of its own,
    id 49408 (the built-in tokenizer splits it into two BPE pieces)."""
    tokenizer = build_clip_tokenizer()
    tokenizer.add_tokens(["zzqx"])
    tokenizer.save_pretrained(folder)


def test_folder_tokenizer_is_preferred(tmp_path):
    _save_folder_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert len(tokenizer) == 49409
    prompt = "Retinal Blood Vessel zzqx"
    ids, mask = tokenize_prompts(tokenizer, [prompt])
    assert ids[0, :int(mask.sum())].tolist() == [49406, 31270, 566, 3590, 16387, 49408, 49407]
    built_in, mask = tokenize_prompts(build_clip_tokenizer(), [prompt])
    assert built_in[0, :int(mask.sum())].tolist() == [49406, 31270, 566, 3590, 16387, 1544, 45038, 49407]
    assert len(load_tokenizer(tmp_path / "no_tokenizer_here")) == 49408  # a folder without one: the built-in


# SAM3's own tokenizer (sam3.model.tokenizer_ve) is open_clip's SimpleTokenizer: the reference for the ids.
EDGE_CASES = [
    "polyp", "Retinal Blood Vessel", "left  kidney\n", "HEPATIC parenchyma", "nuclei, cell's", "12.5mm lesion",
    "tumour – mass", "ÄÖÜ naïve", "optic cup & optic disc", "RNFL & GCIPL & choroid",
    "A &amp; B",  # HTML entity: unescaped before BPE
    "&amp;lt;b&amp;gt;",  # unescaped twice
    "cafÃ©",  # mojibake: repaired by ftfy
    "liver <end_of_text> tumor",  # SAM3's end token written in the prompt
    "x <|endoftext|> y",  # transformers' end marker is plain text for SAM3
    "<START_OF_TEXT> spleen",
]


def test_ids_equal_sam3s_own_tokenizer_on_edge_cases():
    from open_clip.tokenizer import tokenize  # its SimpleTokenizer; the function takes context_length in 2.20 too

    for tokenizer in (build_clip_tokenizer(),):
        ids, mask = tokenize_prompts(tokenizer, EDGE_CASES)
        expected = tokenize(EDGE_CASES, context_length=32)  # padded with 0
        for row, prompt in enumerate(EDGE_CASES):
            n = int(mask[row].sum())
            assert ids[row, :n].tolist() == expected[row, :n].tolist(), prompt
            assert (expected[row, n:] == 0).all() and (ids[row, n:] == 49407).all(), prompt


def test_folder_tokenizer_keeps_sam3_semantics(tmp_path):
    _save_folder_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert len(tokenizer) == 49409  # the folder's, not the built-in one
    ids, _ = tokenize_prompts(tokenizer, EDGE_CASES)
    expected, _ = tokenize_prompts(build_clip_tokenizer(), EDGE_CASES)
    assert torch.equal(ids, expected)


def test_prompt_over_the_context_is_refused_not_truncated():
    import pytest

    from medsam3_monai.networks import PromptError

    with pytest.raises(PromptError, match="at most 32"):
        tokenize_prompts(build_clip_tokenizer(), ["tumor " * 31])
    ids, mask = tokenize_prompts(build_clip_tokenizer(), ["tumor " * 30])  # exactly 32 with start/end
    assert int(mask.sum()) == 32 and ids[0, -1] == 49407


def test_a_prompt_without_a_letter_or_digit_is_refused():
    import re

    import pytest

    from medsam3_monai.networks import PromptError

    for prompt in (".", "?!", " - "):
        with pytest.raises(PromptError, match=re.escape(f"prompt {prompt!r} has no letter or digit, so it names no")):
            tokenize_prompts(build_clip_tokenizer(), ["polyp", prompt])
    tokenize_prompts(build_clip_tokenizer(), ["T1 lesion", "肝脏", "3"])  # any letter or digit names something
