"""BitMasks: a volume's per-prompt slice masks at one bit a pixel, exactly what the bool masks were."""

from __future__ import annotations

import pytest
import torch

from medsam3_monai.inferers import BitMasks
from medsam3_monai.inferers.bitmasks import pack_bits


@pytest.mark.parametrize("width", [1, 7, 8, 13, 112])
def test_packing_is_exact_and_takes_an_eighth_of_the_bytes(width):
    masks = torch.rand(3, 4, 9, width, generator=torch.Generator().manual_seed(width)) > 0.5
    packed = BitMasks.pack(masks)
    assert packed.shape == tuple(masks.shape) and packed.bits.shape == (3, 4, 9, -(-width // 8))
    assert torch.equal(packed.unpack(), masks)
    assert packed.nbytes == 3 * 4 * 9 * -(-width // 8)
    # numpy's bit order: a row's first pixel is its first byte's highest bit; the padding bits stay 0
    first = torch.zeros(1, width, dtype=torch.bool)
    first[0, 0] = True
    assert BitMasks.pack(first).bits[0, 0].item() == 128
    last_bits = width % 8 or 8
    assert BitMasks.pack(torch.ones(1, width, dtype=torch.bool)).bits[0, -1].item() == (0xFF << (8 - last_bits)) & 0xFF
    # the packing of masks on an accelerator (torch operations on their device): numpy's bytes, here on the CPU
    assert torch.equal(pack_bits(masks), packed.bits)
    assert torch.equal(pack_bits(masks[:, :, :0]), packed.bits[:, :, :0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masks_on_a_cuda_device_are_packed_there():
    masks = torch.rand(5, 1008, 1008, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = BitMasks.pack(masks.cuda())
    assert packed.bits.device.type == "cpu" and torch.equal(packed.bits, BitMasks.pack(masks).bits)


def test_indexing_and_assignment_address_the_masks_and_share_the_bits():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(2, 5, 6, 11, generator=generator) > 0.5  # (P, D, H, W)
    packed = BitMasks.pack(masks)
    view = packed[:, 3]  # a slice's masks, a view
    assert view.shape == (2, 6, 11) and torch.equal(view.unpack(), masks[:, 3])
    extra = torch.rand(6, 11, generator=generator) > 0.5
    view.or_(1, extra)  # writes through to the volume
    assert torch.equal(packed[1, 3].unpack(), masks[1, 3] | extra)
    packed[0, 2] = torch.zeros(6, 11, dtype=torch.bool)
    packed[0, 4] = BitMasks.pack(torch.ones(6, 11, dtype=torch.bool))
    assert not packed[0, 2].unpack().any() and packed[0, 4].unpack().all()
    assert torch.equal(packed.any_pixel(), packed.unpack().flatten(2).any(-1))
    assert torch.equal(view.any_pixel(), masks[:, 3].flatten(1).any(-1) | torch.tensor([False, bool(extra.any())]))
    assert packed[:, :0].any_pixel().shape == (2, 0) and BitMasks.zeros(0, 6, 11).any_pixel().shape == (0,)
    picked = view[torch.tensor([1, 0, 1])]  # by number: a copy, in that order
    assert torch.equal(picked.unpack(), view.unpack()[[1, 0, 1]]) and picked.bits.data_ptr() != view.bits.data_ptr()
    keep = torch.tensor([[True, False, True, False, True], [False] * 5])
    expected = packed.unpack() & keep[..., None, None]
    assert torch.equal(packed.keep_where(keep).unpack(), expected)
    assert not packed.any_pixel()[1].any()


def test_bad_use_is_refused_with_a_message():
    packed = BitMasks.zeros(2, 3, 4, 10)
    with pytest.raises(ValueError, match="leading"):
        packed[0, 0, 0]  # a pixel row: unpack first
    with pytest.raises(ValueError, match="leading"):
        packed[..., 0]
    with pytest.raises(ValueError, match="columns"):
        packed[0, 0] = torch.zeros(4, 9, dtype=torch.bool)
    with pytest.raises(ValueError, match="bool"):
        BitMasks.pack(torch.zeros(4, 10))
    with pytest.raises(ValueError, match="do not hold"):
        BitMasks(torch.zeros(4, 3, dtype=torch.uint8), 10)
    assert BitMasks.zeros(0, 4, 10).unpack().shape == (0, 4, 10)
