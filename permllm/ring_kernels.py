"""Fused element-wise ring arithmetic for the protocols' per-call glue: one numba loop instead of a
chain of small torch operations (each a call, a temporary and, between two party threads, a GIL
hand-off). Every kernel is exactly its torch formula mod 2^64 (ring elements read as uint64 inside,
where wrapping is defined); tests compare them bit for bit. Without numba the torch formulas run.

    truncation_open(x, r, offset)            x + r (+ 2^62 with offset)             (protocols.trunc)
    truncation_reply(theirs, x, k0, k1, k)   the side without the mask r, from c_F = theirs:
        c = theirs + x + 2^62,  e = 1 - c_63:  d = k1 - k0 - e  and  y = floor(c / 2^k) - 2^(62-k) - 2^(64-k) k0
    truncation_finish(r, krho, d, k)         the mask holder's side, rho = r_63:
        y = 2^(64-k) (krho - rho d) - floor(r / 2^k)
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
    "truncation_open_torch",
    "truncation_reply",
    "truncation_reply_torch",
    "truncation_finish",
    "truncation_finish_torch",
    "rotate_heads",
    "rotate_heads_torch",
    "OFFSET_BITS",
]

OFFSET_BITS = 62
"""The owner's offset 2^62 that makes a truncated value non-negative (protocols.trunc)."""


def _words(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy().reshape(-1).view(np.uint64)


def truncation_open_torch(x: torch.Tensor, r: torch.Tensor, offset: bool) -> torch.Tensor:
    out = x + r
    return out + (1 << OFFSET_BITS) if offset else out


def truncation_reply_torch(
    theirs: torch.Tensor, x: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference formula in torch operations: (d, y)."""
    c = theirs + x + (1 << OFFSET_BITS)
    d = k1 - k0 - (1 - top_bit(c))
    y = logical_rshift(c, k) - (1 << (OFFSET_BITS - k)) - (k0 << (64 - k))
    return d, y


def truncation_finish_torch(r: torch.Tensor, krho: torch.Tensor, d: torch.Tensor, k: int) -> torch.Tensor:
    """The reference formula in torch operations."""
    return ((krho - top_bit(r) * d) << (64 - k)) - logical_rshift(r, k)


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
    def _reply(theirs, x, k0, k1, d, y, k):
        one = np.uint64(1)
        top = np.uint64(63)
        shift = np.uint64(k)
        pad_shift = np.uint64(64 - k)
        offset = one << np.uint64(OFFSET_BITS)
        low_offset = one << np.uint64(OFFSET_BITS - k)
        for i in range(x.shape[0]):
            c = theirs[i] + x[i] + offset
            d[i] = k1[i] - k0[i] - (one - (c >> top))
            y[i] = (c >> shift) - low_offset - (k0[i] << pad_shift)

    @numba.njit(cache=True, nogil=True)
    def _finish(r, krho, d, y, k):
        top = np.uint64(63)
        shift = np.uint64(k)
        pad_shift = np.uint64(64 - k)
        for i in range(r.shape[0]):
            rho = r[i] >> top
            y[i] = ((krho[i] - rho * d[i]) << pad_shift) - (r[i] >> shift)

    def truncation_open(x: torch.Tensor, r: torch.Tensor, offset: bool) -> torch.Tensor:
        """x + r, plus 2^62 with offset (see the module docstring)."""
        out = torch.empty(x.shape, dtype=torch.int64)
        add = np.uint64(1 << OFFSET_BITS) if offset else np.uint64(0)
        _open(_words(x), _words(r), _words(out), add)
        return out

    def truncation_reply(
        theirs: torch.Tensor, x: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(d, y) of the side without the mask, from the holder's c_F = theirs (module docstring)."""
        d, y = torch.empty(x.shape, dtype=torch.int64), torch.empty(x.shape, dtype=torch.int64)
        _reply(_words(theirs), _words(x), _words(k0), _words(k1), _words(d), _words(y), int(k))
        return d, y

    def truncation_finish(r: torch.Tensor, krho: torch.Tensor, d: torch.Tensor, k: int) -> torch.Tensor:
        """The mask holder's truncated share from the other side's d (module docstring)."""
        y = torch.empty(r.shape, dtype=torch.int64)
        _finish(_words(r), _words(krho), _words(d), _words(y), int(k))
        return y

else:  # pragma: no cover - exercised only on installs without numba
    truncation_open = truncation_open_torch
    truncation_reply = truncation_reply_torch
    truncation_finish = truncation_finish_torch
    rotate_heads = rotate_heads_torch
