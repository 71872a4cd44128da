"""Benchmarks for permllm.he (private token-id recovery, BFV via TenSEAL), vocab 49152.

Run:  pytest bench/test_bench_he.py --benchmark-only
      (add --benchmark-json=out.json to keep `extra_info`: wire sizes in bytes, N, chunk count).

Per generated token the user runs `query` once and `decode` once, the owner runs `answer` once;
`keygen` and the public context are once per session.
"""

from __future__ import annotations

import numpy as np
import pytest

from permllm.he import IndexLookupClient, IndexLookupServer
from permllm.sampling import choose_token

VOCAB = 49152
DEGREES = [4096, 8192]


@pytest.fixture(scope="module", params=DEGREES, ids=[f"N{n}" for n in DEGREES])
def setup(request):
    client = IndexLookupClient(VOCAB, poly_modulus_degree=request.param)
    server = IndexLookupServer(client.public_context())
    table = np.random.default_rng(0).permutation(VOCAB).astype(np.int64)
    j = 31337
    query = client.query(j)
    reply = server.answer(query, table)
    assert client.decode(reply) == table[j]
    return client, server, table, j, query, reply


def sizes(client, query, reply) -> dict:
    return {
        "vocab": VOCAB,
        "poly_modulus_degree": client.poly_modulus_degree,
        "plain_modulus": client.plain_modulus,
        "chunks": client.n_chunks,
        "public_context_bytes": len(client.public_context()),
        "query_bytes": sum(map(len, query)),
        "query_chunk_bytes": len(query[0]),
        "reply_bytes": len(reply),
    }


def test_keygen(benchmark, setup):
    client, _, _, _, query, reply = setup
    benchmark.extra_info.update(sizes(client, query, reply))
    benchmark.pedantic(
        lambda: IndexLookupClient(VOCAB, poly_modulus_degree=client.poly_modulus_degree).public_context(),
        rounds=3,
        iterations=1,
    )


def test_server_load_context(benchmark, setup):
    client, _, _, _, query, reply = setup
    benchmark.extra_info.update(sizes(client, query, reply))
    pub = client.public_context()
    benchmark.pedantic(lambda: IndexLookupServer(pub), rounds=3, iterations=1)


def test_query_encrypt(benchmark, setup):
    client, _, _, j, query, reply = setup
    benchmark.extra_info.update(sizes(client, query, reply))
    benchmark(client.query, j)


def test_server_answer(benchmark, setup):
    client, server, table, _, query, reply = setup
    benchmark.extra_info.update(sizes(client, query, reply))
    benchmark(server.answer, query, table)


def test_decode(benchmark, setup):
    client, _, table, j, query, reply = setup
    benchmark.extra_info.update(sizes(client, query, reply))
    out = benchmark(client.decode, reply)
    assert out == table[j]


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(temperature=0.8, top_p=0.9), dict(temperature=0.8, top_k=50)],
    ids=["greedy", "temp_top_p", "temp_top_k"],
)
def test_choose_token(benchmark, kwargs):
    z = np.random.default_rng(1).normal(size=VOCAB)
    g = np.random.default_rng(2)
    benchmark(lambda: choose_token(z, generator=g, **kwargs))
