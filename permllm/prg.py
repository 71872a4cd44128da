"""Cryptographic pseudo-random generator: AES-128-CTR keystreams, ring elements and uniform permutations.

Every random quantity in the protocols (masks, correlated randomness, secret permutations) comes from a
`Prg`. A `Prg` is a deterministic function of a 16-byte secret seed and a public domain label, so two
parties holding the same seed derive identical streams, and distinct labels give independent streams:
``f"{index}/{name}"`` for the draw ``name`` of protocol call ``index`` (`protocols.material`),
``f"weight/{name}"`` for the owner's mask of linear weight ``name``.

Construction
------------
``key = seed`` and ``nonce = SHA-256(b"permllm/prg/v1\\x00" + domain)[:16]``; the keystream is
AES-128-CTR under (key, nonce) with the full 128-bit block counter starting at the nonce. Streams of
different domains under one seed are AES outputs on disjoint counter ranges unless two 128-bit hashed
nonces land within (stream length / 16) of each other, which has negligible probability.

A seed's AES key schedule is set up once per `PrgKey` and shared by every stream drawn with it (a
protocol call draws a handful of short streams; each used to set up its own AES context): short
reads encrypt their counter blocks with it directly (the CTR keystream computed block by block,
bit-identical to the CTR mode's), long ones run OpenSSL's CTR mode from the right counter block.

Values are read from the keystream in little-endian byte order. Every method consumes keystream
from the current position and advances it, so successive calls continue the same stream:
``prg.bytes(8) + prg.bytes(8) == Prg(seed, domain).bytes(16)``.

Permutations
------------
Fisher-Yates driven by 32-bit keystream words with Lemire's multiply-and-reject method, which maps an
accepted word to ``[0, bound)`` with exactly equal probability (no modulo bias). The shuffle runs in a
numba kernel over a pre-drawn word buffer; when rejections exhaust the buffer (rare), more words are
drawn and the kernel resumes. The exact number of words consumed is therefore data dependent but a
deterministic function of the stream, so both holders of a seed stay in step.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
from collections.abc import Sequence

import numba
import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["Prg", "PrgKey", "fresh_seed", "derive_nonce", "SEED_BYTES", "MAX_PERMUTATION_SIZE"]

SEED_BYTES = 16
"""Length of a Prg seed in bytes (AES-128 key)."""

MAX_PERMUTATION_SIZE = 1 << 31
"""Largest n accepted by `Prg.permutation` (keeps 32-bit-word Lemire products inside int64)."""

_NONCE_LABEL = b"permllm/prg/v1\x00"
_KEYSTREAM_CHUNK_BYTES = 1 << 18  # zero plaintext per OpenSSL call; stays in L2 cache
_ZERO_CHUNK = bytes(_KEYSTREAM_CHUNK_BYTES)  # immutable
_AES_BLOCK_BYTES = 16
_WORD_BITS = 32
_CTR_MIN_BYTES = 1 << 16  # reads at least this long run OpenSSL's CTR mode; shorter ones the shared key
_U64_MASK = (1 << 64) - 1
_REFILL_WORDS = 64  # words drawn each time rejections exhaust the buffer
_LE_UINT32 = np.dtype("<u4")
_LE_UINT64 = np.dtype("<u8")
_LE_INT64 = np.dtype("<i8")


def fresh_seed() -> bytes:
    """Return a new 16-byte seed from the operating system CSPRNG (`secrets.token_bytes`)."""
    return secrets.token_bytes(SEED_BYTES)


def _domain_bytes(domain: str | bytes) -> bytes:
    if isinstance(domain, str):
        return domain.encode("utf-8")
    if isinstance(domain, (bytes, bytearray, memoryview)):
        return bytes(domain)
    raise TypeError(f"Prg domain must be str or bytes, got {type(domain).__name__}")


def derive_nonce(domain: str | bytes) -> bytes:
    """Return the 16-byte AES-CTR initial counter block used for `domain` (public, seed independent)."""
    return hashlib.sha256(_NONCE_LABEL + _domain_bytes(domain)).digest()[:_AES_BLOCK_BYTES]


def _normalize_shape(shape: int | Sequence[int] | torch.Size) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    dims = tuple(int(d) for d in dims)
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must have non-negative dimensions, got {dims}")
    return dims


# --------------------------------------------------------------------------------------------------
# numba kernels (pure functions of their arguments; the Prg drives them)
# --------------------------------------------------------------------------------------------------


@numba.njit(cache=True)
def _lemire_bounded(words, word_pos, bound, word_bits):
    """Draw a uniform integer in [0, bound) from ``words[word_pos:]`` by Lemire's method.

    Each word is taken modulo 2**word_bits (word_bits <= 32, 1 <= bound <= 2**word_bits, and
    bound * 2**word_bits <= 2**63 so all products fit in int64). A word x gives m = x * bound; it is
    rejected when (m mod 2**w) < (2**w mod bound), which leaves exactly floor(2**w / bound) accepted
    words for every output value m >> w.

    Returns (value, next_word_pos); value is -1 when the buffer ran out before a word was accepted
    (all words up to len(words) are then consumed as rejections).
    """
    mask = (np.int64(1) << word_bits) - 1
    n_words = words.shape[0]
    threshold = -1  # computed lazily: the division is needed only when l < bound
    while word_pos < n_words:
        x = np.int64(words[word_pos]) & mask
        word_pos += 1
        m = x * bound
        low = m & mask
        if low < bound:
            if threshold < 0:
                threshold = ((mask + 1) - bound) % bound
            if low < threshold:
                continue
        return m >> word_bits, word_pos
    return np.int64(-1), word_pos


@numba.njit(cache=True)
def _shuffle_segments(values, starts, lengths, words, word_bits, seg_from, step_from):
    """Fisher-Yates shuffle, in place, of each segment ``values[starts[k] : starts[k] + lengths[k]]``.

    Segments are processed in order k = seg_from, seg_from + 1, ...; within a segment, steps
    i = len - 1 down to 1 swap position i with a uniform j in [0, i]. ``step_from`` resumes segment
    ``seg_from`` at step i = step_from (pass -1 to start it from the top).

    Returns (seg, step): (len(starts), -1) when every segment is done, otherwise the segment and step
    at which ``words`` ran out; call again with a fresh buffer and those two values to continue.
    """
    n_segments = starts.shape[0]
    word_pos = 0
    seg = seg_from
    step = step_from
    while seg < n_segments:
        base = starts[seg]
        if step < 0:
            step = lengths[seg] - 1
        while step >= 1:
            j, word_pos = _lemire_bounded(words, word_pos, step + 1, word_bits)
            if j < 0:
                return seg, step
            tmp = values[base + step]
            values[base + step] = values[base + j]
            values[base + j] = tmp
            step -= 1
        seg += 1
        step = -1
    return seg, step


# --------------------------------------------------------------------------------------------------
# Prg
# --------------------------------------------------------------------------------------------------


class PrgKey:
    """One seed's AES-128 key schedule, set up once and shared by the `Prg` streams of many domains.

    Holds the seed (as the key) for as long as it lives: keep it with the session that owns the seed.
    Thread-safe (one lock around each block encryption)."""

    __slots__ = ("_seed", "_ecb", "_lock")

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, (bytes, bytearray)):
            raise TypeError(f"Prg seed must be bytes, got {type(seed).__name__}")
        if len(seed) != SEED_BYTES:
            raise ValueError(f"Prg seed must be exactly {SEED_BYTES} bytes, got {len(seed)}")
        self._seed = bytes(seed)
        self._ecb = Cipher(algorithms.AES(self._seed), modes.ECB()).encryptor()
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the seed
        return "PrgKey(...)"

    def counter_blocks(self, first: int, count: int) -> np.ndarray:
        """AES_key(first + i mod 2^128) for i in [0, count): the CTR keystream of `count` blocks from
        counter block `first`, as a fresh uint8 array of 16 * count bytes."""
        if count == 0:
            return np.empty(0, dtype=np.uint8)
        first &= (1 << 128) - 1
        hi, lo = first >> 64, first & _U64_MASK
        low = np.arange(count, dtype=np.uint64)
        low += np.uint64(lo)  # wraps mod 2^64; a wrap carries into the high word
        counters = np.empty((count, 2), dtype=">u8")
        counters[:, 0] = hi
        counters[:, 1] = low
        if int(low[-1]) < lo:
            counters[low < np.uint64(lo), 0] = (hi + 1) & _U64_MASK
        out = np.empty(16 * count + _AES_BLOCK_BYTES - 1, dtype=np.uint8)
        with self._lock:
            written = self._ecb.update_into(memoryview(counters).cast("B"), out)
        if written != 16 * count:
            raise RuntimeError(f"AES produced {written} bytes for {count} blocks")
        return out[: 16 * count]

    def ctr(self, first: int):
        """A fresh OpenSSL AES-CTR encryptor whose keystream starts at counter block `first`."""
        nonce = (first & ((1 << 128) - 1)).to_bytes(_AES_BLOCK_BYTES, "big")
        return Cipher(algorithms.AES(self._seed), modes.CTR(nonce)).encryptor()


class Prg:
    """AES-128-CTR keystream generator for one (seed, domain) pair.

    Args:
        seed: exactly 16 secret bytes (use `fresh_seed()` in production, explicit bytes in tests), or
            a `PrgKey` of them (no AES key set-up of its own: the same stream, cheaper to start).
        domain: public label (str is UTF-8 encoded) separating independent streams under one seed.

    The object is stateful: `position` counts keystream bytes consumed so far and every draw
    continues from there. Not thread-safe; give each thread its own Prg (distinct domain).
    """

    __slots__ = ("_key", "_nonce", "_ctr", "_position", "domain")

    def __init__(self, seed: bytes | PrgKey, domain: str | bytes) -> None:
        key = seed if isinstance(seed, PrgKey) else PrgKey(seed)
        self.domain: bytes = _domain_bytes(domain)
        self._key = key
        self._nonce = int.from_bytes(derive_nonce(self.domain), "big")
        self._ctr = None  # an OpenSSL CTR encryptor positioned at _position, once a long read made one
        self._position = 0

    def __repr__(self) -> str:  # never shows the seed
        return f"Prg(domain={self.domain!r}, position={self._position})"

    @property
    def position(self) -> int:
        """Number of keystream bytes consumed so far."""
        return self._position

    # -- raw keystream --------------------------------------------------------------------------

    def _keystream_array(self, n_bytes: int) -> np.ndarray:
        """Next `n_bytes` of keystream as a fresh writable, 16-byte aligned uint8 numpy array."""
        if n_bytes < 0:
            raise ValueError(f"byte count must be non-negative, got {n_bytes}")
        if n_bytes >= _CTR_MIN_BYTES or self._ctr is not None:
            buffer = self._ctr_keystream(n_bytes)
        else:
            skip = self._position % _AES_BLOCK_BYTES
            first = self._position // _AES_BLOCK_BYTES
            count = -(-(skip + n_bytes) // _AES_BLOCK_BYTES)
            blocks = self._key.counter_blocks(self._nonce + first, count)
            buffer = blocks[:n_bytes] if skip == 0 else blocks[skip : skip + n_bytes].copy()
        self._position += n_bytes
        return buffer

    def _ctr_keystream(self, n_bytes: int) -> np.ndarray:
        """Long reads: OpenSSL's CTR mode, set up at the current position and kept for the reads after it."""
        if self._ctr is None:
            self._ctr = self._key.ctr(self._nonce + self._position // _AES_BLOCK_BYTES)
            skip = self._position % _AES_BLOCK_BYTES
            if skip:
                self._ctr.update(bytes(skip))
        # A little slack keeps older `cryptography` releases happy (they demand len + 15 for update_into).
        buffer = np.empty(n_bytes + _AES_BLOCK_BYTES - 1, dtype=np.uint8)
        view = memoryview(buffer)
        offset = 0
        while offset < n_bytes:
            chunk = min(_KEYSTREAM_CHUNK_BYTES, n_bytes - offset)
            plaintext = _ZERO_CHUNK if chunk == _KEYSTREAM_CHUNK_BYTES else _ZERO_CHUNK[:chunk]
            written = self._ctr.update_into(plaintext, view[offset : offset + chunk + _AES_BLOCK_BYTES - 1])
            if written != chunk:  # CTR is a stream mode: output length equals input length
                raise RuntimeError(f"AES-CTR produced {written} bytes for a {chunk}-byte request")
            offset += chunk
        return buffer[:n_bytes]

    def bytes(self, n: int) -> bytes:
        """Return the next `n` keystream bytes."""
        return self._keystream_array(int(n)).tobytes()

    def uint64(self, n: int) -> np.ndarray:
        """Return `n` uniform 64-bit words (little-endian keystream) as a writable np.uint64 array of shape (n,)."""
        n = int(n)
        return self._keystream_array(8 * n).view(_LE_UINT64)

    def _uint32(self, n: int) -> np.ndarray:
        return self._keystream_array(4 * int(n)).view(_LE_UINT32)

    def int64(self, shape: int | Sequence[int] | torch.Size) -> torch.Tensor:
        """Return a torch.int64 tensor of `shape` uniform over Z_2^64 (two's complement reinterpretation)."""
        dims = _normalize_shape(shape)
        count = math.prod(dims)
        return torch.from_numpy(self._keystream_array(8 * count).view(_LE_INT64).reshape(dims))

    def bits(self, shape: int | Sequence[int] | torch.Size) -> torch.Tensor:
        """Return a torch.int64 tensor of `shape` with independent uniform 0/1 entries.

        Consumes ceil(numel / 8) keystream bytes, least significant bit of each byte first.
        """
        dims = _normalize_shape(shape)
        count = math.prod(dims)
        packed = self._keystream_array((count + 7) // 8)
        unpacked = np.unpackbits(packed, count=count, bitorder="little")
        return torch.from_numpy(unpacked.astype(np.int64).reshape(dims))

    # -- permutations ---------------------------------------------------------------------------

    def _shuffle_in_place(self, values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> None:
        """Uniformly shuffle each segment of `values` (int64) independently, drawing words from the stream."""
        swaps_needed = int(np.maximum(lengths - 1, 0).sum())
        if swaps_needed == 0:
            return
        words = self._uint32(swaps_needed)
        seg, step = 0, -1
        n_segments = starts.shape[0]
        while True:
            seg, step = _shuffle_segments(values, starts, lengths, words, _WORD_BITS, seg, step)
            if seg >= n_segments:
                return
            words = self._uint32(_REFILL_WORDS)

    def permutation(self, n: int) -> np.ndarray:
        """Return a uniformly random permutation of range(n) as an np.int64 array of shape (n,).

        Consumes about 4 * (n - 1) keystream bytes (a little more after rare rejections).
        """
        n = int(n)
        if n < 0:
            raise ValueError(f"permutation size must be non-negative, got {n}")
        if n > MAX_PERMUTATION_SIZE:
            raise ValueError(f"permutation size {n} exceeds the supported maximum {MAX_PERMUTATION_SIZE}")
        perm = np.arange(n, dtype=np.int64)
        self._shuffle_in_place(perm, np.zeros(1, dtype=np.int64), np.array([n], dtype=np.int64))
        return perm

    def segment_permutation(self, lengths: Sequence[int] | np.ndarray) -> np.ndarray:
        """Return a permutation `perm` of range(sum(lengths)) that shuffles rows of ragged data.

        The data is a concatenation of segments (e.g. softmax rows) with the given lengths. For
        ``y = x[perm]``:
          * output segment k occupies the same positions and length as input segment k;
          * all entries of output segment k come from ONE input segment sigma(k) with
            lengths[sigma(k)] == lengths[k], where sigma is a uniform permutation of the segments
            within each group of equal length (independent across groups);
          * inside each output segment the entries are in a uniform random order, independent of
            sigma and of the other segments.
        Zero-length segments are allowed. Returns np.int64 of shape (sum(lengths),).
        """
        seg_lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if seg_lengths.size and seg_lengths.min() < 0:
            raise ValueError("segment lengths must be non-negative")
        total = int(seg_lengths.sum())
        if total > MAX_PERMUTATION_SIZE:
            raise ValueError(f"total length {total} exceeds the supported maximum {MAX_PERMUTATION_SIZE}")
        if seg_lengths.size and (seg_lengths == seg_lengths[0]).all():
            return self._uniform_segment_permutation(seg_lengths.shape[0], int(seg_lengths[0]))
        return self._ragged_segment_permutation(seg_lengths, total)

    def _ragged_segment_permutation(self, seg_lengths: np.ndarray, total: int) -> np.ndarray:
        """`segment_permutation` for any lengths (the general construction)."""
        n_segments = seg_lengths.shape[0]
        seg_offsets = np.zeros(n_segments, dtype=np.int64)
        np.cumsum(seg_lengths[:-1], out=seg_offsets[1:])

        # 1. sigma: shuffle segment ids within each group of equal length.
        by_length = np.argsort(seg_lengths, kind="stable")
        sorted_lengths = seg_lengths[by_length]
        group_starts = (
            np.flatnonzero(np.r_[True, sorted_lengths[1:] != sorted_lengths[:-1]]) if n_segments else by_length
        )
        group_sizes = np.diff(np.r_[group_starts, n_segments]).astype(np.int64)
        shuffled_ids = by_length.astype(np.int64)
        self._shuffle_in_place(shuffled_ids, group_starts.astype(np.int64), group_sizes)
        source_segment = np.empty(n_segments, dtype=np.int64)
        source_segment[by_length] = shuffled_ids

        # 2. output segment k reads input segment sigma(k) ...
        perm = np.arange(total, dtype=np.int64)
        perm += np.repeat(seg_offsets[source_segment] - seg_offsets, seg_lengths)
        # 3. ... in a uniformly shuffled order.
        self._shuffle_in_place(perm, seg_offsets, seg_lengths)
        return perm

    def _uniform_segment_permutation(self, n_segments: int, length: int) -> np.ndarray:
        """`segment_permutation` of n_segments segments of one length (a single group: sigma shuffles
        them all), with the same draws in the same order and fewer array operations."""
        total = n_segments * length
        perm = np.arange(total, dtype=np.int64)
        if n_segments > 1:
            sigma = np.arange(n_segments, dtype=np.int64)
            self._shuffle_in_place(sigma, np.zeros(1, dtype=np.int64), np.array([n_segments], dtype=np.int64))
            perm += np.repeat((sigma - np.arange(n_segments, dtype=np.int64)) * length, length)
        offsets = np.arange(n_segments, dtype=np.int64) * length
        self._shuffle_in_place(perm, offsets, np.full(n_segments, length, dtype=np.int64))
        return perm
