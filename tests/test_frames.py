"""permllm.transport.frames: the frame header's layout, its validation, and fuzzed headers."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from permllm.errors import ProtocolError
from permllm.transport import check_payload, decode_header, encode_header
from permllm.transport.frames import FIXED_HEADER_LEN, MAGIC

FUZZ_EXAMPLES = int(os.environ.get("PERMLLM_FUZZ_EXAMPLES", "300"))
DTYPES = [np.int64, np.uint64, np.float64, np.float32, np.int32, np.uint8]


def test_header_round_trip():
    header_bytes = encode_header("mul.open/3", np.float32, (2, 0, 5), seq=2**64 - 1, depth=2**32 - 1, deliver_at_ns=123)
    header = decode_header(header_bytes)
    assert header.dtype == np.dtype(np.float32)
    assert header.shape == (2, 0, 5)
    assert (header.tag, header.seq, header.depth, header.deliver_at_ns) == ("mul.open/3", 2**64 - 1, 2**32 - 1, 123)
    assert header.header_nbytes == len(header_bytes) == FIXED_HEADER_LEN + 3 * 8 + 10
    assert header.payload_nbytes == 0


def test_header_layout_is_little_endian():
    header_bytes = encode_header("t", np.int64, (3,), seq=7, depth=2, deliver_at_ns=9)
    assert header_bytes[:4] == MAGIC
    assert struct.unpack_from("<BBBBQIQQ", header_bytes, 4) == (1, 1, 1, 1, 7, 2, 9, 3)
    assert header_bytes[-1:] == b"t"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h: h[:10], "truncated frame header"),
        (lambda h: h + b"x", "overlong frame header"),
        (lambda h: b"XXXX" + h[4:], "bad frame magic"),
        (lambda h: h[:4] + b"\x02" + h[5:], "frame version 2 not supported"),
        (lambda h: h[:5] + b"\x63" + h[6:], "unknown dtype code 99"),
        (lambda h: h[:6] + b"\x09" + h[7:], "ndim=9"),
        (lambda h: h[:7] + b"\x00" + h[8:], "tag length 0"),
        (lambda h: h[:-1] + b"\x80", "not printable ASCII"),
    ],
)
def test_decode_header_rejects(mutate, message):
    valid = encode_header("abc", np.int64, (4,), 0, 1)
    with pytest.raises(ProtocolError, match=message):
        decode_header(mutate(valid))


def test_decode_header_rejects_non_buffers():
    with pytest.raises(ProtocolError, match="bytes-like"):
        decode_header("PLM1 text")


def test_encode_header_rejects_out_of_range_fields():
    with pytest.raises(ProtocolError, match="dimensions"):
        encode_header("t", np.int64, (1,) * 9, 0, 1)
    with pytest.raises(ProtocolError, match="depth"):
        encode_header("t", np.int64, (1,), 0, 2**32)
    with pytest.raises(ProtocolError, match="shape"):
        encode_header("t", np.int64, (-1,), 0, 1)


def test_check_payload():
    header = decode_header(encode_header("t", np.int32, (3, 2), 0, 1))
    check_payload(header, 24, 24)
    with pytest.raises(ProtocolError, match="over the maximum of 23"):
        check_payload(header, 24, 23)
    with pytest.raises(ProtocolError, match="truncated payload"):
        check_payload(header, 20, 100)


def _valid_header(draw) -> bytes:
    ndim = draw(st.integers(0, 8))
    return encode_header(
        draw(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=64)),
        draw(st.sampled_from(DTYPES)),
        tuple(draw(st.lists(st.integers(0, 2**64 - 1), min_size=ndim, max_size=ndim))),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**64 - 1)),
    )


@st.composite
def mutated_headers(draw) -> bytes:
    data = bytearray(_valid_header(draw))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "truncate", "extend", "set"]))
        if action == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif action == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif action == "extend":
            data += draw(st.binary(min_size=1, max_size=16))
        elif data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), mutated_headers()))
def test_fuzz_decode_header_only_raises_protocol_error(data):
    try:
        header = decode_header(data)
    except ProtocolError:
        return
    # Whatever decodes re-encodes to the same bytes and declares a size computable without overflow.
    assert encode_header(header.tag, header.dtype, header.shape, header.seq, header.depth, header.deliver_at_ns) == data
    try:
        check_payload(header, 0, 1 << 20)
    except ProtocolError:
        pass


@settings(max_examples=max(50, FUZZ_EXAMPLES // 3), deadline=None)
@given(st.data())
def test_fuzz_valid_headers_round_trip(data):
    header_bytes = _valid_header(data.draw)
    header = decode_header(header_bytes)
    assert (
        encode_header(header.tag, header.dtype, header.shape, header.seq, header.depth, header.deliver_at_ns)
        == header_bytes
    )
