"""One slice item at a time through a chain: :class:`EachItem`, and :func:`transforms_of` to see inside chains."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from monai.transforms import Compose, InvertibleTransform

__all__ = ["EachItem", "transforms_of"]


class EachItem(InvertibleTransform):
    """Run ``transform`` (a chain) on every item of a case, one item at a time: the first item through the whole
    chain, then the next. A ``Compose`` given a list maps it transform by transform (MONAI's ``map_items``), so
    every slice's intermediates would exist together (a 300-slice volume's float slices at 1008 px: 1.2 GB per
    grey step); here only one slice's do. A single item (a dict) goes through ``transform`` as is.

    Invertible when ``transform`` is: MONAI's ``Invertd`` with a chain holding an ``EachItem`` inverts the item it is
    given through ``transform``'s inverse.
    """

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            return self.transform(data)
        return [self.transform(item) for item in data]

    def inverse(self, data: Any) -> Any:
        if not isinstance(self.transform, InvertibleTransform):
            return data
        if isinstance(data, Mapping):
            return self.transform.inverse(data)
        return [self.transform.inverse(item) for item in data]


def transforms_of(chain: Any) -> list[Any]:
    """The transforms of a chain, nested ``Compose`` and :class:`EachItem` opened (MONAI's ``Compose.flatten`` keeps
    a nested ``Compose`` whose ``map_items`` differs)."""
    inner = chain.transforms if isinstance(chain, Compose) else [chain.transform] if isinstance(chain, EachItem) \
        else None
    return [chain] if inner is None else [step for part in inner for step in transforms_of(part)]
