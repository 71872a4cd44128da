"""Micro-benchmarks for permllm.kernels and permllm.prg (pytest-benchmark).

Run:  pytest bench/test_bench_kernels.py --benchmark-only
      (add --benchmark-json=out.json to keep the per-test `extra_info` figures: ns/element,
       MB/s, and speed ratios against the numpy baseline).

Ratios are measured inside the same test with `timeit` (best of several repeats), so they compare
like with like on the same machine and in the same process state.
"""

from __future__ import annotations

import timeit

import numpy as np
import pytest
import torch

from permllm.kernels import gather_rows_numba, gather_rows_numpy, scatter_rows_numba, scatter_rows_numpy
from permllm.prg import Prg
from permllm.ring_matmul import ring_matmul_numba

SEED = bytes(range(16))
ROW_SHAPES = {"1d_2^20": (1 << 20,), "49152x1": (49152, 1), "4096x576": (4096, 576)}
KERNELS = {
    ("gather", "numba"): gather_rows_numba,
    ("gather", "numpy"): gather_rows_numpy,
    ("scatter", "numba"): scatter_rows_numba,
    ("scatter", "numpy"): scatter_rows_numpy,
}
KEYSTREAM_BYTES = 64 << 20
MATMUL_SHAPES = {
    "1x576@576x1536": (1, 576, 1536),
    "48x576@576x1536": (48, 576, 1536),
    "1x576@576x49152": (1, 576, 49152),
}


def median_seconds(benchmark) -> float:
    return benchmark.stats.stats.median


def best_seconds(fn, repeat: int = 5) -> float:
    """Best-of-`repeat` wall time of one call to fn (after a warm-up call)."""
    fn()
    return min(timeit.repeat(fn, number=1, repeat=repeat))


@pytest.mark.parametrize("shape_name", list(ROW_SHAPES))
@pytest.mark.parametrize("op,impl", list(KERNELS))
def test_bench_row_permutation(benchmark, op, impl, shape_name):
    """gather/scatter of int64 rows by a secret permutation; extra_info: ns per int64 element."""
    shape = ROW_SHAPES[shape_name]
    x = Prg(SEED, "bench/x").int64(shape)
    perm = Prg(SEED, "bench/perm").permutation(shape[0])
    kernel = KERNELS[(op, impl)]
    kernel(x, perm)  # compile / warm caches outside the timing
    benchmark.group = f"{op} {shape_name}"
    benchmark(kernel, x, perm)
    benchmark.extra_info["elements"] = x.numel()
    benchmark.extra_info["ns_per_element"] = median_seconds(benchmark) / x.numel() * 1e9
    if impl == "numba":
        numpy_kernel = KERNELS[(op, "numpy")]
        benchmark.extra_info["speedup_vs_numpy"] = best_seconds(lambda: numpy_kernel(x, perm)) / best_seconds(
            lambda: kernel(x, perm)
        )


def test_bench_aes_keystream_64mib(benchmark):
    """AES-128-CTR keystream as ring elements, 64 MiB per call; extra_info: MB/s (10^6 bytes/s)."""
    prg = Prg(SEED, "bench/keystream")
    benchmark.group = "prg"
    benchmark(prg.int64, KEYSTREAM_BYTES // 8)
    benchmark.extra_info["bytes"] = KEYSTREAM_BYTES
    benchmark.extra_info["MB_per_s"] = KEYSTREAM_BYTES / median_seconds(benchmark) / 1e6


def test_bench_permutation_49152(benchmark):
    """Uniform Fisher-Yates permutation of 49152 elements (keystream + numba shuffle)."""
    prg = Prg(SEED, "bench/permutation")
    prg.permutation(16)  # load the numba kernel
    benchmark.group = "prg"
    benchmark(prg.permutation, 49152)
    benchmark.extra_info["us_per_permutation"] = median_seconds(benchmark) * 1e6
    benchmark.extra_info["ns_per_element"] = median_seconds(benchmark) / 49152 * 1e9


@pytest.mark.parametrize("shape_name", list(MATMUL_SHAPES))
@pytest.mark.parametrize("impl", ["numba", "torch", "numpy"])
def test_bench_ring_matmul(benchmark, impl, shape_name):
    """Ring (wrapping int64) matmul: permllm.ring_matmul's numba kernel (one thread, as each role runs in
    the demo; its row records the speed-up over torch), torch's int64 matmul (its row records the
    speed-up over numpy's) and numpy's."""
    m, k, n = MATMUL_SHAPES[shape_name]
    if impl == "numpy" and m * k * n > 1 << 24:
        pytest.skip("numpy's int64 matmul takes seconds per call at this size")
    a = Prg(SEED, "bench/a").int64((m, k))
    b = Prg(SEED, "bench/b").int64((k, n))
    a_np, b_np = a.numpy(), b.numpy()
    assert np.array_equal(torch.matmul(a, b).numpy(), a_np @ b_np)  # both wrap mod 2^64 identically
    benchmark.group = f"matmul {shape_name}"
    if impl == "numba":
        assert torch.equal(ring_matmul_numba(a, b, threads=1), torch.matmul(a, b))
        benchmark(ring_matmul_numba, a, b, 1)
        benchmark.extra_info["speedup_vs_torch"] = best_seconds(lambda: torch.matmul(a, b), repeat=3) / best_seconds(
            lambda: ring_matmul_numba(a, b, threads=1)
        )
    elif impl == "torch":
        benchmark(torch.matmul, a, b)
        benchmark.extra_info["speedup_vs_numpy"] = best_seconds(lambda: a_np @ b_np, repeat=3) / best_seconds(
            lambda: torch.matmul(a, b)
        )
    else:
        benchmark(np.matmul, a_np, b_np)
    benchmark.extra_info["ms"] = median_seconds(benchmark) * 1e3
    benchmark.extra_info["ns_per_mac"] = median_seconds(benchmark) / (m * k * n) * 1e9
