"""Fused element-wise ring arithmetic for the protocols' per-call glue: one numba loop instead of a
chain of small torch operations (each a call, a temporary and, between two party threads, a GIL
hand-off). Every kernel is exactly its torch formula mod 2^64 (ring elements read as uint64 inside,
where wrapping is defined); tests compare them bit for bit. Without numba the torch formulas run.

    truncation_open(x, r, owner)             x + r (+ 2^62 on the owner's side)     (protocols.trunc)
    truncation_close(mine, theirs, rho, alpha, k, owner)
        c = mine + theirs;  y = 2^(64-k) (1 - c_63) rho - alpha (+ owner: floor(c / 2^k) - 2^(62-k))
    rotate_heads(t, cos, sin, rotated, head_dim, shift)                    (the decoder's RoPE step)
        each row of t (m, cols): heads of head_dim in its first `rotated` columns rotated in the
        rotate-half convention, t * cos + rotate_half(t) * sin with the row's (head_dim,) tables,
        the other columns shifted left by `shift` (the same scale)

Inputs are torch.int64 tensors of one shape (any, made contiguous); outputs are new tensors of it.
"""

from __future__ import annotations

import numpy as np
import torch

from permllm.kernels import NUMBA_AVAILABLE, numba
from permllm.ring import logical_rshift, top_bit

__all__ = [
    "truncation_open",
    "truncation_close",
    "truncation_close_torch",
    "rotate_heads",
    "rotate_heads_torch",
    "OFFSET_BITS",
]

OFFSET_BITS = 62
"""The owner's offset 2^62 that makes a truncated value non-negative (protocols.trunc)."""


def _words(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy().reshape(-1).view(np.uint64)


def truncation_open_torch(x: torch.Tensor, r: torch.Tensor, owner: bool) -> torch.Tensor:
    out = x + r
    return out + (1 << OFFSET_BITS) if owner else out


def truncation_close_torch(
    mine: torch.Tensor, theirs: torch.Tensor, rho: torch.Tensor, alpha: torch.Tensor, k: int, owner: bool
) -> torch.Tensor:
    """The reference formula in torch operations."""
    c = mine + theirs
    y = ((1 - top_bit(c)) << (64 - k)) * rho - alpha
    if owner:
        y = y + (logical_rshift(c, k) - (1 << (OFFSET_BITS - k)))
    return y


def rotate_heads_torch(
    t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotated: int, head_dim: int, shift: int
) -> torch.Tensor:
    """The reference in torch operations: t (m, cols), cos/sin (m, head_dim)."""
    m = t.shape[0]
    heads = t[:, :rotated].reshape(m, -1, head_dim)
    half = head_dim // 2
    turned = torch.cat([-heads[..., half:], heads[..., :half]], dim=-1)
    out = heads * cos[:, None, :] + turned * sin[:, None, :]
    return torch.cat([out.reshape(m, -1), t[:, rotated:] << shift], dim=1)


if NUMBA_AVAILABLE:

    @numba.njit(cache=True, nogil=True)
    def _rotate(t, cos, sin, out, rotated, head_dim, shift):
        m, cols = t.shape
        half = head_dim // 2
        zero = np.uint64(0)
        by = np.uint64(shift)
        for i in range(m):
            for h0 in range(0, rotated, head_dim):
                for d in range(head_dim):
                    turned = zero - t[i, h0 + d + half] if d < half else t[i, h0 + d - half]
                    out[i, h0 + d] = t[i, h0 + d] * cos[i, d] + turned * sin[i, d]
            for j in range(rotated, cols):
                out[i, j] = t[i, j] << by

    def rotate_heads(
        t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotated: int, head_dim: int, shift: int
    ) -> torch.Tensor:
        """RoPE on the first `rotated` columns of t (m, cols), a left shift on the rest (module docstring)."""
        m, cols = t.shape
        if rotated % head_dim or rotated > cols or head_dim % 2 or cos.shape != (m, head_dim) or sin.shape != cos.shape:
            raise ValueError(
                f"rotate_heads: {rotated} of {cols} columns, head_dim {head_dim}, tables {tuple(cos.shape)}"
            )
        out = torch.empty((m, cols), dtype=torch.int64)
        words = [x.detach().contiguous().numpy().view(np.uint64) for x in (t, cos, sin, out)]
        _rotate(*words, int(rotated), int(head_dim), int(shift))
        return out

    @numba.njit(cache=True, nogil=True)
    def _open(x, r, out, offset):
        for i in range(x.shape[0]):
            out[i] = x[i] + r[i] + offset

    @numba.njit(cache=True, nogil=True)
    def _close(mine, theirs, rho, alpha, out, k, owner):
        one = np.uint64(1)
        wrap_shift = np.uint64(64 - k)
        shift = np.uint64(k)
        top = np.uint64(63)
        offset = one << np.uint64(OFFSET_BITS - k)
        for i in range(mine.shape[0]):
            c = mine[i] + theirs[i]
            y = ((one - (c >> top)) << wrap_shift) * rho[i] - alpha[i]
            if owner:
                y += (c >> shift) - offset
            out[i] = y

    def truncation_open(x: torch.Tensor, r: torch.Tensor, owner: bool) -> torch.Tensor:
        """x + r, plus 2^62 on the owner's side (the value a party sends in a truncation)."""
        out = torch.empty(x.shape, dtype=torch.int64)
        offset = np.uint64(1 << OFFSET_BITS) if owner else np.uint64(0)
        _open(_words(x), _words(r), _words(out), offset)
        return out

    def truncation_close(
        mine: torch.Tensor, theirs: torch.Tensor, rho: torch.Tensor, alpha: torch.Tensor, k: int, owner: bool
    ) -> torch.Tensor:
        """The truncated share from the opened c = mine + theirs (see the module docstring)."""
        out = torch.empty(mine.shape, dtype=torch.int64)
        _close(_words(mine), _words(theirs), _words(rho), _words(alpha), _words(out), int(k), bool(owner))
        return out

else:  # pragma: no cover - exercised only on installs without numba
    truncation_open = truncation_open_torch
    truncation_close = truncation_close_torch
    rotate_heads = rotate_heads_torch
