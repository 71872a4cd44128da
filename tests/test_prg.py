"""Tests for permllm.prg: AES-CTR keystream, ring sampling, unbiased uniform permutations.

All tests use explicit seeds, so every statistical check below is deterministic; the stated bounds
say how unlikely a failure would be for a fresh seed if the generator were correct.
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from permllm.kernels import is_permutation
from permllm.prg import (
    MAX_PERMUTATION_SIZE,
    SEED_BYTES,
    Prg,
    PrgKey,
    _lemire_bounded,
    _shuffle_segments,
    derive_nonce,
    fresh_seed,
)

SEED_A = bytes(range(16))
SEED_B = bytes(range(1, 17))


def direct_keystream(seed: bytes, domain: bytes, n_bytes: int) -> bytes:
    """Reference keystream computed straight from `cryptography`, independent of Prg's chunking."""
    nonce = hashlib.sha256(b"permllm/prg/v1\x00" + domain).digest()[:16]
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(nonce)).encryptor()
    return encryptor.update(bytes(n_bytes)) + encryptor.finalize()


# ---------------------------------------------------------------------------------------------------
# construction and keystream
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_seed", [b"", bytes(15), bytes(17), bytes(32)])
def test_seed_must_be_16_bytes(bad_seed):
    with pytest.raises(ValueError, match="exactly 16 bytes"):
        Prg(bad_seed, "d")


def test_seed_and_domain_types_are_checked():
    with pytest.raises(TypeError):
        Prg("0123456789abcdef", "d")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Prg(SEED_A, 7)  # type: ignore[arg-type]


def test_fresh_seed_is_16_random_bytes():
    seeds = {fresh_seed() for _ in range(8)}
    assert all(isinstance(s, bytes) and len(s) == SEED_BYTES for s in seeds)
    assert len(seeds) == 8


def test_keystream_is_deterministic_per_seed_and_domain():
    assert Prg(SEED_A, "mask/3").bytes(1000) == Prg(SEED_A, "mask/3").bytes(1000)
    # str domains are their UTF-8 bytes
    assert Prg(SEED_A, "mask/3").bytes(64) == Prg(SEED_A, b"mask/3").bytes(64)


def test_different_domains_and_seeds_give_different_streams():
    reference = Prg(SEED_A, "mask/3").bytes(64)
    assert Prg(SEED_A, "mask/4").bytes(64) != reference
    assert Prg(SEED_A, "mask/30").bytes(64) != reference
    assert Prg(SEED_B, "mask/3").bytes(64) != reference
    assert derive_nonce("a") != derive_nonce("b")


def test_known_answer_matches_direct_aes_ctr_call():
    for domain in (b"kat", b"softmax/17", b""):
        assert Prg(SEED_A, domain).bytes(1000) == direct_keystream(SEED_A, domain, 1000)


def test_reference_aes_ctr_matches_nist_sp800_38a_f51():
    """Pins the reference itself: NIST SP 800-38A F.5.1 (CTR-AES128.Encrypt), first two blocks."""
    key = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
    counter = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    plaintext = bytes.fromhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51")
    expected = bytes.fromhex("874d6191b620e3261bef6864990db6ce9806f66b7970fdff8617187bb9fffdff")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
    assert encryptor.update(plaintext) == expected


def test_pinned_keystream_vector():
    """Frozen output: a change here breaks interoperability between parties on different versions."""
    assert Prg(SEED_A, "permllm/kat").bytes(32).hex() == (
        "9b42d3061468b13c5954a23e0668a2bfaac5df6ab5a00556d5725a88e7249faa"
    )
    assert Prg(SEED_A, "permllm/kat/perm").permutation(8).tolist() == [6, 2, 3, 4, 5, 1, 7, 0]


@pytest.mark.parametrize("n", [1, 13, 16, 4097, 300_001])  # partial AES blocks and > 1 internal chunk
def test_continuation_two_draws_equal_one_double_draw(n):
    split = Prg(SEED_A, "cont")
    first, second = split.bytes(n), split.bytes(n)
    assert first + second == Prg(SEED_A, "cont").bytes(2 * n)
    assert split.position == 2 * n


def test_shared_key_gives_the_streams_of_the_seed():
    """A PrgKey set up once serves many domains; each stream equals the seed's own, at every read
    length (short reads from the shared key schedule, long ones from OpenSSL's CTR mode) and offset."""
    key = PrgKey(SEED_A)
    for domain in (b"kat", b"3/a", b""):
        lengths = [3, 16, 5, 70_000, 9, 1, 200_000, 13]
        from_key, from_seed = Prg(key, domain), Prg(SEED_A, domain)
        parts = [from_key.bytes(n) for n in lengths]
        assert b"".join(parts) == direct_keystream(SEED_A, domain, sum(lengths))
        assert b"".join(from_seed.bytes(n) for n in lengths) == b"".join(parts)
    assert Prg(key, "r").int64((3, 5)).equal(Prg(SEED_A, "r").int64((3, 5)))
    assert "PrgKey(...)" == repr(key)


@pytest.mark.parametrize("low", [(1 << 64) - 2, (1 << 64) - 1])
def test_shared_key_counter_carries_into_the_high_word(low):
    """The counter blocks are the full 128-bit big-endian counter of CTR mode, carry included."""
    first = (5 << 64) + low
    blocks = PrgKey(SEED_A).counter_blocks(first, 4).tobytes()
    reference = Cipher(algorithms.AES(SEED_A), modes.CTR(first.to_bytes(16, "big"))).encryptor()
    assert blocks == reference.update(bytes(64))
    top = PrgKey(SEED_A).counter_blocks((1 << 128) - 1, 2).tobytes()
    wrap = Cipher(algorithms.AES(SEED_A), modes.CTR(bytes([255] * 16))).encryptor()
    assert top == wrap.update(bytes(32))


def test_continuation_across_value_types():
    mixed = Prg(SEED_A, "mixed")
    head = mixed.bytes(3)
    words = mixed.uint64(5)
    ring = mixed.int64((2, 2))
    whole = Prg(SEED_A, "mixed").bytes(3 + 40 + 32)
    assert head == whole[:3]
    assert words.tobytes() == whole[3:43]
    assert ring.numpy().tobytes() == whole[43:]
    assert mixed.position == 75


def test_uint64_is_little_endian_keystream():
    words = Prg(SEED_A, "le").uint64(4)
    raw = Prg(SEED_A, "le").bytes(32)
    assert words.dtype == np.uint64 and words.shape == (4,)
    assert words.tolist() == [int.from_bytes(raw[8 * i : 8 * i + 8], "little") for i in range(4)]


# ---------------------------------------------------------------------------------------------------
# ring elements and bits
# ---------------------------------------------------------------------------------------------------


def test_int64_shape_dtype_and_sign_coverage():
    ring = Prg(SEED_A, "ring").int64((100, 1000))
    assert ring.dtype == torch.int64 and ring.shape == (100, 1000)
    assert ring.is_contiguous()
    ring.add_(1)  # writable, owned memory
    negative_fraction = (ring < 0).double().mean().item()
    # 10^5 fair signs: sd = 0.0016, bound is > 12 sd
    assert abs(negative_fraction - 0.5) < 0.02
    assert ring.min().item() < -(2**62) and ring.max().item() > 2**62
    assert Prg(SEED_A, "ring").int64(7).shape == (7,)
    assert Prg(SEED_A, "ring").int64(()).shape == ()
    assert Prg(SEED_A, "ring").int64((3, 0)).numel() == 0


def test_per_bit_balance_of_a_million_words():
    words = Prg(SEED_A, "balance").uint64(1_000_000)
    bit_positions = np.arange(64, dtype=np.uint64)
    ones = np.array([int(((words >> b) & np.uint64(1)).sum()) for b in bit_positions])
    # Binomial(10^6, 1/2): sd = 500; bound 3000 = 6 sd (two-sided p ~ 2e-9 per bit, ~1.3e-7 for 64 bits).
    assert np.all(np.abs(ones - 500_000) < 3000), ones


def test_bits_are_zero_one_balanced_and_follow_the_stream():
    bits = Prg(SEED_A, "bits").bits((1000, 1000))
    assert bits.dtype == torch.int64 and bits.shape == (1000, 1000)
    assert set(torch.unique(bits).tolist()) == {0, 1}
    # 10^6 fair bits: sd = 500, bound = 6 sd
    assert abs(int(bits.sum()) - 500_000) < 3000
    raw = np.frombuffer(Prg(SEED_A, "bits").bytes(2), dtype=np.uint8)
    expected = [(int(raw[i // 8]) >> (i % 8)) & 1 for i in range(13)]
    assert Prg(SEED_A, "bits").bits(13).tolist() == expected


# ---------------------------------------------------------------------------------------------------
# unbiased bounded sampling (Lemire)
# ---------------------------------------------------------------------------------------------------


def test_lemire_is_exactly_unbiased_exhaustive_8_bit_words():
    """With 8-bit words, enumerate every word for every bound: each output value must be produced by
    exactly floor(256 / bound) accepted words and exactly 256 mod bound words must be rejected."""
    word_bits = 8
    for bound in range(1, 257):
        counts = np.zeros(bound, dtype=np.int64)
        rejected = 0
        for word in range(256):
            value, next_pos = _lemire_bounded(np.array([word], dtype=np.uint32), 0, bound, word_bits)
            assert next_pos == 1
            if value < 0:
                rejected += 1
            else:
                assert 0 <= value < bound
                counts[value] += 1
        assert np.all(counts == 256 // bound), (bound, counts)
        assert rejected == 256 % bound


def test_naive_modulo_would_fail_the_exhaustive_check():
    """Shows the check above has power: plain `word % 3` on 8-bit words is biased (86, 85, 85)."""
    assert np.bincount(np.arange(256) % 3).tolist() == [86, 85, 85]


def test_lemire_rejects_and_redraws_with_32_bit_words():
    # bound 3: 2^32 mod 3 == 1, so exactly one word (0) is rejected; the next word is then used.
    value, pos = _lemire_bounded(np.array([0, 0xFFFFFFFF], dtype=np.uint32), 0, 3, 32)
    assert (value, pos) == (2, 2)
    assert _lemire_bounded(np.array([0], dtype=np.uint32), 0, 3, 32) == (-1, 1)  # buffer exhausted
    # bound a power of two: no rejection ever, value is the top bits
    assert _lemire_bounded(np.array([0], dtype=np.uint32), 0, 4, 32) == (0, 1)
    assert _lemire_bounded(np.array([0xC0000000], dtype=np.uint32), 0, 4, 32) == (3, 1)


def test_shuffle_resumes_identically_after_buffer_exhaustion():
    """Feeding the words one at a time (forcing many resumes, including mid-rejection) must give the
    same shuffle as one buffer. Zero words are rejected for every bound that is not a power of two."""
    rng = np.random.default_rng(1)
    words = rng.integers(0, 2**32, size=200, dtype=np.uint32)
    words[::3] = 0
    starts = np.array([0, 7, 7, 19], dtype=np.int64)
    lengths = np.array([7, 0, 12, 5], dtype=np.int64)

    at_once = np.arange(24, dtype=np.int64)
    assert _shuffle_segments(at_once, starts, lengths, words, 32, 0, -1) == (4, -1)

    piecewise = np.arange(24, dtype=np.int64)
    seg, step = 0, -1
    for word in words:
        seg, step = _shuffle_segments(piecewise, starts, lengths, np.array([word]), 32, seg, step)
        if seg == 4:
            break
    assert seg == 4
    np.testing.assert_array_equal(piecewise, at_once)
    assert is_permutation(at_once)


# ---------------------------------------------------------------------------------------------------
# permutations
# ---------------------------------------------------------------------------------------------------


def reference_permutation(seed: bytes, domain: bytes, n: int) -> list[int]:
    """Plain-Python Fisher-Yates with 32-bit Lemire over the direct keystream (specification)."""
    stream = direct_keystream(seed, domain, 4 * (n + 64))
    words = iter(int.from_bytes(stream[i : i + 4], "little") for i in range(0, len(stream), 4))
    values = list(range(n))
    for i in range(n - 1, 0, -1):
        bound = i + 1
        while True:
            product = next(words) * bound
            if (product & 0xFFFFFFFF) >= (2**32 - bound) % bound:
                break
        j = product >> 32
        values[i], values[j] = values[j], values[i]
    return values


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 1000])
def test_permutation_matches_plain_python_reference(n):
    perm = Prg(SEED_A, b"ref").permutation(n)
    assert perm.dtype == np.int64 and perm.shape == (n,)
    assert perm.tolist() == reference_permutation(SEED_A, b"ref", n)


def test_permutation_is_permutation_and_deterministic():
    perm = Prg(SEED_A, "perm").permutation(49152)
    assert is_permutation(perm)
    np.testing.assert_array_equal(perm, Prg(SEED_A, "perm").permutation(49152))
    assert not np.array_equal(perm, Prg(SEED_A, "perm2").permutation(49152))
    assert not np.array_equal(perm, np.arange(49152))


def test_large_permutations_survive_rejections():
    """At n = 49152 about a quarter of draws hit a rejection and therefore refill the word buffer."""
    n = 49152
    refilled = 0
    for index in range(20):
        prg = Prg(SEED_A, f"rej/{index}")
        assert is_permutation(prg.permutation(n))
        refilled += prg.position > 4 * (n - 1)
    assert refilled >= 1


def test_permutation_rejects_bad_sizes():
    with pytest.raises(ValueError):
        Prg(SEED_A, "x").permutation(-1)
    with pytest.raises(ValueError):
        Prg(SEED_A, "x").permutation(MAX_PERMUTATION_SIZE + 1)


def test_permutations_of_four_are_uniform_chi_square():
    """24000 draws over the 24 permutations of 4 elements, 1000 expected each.
    Bound: chi2 < 60 with 23 degrees of freedom (p ~ 4e-5 for a correct generator)."""
    draws = 24_000
    index_of = {p: i for i, p in enumerate(itertools.permutations(range(4)))}
    counts = np.zeros(24, dtype=np.int64)
    prg = Prg(SEED_A, "chi2")
    for _ in range(draws):
        counts[index_of[tuple(prg.permutation(4).tolist())]] += 1
    expected = draws / 24
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 60, (chi2, counts)


# ---------------------------------------------------------------------------------------------------
# segment permutations
# ---------------------------------------------------------------------------------------------------


def segment_bounds(lengths):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return [(int(offsets[k]), int(offsets[k + 1])) for k in range(len(lengths))]


def source_segments(perm, lengths):
    """For each output segment, the input segment it reads from (asserting the invariants)."""
    bounds = segment_bounds(lengths)
    owner = np.empty(int(sum(lengths)), dtype=np.int64)
    for k, (lo, hi) in enumerate(bounds):
        owner[lo:hi] = k
    sources = []
    for k, (lo, hi) in enumerate(bounds):
        if hi == lo:
            sources.append(None)
            continue
        from_segments = set(owner[perm[lo:hi]].tolist())
        assert len(from_segments) == 1, f"output segment {k} mixes input segments {from_segments}"
        (source,) = from_segments
        assert lengths[source] == lengths[k]
        src_lo, src_hi = bounds[source]
        assert sorted(perm[lo:hi].tolist()) == list(range(src_lo, src_hi))
        sources.append(source)
    return sources


def test_segment_permutation_invariants_and_movement():
    lengths = [5, 3, 5, 5, 0, 3, 7, 5, 1, 0]
    rows_moved = entries_shuffled = 0
    for index in range(50):
        perm = Prg(SEED_A, f"seg/{index}").segment_permutation(lengths)
        assert perm.dtype == np.int64 and perm.shape == (sum(lengths),)
        assert is_permutation(perm)
        sources = source_segments(perm, lengths)
        rows_moved += any(s is not None and s != k for k, s in enumerate(sources))
        entries_shuffled += any(np.any(np.diff(perm[lo:hi]) != 1) for lo, hi in segment_bounds(lengths) if hi - lo > 1)
    assert rows_moved >= 40
    assert entries_shuffled == 50


def test_segment_permutation_row_shuffle_is_uniform():
    """Three equal-length rows: all 6 arrangements of the rows, 1000 expected each in 6000 draws.
    Bound: chi2 < 35 with 5 degrees of freedom (p ~ 2e-6). The unique-length row never moves."""
    lengths = [2, 2, 4, 2]
    counts: dict[tuple, int] = {}
    prg = Prg(SEED_A, "seg-uniform")
    for _ in range(6000):
        sources = source_segments(prg.segment_permutation(lengths), lengths)
        assert sources[2] == 2
        key = (sources[0], sources[1], sources[3])
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) == set(itertools.permutations([0, 1, 3]))
    chi2 = sum((c - 1000) ** 2 / 1000 for c in counts.values())
    assert chi2 < 35, counts


def test_segment_permutation_edge_cases():
    prg = Prg(SEED_A, "seg-edge")
    assert prg.segment_permutation([]).shape == (0,)
    assert prg.segment_permutation([0, 0]).shape == (0,)
    assert prg.segment_permutation(np.array([1, 2, 3])).shape == (6,)
    assert is_permutation(prg.segment_permutation([4096]))
    assert source_segments(prg.segment_permutation([1] * 100), [1] * 100) is not None
    with pytest.raises(ValueError):
        prg.segment_permutation([3, -1])
    same = [Prg(SEED_A, "seg-det").segment_permutation([64] * 48) for _ in range(2)]
    np.testing.assert_array_equal(*same)


def test_segment_permutation_single_segment_is_uniform_shuffle():
    perm = Prg(SEED_A, "single").segment_permutation([1000])
    assert is_permutation(perm)
    assert not np.array_equal(perm, np.arange(1000))


@pytest.mark.parametrize("lengths", [[1], [7], [1536], [55] * 9, [3] * 4, [0, 0], [1] * 5])
def test_segment_permutation_of_equal_lengths_takes_the_general_constructions_draws(lengths):
    """Equal lengths (one norm row, an element-wise layout, the softmax rows of a decode step) take a
    shorter path: the same permutation from the same words, and the stream continues alike."""
    for d in range(10):
        short, general = Prg(SEED_A, f"eq/{d}"), Prg(SEED_A, f"eq/{d}")
        perm = short.segment_permutation(lengths)
        reference = general._ragged_segment_permutation(np.asarray(lengths, dtype=np.int64), sum(lengths))
        assert np.array_equal(perm, reference)
        assert short.position == general.position and short.bytes(8) == general.bytes(8)
