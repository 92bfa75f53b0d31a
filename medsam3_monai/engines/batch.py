"""Batches of find-queries: collate slice-space items into images + (prompt, targets) pairs, and move them.

An item (from ``medsam3_monai.transforms``) has ``image`` (3, S, S), uint8 8-bit levels (the training bundle's
``Sam3Normalized(levels=True)``) or SAM3-normalised float, and ``targets``: a list of ``{"text", "boxes" (n, 4)
cxcywh, "masks" (n, S, S) InstanceMasks crops, "is_negative"}``. Every (item, target) pair is a find-query; the
images are stacked once and each query points at its image through ``image_ids``.
"""

from __future__ import annotations

import sys

from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from ..boxes import BOX_PADDING_LABEL, largest_component_box_prompts
from ..instance_masks import InstanceMasks
from ..losses.targets import FindTargets
from ..networks.medsam3_net import network_pixels
from ..tensors import plain_tensor
from ..transforms.intensity import sam3_normalize


def _stacked_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, 3, S, S): the items' uint8 levels as they are when all are levels, else every image SAM3-normalised float
    (levels through ``sam3_normalize``: the values ``network_pixels`` would make of them)."""
    if all(image.dtype == torch.uint8 for image in images):
        return torch.stack(list(images))
    return torch.stack([sam3_normalize(image) if image.dtype == torch.uint8 else image.float() for image in images])


def flatten_items(items: Sequence[dict | Sequence[dict]]) -> list[dict]:
    """The slice items of a loader batch: transforms may emit a list per datalist item (the slices of a volume).

    Also the ``collate_fn`` of the volume loader under :class:`ImageBudgetBatches`."""
    flat: list[dict] = []
    for item in items:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return flat


def collate_find_queries(items: Sequence[dict], box_prompts: bool = False) -> dict[str, Any]:
    """Collate items into a find-query batch.

    Returns:
        ``images`` (N, 3, S, S): uint8 levels when every item's are (normalised on the device by
        :class:`PrepareFindBatch`), else SAM3-normalised float; ``prompts`` list of B texts; ``image_ids`` (B,)
        long; ``targets`` FindTargets;
        with ``box_prompts``: ``boxes`` (B, 1, 4) cxcywh of the largest component and ``box_labels`` (B, 1)
        (1, or -10 padding for prompts without a target and for targets whose ``box_prompt`` is False:
        :class:`~medsam3_monai.transforms.RandBoxPromptsd` leaves some text-only); ``meta``: per-query dataset /
        case / label.
    """
    flat = flatten_items(items)
    if not flat:
        raise ValueError("empty batch: no items to collate")
    images = _stacked_images([plain_tensor(torch.as_tensor(item["image"])) for item in flat])  # no metadata
    prompts, image_ids, boxes, masks, meta, with_box = [], [], [], [], [], []
    for index, item in enumerate(flat):
        for target in item["targets"]:
            with_box.append(bool(target.get("box_prompt", True)))
            prompts.append(target["text"])
            image_ids.append(index)
            boxes.append(torch.as_tensor(target["boxes"]).float().reshape(-1, 4))
            found = target["masks"]
            masks.append(found if isinstance(found, InstanceMasks) else torch.as_tensor(found).bool())
            meta.append({"dataset": item.get("dataset"), "case": item.get("case"), "label": target.get("label")})
    if not prompts:
        raise ValueError("batch has no prompts: every item needs at least one target (positive or negative)")
    batch: dict[str, Any] = {
        "images": images,
        "prompts": prompts,
        "image_ids": torch.tensor(image_ids, dtype=torch.long),
        "targets": FindTargets.from_instances(boxes, masks),
        "meta": meta,
    }
    if box_prompts:
        boxed = [i for i, wanted in enumerate(with_box) if wanted]
        found, labels = largest_component_box_prompts(
            [masks[i].union() if isinstance(masks[i], InstanceMasks) else masks[i].any(0) for i in boxed])
        batch["boxes"] = torch.zeros(len(prompts), 1, 4)
        batch["box_labels"] = torch.full((len(prompts), 1), BOX_PADDING_LABEL, dtype=torch.long)
        batch["boxes"][boxed], batch["box_labels"][boxed] = found, labels
    return batch


class ImageBudgetBatches:
    """Find-query batches of at most ``images_per_batch`` images from a loader of datalist items.

    Validation slices every volume (``AxialSlicesd``): one loader batch of a few CT volumes is hundreds of slices,
    and one forward over all of them (with 200 mask logits per query) does not fit a GPU. This iterable keeps the
    slices of consecutive loader batches in a buffer and yields a collated batch whenever ``images_per_batch``
    are there (the last one may be smaller); a volume may span two batches and a batch may hold the slices of
    several volumes. Each batch is one Ignite iteration, so per-prompt metrics update batch by batch and memory
    stays bounded by the budget, not by the volume size. The order of the slices is the loader's.

    It has no length (slice counts are known only after loading); :class:`MedSAM3Evaluator` then ends each pass
    when the loader is exhausted.

    Args:
        loader: iterable of lists of slice items, e.g. a ``DataLoader`` with ``collate_fn=flatten_items``.
        images_per_batch: most images per yielded batch (per forward).
        collate_fn: turns a list of slice items into a batch (default :func:`collate_find_queries`).
        progress: a description to show a progress bar over the loader's items (datalist items: pictures and
            volumes) under, on the first rank only (its share of them under ``torchrun``); None: no bar.
    """

    def __init__(self, loader: Iterable[Sequence[dict | Sequence[dict]]], images_per_batch: int = 8,
                 collate_fn: Callable[[list[dict]], Any] = collate_find_queries, progress: str | None = None) -> None:
        if int(images_per_batch) < 1:
            raise ValueError(f"images_per_batch must be a positive number of images, got {images_per_batch}")
        self.loader = loader
        self.images_per_batch = int(images_per_batch)
        self.collate_fn = collate_fn
        self.progress = progress

    def _items(self) -> Iterable[Sequence[dict | Sequence[dict]]]:
        from .distributed import get_rank, get_world_size

        if self.progress is None or get_rank() > 0:
            return self.loader
        from tqdm import tqdm

        total = len(self.loader) if hasattr(self.loader, "__len__") else None
        share = " (rank 0's share)" if get_world_size() > 1 else ""
        return tqdm(self.loader, total=total, desc=f"{self.progress}{share}", unit="item", leave=False,
                    file=sys.stderr, dynamic_ncols=True)

    def __iter__(self) -> Iterator[Any]:
        pending: list[dict] = []
        for items in self._items():
            pending.extend(flatten_items(items))
            while len(pending) >= self.images_per_batch:
                yield self.collate_fn(pending[: self.images_per_batch])
                pending = pending[self.images_per_batch:]
        if pending:
            yield self.collate_fn(pending)


class PrepareFindBatch:
    """MONAI ``prepare_batch``: (images, targets, (), network kwargs) on ``device``; uint8 images cross as bytes and
    are SAM3-normalised there (``networks.network_pixels``)."""

    def __call__(self, batch: dict, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs):
        images = network_pixels(batch["images"], device if device is not None else batch["images"].device,
                                non_blocking=non_blocking)
        network_kwargs = {
            "prompts": batch["prompts"],
            "image_ids": batch["image_ids"].to(device=device, non_blocking=non_blocking),
            "pixels_normalized": True,
        }
        if "boxes" in batch:
            network_kwargs["boxes"] = batch["boxes"].to(device=device, non_blocking=non_blocking)
            network_kwargs["box_labels"] = batch["box_labels"].to(device=device, non_blocking=non_blocking)
        return images, batch["targets"].to(device) if device is not None else batch["targets"], (), network_kwargs
