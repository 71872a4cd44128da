"""Benchmarks for permllm.session_products on one SmolLM2-135M layer (3 KV groups of 3 heads, d = 64).

Run:  pytest bench/test_bench_session_products.py --benchmark-only --benchmark-json=out.json
      (`extra_info` keeps bytes up/down, ciphertext counts and the user's query/share seconds).

The timed part is the owner's answer; the user's query and share extraction are timed once beside it.
Cases: a 49 + 32 session (the prefill of 49 positions and 31 decode steps, the 32nd token needs no
step) made in one pass; its 31 decode steps alone (first = 1, the prefill's material made apart);
one decode step at context 64 alone (what today's per-step products make, for comparison with
bench/test_bench_bfv_correlations.py's four product rows).
"""

from __future__ import annotations

import time

import pytest
import torch

from permllm.bfv_linear import LinearCorrelationClient, LinearCorrelationServer
from permllm.session_products import SessionLayout, SessionProductClient, SessionProductServer, draw_masks

PROMPT, GENERATED = 49, 32
LAYOUTS = {
    f"session-{PROMPT}+{GENERATED}": SessionLayout(3, 3, 64, (PROMPT,) + (1,) * (GENERATED - 1)),
    f"session-{PROMPT}+{GENERATED}-decode-steps": SessionLayout(3, 3, 64, (PROMPT,) + (1,) * (GENERATED - 1), first=1),
    f"session-{PROMPT}-prefill": SessionLayout(3, 3, 64, (PROMPT,)),
    "decode-step-64": SessionLayout(3, 3, 64, (63, 1), first=1),
}


@pytest.fixture(scope="module")
def linear():
    client = LinearCorrelationClient()
    return client, LinearCorrelationServer(client.public_context())


@pytest.mark.parametrize("name", LAYOUTS)
def test_session_products(benchmark, linear, name):
    layout = LAYOUTS[name]
    client, server = SessionProductClient(linear[0], layout), SessionProductServer(linear[1], layout)
    masks_o, masks_u = draw_masks(layout, bytes(16)), draw_masks(layout, bytes(range(16)))
    start = time.perf_counter()
    query = client.query(masks_u)
    query_s = time.perf_counter() - start
    reply, (score_o, value_o) = benchmark.pedantic(lambda: server.answer(query, masks_o), rounds=1, iterations=1)
    start = time.perf_counter()
    score_u, value_u = client.shares(reply, masks_u)
    shares_s = time.perf_counter() - start
    last = len(layout.steps) - 1
    t = layout.steps[last]
    a = masks_o.score_a[last] + masks_u.score_a[last]
    keys = (masks_o.keys + masks_u.keys)[:, : layout.cache(t)]
    assert torch.equal(score_o[last] + score_u[last], a @ keys.transpose(1, 2))
    a = masks_o.value_a[last] + masks_u.value_a[last]
    values = (masks_o.values + masks_u.values)[:, : layout.cache(t)]
    assert torch.equal(value_o[last] + value_u[last], a @ values)
    benchmark.extra_info.update(
        {
            "bytes_up": sum(map(len, query)),
            "bytes_down": sum(map(len, reply)),
            "parts_up": len(query) - 1,
            "parts_down": len(reply) - 1,
            "steps": len(layout.steps),
            "user_query_s": query_s,
            "user_shares_s": shares_s,
        }
    )
