"""Tests for permllm.kernels: gather/scatter of rows by a permutation, numba vs numpy, validation."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import permllm.kernels as kernels
from permllm.kernels import (
    NUMBA_AVAILABLE,
    gather_rows,
    gather_rows_numba,
    gather_rows_numpy,
    invert_permutation,
    is_permutation,
    scatter_rows,
    scatter_rows_numba,
    scatter_rows_numpy,
)
from permllm.prg import Prg

SEED = bytes(range(16))
SHAPES = [(0,), (1,), (17,), (1000,), (1000, 1), (333, 5), (64, 576), (2, 0)]
GATHERS = [gather_rows, gather_rows_numba, gather_rows_numpy]
SCATTERS = [scatter_rows, scatter_rows_numba, scatter_rows_numpy]


def ring_data(shape, as_torch: bool, label: str = "data"):
    tensor = Prg(SEED, f"{label}/{shape}").int64(shape)
    return tensor if as_torch else tensor.numpy()


def perm_for(n: int, label: str = "perm") -> np.ndarray:
    return Prg(SEED, f"{label}/{n}").permutation(n)


def as_numpy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else x


def test_numba_is_used_when_available():
    assert NUMBA_AVAILABLE
    assert gather_rows is gather_rows_numba and scatter_rows is scatter_rows_numba


def gathered(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """The definition of gather: out[i] = x[perm[i]]."""
    return x[perm]


def scattered(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """The definition of scatter: out[perm[i]] = x[i]."""
    out = np.empty_like(x)
    out[perm] = x
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("as_torch", [True, False])
@pytest.mark.parametrize("op,definition", [(g, gathered) for g in GATHERS] + [(s, scattered) for s in SCATTERS])
def test_definition_and_return_type(op, definition, shape, as_torch):
    x = ring_data(shape, as_torch)
    perm = perm_for(shape[0])
    out = op(x, perm)
    assert type(out) is type(x)
    assert tuple(out.shape) == shape
    np.testing.assert_array_equal(as_numpy(out), definition(as_numpy(x), perm))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gather,scatter", list(zip(GATHERS, SCATTERS)))
def test_gather_and_scatter_are_inverse(gather, scatter, shape):
    x = ring_data(shape, True)
    perm = perm_for(shape[0])
    assert torch.equal(scatter(gather(x, perm), perm), x)
    assert torch.equal(gather(scatter(x, perm), perm), x)


@pytest.mark.parametrize("shape", [(1 << 16,), (49152, 1), (257, 576), (100, 3)])
@pytest.mark.parametrize("as_torch", [True, False])
def test_numba_equals_numpy_exactly(shape, as_torch):
    x = ring_data(shape, as_torch, "cmp")
    perm = perm_for(shape[0], "cmp")
    np.testing.assert_array_equal(as_numpy(gather_rows_numba(x, perm)), as_numpy(gather_rows_numpy(x, perm)))
    np.testing.assert_array_equal(as_numpy(scatter_rows_numba(x, perm)), as_numpy(scatter_rows_numpy(x, perm)))


def test_gather_by_inverse_equals_scatter():
    x = ring_data((500, 3), True)
    perm = perm_for(500)
    inverse = invert_permutation(perm)
    assert is_permutation(inverse)
    np.testing.assert_array_equal(inverse[perm], np.arange(500))
    assert torch.equal(gather_rows(x, inverse), scatter_rows(x, perm))
    np.testing.assert_array_equal(invert_permutation(torch.from_numpy(perm)), inverse)


def test_perm_may_be_a_torch_tensor_or_other_int_array():
    x = ring_data((50, 2), True)
    perm = perm_for(50)
    expected = gather_rows(x, perm)
    assert torch.equal(gather_rows(x, torch.from_numpy(perm)), expected)
    assert torch.equal(gather_rows(x, perm.astype(np.int32)), expected)
    assert torch.equal(gather_rows(x, perm.tolist()), expected)


def test_output_is_fresh_and_input_untouched():
    x = ring_data((100, 4), True)
    before = x.clone()
    perm = perm_for(100)
    for op in GATHERS + SCATTERS:
        out = op(x, perm)
        assert out.data_ptr() != x.data_ptr()
        out.zero_()
        assert torch.equal(x, before)


def test_identity_permutation_is_a_copy():
    x = ring_data((10, 3), False)
    identity = np.arange(10)
    np.testing.assert_array_equal(gather_rows(x, identity), x)
    np.testing.assert_array_equal(scatter_rows(x, identity), x)


def test_non_contiguous_input():
    base = ring_data((8, 6), True)
    x = base.t()  # shape (6, 8), strided
    perm = perm_for(6)
    for op in GATHERS:
        np.testing.assert_array_equal(as_numpy(op(x, perm)), x.numpy()[perm])
    column = base[:, 1]  # shape (8,), stride 6
    perm8 = perm_for(8)
    for op in GATHERS:
        np.testing.assert_array_equal(as_numpy(op(column, perm8)), column.numpy()[perm8])


@pytest.mark.parametrize("op", GATHERS + SCATTERS)
def test_wrong_perm_length_raises_value_error(op):
    x = ring_data((10, 2), True)
    with pytest.raises(ValueError, match="perm has length 9 but x has 10 rows"):
        op(x, np.arange(9))
    with pytest.raises(ValueError, match="perm has length 11 but x has 10 rows"):
        op(x, np.arange(11))
    with pytest.raises(ValueError, match="1-D"):
        op(x, np.arange(10).reshape(2, 5))


@pytest.mark.parametrize("op", GATHERS + SCATTERS)
def test_out_of_range_perm_raises_index_error(op):
    x = ring_data((10,), True)
    for bad_entry in (10, -1, 2**40):
        perm = np.arange(10)
        perm[3] = bad_entry
        with pytest.raises(IndexError, match=r"\[0, 10\)"):
            op(x, perm)


@pytest.mark.parametrize("op", GATHERS + SCATTERS)
def test_bad_data_raises(op):
    perm = np.arange(4)
    with pytest.raises(TypeError, match="int64"):
        op(torch.zeros(4, dtype=torch.int32), perm)
    with pytest.raises(TypeError, match="int64"):
        op(np.zeros(4, dtype=np.float64), perm)
    with pytest.raises(ValueError, match="shape"):
        op(torch.zeros(4, 2, 2, dtype=torch.int64), perm)
    with pytest.raises(TypeError):
        op([1, 2, 3, 4], perm)


def test_is_permutation():
    assert is_permutation(np.array([], dtype=np.int64))
    assert is_permutation(np.array([2, 0, 1]))
    assert is_permutation(torch.tensor([1, 0]))
    assert not is_permutation(np.array([0, 0, 1]))
    assert not is_permutation(np.array([0, 1, 3]))
    assert not is_permutation(np.array([-1, 0, 1]))
    assert not is_permutation(np.array([[0, 1]]))
    assert not is_permutation(np.array([0.0, 1.0]))


def test_invert_permutation_validates():
    with pytest.raises(IndexError):
        invert_permutation(np.array([0, 5]))
    with pytest.raises(ValueError):
        invert_permutation(np.array([[0]]))


def test_numpy_fallback_when_numba_missing(monkeypatch):
    """Load a private copy of the module with `import numba` failing: the numpy path must take over."""
    monkeypatch.setitem(sys.modules, "numba", None)  # makes `import numba` raise ImportError
    spec = importlib.util.spec_from_file_location("_kernels_without_numba", Path(kernels.__file__))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NUMBA_AVAILABLE is False
    assert module.gather_rows is module.gather_rows_numpy
    x = ring_data((20, 3), True)
    perm = perm_for(20)
    assert torch.equal(module.scatter_rows(module.gather_rows(x, perm), perm), x)
    with pytest.raises(RuntimeError, match="numba is not installed"):
        module.gather_rows_numba(x, perm)
