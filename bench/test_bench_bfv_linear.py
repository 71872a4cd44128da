"""Benchmarks for permllm.bfv_linear (shares of V @ W over Z_2^64 from BFV) on SmolLM2-135M shapes.

Run:  pytest bench/test_bench_bfv_linear.py --benchmark-only
      (add --benchmark-json=out.json to keep `extra_info`: bytes up/down, ciphertext counts, packing).

Per matrix and pass the user runs `encrypt_rows` and `decrypt_shares` once, the owner `multiply` once;
the public context travels once per session. T is the number of rows (tokens) per pass.
"""

from __future__ import annotations

import struct
import time

import pytest
import torch

from permllm.bfv_linear import LinearCorrelationClient, LinearCorrelationServer

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
ROWS = [1, 16]


@pytest.fixture(scope="module")
def pair():
    client = LinearCorrelationClient()
    return client, LinearCorrelationServer(client.public_context())


@pytest.mark.parametrize("T", ROWS, ids=[f"T{t}" for t in ROWS])
@pytest.mark.parametrize("n,m", SHAPES, ids=[f"{n}x{m}" for n, m in SHAPES])
def test_linear_correlation(benchmark, pair, n, m, T):
    client, server = pair
    g = torch.Generator().manual_seed(n + m + T)
    V = torch.randint(-(2**63), 2**63 - 1, (T, n), dtype=torch.int64, generator=g)
    W = torch.randint(-(2**19), 2**19, (n, m), dtype=torch.int64, generator=g)
    start = time.perf_counter()
    query = client.encrypt_rows(V, out_features=m)
    encrypt_s = time.perf_counter() - start
    reply, R = benchmark.pedantic(lambda: server.multiply(query, W), rounds=1, iterations=1)
    start = time.perf_counter()
    U = client.decrypt_shares(reply, T, m)
    decrypt_s = time.perf_counter() - start
    assert torch.equal(U + R, V @ W)
    _, _, _, _, tw, nw, mw = struct.unpack("<4sBIIHHH", reply[0])
    benchmark.extra_info.update(
        {
            "bytes_up": sum(map(len, query)),
            "bytes_down": sum(map(len, reply)),
            "query_ciphertexts": len(query) - 1,
            "reply_ciphertexts": len(reply) - 1,
            "packing": f"Tw={tw} nw={nw} mw={mw}",
            "user_encrypt_s": encrypt_s,
            "user_decrypt_s": decrypt_s,
            "public_context_bytes": len(client.public_context()),
        }
    )
