"""Tests for permllm.sampling.choose_token (token choice on permuted logits).

Statistical checks use fixed seeds, so they are deterministic. Each states its bound: Pearson's
chi-square against the exact probabilities, compared with the critical value of the chi-square
distribution at p = 1e-6 (3 degrees of freedom: 30.66; 1 degree: 23.93), i.e. a correct sampler
would fail for a fresh seed with probability 1e-6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from permllm.errors import ConfigError
from permllm.sampling import choose_token

VOCAB = 49152
CHI2_CRIT_P1E6 = {1: 23.93, 3: 30.66}


def chi2_sf(x: float, dof: int) -> float:
    """Survival function of the chi-square distribution for dof 1 and 3 (closed forms)."""
    if dof == 1:
        return math.erfc(math.sqrt(x / 2))
    if dof == 3:
        return math.erfc(math.sqrt(x / 2)) + math.sqrt(2 * x / math.pi) * math.exp(-x / 2)
    raise ValueError(dof)


def test_chi2_critical_values_are_right():
    for dof, crit in CHI2_CRIT_P1E6.items():
        assert chi2_sf(crit, dof) == pytest.approx(1e-6, rel=0.02)


def chi2_stat(counts: np.ndarray, probs: np.ndarray) -> float:
    n = counts.sum()
    expected = n * probs
    return float(((counts - expected) ** 2 / expected).sum())


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    return np.random.default_rng(123).normal(0.0, 3.0, size=VOCAB)


@pytest.fixture(scope="module")
def perm() -> np.ndarray:
    return np.random.default_rng(456).permutation(VOCAB)


# ----------------------------------------------------------------------------- greedy


def test_greedy_is_argmax(logits):
    assert choose_token(logits) == int(np.argmax(logits))
    assert choose_token(logits, temperature=0.0, top_k=5, top_p=0.5) == int(np.argmax(logits))


def test_greedy_ties_break_by_permuted_position():
    z = np.array([0.0, 3.0, 1.0, 3.0, 3.0])
    assert choose_token(z) == 1
    assert choose_token(z, temperature=1.0, top_k=1) == 1
    assert choose_token(z, temperature=1.0, top_p=1e-12) == 1


def test_greedy_equivariant(logits, perm):
    j = choose_token(logits[perm])
    assert perm[j] == int(np.argmax(logits))


def test_greedy_ties_uniform_over_true_tokens():
    """With ties, the chosen true token is uniform among tied tokens over random permutations."""
    z = np.array([2.0, 0.0, 2.0, 1.0])
    rng = np.random.default_rng(5)
    n = 4000
    hits = np.zeros(4, dtype=np.int64)
    for _ in range(n):
        p = rng.permutation(4)
        hits[p[choose_token(z[p])]] += 1
    assert hits[1] == hits[3] == 0
    assert chi2_stat(hits[[0, 2]], np.array([0.5, 0.5])) < CHI2_CRIT_P1E6[1]


# ----------------------------------------------------------------------------- equivariance


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=50),
        dict(temperature=0.7, top_p=0.9),
        dict(temperature=1.3, top_k=1000, top_p=0.95),
        dict(temperature=5.0, top_k=VOCAB + 10),
    ],
)
def test_pathwise_equivariance(logits, perm, kwargs):
    """Same generator seed: the permuted choice maps through perm to the same token."""
    z_perm = logits[perm]
    for seed in range(25):
        token = choose_token(logits, generator=np.random.default_rng(seed), **kwargs)
        j = choose_token(z_perm, generator=np.random.default_rng(seed), **kwargs)
        assert perm[j] == token, seed


def test_equivariance_under_many_permutations(logits):
    rng = np.random.default_rng(99)
    ref = choose_token(logits, temperature=0.9, top_p=0.8, generator=np.random.default_rng(1))
    for _ in range(5):
        p = rng.permutation(VOCAB)
        j = choose_token(logits[p], temperature=0.9, top_p=0.8, generator=np.random.default_rng(1))
        assert p[j] == ref


# ----------------------------------------------------------------------------- filters


def test_top_k_1_equals_greedy(logits, perm):
    z = logits[perm]
    for seed in range(10):
        g = np.random.default_rng(seed)
        assert choose_token(z, temperature=2.0, top_k=1, generator=g) == int(np.argmax(z))


def test_tiny_top_p_equals_greedy(logits, perm):
    z = logits[perm]
    for seed in range(10):
        g = np.random.default_rng(seed)
        assert choose_token(z, temperature=2.0, top_p=1e-9, generator=g) == int(np.argmax(z))


def test_top_k_support_and_distribution():
    z = np.array([1.0, 0.5, -0.3, 2.0])
    g = np.random.default_rng(8)
    n = 20000
    picks = [choose_token(z, temperature=0.8, top_k=2, generator=g) for _ in range(n)]
    counts = np.bincount(picks, minlength=4)
    assert counts[1] == counts[2] == 0
    probs = softmax(z[[0, 3]] / 0.8)
    assert chi2_stat(counts[[0, 3]], probs) < CHI2_CRIT_P1E6[1]


def test_top_p_keeps_smallest_set_with_enough_mass():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    z = np.log(probs)
    g = np.random.default_rng(9)
    # sorted mass: 0.5, 0.8, 0.95, 1.0
    for top_p, support in [(0.4, {1}), (0.49, {1}), (0.75, {1, 3}), (0.9, {1, 3, 2}), (0.97, {0, 1, 2, 3})]:
        seen = {choose_token(z, temperature=1.0, top_p=top_p, generator=g) for _ in range(3000)}
        assert seen == support, top_p


def test_top_p_distribution_renormalised():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    g = np.random.default_rng(10)
    n = 20000
    picks = [choose_token(np.log(probs), temperature=1.0, top_p=0.75, generator=g) for _ in range(n)]
    counts = np.bincount(picks, minlength=4)
    assert counts[0] == counts[2] == 0
    assert chi2_stat(counts[[1, 3]], np.array([0.5, 0.3]) / 0.8) < CHI2_CRIT_P1E6[1]


def test_temperature_distribution_chi_square():
    """4-way softmax at temperature 0.7, 40 000 draws: chi-square (3 dof) below 30.66 (p = 1e-6)."""
    z = np.array([0.3, -1.0, 1.2, 0.0])
    temperature = 0.7
    probs = softmax(z / temperature)
    g = np.random.default_rng(2024)
    n = 40000
    picks = [choose_token(z, temperature=temperature, generator=g) for _ in range(n)]
    counts = np.bincount(picks, minlength=4)
    stat = chi2_stat(counts, probs)
    assert stat < CHI2_CRIT_P1E6[3], (stat, counts, n * probs)


def test_temperature_distribution_equivariant_in_law():
    """Token frequencies through a fresh permutation per draw match softmax (chi-square, 3 dof)."""
    z = np.array([0.3, -1.0, 1.2, 0.0])
    probs = softmax(z)
    rng = np.random.default_rng(77)
    n = 20000
    counts = np.zeros(4, dtype=np.int64)
    for _ in range(n):
        p = rng.permutation(4)
        counts[p[choose_token(z[p], temperature=1.0, generator=rng)]] += 1
    assert chi2_stat(counts, probs) < CHI2_CRIT_P1E6[3]


def test_neg_inf_logits_never_chosen():
    z = np.array([-np.inf, 0.0, -np.inf, 0.1, -np.inf])
    g = np.random.default_rng(4)
    seen = {choose_token(z, temperature=100.0, generator=g) for _ in range(2000)}
    assert seen == {1, 3}
    assert choose_token(z) == 3


def test_extreme_temperatures():
    z = np.array([0.0, 1.0, 1.0 - 1e-9, -5.0])
    g = np.random.default_rng(6)
    assert {choose_token(z, temperature=1e-300, generator=g) for _ in range(200)} == {1}
    assert {choose_token(z, temperature=1e300, generator=g) for _ in range(400)} == {0, 1, 2, 3}


def test_single_logit_and_default_generator():
    assert choose_token(np.array([3.0]), temperature=1.0) == 0
    z = np.array([0.0, 1.0])
    assert choose_token(z, temperature=1.0) in (0, 1)  # generator None -> fresh default_rng


def test_integer_logits_accepted():
    assert choose_token(np.array([1, 5, 2])) == 1


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature="1"), "temperature"),
        (dict(temperature=True), "temperature"),
        (dict(temperature=1.0, top_k=0), "top_k"),
        (dict(temperature=1.0, top_k=-3), "top_k"),
        (dict(temperature=1.0, top_k=2.0), "top_k"),
        (dict(temperature=1.0, top_k=True), "top_k"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=-0.5), "top_p"),
        (dict(temperature=1.0, top_p=1.0001), "top_p"),
        (dict(temperature=1.0, top_p=float("nan")), "top_p"),
        (dict(temperature=1.0, top_p="0.5"), "top_p"),
        (dict(temperature=0.0, top_k=0), "top_k"),  # validated even when greedy
        (dict(temperature=1.0, generator=42), "generator"),
        (dict(temperature=1.0, generator=np.random.RandomState(0)), "generator"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        choose_token(np.array([0.0, 1.0, 2.0]), **kwargs)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([0.0, 1.0], "numpy array"),
        (np.zeros((2, 2)), "1-D"),
        (np.array([], dtype=np.float64), "1-D"),
        (np.array([0.0, np.nan]), "NaN"),
        (np.array([0.0, np.inf]), "inf"),
        (np.array([-np.inf, -np.inf]), "finite"),
        (np.array([1 + 1j, 2j]), "real"),
    ],
)
def test_invalid_logits(bad, match):
    with pytest.raises(ConfigError, match=match):
        choose_token(bad)  # type: ignore[arg-type]
