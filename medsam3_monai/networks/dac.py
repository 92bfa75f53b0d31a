"""SAM3's DAC training forward ("decoupled" one-to-one / one-to-many queries) on transformers' DETR decoder.

In training the official decoder (``sam3/model/decoder.py``, ``dac=True``) runs 2Q object queries: the query
embeddings and reference boxes repeated. The second, one-to-many half skips self-attention: the presence token and
the first Q queries attend among themselves, the second half passes that step unchanged (but still through its
LayerNorm); text cross-attention, image cross-attention with its box-relative bias, the MLP and box refinement
run on all 2Q. :func:`dac_decoder` drives transformers' ``Sam3DetrDecoder`` that way for the duration of a
``with`` block, without re-implementing any of its layers:

* ``query_embed`` and ``reference_points`` are replaced by views whose ``weight`` is the table twice (the
  parameters are the same tensors, so gradients of both halves reach them);
* each layer's ``self_attn`` is wrapped so that it attends over the first 1 + Q tokens only and returns zeros for
  the rest (so the residual leaves them unchanged).

Everything is restored on exit, also on error.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class _RepeatedTable(nn.Module):
    """Stands in for an ``nn.Embedding`` that the decoder reads through ``.weight``: its rows, then again."""

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        self.table = table

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.table.weight, self.table.weight], dim=0)


class _LeadingTokensSelfAttention(nn.Module):
    """Self-attention over the first ``num_tokens`` tokens; the other positions get a zero update."""

    def __init__(self, attention: nn.Module, num_tokens: int) -> None:
        super().__init__()
        self.attention = attention
        self.num_tokens = num_tokens

    def forward(self, query, key, value, attention_mask=None, **kwargs):
        if attention_mask is not None:
            raise ValueError("the DAC decoder self-attention takes no attention mask")
        n = self.num_tokens
        output, weights = self.attention(query[:, :n], key[:, :n], value[:, :n], attention_mask=None, **kwargs)
        return F.pad(output, (0, 0, 0, query.shape[1] - n)), weights


@contextlib.contextmanager
def dac_decoder(decoder: nn.Module) -> Iterator[int]:
    """Run ``decoder`` (transformers ``Sam3DetrDecoder``) with SAM3's DAC queries inside the block.

    Yields Q, the number of one-to-one queries: the decoder's outputs then hold 2Q queries, the first Q the
    one-to-one set (identical to a forward without DAC), the last Q the one-to-many set.
    """
    num_queries = decoder.query_embed.weight.shape[0]
    tables = {"query_embed": decoder.query_embed, "reference_points": decoder.reference_points}
    attentions = [layer.self_attn for layer in decoder.layers]
    try:
        for name, table in tables.items():
            setattr(decoder, name, _RepeatedTable(table))
        for layer, attention in zip(decoder.layers, attentions):
            layer.self_attn = _LeadingTokensSelfAttention(attention, 1 + num_queries)  # presence token + Q
        yield num_queries
    finally:
        for name, table in tables.items():
            setattr(decoder, name, table)
        for layer, attention in zip(decoder.layers, attentions):
            layer.self_attn = attention
