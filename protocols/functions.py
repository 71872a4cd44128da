"""The non-linear functions the user evaluates in the clear on permuted values.

Each takes the permuted, decoded values `z` (float64, shape (n, c)) and the segment lengths of the
layout (rows of a norm or a softmax, or one segment for element-wise functions) and returns the
outputs (n, c_out). A permutation that moves whole equal-length segments and shuffles entries within
each segment commutes with all of them, which is what makes the permuted evaluation correct.
Norm gains and biases are not here: the owner folds them into the next linear layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class UserFunction:
    """A named function the user applies to permuted values.

    name: identifies the function in material keys (both parties must agree on it).
    in_channels / out_channels: channels permuted together per item, and produced per item.
    apply(z, lengths) -> outputs.
    """

    name: str
    in_channels: int
    out_channels: int
    apply: Callable[[np.ndarray, list[int]], np.ndarray]


def _starts(lengths: list[int]) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)


def _segment_sum(v: np.ndarray, lengths: list[int]) -> np.ndarray:
    return np.add.reduceat(v, _starts(lengths))


def _per_item(v: np.ndarray, lengths: list[int]) -> np.ndarray:
    return np.repeat(v, lengths)


def _rms_normalize(eps: float):
    def apply(z: np.ndarray, lengths: list[int]) -> np.ndarray:
        x = z[:, 0]
        mean_sq = _segment_sum(x * x, lengths) / np.asarray(lengths, dtype=np.float64)
        return (x / _per_item(np.sqrt(mean_sq + eps), lengths))[:, None]

    return apply


def _layer_normalize(eps: float):
    def apply(z: np.ndarray, lengths: list[int]) -> np.ndarray:
        x = z[:, 0]
        counts = np.asarray(lengths, dtype=np.float64)
        centred = x - _per_item(_segment_sum(x, lengths) / counts, lengths)
        var = _segment_sum(centred * centred, lengths) / counts
        return (centred / _per_item(np.sqrt(var + eps), lengths))[:, None]

    return apply


def _softmax(z: np.ndarray, lengths: list[int]) -> np.ndarray:
    x = z[:, 0]
    peak = np.maximum.reduceat(x, _starts(lengths))
    e = np.exp(x - _per_item(peak, lengths))
    return (e / _per_item(_segment_sum(e, lengths), lengths))[:, None]


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _swiglu(z: np.ndarray, lengths: list[int]) -> np.ndarray:
    return (_silu(z[:, 0]) * z[:, 1])[:, None]


def _gelu(z: np.ndarray, lengths: list[int]) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(z[:, 0]))
    return (0.5 * x * (1.0 + torch.special.erf(x / math.sqrt(2.0)))).numpy()[:, None]


def rms_normalize(eps: float) -> UserFunction:
    """x / sqrt(mean(x^2) + eps) per row (RMSNorm without its gain)."""
    return UserFunction(f"rmsnorm{eps:.3g}", 1, 1, _rms_normalize(eps))


def layer_normalize(eps: float) -> UserFunction:
    """(x - mean) / sqrt(var + eps) per row (LayerNorm without gain and bias)."""
    return UserFunction(f"layernorm{eps:.3g}", 1, 1, _layer_normalize(eps))


SOFTMAX = UserFunction("softmax", 1, 1, _softmax)
"""Softmax per row (the causal mask is applied by the layout: masked entries are not in it)."""
SILU = UserFunction("silu", 1, 1, lambda z, lengths: _silu(z))
SWIGLU = UserFunction("swiglu", 2, 1, _swiglu)
"""silu(gate) * up on (gate, up) pairs permuted jointly."""
GELU = UserFunction("gelu", 1, 1, _gelu)
"""Exact (erf) GeLU, as BERT uses."""


@dataclass(frozen=True)
class ScaleFunction:
    """A scalar the user computes from a permuted vector (so it must not depend on the order).

    name: identifies it in material keys. apply(z) -> float, z the decoded float64 values (1-D).
    """

    name: str
    apply: Callable[[np.ndarray], float]


def inverse_rms(eps: float) -> ScaleFunction:
    """1 / sqrt(mean(x^2) + eps): the factor RMSNorm (without its gain) multiplies a row by."""
    return ScaleFunction(f"invrms{eps:.3g}", lambda z: float(1.0 / np.sqrt(np.mean(z * z) + eps)))
