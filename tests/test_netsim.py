"""Tests for netsim: profiles, clocks, the FIFO link model and the NetSim channel wrapper."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from netsim import PROFILES, FakeClock, Link, NetSim, Profile, RealClock, parse_profile
from permllm.errors import ChannelTimeout
from permllm.transport import MemoryChannel, ZmqChannel
from permllm.transport.frames import header_length

MS = 1_000_000  # ns
SECOND = 1_000_000_000  # ns


def simulated_pair(profile, clock, **options):
    """Two MemoryChannel ends ("owner" side, "user" side), each wrapped in NetSim on `clock`."""
    inner_a, inner_b = MemoryChannel.pair(timeout=options.pop("timeout", 2.0), **options)
    return NetSim(inner_a, profile, clock), NetSim(inner_b, profile, clock)


def payload_for_frame_of(nbytes: int, tag: str) -> bytes:
    """Raw bytes whose serialized frame under `tag` is exactly `nbytes` long."""
    return bytes(nbytes - header_length(len(tag), 1))


# --- profiles --------------------------------------------------------------------------------


def test_builtin_profiles():
    assert PROFILES["none"] == Profile("none", 0.0, math.inf)
    assert PROFILES["lan"].rtt_s == pytest.approx(0.2e-3) and PROFILES["lan"].bandwidth_bps == 10e9
    assert PROFILES["wan"].rtt_s == pytest.approx(10e-3) and PROFILES["wan"].bandwidth_bps == 1e9
    assert PROFILES["wan-slow"].rtt_s == pytest.approx(50e-3) and PROFILES["wan-slow"].bandwidth_bps == 100e6
    with pytest.raises(TypeError):
        PROFILES["mine"] = PROFILES["lan"]  # read-only mapping


def test_parse_profile_names_and_numbers():
    assert parse_profile("wan") is PROFILES["wan"]
    assert parse_profile(" WAN-Slow ") is PROFILES["wan-slow"]
    custom = parse_profile("12.5,250")
    assert custom.rtt_s == pytest.approx(0.0125)
    assert custom.bandwidth_bps == 250e6
    assert parse_profile(custom) is custom


@pytest.mark.parametrize(
    "spec", ["", "fast", "10", "1,2,3", "a,b", "-1,10", "10,0", "10,-5", "nan,10", "10,nan", "inf,10"]
)
def test_parse_profile_rejects_garbage(spec):
    with pytest.raises(ValueError, match="profile"):
        parse_profile(spec)


def test_profile_validation():
    with pytest.raises(ValueError, match="rtt"):
        Profile("bad", -0.1, 1e9)
    with pytest.raises(ValueError, match="bandwidth"):
        Profile("bad", 0.1, 0)


def test_profile_timing_math():
    profile = Profile("p", 0.02, 8e6)
    assert profile.one_way_ns == 10 * MS
    assert profile.transmit_ns(1_000_000) == SECOND
    assert PROFILES["none"].transmit_ns(10**12) == 0


# --- clocks ----------------------------------------------------------------------------------


def test_fake_clock():
    clock = FakeClock(start_ns=100)
    clock.sleep_until(50)  # in the past: nothing happens
    assert clock.now_ns() == 100 and clock.slept_ns == 0
    clock.sleep_until(400)
    assert clock.now_ns() == 400 and clock.slept_ns == 300
    clock.advance(1.5)
    assert clock.now_ns() == 400 + 1_500_000_000
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)


def test_real_clock_sleep_until():
    clock = RealClock()
    target = clock.now_ns() + 20 * MS
    clock.sleep_until(target)
    assert clock.now_ns() >= target
    assert abs(clock.now_ns() - time.time_ns()) < 50 * MS


# --- link model ------------------------------------------------------------------------------


def test_link_fifo_and_idle_gap():
    link = Link(Profile("p", 0.002, 8e6))  # 1 ms one way, 1 byte per microsecond
    assert link.schedule(0, 1000) == 1 * MS + 1 * MS  # transmit 1 ms + 1 ms propagation
    assert link.schedule(0, 1000) == 2 * MS + 1 * MS  # queued behind the first
    assert link.schedule(10 * MS, 1000) == 11 * MS + 1 * MS  # the wire was idle: departs at once


# --- NetSim with a fake clock ----------------------------------------------------------------


def test_latency_only():
    clock = FakeClock(start_ns=5 * SECOND)
    a, b = simulated_pair(Profile("lat", 0.020, math.inf), clock)
    a.send("m", np.arange(1000, dtype=np.int64))
    assert clock.now_ns() == 5 * SECOND  # the sender never sleeps
    b.recv("m")
    assert clock.now_ns() == 5 * SECOND + 10 * MS


def test_bandwidth_only():
    clock = FakeClock(start_ns=SECOND)
    a, b = simulated_pair(Profile("bw", 0.0, 8e6), clock)  # 8 Mbit/s
    a.send("m", payload_for_frame_of(1_000_000, "m"))  # a 1 MB frame
    assert a.stats.bytes_sent == 1_000_000
    b.recv_bytes("m")
    assert clock.now_ns() == 2 * SECOND


def test_fifo_second_message_waits_for_first():
    clock = FakeClock()
    a, b = simulated_pair(Profile("fifo", 0.010, 8e6), clock)
    a.send("first", payload_for_frame_of(1_000_000, "first"))
    a.send("second", payload_for_frame_of(500_000, "second"))
    b.recv_bytes("first")
    assert clock.now_ns() == SECOND + 5 * MS
    b.recv_bytes("second")
    assert clock.now_ns() == SECOND + SECOND // 2 + 5 * MS


def test_directions_are_independent():
    clock = FakeClock()
    a, b = simulated_pair(Profile("dir", 0.0, 8e6), clock)
    a.send("ab", payload_for_frame_of(1_000_000, "ab"))
    b.send("ba", payload_for_frame_of(1_000_000, "ba"))  # does not queue behind a's frame
    a.recv_bytes("ba")
    b.recv_bytes("ab")
    assert clock.now_ns() == SECOND


@pytest.mark.parametrize("rounds", [1, 2, 7])
def test_ping_pong_costs_half_rtt_per_message(rounds):
    clock = FakeClock()
    rtt_s = 0.010
    a, b = simulated_pair(Profile("pp", rtt_s, math.inf), clock)
    sender, receiver = a, b
    for index in range(rounds):
        sender.send(f"m{index}", np.array([index], dtype=np.int64))
        assert receiver.recv(f"m{index}")[0] == index
        sender, receiver = receiver, sender
    assert clock.now_ns() == rounds * round(rtt_s * 1e9 / 2)
    assert max(a.clock.depth, b.clock.depth) == rounds


def test_deliver_at_is_stamped_in_the_header(memory_channels):
    clock = FakeClock(start_ns=SECOND)
    inner_a, inner_b = memory_channels
    sim_a = NetSim(inner_a, "wan", clock)
    sim_a.send("t", b"abc")
    received = inner_b._receive("t", 1.0)  # unwrapped receiver sees the raw stamp
    expected = SECOND + PROFILES["wan"].transmit_ns(header_length(1, 1) + 3) + 5 * MS
    assert received.header.deliver_at_ns == expected


def test_unstamped_frames_are_not_delayed(memory_channels):
    clock = FakeClock(start_ns=SECOND)
    inner_a, inner_b = memory_channels
    sim_b = NetSim(inner_b, "wan-slow", clock)
    inner_a.send("t", b"x")  # from a sender without netsim: deliver_at_ns == 0
    assert sim_b.recv_bytes("t") == b"x"
    assert clock.now_ns() == SECOND


def test_stats_depth_and_peer_pass_through_without_double_counting(memory_channels):
    clock = FakeClock()
    inner_a, inner_b = memory_channels
    a, b = NetSim(inner_a, "lan", clock), NetSim(inner_b, "lan", clock)
    assert a.stats is inner_a.stats and a.clock is inner_a.clock and a.peer == "user"
    sent = np.zeros((4, 4), dtype=np.float32)
    a.send("x", sent)
    b.recv("x", dtype=np.float32, shape=(4, 4))
    frame_bytes = header_length(1, 2) + sent.nbytes
    assert (inner_a.stats.bytes_sent, inner_a.stats.messages_sent) == (frame_bytes, 1)
    assert (inner_b.stats.bytes_received, inner_b.stats.messages_received) == (frame_bytes, 1)
    assert b.clock.depth == 1


def test_timeout_and_close_pass_through():
    clock = FakeClock()
    a, b = simulated_pair("lan", clock, timeout=0.2)
    with pytest.raises(ChannelTimeout, match="tag 'nothing' from peer 'owner'"):
        b.recv("nothing")
    a.close()
    assert a.closed and a.inner.closed


def test_netsim_wraps_a_zmq_channel():
    clock = FakeClock()
    server = ZmqChannel.bind("tcp://127.0.0.1:0", peer="user", timeout=5.0)
    client = ZmqChannel.connect(server.endpoint, peer="owner", timeout=5.0)
    a, b = NetSim(server, Profile("z", 0.004, math.inf), clock), NetSim(client, Profile("z", 0.004, math.inf), clock)
    try:
        b.send("up", np.arange(3, dtype=np.int64))
        np.testing.assert_array_equal(a.recv("up"), [0, 1, 2])
        assert clock.now_ns() == 2 * MS
        assert server.stats.bytes_received == header_length(2, 1) + 24
    finally:
        a.close()
        b.close()


# --- NetSim with the real clock --------------------------------------------------------------


def test_real_clock_small_profile():
    a, b = simulated_pair(parse_profile("200,1000"), RealClock())  # 100 ms one way
    start = time.monotonic()
    a.send("m", np.arange(10, dtype=np.int64))
    send_s = time.monotonic() - start
    b.recv("m")
    elapsed = time.monotonic() - start
    assert send_s < 0.05  # the sender did not sleep
    assert 0.0995 <= elapsed < 1.0
