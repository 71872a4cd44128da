"""Benchmarks for permllm.ot_shuffle on the shapes of one SmolLM2-135M decode step (as
bench/test_bench_bfv_correlations.py, whose permutation rows they replace).

Run:  pytest bench/test_bench_ot_shuffle.py --benchmark-only --benchmark-json=out.json
      (`extra_info` keeps the owner's and the user's seconds, bytes up (user -> owner) and down).

A round is one batch: the owner's query, the user's answer, the owner's finish; the timed figure is
the whole round on one machine, owner_s (query + finish) and user_s (answer) are its parts (best of
the rounds). "decode-layer" is the six permutations of one decode layer in one batch: the norm's pi and
pi^-1 (576 x 1), SwiGLU's pi (1536 x 2) and pi^-1 (1536 x 1), the softmax's pi and pi^-1 (9 heads x 64).
The base OTs (once per session) are timed once by test_base_ots.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from permllm.ot_shuffle import ShuffleClient, ShuffleServer
from permllm.prg import Prg

CONTEXT = 64  # cached positions of the decode step measured
SOFTMAX = ([CONTEXT] * 9, 1)
BATCHES = {
    "norm-576x1": [([576], 1)],
    "swiglu-1536x2": [([1536], 2)],
    "swiglu-inverse-1536x1": [([1536], 1)],
    f"softmax-9x{CONTEXT}": [SOFTMAX],
    "decode-layer": [([576], 1), ([576], 1), ([1536], 2), ([1536], 1), SOFTMAX, SOFTMAX],
}
ROUNDS = 3


@pytest.fixture(scope="module")
def session():
    client, server = ShuffleClient(), ShuffleServer()
    client.base_accept(server.base_reply(client.base_request()))
    return client, server


def _uniform(seed: int, *shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, shape, dtype=torch.int64, generator=g)


def test_base_ots(benchmark):
    """Once per session: user request (128 elements), owner reply, user keys."""
    times = {}

    def setup_session():
        client, server = ShuffleClient(), ShuffleServer()
        start = time.perf_counter()
        request = client.base_request()
        middle = time.perf_counter()
        reply = server.base_reply(request)
        end = time.perf_counter()
        client.base_accept(reply)
        times.update(
            owner_s=end - middle, user_s=middle - start + time.perf_counter() - end, up=len(request), down=len(reply)
        )

    benchmark.pedantic(setup_session, rounds=1, iterations=1)
    benchmark.extra_info.update(
        {"owner_s": times["owner_s"], "user_s": times["user_s"], "bytes_up": times["up"], "bytes_down": times["down"]}
    )


@pytest.mark.parametrize("name", BATCHES)
def test_permutation_batch(benchmark, session, name):
    client, server = session
    layouts = BATCHES[name]
    perms = [Prg(bytes(16), f"{name}/{i}").segment_permutation(lengths) for i, (lengths, _) in enumerate(layouts)]
    inputs = [_uniform(i, sum(lengths), c) for i, (lengths, c) in enumerate(layouts)]
    channels = [c for _, c in layouts]
    owner_s, user_s, sizes = [], [], {}

    def one_round():
        start = time.perf_counter()
        query = server.query(perms, channels)
        middle = time.perf_counter()
        reply, shares = client.answer(query, inputs)
        end = time.perf_counter()
        b = server.finish(reply)
        owner_s.append(middle - start + time.perf_counter() - end)
        user_s.append(end - middle)
        sizes.update(down=sum(map(len, query)), up=sum(map(len, reply)))
        return shares, b

    shares, b = benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    for a, pi, share, mask in zip(inputs, perms, shares, b):
        assert torch.equal(share + mask, a[torch.from_numpy(np.asarray(pi))])
    benchmark.extra_info.update(
        {"owner_s": min(owner_s), "user_s": min(user_s), "bytes_up": sizes["up"], "bytes_down": sizes["down"]}
    )
