"""The helper's memory and its material pool: v @ U drawn by row blocks is the product with the whole
mask, exactly."""

from __future__ import annotations

import torch

from permllm.prg import Prg
from permllm.ring_matmul import ring_matmul
from protocols.model import decoder_weights as dw


def test_mask_product_by_row_blocks_is_the_product_with_the_whole_mask(monkeypatch):
    monkeypatch.setattr(dw, "MASK_CHUNK_ELEMENTS", 7 * 5)  # several row blocks, the last one short
    seed = bytes(range(16))
    v = Prg(bytes(16), "test/v").int64((3, 23))
    want = ring_matmul(v, dw.weight_mask(seed, "L0.o", 23, 7))
    got = dw.mask_product(seed, "L0.o", 23, 7, v)
    assert got.dtype == torch.int64
    assert torch.equal(got, want)
    assert not torch.equal(dw.mask_product(bytes(16), "L0.o", 23, 7, v), want)  # the seed matters
