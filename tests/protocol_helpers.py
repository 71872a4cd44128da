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


def run_call(call, owner_input, user_input, dry_input, *, seeds=SEEDS, weight_mask=None):
    """Deal for one protocol call, then run it with both parties; returns the PairRun."""
    owner_mat, user_mat = deal(lambda ctx: call(ctx, dry_input), seeds, weight_mask)
    run = run_pair(lambda ctx: call(ctx, owner_input), lambda ctx: call(ctx, user_input), owner_mat, user_mat)
    assert owner_mat.remaining == 0 and user_mat.remaining == 0
    return run
