"""Token selection: the user chooses the next token from permuted logits; BFV recovers its id.

    in:  <z>, the logits (1, vocab) at scale s
    out: the user learns the chosen token id t; the owner learns nothing
    flights 1-2 (permuted_reveal): the user sees pi(z) under a fresh owner permutation pi
    user: chooses a permuted index j (argmax, or sampling: both are permutation-invariant)
    flight 3, user -> owner: Enc_user(one-hot(j)) (BFV ciphertexts, TenSEAL)
    flight 4, owner -> user: Enc_user(sum_i onehot_i * pi_i) = Enc_user(pi[j])
    user: t = Dec(...) = pi[j], the true token id (pi[j] indexes the unpermuted logits)
The owner sees only ciphertexts under the user's key; the user sees pi(z) and pi[j], never pi.
Reference: PermLLM §4.4 (the token choice under a permutation, index recovered homomorphically).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from permllm.fixed import decode
from protocols.permute import permuted_reveal


def select_token(ctx, logits, choose: Callable[[np.ndarray], int] | None = None, lookup=None) -> int | None:
    """Run the selection; returns the token id on the user's side and None on the owner's.

    choose: user only, maps the permuted float64 logits to a permuted index.
    lookup: user: a `permllm.he.IndexLookupClient`; owner: a `permllm.he.IndexLookupServer`.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(vocab)
    if ctx.dealing:
        permuted_reveal(ctx, flat, [vocab], tag="sel")
        return None
    revealed, pi = permuted_reveal(ctx, flat, [vocab], tag="sel")
    if ctx.is_owner:
        count = int(ctx.channel.recv("sel.n", dtype=np.int64, shape=(1,))[0])
        lookup.check_query_count(count, vocab)
        query = [ctx.channel.recv_bytes(f"sel.q{i}", max_len=lookup.max_chunk_bytes) for i in range(count)]
        ctx.channel.send("sel.r", lookup.answer(query, pi))
        return None
    j = int(choose(decode(revealed, logits.bits).numpy().reshape(-1)))
    if not 0 <= j < vocab:
        raise ValueError(f"chosen index {j} is outside the vocabulary")
    query = lookup.query(j)
    ctx.channel.send("sel.n", np.array([len(query)], dtype=np.int64))
    for i, chunk in enumerate(query):
        ctx.channel.send(f"sel.q{i}", chunk)
    return lookup.decode(ctx.channel.recv_bytes("sel.r", max_len=lookup.max_reply_bytes))
