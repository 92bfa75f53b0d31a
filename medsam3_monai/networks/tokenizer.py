"""Offline CLIP BPE tokenizer for SAM3 text prompts.

SAM3's text encoder is CLIP-like with a context of 32 tokens: ``<|startoftext|> ... <|endoftext|>`` padded
with ``<|endoftext|>`` (id 49407). The tokenizer comes from the checkpoint folder when it ships one;
otherwise it is built from ``bpe_simple_vocab_16e6.txt.gz``, the BPE merge list that the
``open_clip_torch`` wheel carries, so nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
from pathlib import Path
from typing import Sequence

import torch
from transformers import CLIPTokenizer, PreTrainedTokenizerBase

CONTEXT_LENGTH = 32
VOCAB_SIZE = 49408
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894 merges: vocab = 256 bytes + 256 word-ends + merges + 2
BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


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


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], context_length: int = CONTEXT_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, both (P, context_length) int64, padded with ``<|endoftext|>``.

    Raises PromptError for an empty prompt or one longer than the context (no silent truncation).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise PromptError("no prompts given: pass at least one text prompt, e.g. 'liver'")
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"empty or non-text prompt {prompt!r}: give a concept such as 'polyp'")
    encoded = tokenizer(list(prompts), padding="max_length", truncation=False, max_length=context_length)
    for prompt, ids in zip(prompts, encoded["input_ids"]):
        if len(ids) > context_length:
            raise PromptError(
                f"prompt {prompt[:60]!r} is {len(ids)} tokens; SAM3 reads at most {context_length} "
                f"(including start/end). Shorten it to a concept phrase."
            )
    return (
        torch.tensor(encoded["input_ids"], dtype=torch.long),
        torch.tensor(encoded["attention_mask"], dtype=torch.long),
    )
