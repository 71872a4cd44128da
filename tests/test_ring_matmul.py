"""ring_matmul is torch's int64 matmul, bit for bit, on every path (tiles, remainders, threads, views),
and with an int32 right operand it equals the int64 product of the widened operand."""

from __future__ import annotations

import pytest
import torch

import permllm.ring_matmul as ring_matmul_module
from permllm.kernels import NUMBA_AVAILABLE
from permllm.ring_matmul import (
    PARALLEL_MIN_MACS,
    TORCH_MIN_ROWS,
    ring_matmul,
    ring_matmul_numba,
    ring_matmul_torch,
)

pytestmark = pytest.mark.skipif(not NUMBA_AVAILABLE, reason="numba is not installed")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _full_range(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(INT64_MIN, INT64_MAX, shape, generator=g, dtype=torch.int64)


@pytest.mark.parametrize(
    "m,k,n",
    [(1, 1, 1), (1, 576, 1536), (3, 7, 5), (4, 9, 513), (5, 64, 1030), (9, 33, 1), (0, 4, 3), (2, 0, 3), (48, 96, 600)],
)
def test_equals_torch_bit_for_bit(m, k, n):
    a, b = _full_range((m, k), m * 1000 + k), _full_range((k, n), n)
    assert torch.equal(ring_matmul(a, b), ring_matmul_torch(a, b))


def test_extreme_values_wrap_like_torch():
    a = torch.tensor([[INT64_MIN, INT64_MAX, -1, 1], [INT64_MAX, INT64_MAX, INT64_MIN, 2]], dtype=torch.int64)
    b = torch.tensor([[INT64_MIN, -1], [INT64_MAX, 3], [INT64_MIN, INT64_MIN], [INT64_MAX, 7]], dtype=torch.int64)
    assert torch.equal(ring_matmul(a, b), a @ b)


def test_threaded_split_equals_one_thread():
    m, k, n = 8, 512, 4096
    assert m * k * n >= PARALLEL_MIN_MACS  # the column split runs
    a, b = _full_range((m, k), 1), _full_range((k, n), 2)
    serial = ring_matmul_numba(a, b, threads=1)
    assert torch.equal(ring_matmul_numba(a, b, threads=2), serial)
    assert torch.equal(ring_matmul_numba(a, b, threads=3), serial)
    assert torch.equal(serial, a @ b)


def test_views_and_transposes():
    a, b = _full_range((6, 40), 3), _full_range((50, 40), 4)
    assert torch.equal(ring_matmul(a, b.T), a @ b.T)
    assert torch.equal(ring_matmul(a[::2], b.T[:, 1:7]), a[::2] @ b.T[:, 1:7])


def test_bad_operands_are_named():
    a = torch.zeros((2, 3), dtype=torch.int64)
    with pytest.raises(TypeError, match="int64"):
        ring_matmul(a.float(), a.T.float())
    with pytest.raises(TypeError, match="int32"):
        ring_matmul(a, a.T.to(torch.int16))
    with pytest.raises(TypeError, match="int64"):
        ring_matmul(a.to(torch.int32), a.T)
    with pytest.raises(ValueError, match="2-D"):
        ring_matmul(a.reshape(-1), a.T)
    with pytest.raises(ValueError, match="inner sizes differ"):
        ring_matmul(a, a)


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _full_range_int32(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(INT32_MIN, INT32_MAX, shape, generator=g, dtype=torch.int64).to(torch.int32)


@pytest.mark.parametrize(
    "m,k,n",
    [(1, 1, 1), (1, 576, 1536), (2, 7, 5), (3, 9, 513), (4, 9, 513), (5, 64, 1030), (9, 33, 1), (0, 4, 3), (2, 0, 3)],
)
def test_int32_weight_equals_int64_product(m, k, n):
    """Full-range int64 shares times full-range int32 weights: exactly the int64 product mod 2^64."""
    a, b = _full_range((m, k), m * 1000 + k + 7), _full_range_int32((k, n), n + 11)
    reference = a @ b.to(torch.int64)
    assert torch.equal(ring_matmul(a, b), reference)
    assert torch.equal(ring_matmul_numba(a, b, threads=1), reference)
    assert torch.equal(ring_matmul_torch(a, b), reference)


def test_int32_extremes_wrap_like_int64():
    a = torch.tensor([[INT64_MIN, INT64_MAX, -1, 1]] * 5, dtype=torch.int64)
    b = torch.tensor([[INT32_MIN, -1], [INT32_MAX, 3], [INT32_MIN, INT32_MIN], [INT32_MAX, 7]], dtype=torch.int32)
    reference = a @ b.to(torch.int64)
    assert torch.equal(ring_matmul(a[:1], b), reference[:1])  # the numba kernel
    assert torch.equal(ring_matmul(a, b), reference)  # widened torch blocks (5 >= TORCH_MIN_ROWS)


def test_int32_widened_blocks_and_threads(monkeypatch):
    """The widened path's row blocks (forced small here) and the kernel's column split give the same product."""
    m, k, n = TORCH_MIN_ROWS + 3, 515, 4100
    a, b = _full_range((m, k), 21), _full_range_int32((k, n), 22)
    reference = a @ b.to(torch.int64)
    monkeypatch.setattr(ring_matmul_module, "WIDEN_BLOCK_ELEMENTS", 3 * n)  # 3 rows of b per block, uneven end
    assert torch.equal(ring_matmul(a, b), reference)
    assert m * k * n >= PARALLEL_MIN_MACS
    assert torch.equal(ring_matmul_numba(a, b, threads=2), reference)
    assert torch.equal(ring_matmul_numba(a[:1], b, threads=3), reference[:1])


def test_int32_views():
    a, b = _full_range((6, 40), 31), _full_range_int32((50, 40), 32)
    assert torch.equal(ring_matmul(a, b.T), a @ b.T.to(torch.int64))
    assert torch.equal(ring_matmul(a[::2], b.T[:, 1:7]), a[::2] @ b.T[:, 1:7].to(torch.int64))
