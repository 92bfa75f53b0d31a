"""Boolean masks kept at one bit a pixel on the host: a volume's per-prompt slice masks in an eighth of the memory.

A volume segmented with P prompts holds a (P, D, S, S) mask volume in slice space until its slices go back to the
input's geometry: as ``torch.bool`` that is one byte a pixel -- 36 GB for 117 TotalSegmentator classes x 300 slices
at SAM3's 1008 px. :class:`BitMasks` stores the same masks as bits (numpy's ``packbits`` along the rows, so
(..., S, ceil(S / 8)) uint8), packed as the detector and the tracker write them and unpacked one slice at a time
by the way back (``postprocess.MaskLogitsd``). Packing is exact: ``BitMasks.pack(m).unpack()`` equals ``m``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["BitMasks", "pack_bits"]


def _leading(index: Any, leading_dims: int) -> Any:
    """``index`` if it addresses only the ``leading_dims`` mask dimensions (not the pixels), else a ValueError."""
    parts = index if isinstance(index, tuple) else (index,)
    if any(part is Ellipsis or part is None for part in parts) or len(parts) > leading_dims:
        raise ValueError(f"BitMasks index {index!r}: index only the {leading_dims} leading (mask) dimensions; "
                         "unpack() first to index pixels")
    return index


#: the value of each of a byte's 8 pixels, first pixel in the highest bit (numpy's ``packbits`` order)
_BIT_VALUES = (128, 64, 32, 16, 8, 4, 2, 1)


def pack_bits(masks: torch.Tensor) -> torch.Tensor:
    """(..., W) bool -> (..., ceil(W / 8)) uint8 on the masks' device, ``np.packbits(masks, axis=-1)``'s bytes (the
    padding bits of a row 0): torch operations, for masks on an accelerator."""
    bytes_ = masks.to(torch.uint8)
    if masks.shape[-1] % 8:
        bytes_ = torch.nn.functional.pad(bytes_, (0, 8 - masks.shape[-1] % 8))
    values = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=masks.device)
    return (bytes_.unflatten(-1, (-1, 8)) * values).sum(-1, dtype=torch.uint8)


class BitMasks:
    """(..., H, W) boolean masks stored as (..., H, ceil(W / 8)) uint8 bits on the host.

    Indexing and assignment address the leading (mask) dimensions and share the bits (``masks[:, z]`` is a view);
    :meth:`unpack` gives the ``torch.bool`` tensor. The bit order is numpy's ``packbits`` (first pixel in a
    byte's highest bit); the padding bits of a row are always 0.

    Args:
        bits: (..., H, ceil(W / 8)) uint8 CPU tensor.
        width: W, the masks' number of columns.
    """

    def __init__(self, bits: torch.Tensor, width: int) -> None:
        if bits.dtype != torch.uint8 or bits.ndim < 2 or bits.device.type != "cpu":
            raise ValueError(f"BitMasks needs (..., H, ceil(W / 8)) uint8 bits on the CPU, got {bits.dtype} "
                             f"{tuple(bits.shape)} on {bits.device}")
        if bits.shape[-1] != -(-int(width) // 8):
            raise ValueError(f"{bits.shape[-1]} bytes a row do not hold {width} columns")
        self.bits = bits
        self.width = int(width)

    @classmethod
    def zeros(cls, *shape: int) -> BitMasks:
        """Empty masks of ``shape`` (..., H, W)."""
        *leading, width = shape
        return cls(torch.zeros(*leading, -(-width // 8), dtype=torch.uint8), width)

    @classmethod
    def pack(cls, masks: torch.Tensor) -> BitMasks:
        """(..., H, W) bool (any device) -> BitMasks on the host. Masks on an accelerator are packed there
        (:func:`pack_bits`), so an eighth of their bytes crosses to the host and the host does no packing."""
        if masks.dtype != torch.bool:
            raise ValueError(f"BitMasks.pack takes bool masks, got {masks.dtype}")
        masks = masks.detach()
        if masks.device.type != "cpu":
            return cls(pack_bits(masks).cpu(), masks.shape[-1])
        return cls(torch.from_numpy(np.packbits(masks.contiguous().numpy(), axis=-1)), masks.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """The masks' shape (..., H, W)."""
        return (*self.bits.shape[:-1], self.width)

    @property
    def nbytes(self) -> int:
        return self.bits.numel()

    def unpack(self) -> torch.Tensor:
        """(..., H, W) torch.bool on the host (one byte a pixel: unpack what you need, e.g. one slice)."""
        if self.bits.numel() == 0:
            return torch.zeros(self.shape, dtype=torch.bool)
        dense = np.unpackbits(self.bits.contiguous().numpy(), axis=-1, count=self.width)
        return torch.from_numpy(dense.view(np.bool_))

    def any_pixel(self) -> torch.Tensor:
        """(...) bool: whether each mask has a pixel set."""
        if self.bits.numel() == 0:
            return torch.zeros(self.bits.shape[:-2], dtype=torch.bool)
        return self.bits.amax(dim=(-2, -1)) > 0  # on a strided view, several times faster than ne().any()

    def keep_where(self, keep: torch.Tensor) -> BitMasks:
        """Empty the masks where ``keep`` (the leading shape, bool) is False; in place, returns self."""
        self.bits.mul_(keep.to(torch.uint8)[..., None, None])
        return self

    def __getitem__(self, index: Any) -> BitMasks:
        index = _leading(index, self.bits.ndim - 2)
        if isinstance(index, torch.Tensor) and index.ndim == 1 and index.dtype == torch.long:
            # masks picked by number (a slice's present prompts): a copy, as advanced indexing gives it, but
            # index_select copies from a strided view several times faster
            return BitMasks(torch.index_select(self.bits, 0, index.to(self.bits.device)), self.width)
        return BitMasks(self.bits[index], self.width)

    def __setitem__(self, index: Any, masks: torch.Tensor | BitMasks) -> None:
        self.bits[_leading(index, self.bits.ndim - 2)] = self._bits_of(masks)

    def or_(self, index: Any, masks: torch.Tensor | BitMasks) -> BitMasks:
        """``self[index] |= masks`` (bool tensor or BitMasks of that shape); in place, returns self."""
        self.bits[_leading(index, self.bits.ndim - 2)] |= self._bits_of(masks)
        return self

    def _bits_of(self, masks: torch.Tensor | BitMasks) -> torch.Tensor:
        packed = masks if isinstance(masks, BitMasks) else BitMasks.pack(masks)
        if packed.width != self.width:
            raise ValueError(f"masks of {packed.width} columns for BitMasks of {self.width}")
        return packed.bits

    def __repr__(self) -> str:
        return f"BitMasks(shape={self.shape}, {self.nbytes} bytes)"
