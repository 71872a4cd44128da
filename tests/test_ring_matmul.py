"""ring_matmul is torch's int64 matmul, bit for bit, on every path (tiles, remainders, threads, views)."""

from __future__ import annotations

import pytest
import torch

from permllm.kernels import NUMBA_AVAILABLE
from permllm.ring_matmul import PARALLEL_MIN_MACS, ring_matmul, ring_matmul_numba, ring_matmul_torch

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
    with pytest.raises(ValueError, match="2-D"):
        ring_matmul(a.reshape(-1), a.T)
    with pytest.raises(ValueError, match="inner sizes differ"):
        ring_matmul(a, a)
