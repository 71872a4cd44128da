"""Coefficient packing and noise flooding for permllm.bfv_linear (Cheetah-style, Huang et al. 2022).

Packing. The limb matrix X (rows x n, entries < t) is cut into blocks of ``rows_per_block`` (Tw) rows
and ``inputs_per_block`` (nw) inputs; W (n x m) into blocks of nw inputs and ``outputs_per_block``
(mw) outputs, with ``stride = N // Tw`` and mw = min(m, stride // nw). In Z_t[x]/(x^N + 1)::

    query poly:   X[r, i]  at coefficient r * stride + i
    weight poly:  W[i, j]  at coefficient j * nw + (nw - 1 - i)
    product:      sum_i X[r, i] W[i, j]  at coefficient r * stride + j * nw + nw - 1

No other pair of terms lands on a result coefficient (cross terms of row r stay inside
[r * stride, r * stride + mw * nw + nw - 2], the negacyclic wrap of the last row lands below nw - 1),
so summing the products over the input blocks gives every (row, output) dot product mod t. The query
layout does not depend on m, so one query serves any weight matrix with n inputs.

Flooding. :func:`flood_polynomial` returns c0 = E (mod q) for a ciphertext (c0, 0), E uniform in
[-2^FLOOD_BITS, 2^FLOOD_BITS). The owner adds it together with the plaintext mask M (SEAL's
``add_plain`` scales M by q/t exactly), i.e. the hand-built (Delta * M + E, 0); E drowns the
weight-dependent decryption noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from permllm.prg import Prg
from permllm.seal_io import POLY_DEGREE, ciphertext_bytes

__all__ = [
    "Packing",
    "choose_packing",
    "flood_polynomial",
    "pack_residues",
    "unpack_residues",
    "compact_ciphertext",
    "expand_compact",
    "FLOOD_BITS",
]

FLOOD_BITS = 90
# Serialized sizes used only to rank packings (zstd packs the unused high bits of each 64-bit word).
_QUERY_CT_BYTES = 207_000  # seeded (c1 travels as a seed): c0's 4 residues, zstd, as measured
_REPLY_CT_BYTES = 2 * 80 * POLY_DEGREE // 8
_MULTIPLY_WEIGHT_BYTES = 4096  # tie-break: owner time per plaintext x ciphertext multiply
_REPLY_TIME_BYTES = 65536  # owner time per compact reply ciphertext (~15 ms: encryption of zero, flood, reads)


@dataclass(frozen=True)
class Packing:
    """Block shape: Tw limb-rows x nw inputs per query ciphertext (see the module docstring)."""

    rows_per_block: int
    inputs_per_block: int

    @property
    def stride(self) -> int:
        return POLY_DEGREE // self.rows_per_block

    def valid_for(self, rows: int, n: int) -> bool:
        return 1 <= self.rows_per_block <= rows and 1 <= self.inputs_per_block <= min(n, self.stride)

    def outputs_per_block(self, m: int) -> int:
        return min(m, self.stride // self.inputs_per_block)

    def query_blocks(self, rows: int, n: int) -> tuple[int, int]:
        return -(-rows // self.rows_per_block), -(-n // self.inputs_per_block)

    def output_blocks(self, m: int) -> int:
        return -(-m // self.outputs_per_block(m))

    def query_coefficients(self, limb_block: np.ndarray) -> np.ndarray:
        """N uint64 coefficients of one query ciphertext from a (<= Tw, <= nw) block of limbs."""
        out = np.zeros((self.rows_per_block, self.stride), dtype=np.uint64)
        out[: limb_block.shape[0], : limb_block.shape[1]] = limb_block
        return _pad(out.reshape(-1))

    def weight_coefficients(self, weight_block: np.ndarray, m: int) -> np.ndarray:
        """N uint64 coefficients of one weight plaintext from a (<= nw, <= mw) block of W mod t."""
        nw, mw = self.inputs_per_block, self.outputs_per_block(m)
        out = np.zeros((mw, nw), dtype=np.uint64)
        ni, mj = weight_block.shape
        out[:mj, nw - ni :] = weight_block.T[:, ::-1]
        return _pad(out.reshape(-1))

    def result_positions(self, rows_here: int, outputs_here: int, m: int) -> np.ndarray:
        """(rows_here, outputs_here) coefficient indices holding the dot products of one reply."""
        nw = self.inputs_per_block
        r = np.arange(rows_here, dtype=np.int64)[:, None] * self.stride
        j = np.arange(outputs_here, dtype=np.int64)[None, :] * nw
        return r + j + nw - 1


def _pad(coeffs: np.ndarray) -> np.ndarray:
    if coeffs.size == POLY_DEGREE:
        return coeffs
    out = np.zeros(POLY_DEGREE, dtype=np.uint64)
    out[: coeffs.size] = coeffs
    return out


def _block_sizes(total: int, limit: int) -> list[int]:
    """Smallest block size for each achievable block count: ceil(total / k), capped at limit."""
    return sorted({min(limit, -(-total // k)) for k in range(1, total + 1)})


@lru_cache(maxsize=256)
def choose_packing(rows: int, n: int, m: int, compact: bool = False) -> Packing:
    """The packing with the fewest estimated bytes on the wire (then fewest multiplies) for rows x n @ n x m.

    compact: replies carry c1 and only the result coefficients of c0 (bfv_linear's compact replies)."""
    best, best_cost = None, math.inf
    for tw in _block_sizes(rows, min(rows, POLY_DEGREE)):
        stride = POLY_DEGREE // tw
        for nw in _block_sizes(n, min(n, stride)):
            packing = Packing(tw, nw)
            row_blocks, input_blocks = packing.query_blocks(rows, n)
            output_blocks = packing.output_blocks(m)
            reply = _REPLY_CT_BYTES
            if compact:  # c1, the results of c0, and the owner's fixed time per reply (re-randomize, flood)
                reply = (POLY_DEGREE + tw * packing.outputs_per_block(m)) * 11 + _REPLY_TIME_BYTES
            cost = (
                row_blocks * input_blocks * _QUERY_CT_BYTES
                + row_blocks * output_blocks * reply
                + row_blocks * input_blocks * output_blocks * _MULTIPLY_WEIGHT_BYTES
            )
            if cost < best_cost:
                best, best_cost = packing, cost
    return best


def _mulmod(a: np.ndarray, b: np.ndarray | int, q: int) -> np.ndarray:
    """a * b mod q elementwise for uint64 a, b < q < 2^51 (float quotient estimate, exact uint64 fix-up)."""
    a = a.astype(np.uint64, copy=False)
    b_arr = np.asarray(b, dtype=np.uint64)
    k = np.floor(a.astype(np.float64) * b_arr.astype(np.float64) / float(q)).astype(np.uint64)
    with np.errstate(over="ignore"):
        r = (a * b_arr - k * np.uint64(q)).view(np.int64)
    qi = np.int64(q)
    r = np.where(r < 0, r + qi, r)
    r = np.where(r < 0, r + qi, r)
    r = np.where(r >= qi, r - qi, r)
    r = np.where(r >= qi, r - qi, r)
    return r.astype(np.uint64)


def flood_polynomial(primes: list[int], prg: Prg, flood_bits: int = FLOOD_BITS) -> np.ndarray:
    """RNS residues (len(primes), N) of E mod q, E uniform in [-2^flood_bits, 2^flood_bits)."""
    if not 2 <= flood_bits <= 100:
        raise ValueError(f"flood_bits must be in [2, 100], got {flood_bits}")
    lo_bits = flood_bits // 2
    e_hi = prg.uint64(POLY_DEGREE) >> np.uint64(64 - (flood_bits + 1 - lo_bits))  # E + 2^bits = hi * 2^lo + lo
    e_lo = prg.uint64(POLY_DEGREE) >> np.uint64(64 - lo_bits)
    out = np.empty((len(primes), POLY_DEGREE), dtype=np.uint64)
    for row, p in enumerate(primes):
        pu = np.uint64(p)
        term = _mulmod(e_hi % pu, (1 << lo_bits) % p, p)
        term = term % pu + e_lo % pu
        term = term % pu + np.uint64(p - (1 << flood_bits) % p)
        out[row] = term % pu
    return out


def _residue_bytes(primes: list[int]) -> list[int]:
    return [(int(p).bit_length() + 7) // 8 for p in primes]


def pack_residues(residues: np.ndarray, primes: list[int]) -> bytes:
    """RNS residues (len(primes), count), each < its prime, in ceil(bits / 8) little-endian bytes each."""
    parts = []
    for row, width in zip(residues, _residue_bytes(primes)):
        parts.append(np.ascontiguousarray(row, dtype="<u8").view(np.uint8).reshape(-1, 8)[:, :width].tobytes())
    return b"".join(parts)


def unpack_residues(data: bytes, primes: list[int], count: int) -> np.ndarray:
    """Inverse of :func:`pack_residues`; ValueError when the size is off or a residue is not below its prime."""
    widths = _residue_bytes(primes)
    if len(data) != count * sum(widths):
        raise ValueError(f"{len(data)} bytes of residues, expected {count * sum(widths)}")
    out = np.zeros((len(primes), count), dtype=np.uint64)
    start = 0
    for row, (p, width) in enumerate(zip(primes, widths)):
        raw = np.frombuffer(data, dtype=np.uint8, count=count * width, offset=start).reshape(count, width)
        wide = np.zeros((count, 8), dtype=np.uint8)
        wide[:, :width] = raw
        out[row] = wide.view("<u8").reshape(-1)
        if out[row].size and int(out[row].max()) >= p:
            raise ValueError("a residue is not below its prime")
        start += count * width
    return out


def compact_ciphertext(ct, positions: np.ndarray, primes: list[int]) -> bytes:
    """A 2-component coefficient-form ciphertext as c1 and c0 at ``positions`` only (packed residues).

    Decryption reads c0 coefficient by coefficient, so these decrypt the result positions exactly."""
    at, size = ct.dyn_array().at, len(primes) * POLY_DEGREE
    c1 = np.fromiter((at(i) for i in range(size, 2 * size)), dtype=np.uint64, count=size)
    wanted = (np.arange(len(primes))[:, None] * POLY_DEGREE + positions[None, :]).reshape(-1).tolist()
    c0 = np.fromiter((at(i) for i in wanted), dtype=np.uint64, count=len(wanted))
    return pack_residues(c1.reshape(len(primes), -1), primes) + pack_residues(c0.reshape(len(primes), -1), primes)


def expand_compact(data: bytes, positions: np.ndarray, primes: list[int], parms_id) -> bytes:
    """SEAL bytes of the ciphertext (c0 zero off ``positions``, c1) a :func:`compact_ciphertext` encodes.

    ValueError when the size is off or a residue is not below its prime."""
    split = _packed_bytes(primes, POLY_DEGREE)
    if len(data) != split + _packed_bytes(primes, positions.size):
        raise ValueError(f"{len(data)} bytes, expected {split + _packed_bytes(primes, positions.size)}")
    polys = np.zeros((2, len(primes), POLY_DEGREE), dtype=np.uint64)
    polys[1] = unpack_residues(data[:split], primes, POLY_DEGREE)
    polys[0][:, positions] = unpack_residues(data[split:], primes, positions.size)
    return ciphertext_bytes(parms_id, polys)


def _packed_bytes(primes: list[int], count: int) -> int:
    return count * sum(_residue_bytes(primes))
