"""Benchmarks for protocols.two_party.he_runs (owner and user over an in-memory channel, no helper).

Run:  pytest bench/test_bench_two_party_he.py --benchmark-only
      (add --benchmark-json=out.json to keep `extra_info`).

Cases on SmolLM2-135M shapes (d = 576, 9 heads of 64, 3 KV heads, MLP 1536, vocabulary 49152):
one decoder layer's four linear weights (q|k|v 576 x 960, o 576 x 576, gate|up 576 x 3072,
down 1536 x 576) in one linear_correlations call at T = 81 session rows (a 49-token prompt and 32
generated), and lm_head (576 x 49152) at T = 32. Weights are 13-bit fixed-point integers (one limb).
The timed part is the whole run (both roles in two threads, keys and context included); `extra_info`
has each role's thread CPU seconds (its own work, not its waiting) and MB each way.
"""

from __future__ import annotations

import time

import pytest
import torch

from parties.inprocess import run_pair
from protocols.two_party.he_runs import HeSession, LinearRequest, linear_correlations

D, MLP, VOCAB = 576, 1536, 49152
CASES = {
    "layer-4-weights-T81": (81, [(D, 960), (D, D), (D, 2 * MLP), (MLP, D)]),
    "lm_head-T32": (32, [(D, VOCAB)]),
}


@pytest.mark.parametrize("name", CASES)
def test_linear_correlations(benchmark, name):
    rows, shapes = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    weights = [torch.randint(-(2**12), 2**12, s, dtype=torch.int64, generator=g) for s in shapes]
    inputs = [torch.randint(-(2**63), 2**63 - 1, (rows, n), dtype=torch.int64, generator=g) for n, _ in shapes]
    cpu = {}

    def role(name, make):
        def fn(ctx):
            start = time.thread_time()
            out = linear_correlations(HeSession(ctx), make())
            cpu[name] = time.thread_time() - start
            return out

        return fn

    owner = role("owner", lambda: [LinearRequest(rows, n, m, w=w) for (n, m), w in zip(shapes, weights)])
    user = role("user", lambda: [LinearRequest(rows, n, m, v=v) for (n, m), v in zip(shapes, inputs)])
    run = benchmark.pedantic(lambda: run_pair(owner, user, None, None, timeout=3600), rounds=1, iterations=1)
    for R, U, v, w in zip(run.owner, run.user, inputs, weights):
        assert torch.equal(R[:2] + U[:2], v[:2] @ w)  # a spot check: two rows
    benchmark.extra_info.update(
        {
            "owner_cpu_s": cpu["owner"],
            "user_cpu_s": cpu["user"],
            "mb_up": run.bytes_user_to_owner / 1e6,
            "mb_down": run.bytes_owner_to_user / 1e6,
            "flights": run.flights,
        }
    )
