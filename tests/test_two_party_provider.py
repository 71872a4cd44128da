"""The two-party material provider: the online protocols run unchanged on material made without a helper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from permllm.fixed import ACT_BITS, WEIGHT_BITS, decode, encode
from permllm.sharing import Shared
from protocols.beaver import GrowingOperand, product
from protocols.context import Role
from protocols.functions import SWIGLU
from protocols.linear import LinearWeight, linear
from protocols.permute import permuted_apply
from tests.clear_runners import ClearRunners
from tests.protocol_helpers import TWO_PARTY, random_ring, run_call, share


def _weights(d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    w = encode(torch.randn(d_in, d_out, generator=g, dtype=torch.float64) * 0.3, WEIGHT_BITS)
    owner = LinearWeight("w", WEIGHT_BITS, d_in, d_out, local=w.to(torch.int32))
    shape_only = LinearWeight("w", WEIGHT_BITS, d_in, d_out)
    return w, owner, shape_only


@pytest.mark.parametrize("runners", ["clear"])
def test_a_masked_linear_then_swiglu_then_a_dealt_linear_match_the_plaintext_exactly_where_exact(runners):
    m, d_in, inter = 3, 6, 5
    w1, owner_w1, shape_w1 = _weights(d_in, 2 * inter, 1)
    owner_w1.name = shape_w1.name = "up"
    w2, owner_w2, shape_w2 = _weights(inter, d_in, 2)
    owner_w2.name = shape_w2.name = "down"
    g = torch.Generator().manual_seed(3)
    x = encode(torch.randn(m, d_in, generator=g, dtype=torch.float64), ACT_BITS)
    xo, xu = share(x, ACT_BITS, seed=4)
    owner_weights = {"up": owner_w1, "down": owner_w2}
    shape_weights = {"up": shape_w1, "down": shape_w2}

    def call(ctx, inp):
        weights = shape_weights if ctx.dealing or not ctx.is_owner else owner_weights
        h = linear(ctx, inp, weights["up"])
        pairs = h.reshape(m * inter, 2)
        act = permuted_apply(ctx, pairs, SWIGLU, [m * inter])
        return h, linear(ctx, act.reshape(m, inter), weights["down"])

    run = run_call(
        call,
        xo,
        xu,
        Shared.placeholder((m, d_in), ACT_BITS),
        provider=TWO_PARTY,
        owner_weights=owner_weights,
        runners=lambda ctx: ClearRunners(ctx, seed=5),
    )
    (ho, yo), (hu, yu) = run.owner, run.user
    h = ho.local + hu.local
    assert torch.equal(h, x @ w1)  # exact mod 2^64
    pairs = decode(h, ACT_BITS + WEIGHT_BITS).numpy().reshape(m * inter, 2)
    act = encode(torch.from_numpy(pairs[:, 0] / (1 + np.exp(-pairs[:, 0])) * pairs[:, 1]), ACT_BITS)
    y = yo.local + yu.local
    # the SwiGLU output is rounded at ACT_BITS by the user: at most one unit off per entry before down
    want = act.reshape(m, inter) @ w2
    assert torch.max(torch.abs(y - want)) <= w2.abs().sum(0).max()
    # the masked linear's message leaves with the step's mask (one hop), then 2 more; the dealt linear sends nothing
    assert run.flights == 3


def test_the_appending_products_match_exactly_with_two_party_material():
    groups, d = 2, 4
    rng = iter(range(100, 200))
    steps = [(3, 3), (1, 1)]
    inputs, rows = [], 0
    for m_new, mx in steps:
        rows += m_new
        inputs.append((random_ring((groups, mx, d), next(rng)) >> 40, random_ring((groups, m_new, d), next(rng)) >> 40))

    def session(ctx, shares):
        cache = GrowingOperand("k", True)
        return [product(ctx, x, y, cache) for x, y in shares]

    owner_in, user_in, dry_in = [], [], []
    for x, y in inputs:
        xo, xu = share(x, 16, next(rng))
        yo, yu = share(y, 16, next(rng))
        owner_in.append((xo, yo))
        user_in.append((xu, yu))
        dry_in.append((Shared.placeholder(x.shape, 16), Shared.placeholder(y.shape, 16)))
    run = run_call(session, owner_in, user_in, dry_in, provider=TWO_PARTY, runners=lambda ctx: ClearRunners(ctx, 6))
    y_full = None
    for (x, y), zo, zu in zip(inputs, run.owner, run.user):
        y_full = y if y_full is None else torch.cat([y_full, y], dim=1)
        assert torch.equal(zo.local + zu.local, x @ y_full.transpose(-1, -2))
    assert run.flights == len(steps)


def test_role_enum_is_what_the_runners_compare():
    assert Role("owner") is Role.OWNER
