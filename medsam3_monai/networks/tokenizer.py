"""Offline CLIP BPE tokenizer for SAM3 text prompts.

SAM3's text encoder is CLIP-like with a context of 32 tokens: ``<|startoftext|> ... <|endoftext|>`` padded
with ``<|endoftext|>`` (id 49407). The tokenizer comes from the checkpoint folder when it ships one;
otherwise it is built from ``bpe_simple_vocab_16e6.txt.gz``, the BPE merge list that the
``open_clip_torch`` wheel carries, so nothing is ever downloaded.

Prompts are tokenised with the semantics of SAM3's own tokenizer (``sam3.model.tokenizer_ve``, the open_clip
``SimpleTokenizer``): the text is cleaned first (``ftfy.fix_text``, HTML entities unescaped twice, whitespace
collapsed, lower case), ``<start_of_text>`` / ``<end_of_text>`` written in a prompt are SAM3's special tokens
(ids 49406 / 49407), and transformers' own markers (``<|endoftext|>``) are plain text. The ids differ from the
official ones only in the padding (49407 here, 0 there), which the attention mask makes irrelevant. SAM3's text mask
is ``ids != 0``, which also hides a prompt's own token of id 0 (the byte '!' as a word piece, "polyp !/ lesion"); the
network's text mask does the same (``MedSAM3Net.encode_text``)."""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import re
from pathlib import Path
from typing import Sequence

import ftfy
import torch
from transformers import CLIPTokenizer, PreTrainedTokenizerBase

CONTEXT_LENGTH = 32
VOCAB_SIZE = 49408
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894 merges: vocab = 256 bytes + 256 word-ends + merges + 2
BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
START_OF_TEXT_ID = VOCAB_SIZE - 2  # 49406
END_OF_TEXT_ID = VOCAB_SIZE - 1  # 49407
# SAM3's special tokens as written in text (its vocabulary names them so; transformers' are <|...|>)
_SAM3_SPECIAL = {"<start_of_text>": START_OF_TEXT_ID, "<end_of_text>": END_OF_TEXT_ID}
_SAM3_SPECIAL_PATTERN = re.compile("(" + "|".join(map(re.escape, _SAM3_SPECIAL)) + ")", re.IGNORECASE)


class PromptError(ValueError):
    """A text prompt the model cannot take (empty, not a string, or longer than the context)."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode table (256 entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def bpe_vocab_path() -> Path:
    """Path of the CLIP BPE merge file inside the installed ``open_clip`` package."""
    try:
        path = Path(str(importlib.resources.files("open_clip") / BPE_FILE_NAME))
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            "open_clip_torch is not installed; it ships the CLIP BPE vocabulary "
            f"({BPE_FILE_NAME}). Install it with `pip install open_clip_torch`."
        ) from err
    if not path.is_file():
        raise FileNotFoundError(f"{BPE_FILE_NAME} not found in the open_clip package at {path}")
    return path


@functools.lru_cache(maxsize=2)
def _vocab_and_merges(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (49408 entries) and its 48894 merges from the gzipped BPE file."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_tokenizer(bpe_path: str | Path | None = None) -> CLIPTokenizer:
    """A transformers ``CLIPTokenizer`` built offline from the BPE merge file."""
    vocab, merges = _vocab_and_merges(str(bpe_path or bpe_vocab_path()))
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
    tokenizer.model_max_length = CONTEXT_LENGTH
    return tokenizer


def load_tokenizer(checkpoint_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The checkpoint folder's own tokenizer when it has one, else the offline CLIP BPE tokenizer."""
    if checkpoint_dir is not None:
        folder = Path(checkpoint_dir)
        if folder.is_dir() and any((folder / name).is_file() for name in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            tokenizer.model_max_length = CONTEXT_LENGTH
            return tokenizer
    return build_clip_tokenizer()


def clean_prompt(text: str) -> str:
    """SAM3's text cleaning: fix mojibake (ftfy), unescape HTML twice, collapse whitespace, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


@functools.lru_cache(maxsize=4096)  # prompts repeat (a dataset's concepts): clean and encode each once
def _encode(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[int, ...]:
    """``(<start>, BPE ids..., <end>)`` of one prompt, untruncated, with SAM3's cleaning and special tokens."""
    ids = [START_OF_TEXT_ID]
    for piece in _SAM3_SPECIAL_PATTERN.split(clean_prompt(prompt)):
        special = _SAM3_SPECIAL.get(piece.lower())
        if special is not None:
            ids.append(special)
        elif piece.strip():
            ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    return (*ids, END_OF_TEXT_ID)


@functools.lru_cache(maxsize=1)
def _offline_tokenizer() -> PreTrainedTokenizerBase:
    return build_clip_tokenizer()


def prompt_reading(prompt: str) -> tuple[int, ...]:
    """The token ids SAM3 reads for ``prompt`` (start and end included, offline CLIP BPE tokenizer): two prompts with
    the same reading are one concept to the network ("polyp." and "polyp .", "kidney(left)" and "Kidney (left)").
    Every SAM3 checkpoint has this tokenizer; more than :data:`CONTEXT_LENGTH` ids are refused by
    :func:`tokenize_prompts`."""
    return _encode(_offline_tokenizer(), prompt)


def repeated_reading(texts: Sequence[str]) -> tuple[int, int] | None:
    """``(first, second)``: the indices of the first text of ``texts`` that SAM3 reads as an earlier one
    (:func:`prompt_reading`) and of that earlier one; None when every text reads differently."""
    seen: dict[tuple[int, ...], int] = {}
    for index, text in enumerate(texts):
        first = seen.setdefault(prompt_reading(text), index)
        if first != index:
            return first, index
    return None


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], context_length: int = CONTEXT_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, both (P, context_length) int64, padded with ``<|endoftext|>``.

    Ids follow SAM3's tokenizer (cleaning and special tokens, see the module docstring). Raises PromptError for
    an empty prompt or one longer than the context: SAM3 would truncate it silently, we refuse instead.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise PromptError("no prompts given: pass at least one text prompt, e.g. 'liver'")
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"empty or non-text prompt {prompt!r}: give a concept such as 'polyp'")
        if not any(character.isalnum() for character in prompt):
            raise PromptError(f"prompt {prompt!r} has no letter or digit, so it names no concept: give one such as "
                              "'polyp'")
    rows = [_encode(tokenizer, prompt) for prompt in prompts]
    for prompt, ids in zip(prompts, rows):
        if len(ids) > context_length:
            raise PromptError(
                f"prompt {prompt[:60]!r} is {len(ids)} tokens; SAM3 reads at most {context_length} "
                f"(including start/end). Shorten it to a concept phrase."
            )
    input_ids = torch.full((len(rows), context_length), END_OF_TEXT_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), context_length), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask
