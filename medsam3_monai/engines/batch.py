"""Batches of find-queries: collate slice-space items into images + (prompt, targets) pairs, and move them.

An item (from ``medsam3_monai.transforms``) has ``image`` (3, S, S) SAM3-normalised and ``targets``: a list of
``{"text", "boxes" (n, 4) cxcywh, "masks" (n, S, S) InstanceMasks crops, "is_negative"}``. Every (item, target) pair is a
find-query; the images are stacked once and each query points at its image through ``image_ids``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..boxes import largest_component_box_prompts
from ..instance_masks import InstanceMasks
from ..losses.targets import FindTargets


def collate_find_queries(items: Sequence[dict], box_prompts: bool = False) -> dict[str, Any]:
    """Collate items into a find-query batch.

    Returns:
        ``images`` (N, 3, S, S); ``prompts`` list of B texts; ``image_ids`` (B,) long; ``targets`` FindTargets;
        with ``box_prompts``: ``boxes`` (B, 1, 4) cxcywh of the largest component and ``box_labels`` (B, 1)
        (1, or -10 padding for prompts without a target); ``meta``: per-query dataset / case / label.
    """
    flat: list[dict] = []
    for item in items:  # transforms may emit a list per datalist item (slices of a volume)
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    if not flat:
        raise ValueError("empty batch: no items to collate")
    images = torch.stack([torch.as_tensor(item["image"]).float() for item in flat])
    prompts, image_ids, boxes, masks, meta = [], [], [], [], []
    for index, item in enumerate(flat):
        for target in item["targets"]:
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
        batch["boxes"], batch["box_labels"] = largest_component_box_prompts(
            [m.union() if isinstance(m, InstanceMasks) else m.any(0) for m in masks])
    return batch


class PrepareFindBatch:
    """MONAI ``prepare_batch``: (images, targets, (), network kwargs) on ``device``."""

    def __call__(self, batch: dict, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs):
        images = batch["images"].to(device=device, non_blocking=non_blocking)
        network_kwargs = {
            "prompts": batch["prompts"],
            "image_ids": batch["image_ids"].to(device=device, non_blocking=non_blocking),
            "pixels_normalized": True,
        }
        if "boxes" in batch:
            network_kwargs["boxes"] = batch["boxes"].to(device=device, non_blocking=non_blocking)
            network_kwargs["box_labels"] = batch["box_labels"].to(device=device, non_blocking=non_blocking)
        return images, batch["targets"].to(device) if device is not None else batch["targets"], (), network_kwargs
