"""Permutation-equivariant token choice on permuted logits (user side).

The user sees z = logits[perm] for a secret permutation perm and must pick a permuted index j; the
token is perm[j] (recovered privately with :mod:`permllm.he`). ``choose_token`` depends on positions
only through tie-breaking, so choosing on z and mapping back through perm gives exactly the
distribution of choosing on the true logits:

    perm[choose_token(logits[perm], ...)]  ~  choose_token(logits, ...)

It is even pathwise equivariant: every random decision is made on the logits sorted by value (one
uniform draw per call, inverse-CDF over the sorted candidates), so with the same generator state the
chosen permuted index maps to the same token, unless logits tie exactly. Ties are broken by permuted
position (the smallest permuted index first), i.e. uniformly at random w.r.t. the true vocabulary
when perm is uniform; between exactly tied tokens this makes the choice differ from a run on
unpermuted logits, never its distribution over distinct logit values.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from permllm.errors import ConfigError

__all__ = ["choose_token"]


def _validate(logits, temperature, top_k, top_p, generator) -> np.ndarray:
    if not isinstance(logits, np.ndarray):
        raise ConfigError(f"logits_permuted must be a numpy array, got {type(logits).__name__}")
    if logits.ndim != 1 or logits.size == 0:
        raise ConfigError(f"logits_permuted must be a non-empty 1-D array, got shape {logits.shape}")
    if not (np.issubdtype(logits.dtype, np.floating) or np.issubdtype(logits.dtype, np.integer)):
        raise ConfigError(f"logits_permuted must be real-valued, got dtype {logits.dtype}")
    z = logits.astype(np.float64, copy=False)
    if np.isnan(z).any() or np.isposinf(z).any():
        raise ConfigError("logits_permuted must not contain NaN or +inf")
    if np.isneginf(z).all():
        raise ConfigError("logits_permuted must contain at least one finite value")

    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ConfigError(f"temperature must be a real number >= 0, got {temperature!r}")
    if not math.isfinite(float(temperature)) or temperature < 0:
        raise ConfigError(f"temperature must be finite and >= 0, got {temperature!r}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
            raise ConfigError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
            raise ConfigError(f"top_p must be a real number in (0, 1] or None, got {top_p!r}")
        if not (0.0 < float(top_p) <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")
    if generator is not None and not isinstance(generator, np.random.Generator):
        raise ConfigError(f"generator must be a numpy.random.Generator or None, got {type(generator).__name__}")
    return z


def choose_token(
    logits_permuted: np.ndarray,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: np.random.Generator | None = None,
) -> int:
    """Return the chosen PERMUTED index into ``logits_permuted``.

    - ``temperature == 0``: greedy argmax (``top_k``/``top_p`` are validated, then irrelevant); ties go
      to the smallest permuted index, i.e. are broken at random w.r.t. the true vocabulary.
    - ``temperature > 0``: softmax(logits / temperature), restricted to the ``top_k`` largest logits
      (k clipped to the vocabulary; ties at the k-th place go to smaller permuted indices), then to
      the nucleus: the smallest prefix, in descending probability, of the renormalised top-k
      distribution whose mass is >= ``top_p`` (always at least one token). One uniform draw from
      ``generator`` (a fresh ``np.random.default_rng()`` when None) selects by inverse CDF.
    - ``-inf`` logits are allowed (probability 0); NaN / +inf are rejected.

    Permutation-equivariant in distribution, and pathwise for distinct logits (module docstring).
    Raises ConfigError for temperature < 0, top_k < 1, top_p outside (0, 1], bad logits/generator.
    """
    z = _validate(logits_permuted, temperature, top_k, top_p, generator)
    if temperature == 0:
        return int(np.argmax(z))  # first occurrence of the maximum

    order = np.argsort(-z, kind="stable")  # descending value; ties: smaller permuted index first
    if top_k is not None and top_k < order.size:
        order = order[: int(top_k)]
    values = z[order]  # identical for any permutation of the input (only `order` differs)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        scaled = (values - values[0]) / float(temperature)  # <= 0; -inf for masked logits
    scaled = np.where(np.isnan(scaled), -np.inf, scaled)
    weights = np.exp(scaled)  # weights[0] == 1, non-increasing
    cdf = np.cumsum(weights)
    total = cdf[-1]
    if top_p is not None and top_p < 1.0:
        # smallest prefix with mass >= top_p; cdf / total is non-decreasing
        keep = int(np.searchsorted(cdf, float(top_p) * total, side="left")) + 1
        keep = min(max(keep, 1), cdf.size)
        cdf = cdf[:keep]
        total = cdf[-1]
    rng = generator if generator is not None else np.random.default_rng()
    u = rng.random() * total
    pick = int(np.searchsorted(cdf, u, side="right"))  # first rank whose cdf exceeds u
    # never a zero-weight tail entry (exp underflow / -inf), even if u rounds up to total
    last_positive = int(np.searchsorted(cdf, total, side="left"))
    return int(order[min(pick, last_positive)])
