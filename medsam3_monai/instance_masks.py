"""Instance masks stored as crops: what the training targets carry instead of a dense ``(N, S, S)`` tensor.

A hundred nuclei at 1008 px are ~100 MB as dense bool masks but a few hundred kB as crops of their bounding
boxes. Targets stay crops through the transforms, the cache and collation, and become dense only on the training
device, inside the criterion (:meth:`InstanceMasks.to_dense`), so the loss sees exactly the same masks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = ["InstanceMasks"]


class InstanceMasks:
    """``(N, H, W)`` bool instance masks as N crops ``(h_k, w_k)`` placed at ``offsets[k] = (top, left)``.

    Behaves like the dense tensor where targets are read: ``shape``, ``len``, ``masks[k]`` (a dense ``(H, W)``
    mask), iteration, ``masks[index_tensor]`` (a subset), ``union()``; :meth:`to_dense` builds the tensor.
    """

    dtype = torch.bool

    def __init__(self, size: Sequence[int], crops: Sequence[torch.Tensor] = (),
                 offsets: torch.Tensor | None = None) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.crops = [c.bool() for c in crops]
        self.offsets = (offsets if offsets is not None else torch.zeros(0, 2)).long().reshape(-1, 2).cpu()
        if len(self.crops) != self.offsets.shape[0]:
            raise ValueError(f"{len(self.crops)} crops for {self.offsets.shape[0]} offsets")

    @classmethod
    def from_dense(cls, masks: torch.Tensor) -> InstanceMasks:
        """``(N, H, W)`` bool -> crops of each mask's bounding box (an empty mask: a 0 x 0 crop)."""
        masks = torch.as_tensor(masks).bool()
        as_bytes = masks.view(torch.uint8)  # a uint8 max reduces ~8x faster than a bool any on CPU
        rows_any, cols_any = as_bytes.amax(dim=2) > 0, as_bytes.amax(dim=1) > 0
        crops, offsets = [], []
        for mask, rows, cols in zip(masks, rows_any, cols_any):
            rows, cols = torch.nonzero(rows).flatten(), torch.nonzero(cols).flatten()
            if rows.numel() == 0:
                crops.append(mask[:0, :0])
                offsets.append((0, 0))
                continue
            r1, r2, c1, c2 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            crops.append(mask[r1:r2, c1:c2].clone())
            offsets.append((r1, c1))
        return cls(masks.shape[-2:], crops, torch.tensor(offsets, dtype=torch.long).reshape(-1, 2))

    def _extents(self) -> torch.Tensor:
        """``(N, 2)`` long: each crop's (rows, columns)."""
        return torch.tensor([tuple(c.shape) for c in self.crops], dtype=torch.long).reshape(-1, 2)

    def boxes_cxcywh(self) -> torch.Tensor:
        """``(N, 4)`` float32 cx, cy, w, h in ``[0, 1]`` of each crop's extent (zeros for an empty crop): the masks'
        boxes when the crops are tight (every border row and column set), as :meth:`from_dense` and
        ``LabelToInstancesd`` make them."""
        height, width = self.size
        extent = self._extents()
        y1, x1 = self.offsets[:, 0].float(), self.offsets[:, 1].float()
        y2, x2 = y1 + extent[:, 0].float(), x1 + extent[:, 1].float()
        boxes = torch.stack([(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height], 1)
        return torch.where((extent.prod(1) > 0)[:, None], boxes, torch.zeros(()))

    @classmethod
    def cat(cls, parts: Sequence[InstanceMasks]) -> InstanceMasks:
        """Concatenate along N (all of one size)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        sizes = {p.size for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"instance masks of different sizes: {sorted(sizes)}")
        return cls(parts[0].size, [c for p in parts for c in p.crops], torch.cat([p.offsets for p in parts]))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.crops), *self.size))

    def __len__(self) -> int:
        return len(self.crops)

    def _place(self, out: torch.Tensor, k: int) -> None:
        crop = self.crops[k]
        top, left = (int(v) for v in self.offsets[k])
        out[top:top + crop.shape[0], left:left + crop.shape[1]] = crop.to(out.device)

    def __getitem__(self, index: int | slice | torch.Tensor | Sequence[int]) -> torch.Tensor | InstanceMasks:
        if isinstance(index, int):
            mask = torch.zeros(self.size, dtype=torch.bool)
            self._place(mask, range(len(self))[index])
            return mask
        rows = torch.arange(len(self))[index]
        rows = rows.reshape(-1).tolist()
        return InstanceMasks(self.size, [self.crops[k] for k in rows], self.offsets[rows])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[k] for k in range(len(self)))

    def to_dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The ``(N, H, W)`` bool tensor, allocated on ``device``.

        On the host the crops are copied in place one by one; on an accelerator all crops travel in one packed
        copy and are scattered by one indexed write (:meth:`_scatter_packed`), not one transfer per crop.
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type != "cpu" and len(self):
            return self._scatter_packed(device)
        out = torch.zeros((len(self), *self.size), dtype=torch.bool, device=device)
        for k in range(len(self)):
            self._place(out[k], k)
        return out

    def _scatter_packed(self, device: torch.device) -> torch.Tensor:
        """:meth:`to_dense` with the crops flattened into one buffer (one host-to-device copy; pinned on CUDA) and
        their pixels' flat indices in the output computed on ``device`` (``repeat_interleave``, no host sync)."""
        height, width = self.size
        extent = self._extents()
        sizes = extent.prod(1)
        total = int(sizes.sum())
        out = torch.zeros((len(self), height, width), dtype=torch.bool, device=device)
        if total == 0:
            return out
        packed = torch.cat([c.reshape(-1) for c in self.crops])
        # per crop: its flat start in the output, its width, its start in the packed buffer
        params = torch.stack([torch.arange(len(self)) * (height * width) + self.offsets[:, 0] * width
                              + self.offsets[:, 1], extent[:, 1].clamp(min=1), sizes.cumsum(0) - sizes, sizes], 1)
        if device.type == "cuda":
            packed, params = packed.pin_memory(), params.pin_memory()
        packed = packed.to(device, non_blocking=True)
        base, crop_width, start, count = params.to(device, non_blocking=True).unbind(1)
        pixel = torch.arange(total, device=device) - start.repeat_interleave(count, output_size=total)
        crop_width = crop_width.repeat_interleave(count, output_size=total)
        index = base.repeat_interleave(count, output_size=total) + (pixel // crop_width) * width + pixel % crop_width
        out.view(-1)[index] = packed
        return out

    def union(self) -> torch.Tensor:
        """``(H, W)`` bool: any instance."""
        out = torch.zeros(self.size, dtype=torch.bool)
        for k in range(len(self)):
            top, left = (int(v) for v in self.offsets[k])
            crop = self.crops[k]
            out[top:top + crop.shape[0], left:left + crop.shape[1]] |= crop
        return out

    def __eq__(self, other: object) -> bool:
        """The same masks (compared densely: for tests and checks, not for the training loop)."""
        if not isinstance(other, InstanceMasks):
            return NotImplemented
        return self.shape == other.shape and torch.equal(self.to_dense(), other.to_dense())

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        return f"InstanceMasks(n={len(self)}, size={self.size})"
