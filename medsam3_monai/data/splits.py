"""Deterministic train/validation splits (Medical SAM3: 85/15 per dataset, seed 42).

The split must be identical on every machine and Python version, so it uses neither ``hash()`` (randomised
per process) nor ``random``/``numpy`` generators (whose algorithms may change). Each item gets the score
``sha256(f"{seed}:{key}")``; within each stratum the ``n_val`` items with the lowest scores go to validation,
``n_val = floor(n * val_fraction + 0.5)`` and at least 1 when the stratum has 2 or more items. An item's score
does not depend on the others, but ``n_val`` does: adding or removing items can move an item across the split
(only the one whose rank crosses the ``n_val`` boundary).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["item_key", "split_items", "validation_count"]


def item_key(item: Any) -> str:
    """Default sort/split key: the item's ``case``, else its ``image`` path, else ``str(item)``."""
    if isinstance(item, Mapping):
        for field in ("case", "image"):
            if field in item:
                return str(item[field])
    return str(item)


def validation_count(n: int, val_fraction: float) -> int:
    """Number of validation items for a stratum of ``n`` items (half-up rounding, at least 1 when n >= 2)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    count = int((Decimal(n) * Decimal(str(val_fraction))).to_integral_value(rounding=ROUND_HALF_UP))
    if count == 0 and n >= 2 and val_fraction > 0:
        count = 1
    return min(count, n - 1) if n >= 2 else 0


def _score(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()


def split_items(
    items: Sequence[T],
    val_fraction: float = 0.15,
    seed: int = 42,
    key: Callable[[T], str] = item_key,
    stratify: Callable[[T], Hashable] | None = None,
) -> tuple[list[T], list[T]]:
    """Split ``items`` into (training, validation), both sorted by ``key``.

    ``stratify`` (optional) maps an item to its group (e.g. BUSI benign/malignant/normal); each group is
    split on its own so every group appears in both parts. Duplicate keys are an error: they would make the
    split depend on input order.
    """
    keys = [key(item) for item in items]
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            raise ValueError(f"duplicate split key {k!r}: every item needs a unique case/image key")
        seen.add(k)
    groups: dict[Hashable, list[tuple[str, T]]] = {}
    for k, item in zip(keys, items):
        groups.setdefault(stratify(item) if stratify else None, []).append((k, item))
    validation_keys: set[str] = set()
    for members in groups.values():
        ranked = sorted(members, key=lambda pair: (_score(seed, pair[0]), pair[0]))
        validation_keys.update(k for k, _ in ranked[: validation_count(len(members), val_fraction)])
    ordered = sorted(zip(keys, items), key=lambda pair: pair[0])
    training = [item for k, item in ordered if k not in validation_keys]
    validation = [item for k, item in ordered if k in validation_keys]
    return training, validation
