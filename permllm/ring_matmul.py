"""Matrix products over Z_2^64: `ring_matmul(a, b) == a @ b` for 2-D torch.int64 tensors, faster.

`b` may also be a torch.int32 matrix (the owner's packed weights: every encoded weight but the
embedding fits in 20 bits): the product is then a @ b.to(int64) mod 2^64, exactly, with each int32
entry widened inside the kernel, so the weight is stored and streamed at half the bytes.

torch's int64 `@` wraps mod 2^64 exactly but runs a scalar kernel on one thread (about 0.1-0.2
GMAC/s here). Every linear layer of a session is such a product (SmolLM2: 1.3e8 multiply-adds per
party per generated token), so the engine uses a numba kernel instead: for each tile of 4 rows of
`a` by 512 columns of `b` it streams the rows of `b` once and keeps the 4 partial rows of the
result in cache; the inner loop runs over contiguous columns and vectorizes. Integer overflow in
numba (LLVM) wraps in two's complement, exactly like torch, so the result is bit-identical (tested
against torch on full-range random operands).

Threads: the kernel releases the GIL; products of at least PARALLEL_MIN_MACS multiply-adds are
split by column blocks over `torch.get_num_threads()` threads (the process's compute-thread
setting, `--threads` on the command line), smaller ones run on the calling thread. Without numba,
`ring_matmul` is torch's `@`.

With TORCH_MIN_ROWS rows or more (a prefill, a precomputation), torch's int64 matmul on b (an int32 b
widened a block of rows at a time) is several times faster than the kernel here (torch 2.13, one
thread: 37 x 576 x 3072 int32 in 7 ms against 44 ms; 37 x 49152 x 576 int64 in 0.31 s against 1.43 s);
for one to three rows (a decode step) the kernel is faster (1 x 576 x 49152: ~21 ms against ~40 ms).

    python -m pytest bench/test_bench_kernels.py -k matmul --benchmark-only   # numba vs torch
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from permllm.kernels import NUMBA_AVAILABLE, numba

__all__ = ["ring_matmul", "ring_matmul_numba", "ring_matmul_torch", "PARALLEL_MIN_MACS", "WEIGHT_DTYPES"]

PARALLEL_MIN_MACS = 1 << 22
TORCH_MIN_ROWS = 4
WIDEN_BLOCK_ELEMENTS = 1 << 22
_ROW_TILE = 4
_COLUMN_TILE = 512
_pools: dict[int, ThreadPoolExecutor] = {}


WEIGHT_DTYPES = (torch.int64, torch.int32)
"""The dtypes `ring_matmul` accepts for its right operand (the left one is always int64)."""


def ring_matmul_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The reference: torch's int64 matmul (wraps mod 2^64); an int32 `b` is widened first."""
    return a @ b.to(torch.int64)


def _widened_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b by row blocks of b of WIDEN_BLOCK_ELEMENTS entries (an int32 b widened one block at a time:
    bounded extra memory; an int64 block is used as it is)."""
    k, n = b.shape
    out = torch.zeros((a.shape[0], n), dtype=torch.int64)
    rows = max(1, WIDEN_BLOCK_ELEMENTS // max(n, 1))
    for p in range(0, k, rows):
        out += a[:, p : p + rows] @ b[p : p + rows].to(torch.int64)
    return out


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != torch.int64 or b.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"ring_matmul: expected an int64 by int64 or int32 product, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"ring_matmul: expected 2-D operands, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"ring_matmul: inner sizes differ: {tuple(a.shape)} @ {tuple(b.shape)}")


if NUMBA_AVAILABLE:

    @numba.njit(cache=True, nogil=True)
    def _matmul_columns(a, b, out, j_start, j_stop):
        """out[:, j_start:j_stop] = a @ b[:, j_start:j_stop] mod 2^64 (a, out C-contiguous int64; b
        C-contiguous int64 or int32, each entry widened to int64 before its product: exact)."""
        m, k = a.shape
        for j0 in range(j_start, j_stop, _COLUMN_TILE):
            j1 = min(j_stop, j0 + _COLUMN_TILE)
            i0 = 0
            while i0 + _ROW_TILE <= m:
                for j in range(j0, j1):
                    out[i0, j] = 0
                    out[i0 + 1, j] = 0
                    out[i0 + 2, j] = 0
                    out[i0 + 3, j] = 0
                for p in range(k):
                    a0 = a[i0, p]
                    a1 = a[i0 + 1, p]
                    a2 = a[i0 + 2, p]
                    a3 = a[i0 + 3, p]
                    for j in range(j0, j1):
                        bv = np.int64(b[p, j])
                        out[i0, j] += a0 * bv
                        out[i0 + 1, j] += a1 * bv
                        out[i0 + 2, j] += a2 * bv
                        out[i0 + 3, j] += a3 * bv
                i0 += _ROW_TILE
            for i in range(i0, m):
                _row_columns(a, b, out, i, j0, j1)

    @numba.njit(cache=True, nogil=True)
    def _row_columns(a, b, out, i, j0, j1):
        """out[i, j0:j1] = a[i] @ b[:, j0:j1] mod 2^64, four rows of b per pass over the output."""
        k = a.shape[1]
        for j in range(j0, j1):
            out[i, j] = 0
        p = 0
        while p + 4 <= k:
            a0 = a[i, p]
            a1 = a[i, p + 1]
            a2 = a[i, p + 2]
            a3 = a[i, p + 3]
            for j in range(j0, j1):
                out[i, j] += (
                    a0 * np.int64(b[p, j])
                    + a1 * np.int64(b[p + 1, j])
                    + a2 * np.int64(b[p + 2, j])
                    + a3 * np.int64(b[p + 3, j])
                )
            p += 4
        for q in range(p, k):
            av = a[i, q]
            for j in range(j0, j1):
                out[i, j] += av * np.int64(b[q, j])

    def ring_matmul_numba(a: torch.Tensor, b: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """a @ b mod 2^64 with the numba kernel (b int64 or int32); threads defaults to torch.get_num_threads()."""
        _check(a, b)
        m, k = a.shape
        n = b.shape[1]
        a_np = np.ascontiguousarray(a.detach().numpy())
        b_np = np.ascontiguousarray(b.detach().numpy())
        out = np.empty((m, n), dtype=np.int64)
        threads = torch.get_num_threads() if threads is None else threads
        blocks = min(threads, -(-n // _COLUMN_TILE))
        if blocks <= 1 or m * k * n < PARALLEL_MIN_MACS:
            _matmul_columns(a_np, b_np, out, 0, n)
        else:
            pool = _pools.get(blocks)
            if pool is None:
                pool = _pools[blocks] = ThreadPoolExecutor(blocks, thread_name_prefix="ring-matmul")
            width = -(-n // blocks)
            edges = [(j, min(n, j + width)) for j in range(0, n, width)]
            for f in [pool.submit(_matmul_columns, a_np, b_np, out, j0, j1) for j0, j1 in edges]:
                f.result()
        return torch.from_numpy(out)

    def ring_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b mod 2^64 (b int64 or int32): the numba kernel, except from TORCH_MIN_ROWS rows on, where
        torch's int64 matmul on row blocks of b is faster."""
        _check(a, b)
        if a.shape[0] >= TORCH_MIN_ROWS:
            return _widened_torch(a, b)
        return ring_matmul_numba(a, b)

else:  # pragma: no cover - exercised only on installs without numba

    def ring_matmul_numba(a, b, threads=None):
        raise RuntimeError("numba is not installed; use ring_matmul or ring_matmul_torch")

    def ring_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _check(a, b)
        return a @ b.to(torch.int64)
