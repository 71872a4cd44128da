"""The view tests have power: with any one mask stream zeroed, narrowed to 32 bits or reused across calls
(for every party and the helper alike, so results stay exact), the correctness tests still pass and
the view test named in tests/mutations.py CATCHERS finds a leak. Test ids read stream-mutation-catcher.

Mutations and the attack that catches each (tests/view_attacks.py):
  v      zero, reuse: linear (x_o + d = x - v, alone and across calls); narrow: embedding lookup (the
         owner's d = onehot(t) - v is no longer a one-time pad)
  s      zero, narrow: linear (d @ U + M = x_u @ U - s); reuse: embedding lookup (U[t1] - U[t2])
  U      zero, narrow: decoder session (W~ = W - U, the user's embedding rows); reuse: decoder session
         (W~_a - W~_b = W_a - W_b for same-shaped weights, e.g. L0.qkv and L1.qkv)
  r      zero, narrow: truncation (the other party's c - 2^62 = x + r, c = c_F + x_S + 2^62); reuse:
         truncation (c_1 - c_2 = x_1 - x_2)
  k0, k1 zero: truncation (the holder's d - krho = -e where rho = 1, d + krho = -e where rho = 0: the
         wrap bit e = 1 - c_63 in the clear); narrow: truncation (the dealt krho is small wherever
         it is the narrowed key); reuse: truncation (the difference of d -/+ krho across two calls is
         minus the difference of their e, and krho repeats where both calls pick the reused key)
  a      zero, narrow, reuse: permuted non-linear (x_o + d = x - a)
  a2     zero, narrow, reuse: permuted non-linear (e = pi(y) - a2)
  b, b2  zero, narrow: permuted non-linear (c1 = pi(a) - b, c2 = pi^-1(a2) - b2 are permuted copies
         of the user's draws); reuse: the same across two calls (c1_1 - c1_2 = a_1[p] - a_2[q])
  pi     zero (identity): permuted non-linear (fixed points); reuse: permuted non-linear (aligned
         revealed values); narrow does not apply to a permutation
  A, B   zero, narrow, reuse: appending product (E_X = X - A, E_Y = Y - B)
  C      zero, narrow: appending product (the user's dealt C_u = A op(B) - C_o is the product of the
         whole Beaver masks, exactly or within 2^32); reuse: the same across calls (C_u,1 - C_u,2 on
         their common prefix is the difference of the two products)
  input  zero, narrow: input sharing (x - mask); reuse does not apply (a fresh seed per call)
  a.src, b.src, pi.src  (a folded norm's reveal of its source row h) zero, narrow, reuse: the decoder
         session on the folded decode path (h_o + d' = h - a', c1' = pi'(a') - b', fixed points and
         one permutation placing pi'(h) of two layers)
The review's four defects (a zeroed, a narrowed, r narrowed, s reused) must be among the caught ones.
The sweep (54 mutations, all caught: UNCAUGHT in tests/mutations.py is empty) takes about a minute, so
it is not marked slow; it also runs as `python -m tests.mutations`.
"""

from __future__ import annotations

import pytest
import torch

from permllm.prg import Prg
from tests.mutations import CATCHERS, UNCAUGHT, all_mutations, check, mutated

CAUGHT = [pair for pair in all_mutations() if pair not in UNCAUGHT]
REVIEW_DEFECTS = [("a", "zero"), ("a", "narrow"), ("r", "narrow"), ("s", "reuse")]


def _ids(pairs):
    return [f"{n}-{k}-{CATCHERS[(n, k)].removeprefix('test_')}" for n, k in pairs]


@pytest.mark.parametrize("name,kind", CAUGHT, ids=_ids(CAUGHT))
def test_mutation_keeps_results_exact_and_a_view_test_finds_the_leak(name, kind):
    assert check(name, kind) == CATCHERS[(name, kind)]


def test_every_mutation_is_caught_or_explained():
    pairs = set(all_mutations())
    assert set(CATCHERS) | set(UNCAUGHT) == pairs
    assert not set(CATCHERS) & set(UNCAUGHT)
    assert all(UNCAUGHT.values())  # each has its reason
    assert all(defect in CATCHERS and defect not in UNCAUGHT for defect in REVIEW_DEFECTS)


def test_a_mutation_changes_only_its_stream_and_is_undone():
    seed = bytes(range(16))
    before = Prg(seed, "3/a").int64((64,))
    other = Prg(seed, "3/b").int64((64,))
    with mutated("a", "zero"):
        assert torch.equal(Prg(seed, "3/a").int64((64,)), torch.zeros(64, dtype=torch.int64))
        assert torch.equal(Prg(seed, "3/b").int64((64,)), other)
    with mutated("a", "narrow"):
        assert torch.equal(Prg(seed, "3/a").int64((64,)), before & 0xFFFFFFFF)
    with mutated("a", "reuse"):
        assert torch.equal(Prg(seed, "3/a").int64((64,)), Prg(seed, "9/a").int64((64,)))
        assert not torch.equal(Prg(seed, "3/a").int64((64,)), before)
    with mutated("U", "reuse"):
        assert torch.equal(Prg(seed, "weight/L0.o").int64((8,)), Prg(seed, "weight/L1.o").int64((8,)))
    with mutated("pi", "zero"):
        assert Prg(seed, "2/pi").segment_permutation([4, 4]).tolist() == list(range(8))
    assert torch.equal(Prg(seed, "3/a").int64((64,)), before)
    with pytest.raises(ValueError, match="no mutation"):
        with mutated("pi", "narrow"):
            pass
