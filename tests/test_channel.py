"""The Channel behaviour every transport shares (permllm.transport.channel), run over MemoryChannel and over
ZmqChannel (loopback TCP, random ports): round trips, byte counts, flights, validation of what arrives."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import torch

from permllm.errors import ChannelTimeout, PeerGone, ProtocolError
from permllm.transport import FlightClock, MemoryChannel, encode_header
from permllm.transport.frames import FIXED_HEADER_LEN, MAX_TAG_LEN, header_length

SHORT = 0.2  # seconds: every wait in these tests is bounded by a short timeout
DTYPES = [np.int64, np.uint64, np.float64, np.float32, np.int32, np.uint8]
SHAPES = [(), (0,), (7,), (3, 4), (2, 0, 3), (1, 2, 1, 2, 1, 2, 1, 2)]


def random_array(rng: np.random.Generator, dtype, shape) -> np.ndarray:
    """Seeded values covering the dtype's range."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype) * 1e6
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def frame_size(tag: str, array: np.ndarray) -> int:
    return header_length(len(tag), array.ndim) + array.nbytes


# --- round trips and byte counts -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_every_dtype_and_shape(make_pair, dtype):
    rng = np.random.default_rng(1234)
    a, b = make_pair()
    expected_bytes = 0
    for index, shape in enumerate(SHAPES):
        tag = f"x{index}"
        sent = random_array(rng, dtype, shape)
        a.send(tag, sent)
        got = b.recv(tag, dtype=dtype, shape=shape)
        assert got.dtype == np.dtype(dtype)
        assert got.shape == shape
        np.testing.assert_array_equal(got, sent)
        expected_bytes += frame_size(tag, sent)
    assert a.stats.bytes_sent == expected_bytes == b.stats.bytes_received
    assert a.stats.messages_sent == len(SHAPES) == b.stats.messages_received
    assert a.stats.bytes_received == 0 and b.stats.messages_sent == 0


def test_byte_count_is_header_plus_payload(pair):
    a, b = pair
    payload = np.arange(1000, dtype=np.int64)
    a.send("tag-of-11ch", payload)
    b.recv("tag-of-11ch")
    assert a.stats.bytes_sent == FIXED_HEADER_LEN + 8 * 1 + 11 + 8000
    assert b.stats.bytes_received == a.stats.bytes_sent


def test_torch_tensors_travel_as_their_numpy_dtype(pair):
    a, b = pair
    gen = torch.Generator().manual_seed(7)
    cases = {
        "i64": torch.randint(-(2**62), 2**62, (4, 5), generator=gen, dtype=torch.int64),
        "f32": torch.randn(3, 3, generator=gen),
        "u8": torch.randint(0, 256, (9,), generator=gen, dtype=torch.uint8),
        "i32-noncontig": torch.randint(-100, 100, (4, 6), generator=gen, dtype=torch.int32).t(),
        "f64-0d": torch.tensor(2.5, dtype=torch.float64),
    }
    for tag, tensor in cases.items():
        a.send(tag, tensor)
        got = b.recv(tag, dtype=tensor.dtype, shape=tuple(tensor.shape))
        assert torch.equal(torch.from_numpy(got), tensor)


def test_received_array_is_writable_and_independent(pair):
    a, b = pair
    sent = np.arange(100_000, dtype=np.int64)  # above the zero-copy threshold on ZeroMQ
    a.send("v", sent)
    sent[:] = -1  # the sender may reuse its buffer as soon as send returns
    got = b.recv("v")
    assert got.flags.writeable
    np.testing.assert_array_equal(got, np.arange(100_000, dtype=np.int64))
    got[0] = 42
    assert got[0] == 42


def test_bytes_round_trip(pair):
    a, b = pair
    a.send("blob", b"\x00\xffhello")
    a.send("empty", b"")
    a.send("ba", bytearray(b"xyz"))
    assert b.recv_bytes("blob") == b"\x00\xffhello"
    assert b.recv_bytes("empty") == b""
    assert b.recv_bytes("ba", max_len=3) == b"xyz"


def test_recv_bytes_rejects_arrays_and_overlong(pair):
    a, b = pair
    a.send("arr", np.arange(3, dtype=np.int64))
    with pytest.raises(ProtocolError, match="expected raw bytes"):
        b.recv_bytes("arr")
    a.send("long", b"0123456789")
    with pytest.raises(ProtocolError, match="at most 4 bytes, received 10"):
        b.recv_bytes("long", max_len=4)


def test_bad_payloads_and_tags_rejected_on_send(pair):
    a, _ = pair
    with pytest.raises(ProtocolError, match="unsupported dtype bool"):
        a.send("t", np.zeros(3, dtype=bool))
    with pytest.raises(ProtocolError, match="unsupported torch dtype"):
        a.send("t", torch.zeros(3, dtype=torch.float16))
    with pytest.raises(TypeError, match="list"):
        a.send("t", [1, 2, 3])
    for tag in ["", "x" * (MAX_TAG_LEN + 1), "caf\u00e9", "new\nline"]:
        with pytest.raises(ProtocolError, match="tag"):
            a.send(tag, b"x")
    a.send("x" * MAX_TAG_LEN, b"x")  # the longest legal tag goes through
    assert a.stats.messages_sent == 1


def test_big_endian_arrays_are_sent_little_endian(pair):
    a, b = pair
    sent = np.arange(5, dtype=">i8")
    a.send("be", sent)
    got = b.recv("be", dtype=np.int64)
    assert got.dtype == np.dtype("<i8")
    np.testing.assert_array_equal(got, sent)


def test_send_over_own_maximum_is_rejected(make_pair):
    a, b = make_pair(max_payload_bytes=64)
    with pytest.raises(ProtocolError, match="over the maximum of 64"):
        a.send("big", np.zeros(9, dtype=np.int64))
    a.send("ok", np.zeros(8, dtype=np.int64))
    assert b.recv("ok").shape == (8,)


# --- flights ---------------------------------------------------------------------------------


def test_ping_pong_is_two_flights(make_pair):
    a, b = make_pair()
    a.send("ping", b"1")
    b.recv_bytes("ping")
    b.send("pong", b"2")
    a.recv_bytes("pong")
    assert (a.clock.depth, b.clock.depth) == (2, 1)


def test_simultaneous_sends_are_one_flight(make_pair):
    a, b = make_pair()
    a.send("from-a", b"1")
    b.send("from-b", b"2")
    a.recv_bytes("from-b")
    b.recv_bytes("from-a")
    assert (a.clock.depth, b.clock.depth) == (1, 1)


def test_flight_clock_is_shared_by_a_partys_channels():
    helper_clock = FlightClock()
    owner_helper, helper_owner = MemoryChannel.pair("owner", "helper", clock_b=helper_clock)
    helper_user, user_helper = MemoryChannel.pair("helper", "user", clock_a=helper_clock)
    owner_helper.send("m", b"x")
    helper_owner.recv_bytes("m")
    helper_user.send("m", b"x")  # relayed: carries depth 2
    user_helper.recv_bytes("m")
    assert user_helper.clock.depth == 2
    assert helper_owner.clock is helper_user.clock


# --- validation of what arrives --------------------------------------------------------------


def test_wrong_tag(pair):
    a, b = pair
    a.send("alpha", np.zeros(2, dtype=np.int64))
    with pytest.raises(ProtocolError, match=r"peer 'owner': expected tag 'beta', received tag 'alpha'"):
        b.recv("beta")


def test_wrong_dtype(pair):
    a, b = pair
    a.send("t", np.zeros(2, dtype=np.float64))
    with pytest.raises(ProtocolError, match=r"peer 'owner', tag 't': expected dtype int64, received float64"):
        b.recv("t", dtype=np.int64)


def test_wrong_shape(pair):
    a, b = pair
    a.send("t", np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ProtocolError, match=r"expected shape \(3, 2\), received \(2, 3\)"):
        b.recv("t", shape=(3, 2))


def test_bad_magic(pair):
    a, b = pair
    header = bytearray(encode_header("t", np.int64, (1,), 0, 1))
    header[:4] = b"EVIL"
    a._send_frame(bytes(header), memoryview(bytes(8)))
    with pytest.raises(ProtocolError, match="bad frame magic"):
        b.recv("t")


def test_truncated_header(pair):
    a, b = pair
    header = encode_header("tag", np.int64, (1,), 0, 1)
    a._send_frame(header[:-1], memoryview(bytes(8)))
    with pytest.raises(ProtocolError, match="truncated frame header"):
        b.recv("tag")


@pytest.mark.parametrize("payload_len, word", [(15, "truncated"), (17, "overlong")])
def test_payload_length_must_match_shape(pair, payload_len, word):
    a, b = pair
    a._send_frame(encode_header("t", np.int64, (2,), 0, 1), memoryview(bytes(payload_len)))
    with pytest.raises(ProtocolError, match=f"{word} payload for frame 't': {payload_len} bytes"):
        b.recv("t")


def test_declared_size_over_maximum_rejected_before_allocation(pair):
    a, b = pair
    huge_shape = (2**57,)  # 2^60 bytes of int64
    a._send_frame(encode_header("t", np.int64, huge_shape, 0, 1), memoryview(bytes(8)))
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=f"declares {2**60} payload bytes .* over the maximum"):
            b.recv("t")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_size_limit_checked_before_length_mismatch(make_pair):
    a, b = make_pair(max_payload_bytes=1024)
    a._send_frame(encode_header("t", np.uint8, (2048,), 0, 1), memoryview(bytes(16)))
    with pytest.raises(ProtocolError, match="over the maximum of 1024"):
        b.recv("t")


def test_replayed_frame(pair):
    a, b = pair
    frame = (encode_header("t", np.uint8, (1,), 0, 1), memoryview(b"x"))
    a._send_frame(*frame)
    assert b.recv_bytes("t") == b"x"
    a._send_frame(*frame)
    with pytest.raises(ProtocolError, match="replayed frame from peer 'owner': expected seq 1, received seq 0"):
        b.recv_bytes("t")


def test_out_of_order_frame(pair):
    a, b = pair
    a._send_frame(encode_header("t", np.uint8, (1,), 5, 1), memoryview(b"x"))
    with pytest.raises(ProtocolError, match="out-of-order frame from peer 'owner': expected seq 0, received seq 5"):
        b.recv_bytes("t")


def test_timeout_names_peer_and_tag(pair):
    a, b = pair
    start = time.monotonic()
    with pytest.raises(ChannelTimeout, match=r"waiting for tag 'reply' from peer 'user'"):
        a.recv("reply", timeout=SHORT)
    assert SHORT * 0.9 <= time.monotonic() - start < SHORT + 2.0


def test_default_timeout_is_configurable(make_pair):
    a, _ = make_pair(timeout=SHORT)
    assert a.timeout == SHORT
    start = time.monotonic()
    with pytest.raises(ChannelTimeout, match="0.2 s"):
        a.recv("x")
    assert time.monotonic() - start < SHORT + 2.0


def test_invalid_timeout_rejected(pair):
    a, _ = pair
    with pytest.raises(ValueError, match="positive"):
        a.recv("x", timeout=0)


def test_peer_close_raises_peer_gone(pair):
    a, b = pair
    a.send("hello", b"1")  # establishes the connection before the close
    assert b.recv_bytes("hello") == b"1"
    b.send("ack", b"2")
    assert a.recv_bytes("ack") == b"2"
    a.close()
    start = time.monotonic()
    with pytest.raises(PeerGone, match=r"waiting for tag 'next' from peer 'owner'"):
        b.recv("next", timeout=3.0)
    assert time.monotonic() - start < 1.0


def test_use_after_local_close(pair):
    a, _ = pair
    a.close()
    a.close()  # idempotent
    assert a.closed
    with pytest.raises(PeerGone, match="this end of the channel to peer 'user' is closed"):
        a.send("x", b"1")
    with pytest.raises(PeerGone, match="is closed"):
        a.recv("x", timeout=SHORT)
