"""MemoryChannel specifics (permllm.transport.memory): close while waiting, delivery after close, copies."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from permllm.errors import PeerGone
from permllm.transport import FlightClock, MemoryChannel

SHORT = 0.2  # seconds: every wait in these tests is bounded by a short timeout


def test_memory_pending_recv_wakes_on_peer_close():
    a, b = MemoryChannel.pair(timeout=30.0)
    errors: list[BaseException] = []

    def wait_for_message():
        try:
            b.recv("never")
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
            errors.append(exc)

    waiter = threading.Thread(target=wait_for_message)
    waiter.start()
    time.sleep(0.05)
    start = time.monotonic()
    a.close()
    waiter.join(timeout=2.0)
    assert not waiter.is_alive()
    assert time.monotonic() - start < 1.0
    assert len(errors) == 1 and isinstance(errors[0], PeerGone)
    assert "peer 'owner' closed the channel" in str(errors[0])


def test_memory_frames_sent_before_close_are_still_delivered():
    a, b = MemoryChannel.pair(timeout=SHORT)
    a.send("last", np.arange(3, dtype=np.int64))
    a.close()
    np.testing.assert_array_equal(b.recv("last"), [0, 1, 2])
    with pytest.raises(PeerGone):
        b.recv("more")
    with pytest.raises(PeerGone, match="sending tag 'reply' to peer 'owner'"):
        b.send("reply", b"x")


def test_memory_pair_names_and_clocks():
    clock_a, clock_b = FlightClock(), FlightClock()
    a, b = MemoryChannel.pair("helper", "owner", clock_a=clock_a, clock_b=clock_b)
    assert (a.peer, b.peer) == ("owner", "helper")
    assert a.clock is clock_a and b.clock is clock_b


def test_memory_receiver_gets_a_copy():
    a, b = MemoryChannel.pair()
    sent = np.arange(4, dtype=np.int64)
    a.send("v", sent)
    got = b.recv("v")
    got[:] = 0
    np.testing.assert_array_equal(sent, [0, 1, 2, 3])
    assert not np.shares_memory(got, sent)
