"""Benchmarks for permllm.bfv_correlations on the shapes of one SmolLM2-135M decode step.

Run:  pytest bench/test_bench_bfv_correlations.py --benchmark-only --benchmark-json=out.json
      (`extra_info` keeps bytes up/down, ciphertext counts and the user's encrypt/decrypt seconds).

The timed part is the owner's answer; the user's query and share extraction are timed once beside it.
Per decode layer one step needs: the norm's pi and pi^-1 (576 x 1), SwiGLU's pi (1536 x 2) and
pi^-1 (1536 x 1), the softmax's pi and pi^-1 (9 heads x L), and two product correlations for each
of the score and value Beaver triples (3 KV groups, 3 query rows, 64 x L or L x 64).
"""

from __future__ import annotations

import time

import pytest
import torch

from permllm.bfv_correlations import PermutationClient, PermutationServer, ProductClient, ProductServer
from permllm.bfv_linear import LinearCorrelationClient, LinearCorrelationServer
from permllm.prg import Prg

CONTEXT = 64  # cached positions of the decode step measured
PERMUTATIONS = {
    "norm-576x1": ([576], 1),
    "swiglu-1536x2": ([1536], 2),
    "swiglu-inverse-1536x1": ([1536], 1),
    f"softmax-9x{CONTEXT}": ([CONTEXT] * 9, 1),
}
PRODUCTS = {  # (groups, rows, inner, out): X (G, r, k) @ Y (G, k, m)
    f"scores-user-left-3x3x64x{CONTEXT}": (3, 3, 64, CONTEXT),
    f"scores-owner-left-3x{CONTEXT}x64x3": (3, CONTEXT, 64, 3),
    f"values-user-left-3x3x{CONTEXT}x64": (3, 3, CONTEXT, 64),
    f"values-owner-left-3x64x{CONTEXT}x3": (3, 64, CONTEXT, 3),
}


@pytest.fixture(scope="module")
def linear():
    client = LinearCorrelationClient()
    return client, LinearCorrelationServer(client.public_context())


def _uniform(seed: int, *shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, shape, dtype=torch.int64, generator=g)


def _record(benchmark, query, reply, encrypt_s, decrypt_s):
    benchmark.extra_info.update(
        {
            "bytes_up": sum(map(len, query)),
            "bytes_down": sum(map(len, reply)),
            "parts_up": len(query) - 1,
            "parts_down": len(reply) - 1,
            "user_encrypt_s": encrypt_s,
            "user_decrypt_s": decrypt_s,
        }
    )


@pytest.mark.parametrize("name", PERMUTATIONS)
def test_permutation_correlation(benchmark, linear, name):
    lengths, c = PERMUTATIONS[name]
    client, server = PermutationClient(linear[0]), PermutationServer(linear[1])
    n = sum(lengths)
    a = _uniform(n, n, c)
    pi = Prg(bytes(16), name).segment_permutation(lengths)
    start = time.perf_counter()
    query = client.query(a, lengths)
    encrypt_s = time.perf_counter() - start
    reply, b = benchmark.pedantic(lambda: server.answer(query, pi, lengths, c), rounds=1, iterations=1)
    start = time.perf_counter()
    share = client.shares(reply, (n, c), lengths)
    decrypt_s = time.perf_counter() - start
    assert torch.equal(share + b, a[torch.from_numpy(pi)])
    _record(benchmark, query, reply, encrypt_s, decrypt_s)


@pytest.mark.parametrize("name", PRODUCTS)
def test_product_correlation(benchmark, linear, name):
    g, r, k, m = PRODUCTS[name]
    client, server = ProductClient(linear[0]), ProductServer(linear[1])
    x, y = _uniform(1, g, r, k), _uniform(2, g, k, m)
    start = time.perf_counter()
    query = client.query(x, m)
    encrypt_s = time.perf_counter() - start
    reply, owner = benchmark.pedantic(lambda: server.answer(query, y, r), rounds=1, iterations=1)
    start = time.perf_counter()
    share = client.shares(reply, g, r, m)
    decrypt_s = time.perf_counter() - start
    assert torch.equal(share + owner, x @ y)
    _record(benchmark, query, reply, encrypt_s, decrypt_s)
