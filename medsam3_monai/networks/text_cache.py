"""Prompt -> text-feature cache: prompts repeat across a dataset, the text encoder need not."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable, Sequence

import torch
from torch import nn


class TextFeatureCache:
    """LRU cache of projected text features per prompt string.

    Entries are valid only while the text weights are unchanged: the cache keys itself on the version
    counters of those parameters (bumped by every optimiser step or ``load_state_dict``), so it can never
    serve stale features. It is bypassed whenever gradients must flow into the text encoder.
    """

    def __init__(self, modules: Iterable[nn.Module], max_size: int = 1024) -> None:
        self._modules = list(modules)
        self.max_size = max_size
        self._entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._fingerprint: tuple | None = None
        self.hits = 0
        self.misses = 0

    def _parameters(self) -> list[nn.Parameter]:
        return [p for module in self._modules for p in module.parameters()]

    def usable(self) -> bool:
        """True when no gradient needs to reach the text weights (eval, no_grad, or frozen encoder)."""
        if self.max_size <= 0:
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self._parameters()))

    def clear(self) -> None:
        self._entries.clear()
        self._fingerprint = None

    def lookup(
        self,
        prompts: Sequence[str],
        encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (P, T, C) and mask (P, T) for ``prompts``, encoding only the unseen ones."""
        fingerprint = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in self._parameters())
        if fingerprint != self._fingerprint:
            self._entries.clear()
            self._fingerprint = fingerprint
        missing = list(dict.fromkeys(p for p in prompts if p not in self._entries))
        self.hits += len(prompts) - len(missing)
        self.misses += len(missing)
        if missing:
            features, mask = encode(missing)
            for i, prompt in enumerate(missing):
                self._entries[prompt] = (features[i].detach(), mask[i])
        features = torch.stack([self._entries[p][0] for p in prompts])
        mask = torch.stack([self._entries[p][1] for p in prompts])
        for prompt in prompts:
            self._entries.move_to_end(prompt)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)
        return features, mask
