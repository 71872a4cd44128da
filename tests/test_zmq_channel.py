"""ZmqChannel specifics (permllm.transport.zmq_channel), on loopback TCP with random ports: endpoints, large
and oversized messages, linger, CURVE."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from permllm.errors import ChannelTimeout, ConfigError, ProtocolError
from permllm.transport import ZmqChannel
from permllm.transport.frames import header_length

SHORT = 0.2  # seconds: every wait in these tests is bounded by a short timeout


def test_zmq_bind_reports_a_random_port(make_zmq_pair):
    a, b = make_zmq_pair()
    host, port = a.endpoint.rsplit(":", 1)
    assert host == "tcp://127.0.0.1" and int(port) > 0
    assert b.endpoint == a.endpoint


def test_zmq_large_payload(make_zmq_pair):
    a, b = make_zmq_pair()
    rng = np.random.default_rng(99)
    sent = rng.integers(-(2**63), 2**63 - 1, size=(1024, 1024), dtype=np.int64)  # 8 MiB
    b.send("big", sent)
    got = a.recv("big", dtype=np.int64, shape=sent.shape)
    np.testing.assert_array_equal(got, sent)
    assert a.stats.bytes_received == header_length(len("big"), sent.ndim) + sent.nbytes


def test_zmq_message_over_maxmsgsize_is_dropped_not_allocated(make_zmq_pair):
    a, b = make_zmq_pair(timeout=SHORT, server_options={"max_payload_bytes": 1000})
    b.send("big", bytes(10_000))
    with pytest.raises(ChannelTimeout, match="waiting for tag 'big'"):
        a.recv_bytes("big")


def test_zmq_message_with_wrong_part_count(make_zmq_pair):
    a, b = make_zmq_pair()
    b._socket.send_multipart([b"one", b"two", b"three"])
    with pytest.raises(ProtocolError, match="expected a 2-part frame .* received 3 parts"):
        a.recv("t")


def test_zmq_linger_delivers_a_last_message_sent_right_after_connect():
    server = ZmqChannel.bind("tcp://127.0.0.1:0", peer="user", timeout=2.0)
    try:
        client = ZmqChannel.connect(server.endpoint, peer="owner", timeout=2.0, linger_s=1.0)
        client.send("last", np.arange(4, dtype=np.int64))
        client.close()
        np.testing.assert_array_equal(server.recv("last"), [0, 1, 2, 3])
    finally:
        server.close()


def test_zmq_curve_with_matching_keys(make_zmq_pair):
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    a, b = make_zmq_pair(
        server_options={"curve_server": True, "curve_secret_key": server_secret},
        client_options={
            "curve_server_key": server_public,
            "curve_public_key": client_public,
            "curve_secret_key": client_secret,
        },
    )
    b.send("secret", np.arange(5, dtype=np.int64))
    np.testing.assert_array_equal(a.recv("secret"), np.arange(5))
    a.send("back", b"ok")
    assert b.recv_bytes("back") == b"ok"


def test_zmq_curve_with_wrong_server_key_times_out(make_zmq_pair):
    _, server_secret = zmq.curve_keypair()
    wrong_public, _ = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    a, b = make_zmq_pair(
        timeout=SHORT,
        server_options={"curve_server": True, "curve_secret_key": server_secret},
        client_options={
            "curve_server_key": wrong_public,
            "curve_public_key": client_public,
            "curve_secret_key": client_secret,
        },
    )
    b.send("secret", b"x")
    with pytest.raises(ChannelTimeout, match="waiting for tag 'secret' from peer 'user'"):
        a.recv_bytes("secret")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"curve_secret_key": b"k" * 32}, "without curve_server=True or curve_server_key"),
        ({"curve_server": True}, "server needs curve_secret_key"),
        ({"curve_server_key": b"k" * 32}, "client needs"),
        ({"curve_server": True, "curve_server_key": b"k" * 32, "curve_secret_key": b"k" * 32}, "exclusive"),
    ],
)
def test_zmq_incomplete_curve_options(options, message):
    with pytest.raises(ConfigError, match=message):
        ZmqChannel.bind("tcp://127.0.0.1:0", peer="user", **options)
