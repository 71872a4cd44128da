"""Permutation and product correlations between owner and user with BFV (no helper party).

Built on :mod:`permllm.bfv_linear` (shares of V @ W for the user's V and the owner's small-integer W,
one round trip). Two correlations the online protocols consume, made by the two parties alone:

Permutation correlation (protocols.permute's c1 = pi(a) - b and c2 = pi^-1(a2) - b2)::

    in:  user a (n, c) int64 uniform;  owner pi (segment permutation of range(n), gather: pi(t) = t[pi])
    out: owner b (n, c) uniform;        user pi(a) - b   (mod 2^64)

pi keeps every entry inside its *group* (the segments of one length, permllm.prg.segment_permutation),
so pi is block-diagonal over groups. For a group with entry indices g, the owner's weight is the 0/1
matrix P_g (|g| x |g|) with P_g[loc(pi[j]), loc(j)] = 1 and the user's rows are a[g]^T (c x |g|):
(a[g]^T P_g)[ch, loc(j)] = a[pi[j], ch]. One linear correlation per group; all groups (and several
correlations, e.g. pi and pi^-1 of one step) travel in one query and one reply. Zero weight blocks
are skipped by bfv_linear, so a group costs about |g|^2 / (nw * mw) products, not (|g| / nw)^2 * T.

Product correlation (the cross terms of a two-party Beaver triple, protocols.beaver)::

    in:  user X (G, r, k) int64;  owner Y (G, k, m) int64 (full 64-bit)
    out: owner R (G, r, m) uniform;  user X @ Y - R   (mod 2^64)

Y = sum_j 2^(16 j) Y_j with 16-bit limbs Y_j (they fit bfv_linear's signed 20-bit weights); the G
groups share one query as a block-diagonal product [X_1 | ... | X_G] @ diag(Y_1j, ..., Y_Gj); the
owner answers the one query with four limb replies. A Beaver triple C = A @ B with A = A_o + A_u,
B = B_o + B_u needs two of them: A_u @ B_o (user-left) and (A_o @ B_u)^T = B_u^T @ A_o^T.

Messages: a query or a reply is ``[header, parts...]``, the header a count of sub-messages and each
one's part count; every size is checked before anything is decoded (ProtocolError on peer bytes).
Security is bfv_linear's (RLWE for the owner; masked, re-randomized, flooded replies for the user).
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from permllm.bfv_linear import MAX_FEATURES, MAX_ROWS, LinearCorrelationClient, LinearCorrelationServer
from permllm.errors import ConfigError, ProtocolError
from permllm.kernels import is_permutation
from permllm.prg import Prg, fresh_seed

__all__ = [
    "LIMB_BITS",
    "PermutationClient",
    "PermutationServer",
    "ProductClient",
    "ProductServer",
    "permutation_groups",
]

LIMB_BITS = 16
LIMBS = 64 // LIMB_BITS
MAX_SUBMESSAGES = 4096
_BUNDLE = struct.Struct("<4sBI")  # magic, version, sub-message count; then count x uint32 part counts
_VERSION = 1


def _bundle(magic: bytes, messages: list[list[bytes]]) -> list[bytes]:
    counts = struct.pack(f"<{len(messages)}I", *(len(m) for m in messages))
    return [_BUNDLE.pack(magic, _VERSION, len(messages)) + counts] + [part for m in messages for part in m]


def _unbundle(msg, magic: bytes, expected: int, what: str) -> list[list[bytes]]:
    if not isinstance(msg, (list, tuple)) or not msg or not isinstance(msg[0], (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{what} must be a non-empty list of bytes")
    head = bytes(msg[0])
    if len(head) < _BUNDLE.size:
        raise ProtocolError(f"{what} header has {len(head)} bytes, shorter than {_BUNDLE.size}")
    tag, version, count = _BUNDLE.unpack(head[: _BUNDLE.size])
    if tag != magic or version != _VERSION:
        raise ProtocolError(f"{what} header has magic {tag!r} version {version}, expected {magic!r} v{_VERSION}")
    if count != expected or len(head) != _BUNDLE.size + 4 * count:
        raise ProtocolError(f"{what} carries {count} sub-messages ({len(head)} header bytes), expected {expected}")
    counts = struct.unpack(f"<{count}I", head[_BUNDLE.size :])
    if any(c < 1 for c in counts) or sum(counts) != len(msg) - 1:
        raise ProtocolError(f"{what} part counts {sum(counts)} do not match its {len(msg) - 1} parts")
    out, start = [], 1
    for c in counts:
        out.append(list(msg[start : start + c]))
        start += c
    return out


def permutation_groups(lengths) -> list[np.ndarray]:
    """Entry indices of each group of equal-length segments (ascending length, then segment order).

    A segment permutation (permllm.prg.segment_permutation) maps every group onto itself."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lengths.size == 0 or lengths.min() < 0:
        raise ConfigError("segment lengths must be a non-empty sequence of non-negative integers")
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    groups = []
    for length in np.unique(lengths):
        if length == 0:
            continue
        starts = offsets[lengths == length]
        groups.append((starts[:, None] + np.arange(length)[None, :]).reshape(-1))
    return groups


def _check_user_tensor(x, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or x.dim() != 2:
        raise ConfigError(f"{what} must be a 2-D torch.int64 tensor")
    if not (1 <= x.shape[1] <= MAX_ROWS):
        raise ConfigError(f"{what} has {x.shape[1]} channels, at most {MAX_ROWS} are supported")
    return x


def _check_groups(groups: list[np.ndarray], n: int) -> None:
    if sum(len(g) for g in groups) != n:
        raise ConfigError(f"segment lengths cover {sum(len(g) for g in groups)} entries, the tensor has {n}")
    if any(len(g) > MAX_FEATURES for g in groups):
        raise ConfigError(f"a group of equal-length segments exceeds {MAX_FEATURES} entries")
    if len(groups) > MAX_SUBMESSAGES:
        raise ConfigError(f"{len(groups)} groups of segment lengths exceed {MAX_SUBMESSAGES}")


class PermutationClient:
    """User side of the permutation correlation: queries for a and reads its share pi(a) - b."""

    def __init__(self, linear: LinearCorrelationClient) -> None:
        self._linear = linear

    def query(self, a: torch.Tensor, lengths) -> list[bytes]:
        """Query for a (n, c): one encrypted a[g]^T per group of equal-length segments."""
        a = _check_user_tensor(a, "a")
        groups = permutation_groups(lengths)
        _check_groups(groups, a.shape[0])
        return _bundle(b"PLPQ", [self._linear.encrypt_rows(a[g].T.contiguous()) for g in groups])

    def shares(self, reply, shape, lengths) -> torch.Tensor:
        """The user's share pi(a) - b (mod 2^64), torch.int64 of ``shape`` (n, c)."""
        n, c = shape
        groups = permutation_groups(lengths)
        _check_groups(groups, n)
        parts = _unbundle(reply, b"PLPR", len(groups), "permutation reply")
        out = torch.empty((n, c), dtype=torch.int64)
        for g, part in zip(groups, parts):
            out[g] = self._linear.decrypt_shares(part, c, len(g)).T
        return out


class PermutationServer:
    """Owner side of the permutation correlation: answers a query with its permutation's 0/1 matrices."""

    def __init__(self, linear: LinearCorrelationServer) -> None:
        self._linear = linear

    def answer(self, query, perm: np.ndarray, lengths, channels: int, *, seed: bytes | None = None):
        """(reply, b): b (n, channels) uniform from ``seed`` (or fresh), the user gets pi(a) - b."""
        perm = np.asarray(perm, dtype=np.int64)
        n = perm.shape[0]
        if not is_permutation(perm):
            raise ConfigError("perm must be a permutation of range(n)")
        groups = permutation_groups(lengths)
        _check_groups(groups, n)
        parts = _unbundle(query, b"PLPQ", len(groups), "permutation query")
        b = self._owner_mask(n, channels, seed)
        local = np.empty(n, dtype=np.int64)
        replies = []
        for g, part in zip(groups, parts):
            if not np.array_equal(np.sort(perm[g]), np.sort(g)):
                raise ConfigError("perm moves an entry out of its group of equal-length segments")
            local[g] = np.arange(len(g))
            sources = local[perm[g]]
            weight = torch.zeros((len(g), len(g)), dtype=torch.int64)
            weight[torch.from_numpy(sources), torch.arange(len(g))] = 1
            reply, _ = self._linear.multiply(part, weight, mask=b[g].T.contiguous())
            replies.append(reply)
        return _bundle(b"PLPR", replies), b

    def _owner_mask(self, n: int, channels: int, seed: bytes | None) -> torch.Tensor:
        prg = Prg(fresh_seed() if seed is None else seed, "bfv_correlations/permutation")
        return torch.from_numpy(prg.uint64(n * channels).view(np.int64).reshape(n, channels))


def _check_groups_tensor(x, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or x.dim() != 3:
        raise ConfigError(f"{what} must be a 3-D torch.int64 tensor (groups, rows, columns)")
    return x


def _block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """diag(Y_1, ..., Y_G) of shape (G k, G m) from (G, k, m)."""
    g, k, m = blocks.shape
    out = torch.zeros((g * k, g * m), dtype=blocks.dtype)
    for i in range(g):
        out[i * k : (i + 1) * k, i * m : (i + 1) * m] = blocks[i]
    return out


class ProductClient:
    """User side of the product correlation: queries for X (G, r, k), reads X @ Y - R."""

    def __init__(self, linear: LinearCorrelationClient) -> None:
        self._linear = linear

    def query(self, x: torch.Tensor, out_features: int) -> list[bytes]:
        """Query for X: the rows [X_1 | ... | X_G] (r, G k), encrypted once for every limb of Y."""
        x = _check_groups_tensor(x, "X")
        g, r, k = x.shape
        rows = x.permute(1, 0, 2).reshape(r, g * k).contiguous()
        return _bundle(b"PLXQ", [self._linear.encrypt_rows(rows, out_features=g * out_features)])

    def shares(self, reply, groups: int, rows: int, out_features: int) -> torch.Tensor:
        """The user's share X @ Y - R (mod 2^64), torch.int64 (G, r, m)."""
        parts = _unbundle(reply, b"PLXR", LIMBS, "product reply")
        total = torch.zeros((rows, groups * out_features), dtype=torch.int64)
        for j, part in enumerate(parts):
            total += self._linear.decrypt_shares(part, rows, groups * out_features) * (1 << (LIMB_BITS * j))
        return total.reshape(rows, groups, out_features).permute(1, 0, 2).contiguous()


class ProductServer:
    """Owner side of the product correlation: Y in 16-bit limbs, one masked reply per limb."""

    def __init__(self, linear: LinearCorrelationServer) -> None:
        self._linear = linear

    def answer(self, query, y: torch.Tensor, rows: int, *, seed: bytes | None = None):
        """(reply, R): R (G, rows, m) uniform from ``seed`` (or fresh), the user gets X @ Y - R."""
        y = _check_groups_tensor(y, "Y")
        g, k, m = y.shape
        (part,) = _unbundle(query, b"PLXQ", 1, "product query")
        unsigned = y.contiguous().numpy().view(np.uint64)
        prg = Prg(fresh_seed() if seed is None else seed, "bfv_correlations/product")
        replies, owner = [], torch.zeros((rows, g * m), dtype=torch.int64)
        for j in range(LIMBS):
            limb = (unsigned >> np.uint64(LIMB_BITS * j)) & np.uint64((1 << LIMB_BITS) - 1)
            weight = _block_diagonal(torch.from_numpy(limb.astype(np.int64)))
            mask = torch.from_numpy(prg.uint64(rows * g * m).view(np.int64).reshape(rows, g * m))
            reply, _ = self._linear.multiply(part, weight, mask=mask)
            replies.append(reply)
            owner += mask * (1 << (LIMB_BITS * j))
        return _bundle(b"PLXR", replies), owner.reshape(rows, g, m).permute(1, 0, 2).contiguous()
