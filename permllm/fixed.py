"""Fixed-point encoding of reals into Z_2^64.

A real x is encoded at scale s as round(x * 2^s). Products add scales: an activation at ACT_BITS times
a weight at WEIGHT_BITS gives LINEAR_BITS. Nothing is truncated on shares: rescaling happens either in
the clear on the user's side (after a permuted reveal) or with `protocols.trunc`, which is exact up to
one unit in the last place and never fails for |x| < 2^62.
"""

from __future__ import annotations

import torch

ACT_BITS = 16
"""Scale of activations re-shared by the user after a non-linear step (and of Q, K, V after trunc)."""
WEIGHT_BITS = 16
"""Scale of linear-layer weights."""
LINEAR_BITS = ACT_BITS + WEIGHT_BITS
"""Scale of linear outputs and of the residual stream."""
ROPE_BITS = 16
"""Scale of the public rotary cos/sin tables."""
MAX_ENCODABLE = 2.0**62
"""Encoded magnitudes must stay below this so that sums, offsets and truncation never wrap."""


def encode(x: torch.Tensor | float, bits: int) -> torch.Tensor:
    """round(x * 2^bits) as int64; raises OverflowError if any |x * 2^bits| >= 2^62 or x is not finite."""
    t = torch.as_tensor(x, dtype=torch.float64) * float(2**bits)
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise OverflowError("cannot encode NaN or infinite values")
    if t.numel() and float(t.abs().max()) >= MAX_ENCODABLE:
        raise OverflowError(
            f"value {float(t.abs().max()) / 2**bits:.4g} does not fit at {bits} fractional bits (limit 2^62)"
        )
    return torch.round(t).to(torch.int64)


def decode(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x / 2^bits as float64 (x read as signed)."""
    return x.to(torch.float64) / float(2**bits)
