"""Bounded peer input: whatever a peer sends (frames, control JSON, material records, BFV blobs), the
receiver raises only PermLLM errors and holds a bounded amount of memory. Direct regression tests
for each bound first, then fuzz corpora (hypothesis, derandomized so CI replays the same examples)."""

from __future__ import annotations

import json
import math
import resource
import struct
import tracemalloc

import numpy as np
import pytest
import tenseal as ts
import torch
import zmq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from netsim import FakeClock, NetSim, Profile
from netsim.link import MAX_SIMULATED_DELAY_S
from parties.wire import (
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    MAX_RECORD_TENSORS,
    parse_json,
    recv_json,
    recv_records,
    send_record,
    send_stream_seed,
)
from permllm.errors import ChannelTimeout, ConfigError, PermLLMError, ProtocolError
from permllm.he import COEFF_MODULUS_CHAIN_BITS, IndexLookupClient, IndexLookupServer, batching_prime
from permllm.transport import FlightClock, MemoryChannel, ZmqChannel, encode_header
from permllm.transport.channel import Channel, ChannelStats, Received
from permllm.transport.frames import FIXED_HEADER_LEN, MAGIC, MAX_FLIGHT_DEPTH, MAX_NDIM, check_shape
from permllm.transport.zmq_channel import RECEIVE_HWM, SEND_HWM
from protocols.material import MaterialRecord, QueuedMaterial

CAP = 1 << 16  # payload cap of the fuzzed channels: 64 KiB
MEMORY_BOUND = 4 * CAP + (1 << 20)  # what one fuzzed receive may allocate at its peak (Python heap)
FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)
DTYPE_CODES = list(range(0, 9))  # 1..6 are known, 0, 7 and 8 are not
EXTREME_DIMS = st.sampled_from([0, 1, 2, 7, CAP // 8, CAP, CAP + 1, 2**31, 2**32, 2**62, 2**63, 2**64 - 1])
SHORT_S = 0.02


def raw_header(code: int, shape, tag: bytes = b"t", seq: int = 0, depth: int = 1, deliver_at_ns: int = 0) -> bytes:
    """A header built field by field, so fuzzing can declare what encode_header would refuse."""
    fixed = struct.pack("<4sBBBBQIQ", MAGIC, 1, code, len(shape), len(tag), seq, depth, deliver_at_ns)
    return fixed + struct.pack(f"<{len(shape)}Q", *shape) + tag


def peak_bytes(fn) -> tuple[object, int]:
    """Run fn under tracemalloc; returns (its result or the PermLLMError it raised, peak bytes)."""
    tracemalloc.start()
    try:
        try:
            result = fn()
        except PermLLMError as exc:
            result = exc
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


@pytest.fixture
def pair():
    a, b = MemoryChannel.pair(timeout=SHORT_S, max_payload_bytes=CAP)
    yield a, b
    a.close()
    b.close()


# ------------------------------------------------------------------------------ frames: regressions
def test_zero_dimension_beside_a_huge_one_is_refused_before_reshape(pair):
    a, b = pair
    a._send_frame(encode_header("t", np.int64, (0, 2**63), 0, 1), memoryview(b""))
    with pytest.raises(ProtocolError, match=r"shape \(0, 9223372036854775808\).*over the maximum"):
        b.recv("t")
    a._send_frame(encode_header("u", np.uint8, (2**63, 0), 0, 1), memoryview(b""))
    with pytest.raises(ProtocolError, match="over the maximum"):
        recv_json(b, "u", timeout=SHORT_S)


def test_every_dimension_is_checked_against_the_cap():
    dtype = np.dtype("<i8")
    check_shape("t", (0, CAP // 8), dtype, CAP)  # a zero dimension beside one that fits the cap
    check_shape("t", (), dtype, CAP)
    for shape in [(0, CAP // 8 + 1), (0, 0, 2**40), (2, CAP // 16 + 1), (1,) * (MAX_NDIM + 1)]:
        with pytest.raises(ProtocolError):
            check_shape("t", shape, dtype, CAP)


def test_sender_refuses_what_its_peer_would_refuse(pair):
    a, _ = pair
    with pytest.raises(ProtocolError, match="over the maximum"):
        a.send("t", np.empty((0, CAP), dtype=np.int64))
    assert a.stats.messages_sent == 0


def test_empty_arrays_within_the_cap_still_travel(pair):
    a, b = pair
    a.send("t", np.empty((0, 5), dtype=np.int32))
    assert b.recv("t", dtype=np.int32).shape == (0, 5)


# --------------------------------------------------------------------------- flight depth: regressions
def test_peer_flight_depth_beyond_the_possible_does_not_poison_the_clock(pair):
    a, b = pair
    b.clock.observe(5)
    a._send_frame(encode_header("t", np.int64, (1,), 0, 2**32 - 1), memoryview(bytes(8)))
    with pytest.raises(ProtocolError, match="flight depth 4294967295"):
        b.recv("t")
    assert b.clock.depth == 5
    b.send("back", np.arange(2, dtype=np.int64))  # later sends still encode
    np.testing.assert_array_equal(a.recv("back"), [0, 1])
    assert a.clock.depth == 6
    a._send_frame(encode_header("t", np.int64, (1,), 0, MAX_FLIGHT_DEPTH), memoryview(bytes(8)))
    assert b.recv("t").tolist() == [0]  # the largest accepted depth still leaves room for depth + 1
    b.send("next", b"x")
    assert b.clock.outgoing_depth() == MAX_FLIGHT_DEPTH + 1 < 2**32


def test_flight_clock_refuses_an_impossible_depth_and_keeps_its_own():
    clock = FlightClock()
    clock.observe(3)
    for depth in (MAX_FLIGHT_DEPTH + 1, 2**32 - 1, -1):
        with pytest.raises(ProtocolError, match="flight depth"):
            clock.observe(depth)
    assert clock.depth == 3 and clock.outgoing_depth() == 4


# ------------------------------------------------------------------------------- JSON: regressions
@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"[" * 200_000 + b"]" * 200_000, f"at most {MAX_JSON_BYTES}"),
        (b'{"a":' + b"[" * (MAX_JSON_DEPTH + 5) + b"]" * (MAX_JSON_DEPTH + 5) + b"}", "nested"),
        (b'{"a": ' + b"9" * 5000 + b"}", "digits"),
        (b'{"a": -' + b"1" * 41 + b"}", "digits"),
        (b'{"a": NaN}', "NaN"),
        (b'{"a": Infinity}', "Infinity"),
        (b'{"a": "\xff"}', "malformed"),
        (b'{"a": 1', "malformed"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"error": "' + b"x" * 5000 + b'"}', "ended the session"),
    ],
)
def test_control_message_failures_are_protocol_errors(raw, match):
    a, b = MemoryChannel.pair(timeout=SHORT_S)
    a.send("hello", raw)
    with pytest.raises(ProtocolError, match=match):
        recv_json(b, "hello", timeout=SHORT_S)


def test_control_message_within_the_bounds_is_read(pair):
    a, b = pair
    nested = {"arch": {"layers": [[1, 2], [3, {"d": -(10**39)}]]}, "s": "[[[{{{", "f": 1.5}
    a.send("hello", json.dumps(nested).encode())
    assert recv_json(b, "hello", timeout=SHORT_S) == nested


def test_deep_json_inside_strings_does_not_count_as_nesting():
    text = '{"a": "' + "[" * 1000 + '\\"' + "{" * 1000 + '"}'
    assert parse_json(text.encode(), "user", "t") == json.loads(text)


# ------------------------------------------------------------------------------------ zmq: regressions
@pytest.fixture
def zmq_pair():
    made = []

    def factory(server_cap=None):
        options = {} if server_cap is None else {"max_payload_bytes": server_cap}
        server = ZmqChannel.bind("tcp://127.0.0.1:0", peer="user", timeout=2.0, **options)
        client = ZmqChannel.connect(server.endpoint, peer="owner", timeout=2.0)
        made.extend([server, client])
        return server, client

    yield factory
    for channel in made:
        channel.close()


def test_zmq_socket_bounds_what_libzmq_takes_in(zmq_pair):
    server, _ = zmq_pair(server_cap=4096)
    assert server._socket.getsockopt(zmq.MAXMSGSIZE) == 4096
    assert server._socket.getsockopt(zmq.RCVHWM) == RECEIVE_HWM <= 8
    assert server._socket.getsockopt(zmq.SNDHWM) == SEND_HWM


def test_zmq_control_channel_drops_an_oversized_frame_unallocated(zmq_pair):
    server, client = zmq_pair(server_cap=4096)
    client.send("big", bytes(1 << 20))
    with pytest.raises(ChannelTimeout):  # libzmq dropped the connection instead of taking the frame in
        server.recv_bytes("big", timeout=0.3)


def test_a_control_receive_cap_bounds_what_comes_in_but_not_what_goes_out():
    from parties.wire import CONTROL_RECEIVE_BYTES

    helper = ZmqChannel.bind("tcp://127.0.0.1:0", peer="owner", timeout=2.0, max_receive_bytes=CONTROL_RECEIVE_BYTES)
    owner = ZmqChannel.connect(helper.endpoint, peer="helper", timeout=2.0)
    try:
        assert helper._socket.getsockopt(zmq.MAXMSGSIZE) == CONTROL_RECEIVE_BYTES == helper.max_receive_bytes
        helper.send("mat.t", np.arange(1 << 17, dtype=np.int64))  # 1 MiB of material still goes out
        assert owner.recv("mat.t", dtype=np.int64).shape == (1 << 17,)
        owner.send("owner-plan", bytes(CONTROL_RECEIVE_BYTES))
        assert len(helper.recv_bytes("owner-plan")) == CONTROL_RECEIVE_BYTES
        owner.send("owner-plan", bytes(CONTROL_RECEIVE_BYTES + 1))
        with pytest.raises(ChannelTimeout):  # libzmq dropped the connection instead of taking the frame in
            helper.recv_bytes("owner-plan", timeout=0.3)
    finally:
        owner.close()
        helper.close()


def test_a_receive_cap_above_the_payload_cap_is_refused():
    with pytest.raises(ValueError, match="max_receive_bytes"):
        ZmqChannel.bind("tcp://127.0.0.1:0", peer="owner", max_payload_bytes=10, max_receive_bytes=11)


def test_the_helper_role_opens_its_channels_with_the_control_cap(monkeypatch):
    import argparse

    import parties.cli as cli
    from parties.wire import CONTROL_RECEIVE_BYTES
    from permllm.transport import DEFAULT_MAX_PAYLOAD_BYTES

    caps = {}

    def open_one(args, channel, curve):
        raw, _ = channel("tcp://127.0.0.1:0", "owner" if args.command == "helper" else "helper", True)
        caps[args.command] = raw._socket.getsockopt(zmq.MAXMSGSIZE)
        return {}

    monkeypatch.setattr(cli, "_run_role_on", open_one)
    for command in ("helper", "owner", "user"):
        args = argparse.Namespace(command=command, network="none", timeout=2.0, report=None)
        cli._run_role_with(args, FlightClock(), None)
    assert caps == {
        "helper": CONTROL_RECEIVE_BYTES,
        "owner": DEFAULT_MAX_PAYLOAD_BYTES,
        "user": DEFAULT_MAX_PAYLOAD_BYTES,
    }


def test_zmq_third_part_is_refused_before_the_rest_is_read(zmq_pair):
    server, client = zmq_pair()
    client._socket.send_multipart([b"h", b"p"] + [b"x" * 1000] * 50)
    with pytest.raises(ProtocolError, match="received 3 parts"):
        server.recv("t")
    assert server._socket.getsockopt(zmq.RCVMORE) == 1  # parts 4..52 are still unread
    with pytest.raises(ProtocolError, match="out of step"):
        server.recv("t")


def test_zmq_one_part_message_is_refused_and_the_channel_goes_on(zmq_pair):
    server, client = zmq_pair()
    client._socket.send(b"lonely")
    with pytest.raises(ProtocolError, match="received 1 part"):
        server.recv("t")
    client.send("t", np.arange(3, dtype=np.int64))
    assert server.recv("t").tolist() == [0, 1, 2]


# -------------------------------------------------------------------------------- netsim: regressions
def simulated(clock, timeout=2.0):
    inner_a, inner_b = MemoryChannel.pair(timeout=timeout)
    profile = Profile("p", 0.0, math.inf)
    return NetSim(inner_a, profile, clock), NetSim(inner_b, profile, clock)


@pytest.mark.parametrize("ahead_s", [None, 365 * 86400.0, MAX_SIMULATED_DELAY_S + 1])
def test_netsim_refuses_an_absurd_delivery_stamp_without_sleeping(ahead_s):
    clock = FakeClock(start_ns=10**18)
    a, b = simulated(clock, timeout=math.inf)
    stamp = 2**64 - 1 if ahead_s is None else clock.now_ns() + int(ahead_s * 1e9)
    a._send_frame(encode_header("t", np.int64, (1,), 0, 1, stamp), memoryview(bytes(8)))
    with pytest.raises(ProtocolError, match="stamped for delivery"):
        b.recv("t")
    assert clock.slept_ns == 0


def test_netsim_wait_is_capped_by_the_receive_timeout():
    clock = FakeClock(start_ns=10**18)
    a, b = simulated(clock, timeout=2.0)
    a._send_frame(encode_header("t", np.int64, (1,), 0, 1, clock.now_ns() + 10**10), memoryview(bytes(8)))
    with pytest.raises(ChannelTimeout, match="after the receive timeout of 2 s"):
        b.recv("t")
    assert clock.slept_ns == 0
    a._send_frame(encode_header("t", np.int64, (1,), 1, 1, clock.now_ns() + 10**9), memoryview(bytes(8)))
    assert b.recv("t").tolist() == [0]
    assert clock.slept_ns == 10**9  # a stamp within the timeout is still waited for exactly


# ---------------------------------------------------------------------------- material: regressions
def send_header(channel, text: str) -> None:
    channel.send("mat", text.encode("ascii"))


def test_material_record_count_is_bounded(pair):
    a, b = pair
    for index in range(3):
        send_record(a, MaterialRecord(index, "k", "key", {"x": torch.zeros(2, dtype=torch.int64)}))
    kept = []
    with pytest.raises(ProtocolError, match="more than the 2 material records"):
        recv_records(b, kept.append, timeout=SHORT_S, max_records=2)
    assert len(kept) == 2


@pytest.mark.parametrize(
    "header", ["+0\tk\tkey\t", " 0\tk\tkey\t", "0_0\tk\tkey\t", "9" * 30 + "\tk\tkey\t", "end\t-0"]
)
def test_material_indices_are_plain_digits(pair, header):
    a, b = pair
    send_header(a, header)
    with pytest.raises(ProtocolError, match="malformed material record header"):
        recv_records(b, lambda r: None, timeout=SHORT_S)


def test_material_record_tensor_names_are_bounded_and_distinct(pair):
    a, b = pair
    send_header(a, "0\tk\tkey\t" + ",".join(f"t{i}" for i in range(MAX_RECORD_TENSORS + 1)))
    with pytest.raises(ProtocolError, match="tensors"):
        recv_records(b, lambda r: None, timeout=SHORT_S)
    a2, b2 = MemoryChannel.pair(timeout=SHORT_S)
    send_header(a2, "0\tk\tkey\tx,x")
    with pytest.raises(ProtocolError, match="distinct"):
        recv_records(b2, lambda r: None, timeout=SHORT_S)


def test_queued_material_refuses_records_past_its_bound():
    queue = QueuedMaterial(bytes(16), [MaterialRecord(0, "k", "a")], max_records=2)
    queue.extend([MaterialRecord(1, "k", "a")])
    with pytest.raises(ProtocolError, match="more than the 2 material records"):
        queue.extend([MaterialRecord(2, "k", "a")])
    assert queue.remaining == 2
    with pytest.raises(ProtocolError):
        QueuedMaterial(bytes(16), [MaterialRecord(i, "k", "a") for i in range(3)], max_records=2)


def test_a_record_past_the_bound_is_refused_at_its_header_before_its_tensors(pair):
    a, b = pair
    send_record(a, MaterialRecord(0, "k", "key", {"x": torch.zeros(2, dtype=torch.int64)}))
    send_record(a, MaterialRecord(1, "k", "key", {"big": torch.arange(CAP // 8, dtype=torch.int64)}))
    with pytest.raises(ProtocolError, match="more than the 1 material records"):
        recv_records(b, lambda r: None, timeout=SHORT_S, max_records=1)
    assert b.recv("mat.t", dtype=np.int64).shape == (CAP // 8,)  # never taken in by the refused stream


def dealt_calls(fam, arch, plan, mask) -> int:
    from protocols.context import DealerContext
    from protocols.material import Dealer

    dealer = Dealer(bytes(16), bytes(16))
    driver = fam.driver(arch, fam.helper_weights(arch), plan.prompt_tokens + plan.max_new_tokens)
    fam.run_session(DealerContext(dealer, mask), driver, plan)
    return dealer.calls


@pytest.mark.parametrize(("layers", "prompt", "budget"), [(1, 1, 1), (1, 3, 4), (2, 2, 1), (3, 5, 3)])
def test_the_plan_bound_on_material_is_what_the_helper_deals_for_a_decoder(layers, prompt, budget):
    from parties.families import family
    from parties.handshake import Plan
    from protocols.model.decoder_weights import DecoderArch, weight_mask
    from tests.tiny_model import decoder_config

    fam = family("smollm2")
    arch = DecoderArch.from_config(decoder_config(layers=layers))
    shapes = fam.linear_shapes(arch)
    plan = Plan("smollm2", prompt, budget)
    mask = lambda name: weight_mask(bytes(16), name, *shapes[name][:2])  # noqa: E731
    assert fam.material_calls(arch, plan) == dealt_calls(fam, arch, plan, mask)


@pytest.mark.parametrize(("layers", "prompt"), [(1, 1), (2, 5)])
def test_the_plan_bound_on_material_is_what_the_helper_deals_for_an_encoder(layers, prompt):
    from parties.families import family
    from parties.handshake import Plan
    from parties.session import prepare_model
    from protocols.model.encoder_weights import EncoderArch
    from tests.tiny_encoder import tiny_encoder

    weights = tiny_encoder(layers=layers)
    fam, arch = family("minilm"), EncoderArch.from_config(weights.config)
    plan = Plan("minilm", prompt, 0)
    assert fam.material_calls(arch, plan) == dealt_calls(fam, arch, plan, prepare_model(weights, bytes(16)).mask)


@pytest.mark.parametrize("role", ["owner", "user"])
def test_parties_refuse_material_past_their_plan(role):
    import parties.owner
    import parties.user
    from parties.families import family
    from parties.handshake import Plan
    from protocols.model.decoder_weights import DecoderArch
    from tests.tiny_model import decoder_config

    fam, arch = family("smollm2"), DecoderArch.from_config(decoder_config(layers=1))
    calls = fam.material_calls(arch, Plan("smollm2", 2, 1))
    helper, party = MemoryChannel.pair(timeout=SHORT_S, max_payload_bytes=CAP)
    send_stream_seed(helper, None)
    for index in range(calls + 1):
        send_record(helper, MaterialRecord(index, "k", "key"))
    with pytest.raises(ProtocolError, match=f"more than the {calls} material records"):
        if role == "owner":
            parties.owner.receive_material(party, bytes(16), SHORT_S, calls)
        else:
            parties.user.receive_material(party, bytes(16), SHORT_S, False, calls)


# ------------------------------------------------------------------------------------ BFV: regressions
VOCAB = 5000  # 3 chunks at N = 4096: quick to encrypt and answer


@pytest.fixture(scope="module")
def client():
    return IndexLookupClient(VOCAB)


@pytest.fixture(scope="module")
def server(client):
    return IndexLookupServer(client.public_context(), vocab_size=VOCAB, poly_modulus_degree=4096)


def public_of(ctx) -> bytes:
    ctx.generate_galois_keys()
    return ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True, save_relin_keys=False)


def test_owner_pins_the_coefficient_modulus():
    t = batching_prime(4096, VOCAB)
    weak = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=4096, plain_modulus=t, coeff_mod_bit_sizes=[30, 30])
    with pytest.raises(ProtocolError, match="coefficient modulus chain"):
        IndexLookupServer(public_of(weak), vocab_size=VOCAB)
    assert COEFF_MODULUS_CHAIN_BITS[4096] == (109, 72, 36)


def test_owner_pins_the_plain_modulus_and_the_degree(client):
    pub = client.public_context()
    with pytest.raises(ProtocolError, match="plain modulus .* expects 65537"):
        IndexLookupServer(pub, vocab_size=49152)
    with pytest.raises(ProtocolError, match="poly_modulus_degree 4096, the owner expects 8192"):
        IndexLookupServer(pub, poly_modulus_degree=8192)
    huge_t = batching_prime(4096, 1 << 22)
    wide = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=4096, plain_modulus=huge_t)
    with pytest.raises(ProtocolError, match="not a batching prime up to"):
        IndexLookupServer(public_of(wide))
    with pytest.raises(ConfigError):
        IndexLookupServer(pub, vocab_size=0)


def test_owner_bounds_the_query_chunk_count(server):
    assert server.expected_chunks(VOCAB) == 3
    server.check_query_count(3, VOCAB)
    for count in (0, 2, 4, 2**40, -1, True):
        with pytest.raises(ProtocolError, match="chunks"):
            server.check_query_count(count, VOCAB)
    with pytest.raises(ConfigError, match="pinned to vocab"):
        server.answer([b"x"] * 3, np.arange(VOCAB + 1))


def test_pinned_server_answers_the_matching_client(client, server):
    table = np.random.default_rng(7).permutation(VOCAB)
    assert client.decode(server.answer(client.query(4321), table)) == int(table[4321])


# ---------------------------------------------------------------------------------------- fuzz: frames
def mostly(good, *bad):
    """A strategy that draws `good` most of the time, else one of `bad` (about one draw in ten)."""
    return st.integers(0, 9).flatmap(lambda k: st.one_of(*bad) if k == 7 else good)


@st.composite
def frames(draw):
    ndim = draw(mostly(st.integers(0, 3), st.integers(4, MAX_NDIM + 2)))
    shape = draw(st.lists(mostly(st.integers(0, 9), EXTREME_DIMS), min_size=ndim, max_size=ndim))
    code = draw(mostly(st.sampled_from([1, 6]), st.sampled_from(DTYPE_CODES)))
    depth = draw(mostly(st.integers(0, 9), st.sampled_from([MAX_FLIGHT_DEPTH, MAX_FLIGHT_DEPTH + 1, 2**32 - 1])))
    seq = draw(mostly(st.just(0), st.sampled_from([1, 2**63, 2**64 - 1])))
    header = raw_header(code, shape, seq=seq, depth=depth)
    if ndim <= MAX_NDIM and 1 <= code <= 6:
        itemsize = [8, 8, 8, 4, 4, 1][code - 1]
        exact = math.prod(shape) * itemsize
        wrong = st.sampled_from([exact + 1, max(exact - 1, 0), 0])
        length = draw(mostly(st.just(exact), wrong) if exact <= CAP else st.integers(0, 64))
    else:
        length = draw(st.integers(0, 64))
    if draw(st.integers(0, 9)) == 7:
        header = bytearray(header)
        header[draw(st.integers(0, len(header) - 1))] ^= 1 << draw(st.integers(0, 7))
        header = bytes(header)
    return header, bytes(length)


@FUZZ
@given(frames(), st.sampled_from(["array", "typed", "bytes", "json"]))
def test_fuzz_frames_raise_only_permllm_errors_in_bounded_memory(frame, how):
    header, payload = frame
    a, b = MemoryChannel.pair(timeout=SHORT_S, max_payload_bytes=CAP)
    a._send_frame(header, memoryview(payload))
    readers = {
        "array": lambda: b.recv("t"),
        "typed": lambda: b.recv("t", dtype=np.int64, shape=(len(payload) // 8,)),
        "bytes": lambda: b.recv_bytes("t", max_len=32),
        "json": lambda: recv_json(b, "t", timeout=SHORT_S),
    }
    result, peak = peak_bytes(readers[how])
    event(f"{how}: {type(result).__name__}")
    assert peak < MEMORY_BOUND
    if isinstance(result, np.ndarray):
        assert result.nbytes == len(payload) <= CAP
        assert b.clock.depth <= MAX_FLIGHT_DEPTH
    a.close()
    b.close()


# ------------------------------------------------------------------------------------------ fuzz: JSON
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=40,
)


@st.composite
def json_texts(draw):
    kind = draw(st.sampled_from(["value", "mutated", "deep", "bigint", "binary"]))
    if kind == "value":
        return json.dumps({"m": draw(json_values)}).encode()
    if kind == "mutated":
        raw = bytearray(json.dumps({"m": draw(json_values)}).encode())
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.sampled_from(b'[]{}",:0-9e\\\x00\xff'))
        return bytes(raw)
    if kind == "deep":
        depth = draw(st.sampled_from([MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, 5000, MAX_JSON_BYTES // 2]))
        opener = draw(st.sampled_from(["[", '{"a":']))
        closer = "]" if opener == "[" else "}"
        return ("{" + '"d":' + opener * depth + "1" + closer * depth + "}").encode()[: MAX_JSON_BYTES + 10]
    if kind == "bigint":
        return b'{"n": ' + b"7" * draw(st.sampled_from([20, 40, 41, 4300, 5000, 60000])) + b"}"
    return draw(st.binary(max_size=300))


@FUZZ
@given(json_texts())
def test_fuzz_control_messages_raise_only_protocol_errors(raw):
    result, peak = peak_bytes(lambda: parse_json(raw, "user", "hello"))
    event(type(result).__name__)
    assert peak < MEMORY_BOUND + 16 * len(raw)
    if isinstance(result, PermLLMError):
        assert isinstance(result, ProtocolError)
    else:
        assert isinstance(result, dict) and result == json.loads(raw)


# -------------------------------------------------------------------------------------- fuzz: material
@st.composite
def record_streams(draw):
    """A list of (tag, payload) frames a helper might send for a material stream."""
    out = []
    records = draw(st.integers(0, 5))
    for index in range(records):
        idx = draw(mostly(st.just(str(index)), st.sampled_from([str(index + 1), "-1", "x", "", "1e3", "٣", "9" * 25])))
        names = draw(mostly(st.lists(st.sampled_from("abc"), unique=True, max_size=3), st.lists(st.text(max_size=3))))
        layout = mostly(st.just("{i}\tk\tkey\t{n}"), st.sampled_from(["{i}\tk\t{n}", "{i}\t\t\t{n}", "error\t{n}"]))
        out.append(("mat", draw(layout).format(i=idx, n=",".join(names)).encode("utf-8")))
        for _ in range(draw(mostly(st.just(len(names)), st.integers(0, 4)))):
            dtype = draw(mostly(st.just(np.int64), st.sampled_from([np.int32, np.uint8])))
            tag = draw(mostly(st.just("mat.t"), st.just("mat")))
            out.append((tag, np.zeros(draw(mostly(st.integers(0, 4), st.sampled_from([0, 7, 8]))), dtype)))
    if draw(st.integers(0, 5)):
        count = draw(mostly(st.just(records), st.sampled_from([records + 1, 10**30])))
        out.append(("mat", f"end\t{count}".encode()))
    return out


@FUZZ
@given(record_streams(), st.integers(1, 4))
def test_fuzz_material_streams_raise_only_permllm_errors(stream, max_records):
    a, b = MemoryChannel.pair(timeout=SHORT_S, max_payload_bytes=CAP)
    for tag, payload in stream:
        a.send(tag, payload)
    kept: list[MaterialRecord] = []
    result, peak = peak_bytes(lambda: recv_records(b, kept.append, timeout=SHORT_S, max_records=max_records))
    event(f"{type(result).__name__}, {len(kept)} kept")
    assert peak < MEMORY_BOUND
    assert len(kept) <= max_records
    assert [r.index for r in kept] == list(range(len(kept)))
    if not isinstance(result, PermLLMError):
        assert result == len(kept)
    a.close()
    b.close()


# ------------------------------------------------------------------------------------------- fuzz: BFV
@pytest.fixture(scope="module")
def bfv_corpus(client):
    return {"context": client.public_context(), "chunks": client.query(17)}


def mutate(data: bytes, draw) -> bytes:
    raw = bytearray(data)
    action = draw(st.sampled_from(["flip", "truncate", "extend", "zero"]))
    at = draw(st.integers(0, max(len(raw) - 1, 0)))
    if action == "flip" and raw:
        raw[at] ^= 1 << draw(st.integers(0, 7))
    elif action == "truncate":
        del raw[at:]
    elif action == "extend":
        raw += draw(st.binary(min_size=1, max_size=64))
    else:
        raw[at : at + 64] = bytes(len(raw[at : at + 64]))
    return bytes(raw)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_fuzz_bfv_blobs_raise_only_protocol_errors(client, server, bfv_corpus, data):
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    target = data.draw(st.sampled_from(["chunk", "count", "reply", "context"]))
    table = np.arange(VOCAB)
    try:
        if target == "chunk":
            query = list(bfv_corpus["chunks"])
            i = data.draw(st.integers(0, len(query) - 1))
            query[i] = mutate(query[i], data.draw)
            server.answer(query, table)
        elif target == "count":
            query = list(bfv_corpus["chunks"]) * data.draw(st.integers(0, 3))
            server.answer(query[: data.draw(st.integers(0, len(query)))], table)
        elif target == "reply":
            client.decode(data.draw(st.one_of(st.binary(max_size=2000), st.just(bfv_corpus["chunks"][0][:5000]))))
        else:
            IndexLookupServer(mutate(bfv_corpus["context"], data.draw), vocab_size=VOCAB)
        event(f"{target}: accepted")
    except ProtocolError:
        event(f"{target}: refused")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before < 256 << 10  # KiB


# ----------------------------------------------------------------------------- a recording wrapper too
class Tap(Channel):
    """A wrapper that sees validated frames only: a fuzzed frame never reaches it unchecked."""

    def __init__(self, inner: Channel) -> None:
        super().__init__(inner.peer, clock=inner.clock, stats=ChannelStats(), max_payload_bytes=CAP)
        self.inner, self.seen = inner, []

    def _receive(self, tag, timeout) -> Received:
        message = self.inner._receive(tag, timeout)
        self.seen.append(message.header)
        return message

    def _send_frame(self, header, payload):
        self.inner._send_frame(header, payload)

    def _recv_frame(self, timeout_s):
        return self.inner._recv_frame(timeout_s)

    def _close_transport(self):
        self.inner.close()


@FUZZ
@given(frames())
def test_fuzz_wrappers_only_see_checked_headers(frame):
    header, payload = frame
    a, b = MemoryChannel.pair(timeout=SHORT_S, max_payload_bytes=CAP)
    tap = Tap(b)
    a._send_frame(header, memoryview(payload))
    try:
        tap.recv("t")
    except PermLLMError:
        pass
    for seen in tap.seen:
        assert seen.payload_nbytes == len(payload) <= CAP
        assert math.prod(max(d, 1) for d in seen.shape) * seen.dtype.itemsize <= CAP
        assert seen.depth <= MAX_FLIGHT_DEPTH
    a.close()
    tap.close()


def test_fixed_header_length_unchanged():
    """The bounds add no bytes to a frame: the header layout is the same."""
    assert FIXED_HEADER_LEN == 28
    assert len(encode_header("t", np.int64, (3, 4), 0, 1)) == 28 + 16 + 1
