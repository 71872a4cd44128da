"""Token selection: the user chooses the next token from permuted logits and learns only its true id.

    in:  <z>, the logits (1, V) at scale s
    out: the user learns the chosen token id t; the owner learns nothing
    flights 1-2 (permuted_reveal): the user sees pi(z) under a fresh owner permutation pi
    user: chooses a permuted index j (argmax, or sampling: both are permutation-invariant), so that
          t = pi[j] indexes the unpermuted logits

Two ways to recover pi[j] (the `mode` of `select_token`):

"table" (the default; needs a helper). Words in Z_2^64.
    helper deals: user j* uniform in [0, V) (drawn from the user-helper stream) and K[j*];
                  K (V words, uniform in Z_2^64) comes from the owner-helper stream, so the owner
                  derives it itself and nothing is dealt to the owner
    flight 3, user -> owner:  delta = (j - j*) mod V                                8 bytes
    flight 4, owner -> user:  T[i] = pi[(i + delta) mod V] + K[i], i in [0, V)    8V bytes
    user: t = T[j*] - K[j*] = pi[(j* + delta) mod V] = pi[j]
  Views. The owner sees delta, uniform in [0, V) and independent of j (j* is uniform and unknown to
  it). The user sees T; every T[i] with i != j* is pi[...] + K[i] with K[i] uniform in Z_2^64 and
  unknown to it, a one-time pad, so the other V - 1 entries are uniform and independent of pi; the
  one entry it can unmask is pi[j]. Z_2^64 rather than Z_V: the pad is exact with the ring draws
  every protocol here already uses (no rejection sampling of V words), and T is one more ring
  message; the price is 8 bytes per entry instead of ceil(log2 V) bits.

"bfv" (kept for a future two-party mode without helper; NOT secure as it stands).
    flight 3, user -> owner:  Enc_user(one-hot(j)) (BFV ciphertexts, TenSEAL)
    flight 4, owner -> user:  Enc_user(sum_i onehot_i * pi_i) + flood = Enc_user(pi[j])
  The reply's noise flood (permllm.he) is rank one: the user, who holds the secret key, can strip it
  and recover the whole of pi, hence the unpermuted logits. It must be replaced before a helper-free
  mode uses this path (see SECURITY.md); no shipping mode uses it.

Reference: PermLLM §4.4 (the token choice under a permutation; the paper recovers the index
homomorphically, the table replaces that with helper-dealt material).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from permllm.errors import ConfigError, ProtocolError
from permllm.fixed import decode
from protocols.permute import permuted_reveal

TABLE = "table"
BFV = "bfv"
SELECTION_MODES = (TABLE, BFV)

_RING = 1 << 64


def select_token(
    ctx, logits, choose: Callable[[np.ndarray], int] | None = None, lookup=None, mode: str = TABLE
) -> int | None:
    """Run the selection; returns the token id on the user's side and None on the owner's.

    choose: user only, maps the permuted float64 logits to a permuted index.
    mode: "table" (helper-dealt material) or "bfv" (see the module docstring: not secure yet).
    lookup: "bfv" only; user: a `permllm.he.IndexLookupClient`, owner: a `permllm.he.IndexLookupServer`.
    """
    if mode not in SELECTION_MODES:
        raise ConfigError(f"unknown token selection {mode!r}; choose one of {', '.join(SELECTION_MODES)}")
    if not ctx.dealing and mode == BFV and lookup is None:
        raise ConfigError("the 'bfv' token selection needs a BFV lookup on both parties")
    if not ctx.dealing and mode == TABLE and lookup is not None:
        raise ConfigError("the 'table' token selection takes no BFV lookup (pass mode='bfv' to use one)")
    vocab = logits.shape[-1]
    flat = logits.reshape(vocab)
    if ctx.dealing:
        permuted_reveal(ctx, flat, [vocab], tag="sel")
        if mode == TABLE:
            ctx.deal(ctx.call("selection", str(vocab)), TableMask(vocab))
        return None
    revealed, pi = permuted_reveal(ctx, flat, [vocab], tag="sel")
    j = None
    if not ctx.is_owner:
        j = int(choose(decode(revealed, logits.bits).numpy().reshape(-1)))
        if not 0 <= j < vocab:
            raise ValueError(f"chosen index {j} is outside the vocabulary")
    if mode == TABLE:
        return _table_lookup(ctx, ctx.take("selection", str(vocab)), vocab, j, pi)
    return _bfv_lookup(ctx, lookup, j, pi)


def uniform_index(draw: Callable[[str, tuple], torch.Tensor], name: str, bound: int) -> int:
    """A uniform integer in [0, bound) from 64-bit words draw(f"{name}/{attempt}", (1,)), the few at or
    above the largest multiple of bound rejected (so no modulo bias)."""
    limit = _RING - _RING % bound
    attempt = 0
    while True:
        word = int(draw(f"{name}/{attempt}", (1,))[0]) % _RING
        if word < limit:
            return word % bound
        attempt += 1


@dataclass(frozen=True)
class TableMask:
    """The table choice's correlation: the user's j* uniform in [0, vocab) (from its stream) and
    K[j*], K (vocab words) the owner's (seeded from the helper; made by oblivious transfer in the
    two-party mode)."""

    vocab: int

    def deal(self, call, ctx) -> None:
        jstar = uniform_index(call.user_draw, "jstar", self.vocab)
        call.to_user("jstar", torch.tensor([jstar], dtype=torch.int64))
        call.to_user("kstar", call.owner_draw("K", (self.vocab,))[jstar : jstar + 1])


def _table_lookup(ctx, mat, vocab: int, j: int | None, pi) -> int | None:
    jstar = None
    if not ctx.is_owner:
        jstar = int(mat.dealt("jstar", (1,))[0])
        if not 0 <= jstar < vocab:
            raise ProtocolError(f"the helper dealt the index {jstar} for a vocabulary of {vocab}")
    delta = int(ctx.user_sends("sel.delta", lambda: torch.tensor([(j - jstar) % vocab]), (1,))[0])
    if not 0 <= delta < vocab:
        raise ProtocolError(f"the user sent the shift {delta} for a vocabulary of {vocab}")

    def table():
        shifted = torch.from_numpy(np.roll(pi, -delta))  # shifted[i] = pi[(i + delta) mod V]
        return shifted + mat.part("K", (vocab,))

    words = ctx.owner_sends("sel.table", table, (vocab,))
    if ctx.is_owner:
        return None
    token = int(words[jstar] - mat.dealt("kstar", (1,))[0])
    if not 0 <= token < vocab:
        raise ProtocolError(f"the owner's table unmasked to {token}, not a token id below {vocab}")
    return token


def _bfv_lookup(ctx, lookup, j: int | None, pi) -> int | None:
    """Flights 3-4 of the "bfv" mode. Its reply flood is not sufficient (module docstring)."""
    if ctx.is_owner:
        count = int(ctx.channel.recv("sel.n", dtype=np.int64, shape=(1,))[0])
        lookup.check_query_count(count, len(pi))
        query = [ctx.channel.recv_bytes(f"sel.q{i}", max_len=lookup.max_chunk_bytes) for i in range(count)]
        ctx.channel.send("sel.r", lookup.answer(query, pi))
        return None
    query = lookup.query(j)
    ctx.channel.send("sel.n", np.array([len(query)], dtype=np.int64))
    for i, chunk in enumerate(query):
        ctx.channel.send(f"sel.q{i}", chunk)
    return lookup.decode(ctx.channel.recv_bytes("sel.r", max_len=lookup.max_reply_bytes))
