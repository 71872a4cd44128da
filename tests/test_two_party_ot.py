"""protocols.two_party.ot_runs: random OTs both ways, table correlations, permutation correlations.

Seeded party seeds and inputs; ring values compared exactly; every run's flights and bytes asserted.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from parties.inprocess import run_pair
from permllm.errors import ProtocolError
from permllm.kernels import gather_rows
from permllm.ot import matrix_bytes
from permllm.ot_shuffle import query_bytes, reply_bytes
from permllm.prg import Prg
from protocols.context import Role
from protocols.two_party.ot_runs import OtSession, permutation_correlations, random_ots, table_correlations

OWNER_SEED, USER_SEED = bytes(range(16, 32)), bytes(range(16))
REQUEST, REPLY = 7 + 128 * 384, 7 + 384


def _frame(tag: str, nbytes: int) -> int:
    """Bytes of one raw-bytes frame: 28-byte fixed header, one dimension, the tag, the payload."""
    return 28 + 8 + len(tag) + nbytes


def _bits(seed: int, m: int) -> np.ndarray:
    return (np.frombuffer(Prg(bytes(16), f"bits/{seed}").bytes(m), dtype=np.uint8) & 1).astype(np.uint8)


def _pair(owner_fn, user_fn):
    def owner(ctx):
        return owner_fn(OtSession(ctx, OWNER_SEED))

    def user(ctx):
        return user_fn(OtSession(ctx, USER_SEED))

    return run_pair(owner, user, None, None)


def test_random_ots_both_directions_in_one_session():
    m0, m1 = 1000, 77
    c0, c1 = _bits(0, m0), _bits(1, m1)

    def owner(s):
        return random_ots(s, Role.OWNER, c0, m0), random_ots(s, Role.USER, None, m1), random_ots(s, Role.OWNER, c0, m0)

    def user(s):
        return (
            random_ots(s, Role.OWNER, None, m0),
            random_ots(s, Role.USER, c1, m1),
            random_ots(s, Role.OWNER, None, m0),
        )

    run = _pair(owner, user)
    (mine0, (k0b, k1b), again), ((k0a, k1a), mine1, (k0c, k1c)) = run.owner, run.user
    assert torch.equal(mine0, torch.where(torch.from_numpy(c0 == 1), k1a, k0a))
    assert torch.equal(mine1, torch.where(torch.from_numpy(c1 == 1), k1b, k0b))
    assert torch.equal(again, torch.where(torch.from_numpy(c0 == 1), k1c, k0c))
    assert not torch.equal(again, mine0)  # a fresh batch
    assert bool((k0a != k1a).all()) and bool((k0b != k1b).all())
    assert mine0.dtype == torch.int64 and mine0.shape == (m0,)
    # flights: req (u->o) | rep + U + the other direction's req (o->u) | rep + U (u->o) | U (o->u)
    assert run.flights == 4
    assert run.bytes_owner_to_user == (
        _frame("ot.base.0.rep", REPLY)
        + _frame("ot.u.0", matrix_bytes(m0))
        + _frame("ot.base.1.req", REQUEST)
        + _frame("ot.u.2", matrix_bytes(m0))
    )
    assert run.bytes_user_to_owner == (
        _frame("ot.base.0.req", REQUEST) + _frame("ot.base.1.rep", REPLY) + _frame("ot.u.1", matrix_bytes(m1))
    )


def test_bad_peer_bytes_are_protocol_errors():
    def owner(s):
        random_ots(s, Role.OWNER, _bits(2, 64), 64)
        s.ctx.channel.send("ot.u.2", b"short")  # U of 5 bytes for a batch of 64 OTs

    def user(s):
        random_ots(s, Role.OWNER, None, 64)
        return random_ots(s, Role.OWNER, None, 64)

    with pytest.raises(ProtocolError, match="matrix has 5 bytes"):
        _pair(owner, user)

    def bad_base(s):
        s.ctx.channel.recv_bytes("ot.base.0.req", max_len=10**6)
        s.ctx.channel.send("ot.base.0.rep", b"\x00" * REPLY)

    with pytest.raises(ProtocolError, match="header"):
        _pair(bad_base, lambda s: random_ots(s, Role.OWNER, None, 8))


# -- table -----------------------------------------------------------------------------------------


def _table_run(vocab, jstars):
    return _pair(
        lambda s: table_correlations(s, vocab, None, len(jstars)),
        lambda s: table_correlations(s, vocab, jstars, len(jstars)),
    )


def test_table_correlations_agree_at_jstar_and_cost_one_flight():
    vocab, jstars = 1000, [0, 999, 517, 3]
    run = _table_run(vocab, jstars)
    b = math.ceil(math.log2(vocab))
    assert len(run.owner) == len(run.user) == len(jstars)
    for table, mine, j in zip(run.owner, run.user, jstars):
        assert table.shape == (vocab,) and table.dtype == torch.int64 and mine.shape == (1,)
        assert int(table[j]) == int(mine[0])
        assert len(set(table.tolist())) == vocab
    assert run.flights == 2
    assert run.bytes_owner_to_user == _frame("ot.base.1.req", REQUEST)
    assert run.bytes_user_to_owner == _frame("ot.base.1.rep", REPLY) + _frame("ot.u.1", matrix_bytes(b * 4))


def _linear_relation(table: torch.Tensor) -> bool:
    """K[0] + K[3] == K[1] + K[2]: holds for any per-bit word sum K[i] = sum_b w_{b, bit_b(i)}."""
    return int(table[0] + table[3]) == int(table[1] + table[2])


def test_no_linear_relation_among_the_table_entries():
    run = _table_run(64, [5, 9, 60])
    assert not any(_linear_relation(t) for t in run.owner)
    # the power check: a plain sum of per-key words has the relation
    words = torch.from_numpy(Prg(bytes(16), "words").uint64(12).view(np.int64)).reshape(6, 2)
    broken = torch.stack([sum(words[k, (i >> k) & 1] for k in range(6)) for i in range(64)])
    assert _linear_relation(broken)


def test_the_user_cannot_guess_other_entries():
    """The user's view: its pads and j*. Its best guesses for K[i], i != j*, (the sum with its own
    pads where the bits agree, and either pad in place of the one it lacks) are all wrong."""
    from protocols.two_party import ot_runs

    vocab, j = 256, 77
    seen = {}
    orig = ot_runs._random_rows

    def spy(session, chooser, choices, count):
        out = orig(session, chooser, choices, count)
        if session.role is Role.USER:
            seen["pads"] = out
        return out

    ot_runs._random_rows = spy
    try:
        run = _table_run(vocab, [j])
    finally:
        ot_runs._random_rows = orig
    (table,), pads = run.owner, seen["pads"].reshape(8, 16)
    hits = 0
    for i in range(vocab):
        if i == j:
            continue
        guess = sum(int(ot_runs._prf(pads[k].tobytes(), np.array([i], dtype=np.uint64), k)[0]) for k in range(8))
        hits += (guess - int(table[i].item())) % 2**64 == 0
    assert hits == 0
    guess_j = sum(int(ot_runs._prf(pads[k].tobytes(), np.array([j], dtype=np.uint64), k)[0]) for k in range(8))
    assert (guess_j - int(table[j].item())) % 2**64 == 0


def test_the_user_view_of_random_ots_misses_the_other_pad():
    c = _bits(3, 512)
    run = _pair(lambda s: random_ots(s, Role.USER, None, 512), lambda s: random_ots(s, Role.USER, c, 512))
    (k0, k1), mine = run.owner, run.user
    other = torch.where(torch.from_numpy(c == 1), k0, k1)
    assert not bool((other == mine).any())
    assert len(set(other.tolist()) & set(mine.tolist())) == 0


# -- permutations ----------------------------------------------------------------------------------


def _uniform(seed: int, *shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, shape, dtype=torch.int64, generator=g)


SHAPES = [(1, 1), (5, 2), (64, 3), (63, 1)]


def test_permutation_correlations_in_one_batch():
    perms = [Prg(OWNER_SEED, f"p/{n}").permutation(n) for n, _ in SHAPES[:3]]
    perms.append(Prg(OWNER_SEED, "seg").segment_permutation([7] * 9))
    inputs = [_uniform(i, *s) for i, s in enumerate(SHAPES)]
    run = _pair(
        lambda s: permutation_correlations(s, perms, None, SHAPES),
        lambda s: permutation_correlations(s, None, inputs, SHAPES),
    )
    for a, pi, b, share in zip(inputs, perms, run.owner, run.user):
        assert torch.equal(share + b, gather_rows(a, pi))
    assert run.flights == 3
    q, r = query_bytes(SHAPES), reply_bytes(SHAPES)
    head = 13 + 8 * len(SHAPES)
    assert run.bytes_owner_to_user == (
        _frame("ot.base.0.rep", REPLY) + _frame("ot.sq.0", head) + _frame("ot.su.0", q - head)
    )
    assert run.bytes_user_to_owner == _frame("ot.base.0.req", REQUEST) + 3 * _frame("ot.sr0.0", 0) + r


def test_permutation_chunks_are_pipelined(monkeypatch):
    """Batches over CHUNK_BYTES split into chunks: all queries, then all replies (still two flights
    once the base OTs exist)."""
    from protocols.two_party import ot_runs

    monkeypatch.setattr(ot_runs, "CHUNK_BYTES", 4000)
    shapes = [(64, 2), (64, 2), (30, 1)]
    perms = [Prg(OWNER_SEED, f"c/{i}").permutation(n) for i, (n, _) in enumerate(shapes)]
    inputs = [_uniform(10 + i, *s) for i, s in enumerate(shapes)]
    assert len(ot_runs._chunks(shapes)) == 3
    run = _pair(
        lambda s: permutation_correlations(s, perms, None, shapes),
        lambda s: permutation_correlations(s, None, inputs, shapes),
    )
    for a, pi, b, share in zip(inputs, perms, run.owner, run.user):
        assert torch.equal(share + b, gather_rows(a, pi))
    assert run.flights == 3
    assert run.messages == 2 + 3 * 2 + 3 * 3
