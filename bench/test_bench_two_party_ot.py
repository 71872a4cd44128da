"""protocols.two_party.ot_runs: random OTs and table correlations between owner and user in one process.

    PYTHONPATH=. python -m pytest bench/test_bench_two_party_ot.py --benchmark-only

random_ots is measured at 2^20 OTs (one SmolLM2-135M session's truncations need about 3.7M: the cost
is linear in the count, U is 16 bytes per OT, so about 3.5 x these figures, in batches of at most 2^22);
table_correlations at vocab 49152 x 32 steps (16 OTs per step, the owner evaluates 49152 x 16 AES
blocks per step). The timed figure is one whole run on one machine (2 CPU cores shared), and it
includes the base OTs of both directions (run first; their bytes are left out of the byte counts).
"""

from __future__ import annotations

import numpy as np
import pytest

from parties.inprocess import run_pair
from permllm.prg import Prg
from protocols.context import Role
from protocols.two_party.ot_runs import OtSession, random_ots, table_correlations

COUNT = 1 << 20
VOCAB, STEPS = 49152, 32


def _measure(benchmark, owner_work, user_work):
    stats = {}

    def owner(ctx):
        s = OtSession(ctx, bytes(16))
        random_ots(s, Role.USER, None, 1)  # base OTs of both directions (outside the byte counts)
        random_ots(s, Role.OWNER, np.zeros(1, dtype=np.uint8), 1)
        start = ctx.channel.stats.bytes_sent
        owner_work(s)
        return ctx.channel.stats.bytes_sent - start

    def user(ctx):
        s = OtSession(ctx, bytes(range(16)))
        random_ots(s, Role.USER, np.zeros(1, dtype=np.uint8), 1)
        random_ots(s, Role.OWNER, None, 1)
        start = ctx.channel.stats.bytes_sent
        user_work(s)
        return ctx.channel.stats.bytes_sent - start

    def once():
        run = run_pair(owner, user, None, None, timeout=600)
        stats.update(bytes_owner_to_user=run.owner, bytes_user_to_owner=run.user)

    benchmark.pedantic(once, rounds=1, iterations=1)
    benchmark.extra_info.update(stats)


@pytest.mark.parametrize("chooser", [Role.OWNER, Role.USER])
def test_random_ots(benchmark, chooser):
    choices = (np.frombuffer(Prg(bytes(16), "bench").bytes(COUNT), dtype=np.uint8) & 1).astype(np.uint8)
    if chooser is Role.OWNER:
        _measure(
            benchmark, lambda s: random_ots(s, chooser, choices, COUNT), lambda s: random_ots(s, chooser, None, COUNT)
        )
    else:
        _measure(
            benchmark, lambda s: random_ots(s, chooser, None, COUNT), lambda s: random_ots(s, chooser, choices, COUNT)
        )


def test_table_correlations(benchmark):
    jstars = [int(j) for j in Prg(bytes(16), "jstars").uint64(STEPS) % VOCAB]
    _measure(
        benchmark,
        lambda s: table_correlations(s, VOCAB, None, STEPS),
        lambda s: table_correlations(s, VOCAB, jstars, STEPS),
    )
