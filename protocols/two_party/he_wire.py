"""Framing and size bounds of the two-party HE messages (protocols.two_party.he_runs).

One channel message (raw bytes) carries a list of sub-messages, each a list of byte parts (what
permllm.bfv_linear and permllm.session_products exchange)::

    header   magic (4 bytes), version u8, flags u8, sub-message count u32
    counts   one u32 per sub-message: its number of parts
    lengths  one u32 per part
    parts    the parts' bytes, in order

The receiver names the magic, the sub-message count and the most parts it accepts, and reads the
message with ``recv_bytes(max_len=...)`` from a bound computed from public shapes, so a peer's
sizes are all checked before anything is decoded (ProtocolError otherwise).
"""

from __future__ import annotations

import struct

from permllm.bfv_linear import MAX_FEATURES, WEIGHT_BITS
from permllm.bfv_packing import choose_packing
from permllm.errors import ProtocolError
from permllm.seal_io import COEFF_BITS, POLY_DEGREE, REPLY_PRIMES, max_ciphertext_bytes

__all__ = [
    "CONTEXT_MAX_BYTES",
    "MAX_LIMBS",
    "COLUMNS_PER_PIECE",
    "pack_message",
    "unpack_message",
    "query_bound",
    "reply_bound",
    "message_overhead",
    "bundle_overhead",
]

_HEADER = struct.Struct("<4sBBI")
_VERSION = 1
#: the user's public context: its framing, the encryption parameters (< 4 KiB) and the public key
CONTEXT_MAX_BYTES = 64 + 4096 + max_ciphertext_bytes(len(COEFF_BITS))
#: signed WEIGHT_BITS-bit limbs of a 64-bit weight (4 x 20 bits cover Z_2^64)
MAX_LIMBS = -(-64 // WEIGHT_BITS)
#: output columns per reply piece, so that every limb's columns side by side fit bfv_linear's m limit
COLUMNS_PER_PIECE = MAX_FEATURES // MAX_LIMBS
_QUERY_CT = max_ciphertext_bytes(len(COEFF_BITS) - 1)
_REPLY_CT = max_ciphertext_bytes(REPLY_PRIMES)
_LINEAR_HEADER = 32  # bfv_linear's query and reply headers are 17 and 19 bytes
_BUNDLE_HEADER = 9  # bfv_correlations' bundle header, plus 4 bytes per sub-message


def message_overhead(part_counts: list[int]) -> int:
    """Framing bytes of a message whose sub-messages have these part counts."""
    return _HEADER.size + 4 * len(part_counts) + 4 * sum(part_counts)


def pack_message(magic: bytes, subs: list[list[bytes]], flags: int = 0) -> bytes:
    """One bytes message from sub-messages (lists of bytes parts)."""
    counts = [len(sub) for sub in subs]
    parts = [bytes(p) for sub in subs for p in sub]
    head = _HEADER.pack(magic, _VERSION, flags, len(subs))
    tables = struct.pack(f"<{len(counts)}I", *counts) + struct.pack(f"<{len(parts)}I", *(len(p) for p in parts))
    return b"".join([head, tables, *parts])


def unpack_message(data: bytes, magic: bytes, subs: int, max_parts: int, what: str) -> tuple[int, list[list[bytes]]]:
    """(flags, sub-messages) of a :func:`pack_message` message; ProtocolError unless it has ``subs``
    sub-messages of at least one part each, at most ``max_parts`` parts, and lengths that add up."""
    if len(data) < _HEADER.size:
        raise ProtocolError(f"{what}: {len(data)} bytes, shorter than its header")
    tag, version, flags, count = _HEADER.unpack_from(data)
    if tag != magic or version != _VERSION:
        raise ProtocolError(f"{what}: magic {tag!r} version {version}, expected {magic!r} v{_VERSION}")
    if count != subs or len(data) < _HEADER.size + 4 * count:
        raise ProtocolError(f"{what}: {count} sub-messages, expected {subs}")
    counts = struct.unpack_from(f"<{count}I", data, _HEADER.size)
    total = sum(counts)
    if min(counts, default=1) < 1 or total > max_parts:
        raise ProtocolError(f"{what}: part counts {total} (each >= 1) outside the {max_parts} parts accepted")
    start = _HEADER.size + 4 * count
    if len(data) < start + 4 * total:
        raise ProtocolError(f"{what}: {len(data)} bytes, too short for its {total} part lengths")
    lengths = struct.unpack_from(f"<{total}I", data, start)
    offset = start + 4 * total
    if offset + sum(lengths) != len(data):
        raise ProtocolError(
            f"{what}: part lengths add up to {offset + sum(lengths)} bytes, the message has {len(data)}"
        )
    parts = []
    for length in lengths:
        parts.append(data[offset : offset + length])
        offset += length
    out, k = [], 0
    for c in counts:
        out.append(parts[k : k + c])
        k += c
    return flags, out


def query_bound(rows: int, n: int, m: int) -> tuple[int, int]:
    """(parts, bytes) at most of one bfv_linear query for rows x n (out_features m, compact replies)."""
    row_blocks, input_blocks = choose_packing(2 * rows, n, m, compact=True).query_blocks(2 * rows, n)
    cts = row_blocks * input_blocks
    return 1 + cts, _LINEAR_HEADER + cts * _QUERY_CT


def reply_bound(rows: int, n: int, m_query: int, m_reply: int) -> tuple[int, int]:
    """(parts, bytes) at most of one compact bfv_linear reply with m_reply outputs to a query made
    for out_features m_query."""
    packing = choose_packing(2 * rows, n, m_query, compact=True)
    cts = packing.query_blocks(2 * rows, n)[0] * packing.output_blocks(m_reply)
    compact = 11 * (POLY_DEGREE + packing.rows_per_block * packing.outputs_per_block(m_reply))
    return 1 + cts, _LINEAR_HEADER + cts * min(compact, _REPLY_CT)


def bundle_overhead(subs: int) -> int:
    """Bytes of a bfv_correlations bundle header over ``subs`` sub-messages."""
    return _BUNDLE_HEADER + 4 * subs
