"""Wire format of one message: a fixed little-endian header followed by the raw payload bytes.

Header layout (all integers little-endian, no padding)::

    magic        4 bytes   b"PLM1"
    version      u8        FRAME_VERSION
    dtype code   u8        see DTYPE_CODES
    ndim         u8        0..MAX_NDIM
    tag length   u8        1..MAX_TAG_LEN
    seq          u64       per-direction sequence number, 0, 1, 2, ...
    depth        u32       flight depth of the sender + 1 (see FlightClock)
    deliver_at   u64       ns since the epoch before which the receiver must not see the frame (netsim), or 0
    shape        u64 x ndim
    tag          tag length bytes, printable ASCII

The payload is the C-ordered little-endian element data: exactly prod(shape) * itemsize bytes. Raw
`bytes` travel as a 1-D uint8 array. Nothing here unpickles or evaluates anything; a header is only
ever turned into integers, a dtype from a fixed table and an ASCII string.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from permllm.errors import ProtocolError

MAGIC = b"PLM1"
FRAME_VERSION = 1
MAX_NDIM = 8
MAX_TAG_LEN = 64
DEFAULT_MAX_PAYLOAD_BYTES = 4 * 1024**3
MAX_FLIGHT_DEPTH = 2**31
"""Largest flight depth a receiver accepts: far beyond any session, and far enough below the u32
field's limit that the depth + 1 this party stamps next always fits."""

_FIXED = struct.Struct("<4sBBBBQIQ")
FIXED_HEADER_LEN = _FIXED.size  # 28
MAX_HEADER_LEN = FIXED_HEADER_LEN + 8 * MAX_NDIM + MAX_TAG_LEN

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1

DTYPE_CODES: dict[np.dtype, int] = {
    np.dtype("<i8"): 1,
    np.dtype("<u8"): 2,
    np.dtype("<f8"): 3,
    np.dtype("<f4"): 4,
    np.dtype("<i4"): 5,
    np.dtype("u1"): 6,
}
DTYPES_BY_CODE: dict[int, np.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}
SUPPORTED_DTYPE_NAMES = tuple(str(dtype) for dtype in DTYPE_CODES)


@dataclass(frozen=True)
class Header:
    """A decoded frame header.

    dtype: numpy dtype of the payload elements (little-endian, one of DTYPE_CODES).
    shape: the array shape; () for a 0-d array.
    tag: the message tag (printable ASCII, 1..MAX_TAG_LEN characters).
    seq: sequence number of the frame in its direction.
    depth: the sender's flight depth + 1.
    deliver_at_ns: simulated delivery time in ns (0 = deliver at once).
    """

    dtype: np.dtype
    shape: tuple[int, ...]
    tag: str
    seq: int
    depth: int
    deliver_at_ns: int = 0

    @property
    def payload_nbytes(self) -> int:
        """Payload size the header declares, as an exact Python int (never overflows)."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def header_nbytes(self) -> int:
        """Length of this header once encoded."""
        return header_length(len(self.tag), len(self.shape))


def header_length(tag_len: int, ndim: int) -> int:
    """Encoded header length for a tag of `tag_len` ASCII characters and an `ndim`-dimensional shape."""
    return FIXED_HEADER_LEN + 8 * ndim + tag_len


def wire_dtype(dtype) -> np.dtype:
    """Normalise `dtype` (numpy dtype, type or name) to the little-endian wire dtype.

    Raises ProtocolError when the dtype is not one of the supported ones.
    """
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise ProtocolError(f"unsupported dtype {dtype!r}; supported: {', '.join(SUPPORTED_DTYPE_NAMES)}") from exc
    little = resolved.newbyteorder("<") if resolved.byteorder == ">" else resolved
    if little not in DTYPE_CODES:
        raise ProtocolError(f"unsupported dtype {resolved}; supported: {', '.join(SUPPORTED_DTYPE_NAMES)}")
    return little


def check_tag(tag: str) -> bytes:
    """Validate a message tag and return its ASCII bytes.

    Raises ProtocolError unless `tag` is a str of 1..MAX_TAG_LEN printable ASCII characters.
    """
    if not isinstance(tag, str):
        raise ProtocolError(f"tag must be a str, got {type(tag).__name__}")
    if not 1 <= len(tag) <= MAX_TAG_LEN:
        raise ProtocolError(f"tag must have 1..{MAX_TAG_LEN} characters, got {len(tag)}: {tag[:80]!r}")
    if not (tag.isascii() and tag.isprintable()):  # exactly " " .. "~" (ASCII's printable range)
        raise ProtocolError(f"tag must be printable ASCII, got {tag!r}")
    return tag.encode("ascii")


def encode_header(
    tag: str,
    dtype,
    shape: tuple[int, ...],
    seq: int,
    depth: int,
    deliver_at_ns: int = 0,
) -> bytes:
    """Encode a frame header.

    tag: 1..64 printable ASCII characters; dtype: a supported dtype (see DTYPE_CODES); shape: up to
    MAX_NDIM non-negative ints; seq: 0..2^64-1; depth: 0..2^32-1; deliver_at_ns: 0..2^64-1.
    Returns the header bytes. Raises ProtocolError on any value that does not fit the format.
    """
    tag_bytes = check_tag(tag)
    code = DTYPE_CODES[wire_dtype(dtype)]
    shape = tuple(shape)
    if len(shape) > MAX_NDIM:
        raise ProtocolError(f"tag {tag!r}: {len(shape)}-d payload, at most {MAX_NDIM} dimensions travel")
    for dim in shape:
        if not 0 <= int(dim) <= _U64_MAX:
            raise ProtocolError(f"tag {tag!r}: shape {shape} has a dimension outside 0..2^64-1")
    for name, value, limit in (
        ("seq", seq, _U64_MAX),
        ("depth", depth, _U32_MAX),
        ("deliver_at_ns", deliver_at_ns, _U64_MAX),
    ):
        if not 0 <= int(value) <= limit:
            raise ProtocolError(f"tag {tag!r}: {name}={value} outside 0..{limit}")
    fixed = _FIXED.pack(
        MAGIC, FRAME_VERSION, code, len(shape), len(tag_bytes), int(seq), int(depth), int(deliver_at_ns)
    )
    dims = struct.pack(f"<{len(shape)}Q", *(int(d) for d in shape))
    return fixed + dims + tag_bytes


def decode_header(buf) -> Header:
    """Parse and validate header bytes (the whole first part of a frame, nothing more).

    buf: bytes-like. Returns a Header. Raises ProtocolError when the buffer is shorter or longer than
    the header it describes, or on a bad magic, version, dtype code, ndim, tag length or non-ASCII tag.
    Never allocates memory in proportion to any declared size.
    """
    try:
        view = memoryview(buf).cast("B")
    except TypeError as exc:
        raise ProtocolError(f"frame header must be bytes-like, got {type(buf).__name__}") from exc
    if len(view) < FIXED_HEADER_LEN:
        raise ProtocolError(f"truncated frame header: {len(view)} bytes, the fixed part alone is {FIXED_HEADER_LEN}")
    magic, version, code, ndim, tag_len, seq, depth, deliver_at_ns = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r}, expected {MAGIC!r} (not a permllm peer?)")
    if version != FRAME_VERSION:
        raise ProtocolError(f"frame version {version} not supported, expected {FRAME_VERSION}")
    dtype = DTYPES_BY_CODE.get(code)
    if dtype is None:
        raise ProtocolError(f"unknown dtype code {code} in frame header; known: {sorted(DTYPES_BY_CODE)}")
    if ndim > MAX_NDIM:
        raise ProtocolError(f"frame header declares ndim={ndim}, at most {MAX_NDIM}")
    if not 1 <= tag_len <= MAX_TAG_LEN:
        raise ProtocolError(f"frame header declares tag length {tag_len}, must be 1..{MAX_TAG_LEN}")
    expected_len = header_length(tag_len, ndim)
    if len(view) != expected_len:
        kind = "truncated" if len(view) < expected_len else "overlong"
        raise ProtocolError(f"{kind} frame header: {len(view)} bytes, its fields declare {expected_len}")
    shape = struct.unpack_from(f"<{ndim}Q", view, FIXED_HEADER_LEN)
    raw_tag = bytes(view[FIXED_HEADER_LEN + 8 * ndim :])
    if not (raw_tag.isascii() and raw_tag.decode("ascii").isprintable()):  # exactly 0x20 .. 0x7E
        raise ProtocolError(f"frame tag is not printable ASCII: {raw_tag!r}")
    return Header(
        dtype=dtype, shape=tuple(shape), tag=raw_tag.decode("ascii"), seq=seq, depth=depth, deliver_at_ns=deliver_at_ns
    )


def check_shape(tag: str, shape: tuple[int, ...], dtype: np.dtype, max_payload_bytes: int) -> None:
    """Check that a shape fits `max_payload_bytes` dimension by dimension, zero dimensions included.

    The product of the dimensions, each counted as at least 1, times the itemsize must be at most
    `max_payload_bytes`: so a shape like (0, 2^63), whose payload is empty, is refused as well, and
    numpy never sees a dimension it cannot index. Exact integers, nothing allocated.
    Raises ProtocolError naming the tag and the shape.
    """
    if len(shape) > MAX_NDIM:
        raise ProtocolError(f"frame {tag!r} has {len(shape)} dimensions, at most {MAX_NDIM}")
    declared = math.prod(shape) * dtype.itemsize
    if declared > max_payload_bytes:
        raise ProtocolError(
            f"frame {tag!r} declares {declared} payload bytes (shape {shape}, {dtype}), "
            f"over the maximum of {max_payload_bytes}"
        )
    extent = math.prod(max(dim, 1) for dim in shape) * dtype.itemsize
    if extent > max_payload_bytes:
        raise ProtocolError(
            f"frame {tag!r} declares shape {shape} ({dtype}) with a dimension spanning {extent} bytes, "
            f"over the maximum of {max_payload_bytes}"
        )


def check_payload(header: Header, payload_len: int, max_payload_bytes: int) -> None:
    """Check a received header's shape, size and depth against its payload and the receiver's limits.

    Every dimension is checked against `max_payload_bytes` first (`check_shape`), using exact
    integers, so a header claiming e.g. 2^60 bytes, or a (0, 2^63) shape, is rejected before
    anything is allocated or reshaped for it. Raises ProtocolError on an oversized or unbounded
    shape, a flight depth over MAX_FLIGHT_DEPTH, or when `payload_len` differs from the declared
    prod(shape) * itemsize.
    """
    check_shape(header.tag, header.shape, header.dtype, max_payload_bytes)
    if header.depth > MAX_FLIGHT_DEPTH:
        raise ProtocolError(
            f"frame {header.tag!r} claims flight depth {header.depth}, over the maximum of {MAX_FLIGHT_DEPTH}"
        )
    declared = header.payload_nbytes
    if payload_len != declared:
        kind = "truncated" if payload_len < declared else "overlong"
        raise ProtocolError(
            f"{kind} payload for frame {header.tag!r}: {payload_len} bytes, "
            f"shape {header.shape} of {header.dtype} needs {declared}"
        )
