"""Tests for permllm.ring_kernels: each fused kernel equals its torch formula bit for bit."""

from __future__ import annotations

import pytest
import torch

from permllm.prg import Prg
from permllm.ring_kernels import (
    rotate_heads,
    rotate_heads_torch,
    truncation_finish,
    truncation_finish_torch,
    truncation_open,
    truncation_reply,
    truncation_reply_torch,
)

SEED = bytes(range(16))


def _ring(name: str, shape) -> torch.Tensor:
    return Prg(SEED, name).int64(shape)


def _edges(shape) -> torch.Tensor:
    """Full-range words with the boundary values (0, +-1, +-2^62, +-2^63) at the front."""
    t = _ring("edges", shape).reshape(-1)
    special = torch.tensor([0, 1, -1, 2**62, -(2**62), 2**63 - 1, -(2**63), 2**62 - 1], dtype=torch.int64)
    t[: special.numel()] = special[: t.numel()]
    return t.reshape(shape)


@pytest.mark.parametrize("owner", [False, True])
@pytest.mark.parametrize("shape", [(1, 960), (3, 64), (37,), (0, 4)])
def test_truncation_open_is_the_sum_with_the_owner_offset(owner, shape):
    x, r = _edges(shape), _ring("r", shape)
    expected = x + r + (2**62 if owner else 0)
    assert torch.equal(truncation_open(x, r, owner), expected)


@pytest.mark.parametrize("k", [1, 16, 32, 48, 61])
@pytest.mark.parametrize("shape", [(1, 960), (9, 7), (0,)])
def test_truncation_reply_and_finish_equal_the_torch_formulas(k, shape):
    theirs, x = _ring("theirs", shape), _edges(shape)
    k0, k1 = _edges(shape).flip(-1), _ring("k1", shape)
    d, y = truncation_reply(theirs, x, k0, k1, k)
    want_d, want_y = truncation_reply_torch(theirs, x, k0, k1, k)
    assert d.shape == y.shape == x.shape and d.dtype == y.dtype == torch.int64
    assert torch.equal(d, want_d) and torch.equal(y, want_y)
    r, krho = _edges(shape), _ring("krho", shape)
    got = truncation_finish(r, krho, d, k)
    assert got.shape == r.shape and got.dtype == torch.int64
    assert torch.equal(got, truncation_finish_torch(r, krho, d, k))


def test_truncation_kernels_read_non_contiguous_inputs():
    a = _ring("m", (8, 6)).t()
    b, c, e = (_ring(n, (6, 8)) for n in "tre")
    for got, want in zip(truncation_reply(a, b, c, e, 16), truncation_reply_torch(a, b, c, e, 16)):
        assert torch.equal(got, want)
    assert torch.equal(truncation_finish(a, b, c, 16), truncation_finish_torch(a, b, c, 16))


@pytest.mark.parametrize("k", [1, 16, 45])
def test_truncation_kernels_make_the_shared_quotient(k):
    """The three kernels as protocols.trunc composes them, on plaintext-consistent inputs with the
    random-OT correlation krho = k_rho: the two shares add up to floor(x / 2^k) or one above it."""
    n = 4096
    x = _ring("x", (n,)) >> 2
    x[:4] = torch.tensor([0, -1, 2**61 - 1, -(2**61)])
    x_f = _ring("xf", (n,))
    x_s, r, k0, k1 = x - x_f, _edges((n,)), _ring("k0", (n,)), _ring("k1", (n,))
    krho = torch.where(r < 0, k1, k0)
    d, y_s = truncation_reply(truncation_open(x_f, r, False), x_s, k0, k1, k)
    err = y_s + truncation_finish(r, krho, d, k) - torch.div(x, 2**k, rounding_mode="floor")
    assert set(err.unique().tolist()) <= {0, 1}


def _rope_reference(t, cos, sin):
    """The decoder's rotary embedding of a share (m, heads, hd), written out once more for the test."""
    half = t.shape[-1] // 2
    rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return t * cos[:, None, :] + rotated * sin[:, None, :]


@pytest.mark.parametrize("m, heads, groups, hd", [(1, 9, 3, 64), (3, 4, 2, 8), (2, 2, 1, 2)])
def test_rotate_heads_equals_rope_on_q_and_k_and_a_shift_on_v(m, heads, groups, hd):
    cols = (heads + 2 * groups) * hd
    t = _edges((m, cols))
    cos, sin = _ring("cos", (m, hd)) >> 40, _ring("sin", (m, hd)) >> 40
    q_end, k_end = heads * hd, (heads + groups) * hd
    q = _rope_reference(t[:, :q_end].reshape(m, heads, hd), cos, sin)
    k = _rope_reference(t[:, q_end:k_end].reshape(m, groups, hd), cos, sin)
    v = t[:, k_end:] << 16
    expected = torch.cat([q.reshape(m, -1), k.reshape(m, -1), v], dim=1)
    assert torch.equal(rotate_heads(t, cos, sin, k_end, hd, 16), expected)
    assert torch.equal(rotate_heads_torch(t, cos, sin, k_end, hd, 16), expected)


def test_rotate_heads_refuses_a_layout_that_does_not_fit():
    t, tables = _ring("t", (1, 10)), _ring("c", (1, 4))
    with pytest.raises(ValueError, match="rotate_heads"):
        rotate_heads(t, tables, tables, 6, 4, 16)
