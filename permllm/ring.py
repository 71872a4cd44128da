"""The ring Z_2^64, held as torch.int64 in two's complement.

torch's int64 +, -, * and @ wrap modulo 2^64, so ring arithmetic is plain tensor arithmetic. This
module adds the few operations that need care: the unsigned (logical) shift and the top bit.
"""

from __future__ import annotations

import torch

RING_BITS = 64
DTYPE = torch.int64


def logical_rshift(x: torch.Tensor, k: int) -> torch.Tensor:
    """floor(x / 2^k) with x read as an unsigned 64-bit integer (0 <= k < 64)."""
    if not 0 <= k < RING_BITS:
        raise ValueError(f"shift must be in [0, 64), got {k}")
    if k == 0:
        return x.clone()
    return (x >> k) & ((1 << (RING_BITS - k)) - 1)


def top_bit(x: torch.Tensor) -> torch.Tensor:
    """Bit 63 of x (1 where x, read as signed, is negative), as int64 0/1."""
    return (x < 0).to(DTYPE)
