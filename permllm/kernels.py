"""Row permutation kernels for ring tensors: gather (apply a permutation) and scatter (apply its inverse).

Conventions, for x of shape (n,) or (n, c) and an int64 permutation `perm` of range(n):
    gather_rows(x, perm)[i]        == x[perm[i]]
    scatter_rows(x, perm)[perm[i]] == x[i]
so ``scatter_rows(gather_rows(x, perm), perm) == x``.

`gather_rows` / `scatter_rows` accept a torch.int64 tensor or an np.int64 array and return a new
object of the same kind (never a view of x). They dispatch to the numba kernels when numba is
importable (`NUMBA_AVAILABLE`) and to the numpy implementations otherwise; both variants are exported
so benchmarks and tests can compare them.

Validation is deliberately cheap: the length of perm must equal n (ValueError). Entries are
range-checked (IndexError) because an out-of-range index would otherwise read or write outside the
buffers; whether perm is a bijection is NOT checked in the hot path -- use `is_permutation` in tests.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

try:
    import numba

    NUMBA_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only on installs without numba
    numba = None
    NUMBA_AVAILABLE = False

__all__ = [
    "NUMBA_AVAILABLE",
    "gather_rows",
    "scatter_rows",
    "gather_rows_numpy",
    "scatter_rows_numpy",
    "gather_rows_numba",
    "scatter_rows_numba",
    "invert_permutation",
    "is_permutation",
]

RowData = TypeVar("RowData", torch.Tensor, np.ndarray)

_SUPPORTED_DTYPES = (np.dtype(np.int64),)


# --------------------------------------------------------------------------------------------------
# argument handling
# --------------------------------------------------------------------------------------------------


def _as_numpy_rows(x: torch.Tensor | np.ndarray, op: str) -> np.ndarray:
    """Return a C-contiguous int64 numpy view (zero-copy when possible) of x, which must be 1-D or 2-D."""
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.int64:
            raise TypeError(f"{op}: expected a torch.int64 tensor, got {x.dtype}")
        if x.device.type != "cpu":
            raise ValueError(f"{op}: expected a CPU tensor, got device {x.device}")
        array = x.detach().numpy()
    elif isinstance(x, np.ndarray):
        array = x
    else:
        raise TypeError(f"{op}: expected torch.Tensor or np.ndarray, got {type(x).__name__}")
    if array.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: expected int64 data, got {array.dtype}")
    if array.ndim not in (1, 2):
        raise ValueError(f"{op}: expected x of shape (n,) or (n, c), got shape {tuple(array.shape)}")
    return np.ascontiguousarray(array)


def _as_index_array(perm: torch.Tensor | np.ndarray, n_rows: int, op: str) -> np.ndarray:
    """Return perm as a C-contiguous 1-D int64 numpy array of length n_rows (ValueError otherwise)."""
    if isinstance(perm, torch.Tensor):
        perm = perm.detach().cpu().numpy()
    index = np.ascontiguousarray(perm, dtype=np.int64)
    if index.ndim != 1:
        raise ValueError(f"{op}: perm must be 1-D, got shape {tuple(index.shape)}")
    if index.shape[0] != n_rows:
        raise ValueError(f"{op}: perm has length {index.shape[0]} but x has {n_rows} rows; they must match")
    return index


def _check_index_range(index: np.ndarray, n_rows: int, op: str) -> None:
    if index.size and (index.min() < 0 or index.max() >= n_rows):
        raise IndexError(f"{op}: perm entries must lie in [0, {n_rows}), got range [{index.min()}, {index.max()}]")


def _wrap_like(template: torch.Tensor | np.ndarray, result: np.ndarray) -> torch.Tensor | np.ndarray:
    return torch.from_numpy(result) if isinstance(template, torch.Tensor) else result


# --------------------------------------------------------------------------------------------------
# numpy implementations
# --------------------------------------------------------------------------------------------------


def gather_rows_numpy(x: RowData, perm: torch.Tensor | np.ndarray) -> RowData:
    """out[i] = x[perm[i]] with numpy fancy indexing. x: int64 (n,) or (n, c); returns the type of x."""
    rows = _as_numpy_rows(x, "gather_rows")
    index = _as_index_array(perm, rows.shape[0], "gather_rows")
    _check_index_range(index, rows.shape[0], "gather_rows")
    return _wrap_like(x, rows[index])


def scatter_rows_numpy(x: RowData, perm: torch.Tensor | np.ndarray) -> RowData:
    """out[perm[i]] = x[i] with numpy fancy indexing. x: int64 (n,) or (n, c); returns the type of x."""
    rows = _as_numpy_rows(x, "scatter_rows")
    index = _as_index_array(perm, rows.shape[0], "scatter_rows")
    _check_index_range(index, rows.shape[0], "scatter_rows")
    out = np.empty_like(rows)
    out[index] = rows
    return _wrap_like(x, out)


# --------------------------------------------------------------------------------------------------
# numba implementations
# --------------------------------------------------------------------------------------------------

if NUMBA_AVAILABLE:

    @numba.njit(cache=True, parallel=False)
    def _gather_1d(src, index, out):
        """out[i] = src[index[i]]; returns False (leaving out partly written) on an out-of-range index."""
        n = src.shape[0]
        for i in range(n):
            p = index[i]
            if p < 0 or p >= n:
                return False
            out[i] = src[p]
        return True

    @numba.njit(cache=True, parallel=False)
    def _scatter_1d(src, index, out):
        """out[index[i]] = src[i]; returns False on an out-of-range index."""
        n = src.shape[0]
        for i in range(n):
            p = index[i]
            if p < 0 or p >= n:
                return False
            out[p] = src[i]
        return True

    @numba.njit(cache=True, parallel=False)
    def _gather_2d(src, index, out):
        """out[i, :] = src[index[i], :]; returns False on an out-of-range index."""
        n, c = src.shape
        for i in range(n):
            p = index[i]
            if p < 0 or p >= n:
                return False
            for k in range(c):
                out[i, k] = src[p, k]
        return True

    @numba.njit(cache=True, parallel=False)
    def _scatter_2d(src, index, out):
        """out[index[i], :] = src[i, :]; returns False on an out-of-range index."""
        n, c = src.shape
        for i in range(n):
            p = index[i]
            if p < 0 or p >= n:
                return False
            for k in range(c):
                out[p, k] = src[i, k]
        return True

    def _run_numba(kernel_1d, kernel_2d, x, perm, op):
        rows = _as_numpy_rows(x, op)
        index = _as_index_array(perm, rows.shape[0], op)
        out = np.empty_like(rows)
        # A (n, 1) array is a 1-D problem; the flat kernel avoids the inner-loop overhead.
        if rows.ndim == 1 or rows.shape[1] == 1:
            ok = kernel_1d(rows.reshape(-1), index, out.reshape(-1))
        else:
            ok = kernel_2d(rows, index, out)
        if not ok:
            _check_index_range(index, rows.shape[0], op)  # raises with the offending range
        return _wrap_like(x, out)

    def gather_rows_numba(x: RowData, perm: torch.Tensor | np.ndarray) -> RowData:
        """out[i] = x[perm[i]] with a numba loop. x: int64 (n,) or (n, c); returns the type of x."""
        return _run_numba(_gather_1d, _gather_2d, x, perm, "gather_rows")

    def scatter_rows_numba(x: RowData, perm: torch.Tensor | np.ndarray) -> RowData:
        """out[perm[i]] = x[i] with a numba loop. x: int64 (n,) or (n, c); returns the type of x."""
        return _run_numba(_scatter_1d, _scatter_2d, x, perm, "scatter_rows")

    # Public entry points are plain aliases (no extra call layer) of the fastest available variant.
    gather_rows = gather_rows_numba
    scatter_rows = scatter_rows_numba

else:  # pragma: no cover - exercised only on installs without numba

    def gather_rows_numba(x, perm):
        raise RuntimeError("numba is not installed; use gather_rows or gather_rows_numpy")

    def scatter_rows_numba(x, perm):
        raise RuntimeError("numba is not installed; use scatter_rows or scatter_rows_numpy")

    gather_rows = gather_rows_numpy
    scatter_rows = scatter_rows_numpy


# --------------------------------------------------------------------------------------------------
# permutation helpers
# --------------------------------------------------------------------------------------------------


def invert_permutation(perm: torch.Tensor | np.ndarray) -> np.ndarray:
    """Return inv (np.int64, shape (n,)) with inv[perm[i]] = i, so gather by inv == scatter by perm."""
    if isinstance(perm, torch.Tensor):
        perm = perm.detach().cpu().numpy()
    index = np.ascontiguousarray(perm, dtype=np.int64)
    if index.ndim != 1:
        raise ValueError(f"invert_permutation: perm must be 1-D, got shape {tuple(index.shape)}")
    _check_index_range(index, index.shape[0], "invert_permutation")
    inverse = np.empty_like(index)
    inverse[index] = np.arange(index.shape[0], dtype=np.int64)
    return inverse


def is_permutation(perm: torch.Tensor | np.ndarray) -> bool:
    """True iff perm is a 1-D integer array containing each of 0..n-1 exactly once (n = len(perm))."""
    if isinstance(perm, torch.Tensor):
        perm = perm.detach().cpu().numpy()
    array = np.asarray(perm)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        return False
    n = array.shape[0]
    if n == 0:
        return True
    if array.min() < 0 or array.max() >= n:
        return False
    return bool(np.all(np.bincount(array, minlength=n) == 1))
