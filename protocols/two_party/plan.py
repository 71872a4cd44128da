"""The two-party mode's plan: every correlation a session consumes, listed by a dry run on each party.

Owner and user run the session's program (the same `generate` / `embed` the helper dry-runs) with a
`PlanContext` before the online phase. Shapes only: no secret enters, nothing is sent, and both parties
get the same plan, call for call, because the program depends only on public sizes (prompt length,
budget, architecture). Each protocol call hands its correlation requests (`linear.LinearMask`,
`permute.PermutationMask`, `beaver.ProductMask`, `selection.TableMask`, `trunc.TruncationMask`) to
`deal`, which records them; `protocols.two_party.provider` then makes them with the other party.

A permuted step's user output (c2) feeds the next linear call as its dealt input, whose correlation
needs that c2's values, which exist only once the permutation correlations are made. In the plan the
dry run carries, in place of c2, the positions of its entries in the plan's list of dealt user shares
(`dealt_positions`); reshapes of the placeholder keep them aligned, so a linear request's `v` names
exactly which dealt entries it multiplies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from permllm.errors import ConfigError
from protocols.permute import PermutationMask


@dataclass
class PlannedCall:
    """One protocol call of the plan: its position, kind and key (as the material queue checks them)
    and the correlations it needs."""

    index: int
    kind: str
    key: str
    requests: list = field(default_factory=list)


@dataclass(frozen=True)
class DealtShare:
    """Where a request's dealt user output sits among the plan's dealt entries."""

    index: int
    name: str
    first: int
    shape: tuple


class PlanContext:
    """A dry run that records correlations instead of dealing them (see the module docstring)."""

    dealing = True

    def __init__(self):
        self.calls: list[PlannedCall] = []
        self.dealt: list[DealtShare] = []
        self.dealt_entries = 0

    def call(self, kind: str, key: str) -> PlannedCall:
        call = PlannedCall(len(self.calls), kind, key)
        self.calls.append(call)
        return call

    def deal(self, call: PlannedCall, request) -> torch.Tensor | None:
        """Record `request`; a request with a dealt user output (`request.out` of a permutation) returns
        the positions of its entries, which the dry run carries as that output."""
        call.requests.append(request)
        if not isinstance(request, PermutationMask):
            return None
        count = 1
        for d in request.shape:
            count *= int(d)
        share = DealtShare(call.index, request.out, self.dealt_entries, tuple(request.shape))
        self.dealt.append(share)
        self.dealt_entries += count
        return dealt_positions(share)

    def mask_product(self, name: str, v):
        raise ConfigError("the two-party plan records linear correlations; it never multiplies by a mask")


def dealt_positions(share: DealtShare) -> torch.Tensor:
    count = 1
    for d in share.shape:
        count *= int(d)
    return torch.arange(share.first, share.first + count, dtype=torch.int64).reshape(share.shape)


def plan_session(program: Callable[[PlanContext], Any]) -> PlanContext:
    """Run `program` (the session's dry run, e.g. `generate(ctx, driver, ...)` on shape-only weights)
    under a PlanContext and return it."""
    ctx = PlanContext()
    program(ctx)
    return ctx
