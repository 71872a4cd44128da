"""Shared helpers for protocol tests: seeded shares, exact wire sizes, one-call runs."""

from __future__ import annotations

import math

import torch

from parties.inprocess import Seeds, deal, run_pair
from permllm.sharing import Shared
from permllm.transport.frames import header_length

SEEDS = Seeds(owner=bytes(range(16)), user=bytes(range(16, 32)))


def wire_bytes(tag: str, shape) -> int:
    """Exact serialized size of one int64 message: frame header plus payload."""
    return header_length(len(tag), len(shape)) + 8 * math.prod(shape)


def random_ring(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, shape, generator=g, dtype=torch.int64)


def share(x: torch.Tensor, bits: int, seed: int, *, dealt_user_share: bool = False):
    """(owner Shared, user Shared) of the ring tensor x with a seeded mask."""
    mask = random_ring(tuple(x.shape), seed)
    return Shared.of(x - mask, bits, dealt=dealt_user_share), Shared.of(mask, bits, dealt=dealt_user_share)


HELPER = "helper"
TWO_PARTY = "two-party"
PROVIDERS = (HELPER, TWO_PARTY)


def two_party_material(program, seeds=SEEDS, *, owner_weights=None, runners=None):
    """Plan `program` (a dry run) on both sides, then make each party's material with the other, no
    helper; returns (owner material, user material, the offline PairRun). runners(ctx) -> the
    two-party runs (default: oblivious transfer and BFV)."""
    from protocols.two_party.plan import plan_session
    from protocols.two_party.provider import make_material

    def side(seed, weights):
        def make(ctx):
            plan = plan_session(program)
            return make_material(ctx, plan, seed, weights=weights, runners=None if runners is None else runners(ctx))

        return make

    offline = run_pair(side(seeds.owner, owner_weights or {}), side(seeds.user, None), None, None)
    return offline.owner, offline.user, offline


def run_call(
    call,
    owner_input,
    user_input,
    dry_input,
    *,
    seeds=SEEDS,
    weight_mask=None,
    provider=HELPER,
    owner_weights=None,
    runners=None,
):
    """Make the material for one protocol call (the helper deals it, or owner and user make it with
    `provider="two-party"`), then run it with both parties; returns the online PairRun."""
    if provider == TWO_PARTY:
        owner_mat, user_mat, _ = two_party_material(
            lambda ctx: call(ctx, dry_input), seeds, owner_weights=owner_weights, runners=runners
        )
    else:
        owner_mat, user_mat = deal(lambda ctx: call(ctx, dry_input), seeds, weight_mask)
    run = run_pair(lambda ctx: call(ctx, owner_input), lambda ctx: call(ctx, user_input), owner_mat, user_mat)
    assert owner_mat.remaining == 0 and user_mat.remaining == 0
    return run
