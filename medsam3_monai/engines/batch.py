"""Batches of find-queries: collate slice-space items into images + (prompt, targets) pairs, and move them.

An item (from ``medsam3_monai.transforms``) has ``image`` (3, S, S) SAM3-normalised and ``targets``: a list of
``{"text", "boxes" (n, 4) cxcywh, "masks" (n, S, S), "is_negative"}``. Every (item, target) pair is a
find-query; the images are stacked once and each query points at its image through ``image_ids``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from ..losses.box_ops import xyxy_to_cxcywh
from ..losses.targets import FindTargets

BOX_PADDING_LABEL = -10


def largest_component_box(mask: torch.Tensor) -> torch.Tensor | None:
    """cx, cy, w, h in [0, 1] of the largest 8-connected component of a (H, W) mask, or None when empty.

    This is MedSAM3's text + box prompt (the T+I protocol of both papers).
    """
    array = mask.detach().cpu().numpy().astype(bool)
    if not array.any():
        return None
    labels, count = ndimage.label(array, structure=np.ones((3, 3), dtype=bool))
    sizes = ndimage.sum_labels(array, labels, index=np.arange(1, count + 1))
    rows, cols = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    height, width = array.shape
    xyxy = torch.tensor([cols.min() / width, rows.min() / height, (cols.max() + 1) / width, (rows.max() + 1) / height])
    return xyxy_to_cxcywh(xyxy.float())


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
            masks.append(torch.as_tensor(target["masks"]).bool())
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
        batch["boxes"], batch["box_labels"] = _box_prompts(masks)
    return batch


def _box_prompts(masks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    boxes = torch.zeros(len(masks), 1, 4)
    labels = torch.full((len(masks), 1), BOX_PADDING_LABEL, dtype=torch.long)
    for i, instance_masks in enumerate(masks):
        box = largest_component_box(instance_masks.any(0)) if instance_masks.shape[0] else None
        if box is not None:
            boxes[i, 0], labels[i, 0] = box, 1
    return boxes, labels


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
