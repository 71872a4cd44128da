"""Throughput of one message (send + receive, full framing and validation) through each transport.

Run:  pytest bench/test_bench_channel.py --benchmark-only
      (add --benchmark-json=out.json to keep `extra_info`: payload MiB, MB/s at the median and best
      round, 1 MB = 10^6 bytes).

Both ends live in this process: the sender's send() and the receiver's recv() run one after the
other on one thread; with ZeroMQ the two sockets have separate contexts, so the bytes really cross
the loopback TCP stack through libzmq's I/O threads. `zmq-curve` is the same socket pair with CURVE
encryption and authentication on (what every role uses by default): its ratio to `zmq-tcp` is the
transport cost of CURVE.
"""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from permllm.transport import MemoryChannel, ZmqChannel

SIZES_MIB = {"1MiB": 1, "64MiB": 64}
ROUNDS = {"1MiB": 40, "64MiB": 5}


def _memory_pair():
    return MemoryChannel.pair("owner", "user", timeout=30.0)


def _zmq_pair(curve: bool = False):
    server_options, client_options = {}, {}
    if curve:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        server_options = {"curve_server": True, "curve_secret_key": server_secret}
        client_options = {
            "curve_server_key": server_public,
            "curve_public_key": client_public,
            "curve_secret_key": client_secret,
        }
    server = ZmqChannel.bind("tcp://127.0.0.1:0", peer="user", timeout=30.0, **server_options)
    client = ZmqChannel.connect(server.endpoint, peer="owner", timeout=30.0, **client_options)
    client.send("warmup", b"x")  # establish the connection (and the CURVE handshake) outside the measurement
    server.recv_bytes("warmup")
    return client, server


PAIRS = {"memory": _memory_pair, "zmq-tcp": _zmq_pair, "zmq-curve": lambda: _zmq_pair(curve=True)}


@pytest.mark.parametrize("size", sorted(SIZES_MIB))
@pytest.mark.parametrize("transport", sorted(PAIRS))
def test_channel_throughput(benchmark, transport, size):
    sender, receiver = PAIRS[transport]()
    payload = np.random.default_rng(0).integers(-(2**63), 2**63 - 1, size=SIZES_MIB[size] * 2**17, dtype=np.int64)

    def one_message():
        sender.send("bench", payload)
        return receiver.recv("bench", dtype=np.int64, shape=payload.shape)

    try:
        got = benchmark.pedantic(one_message, rounds=ROUNDS[size], iterations=1, warmup_rounds=1)
    finally:
        sender.close()
        receiver.close()
    assert got[-1] == payload[-1] and got.shape == payload.shape
    stats = benchmark.stats.stats
    benchmark.extra_info["payload_mib"] = SIZES_MIB[size]
    benchmark.extra_info["mb_per_s"] = round(payload.nbytes / stats.median / 1e6, 1)  # median: robust to noise
    benchmark.extra_info["mb_per_s_best"] = round(payload.nbytes / stats.min / 1e6, 1)
