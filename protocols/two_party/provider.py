"""The two-party material provider: owner and user make a session's correlations with no helper.

Both parties call `make_material(ctx, plan, seed, ...)` with the same plan (`protocols.two_party.plan`)
and their own seed; it returns the party's `QueuedMaterial`, which the online protocols consume exactly
as they consume the helper's. Every correlation the helper would deal from both seeds is made instead
by a two-party run between owner and user (`Runners`), in five stages, each one batch over the session:

1. permutations (`PermutationMask`): user a (its seeded draw), owner pi (its seeded permutation, or its
   inverse for a re-share) -> owner b (replaces its seeded b), user out = pi(a) - b (dealt);
   oblivious switching networks (`ot_runs.permutation_correlations`).
2. linear layers (`LinearMask`): the user's v (seeded, or a dealt c2 of stage 1) and the owner's W
   -> owner R, user v @ W - R (`he_runs.linear_correlations`, BFV). The owner's M is R and the user
   keeps v @ W - R as its precomputed share (`linear.keep_user_term`): the online linear protocol is
   unchanged and its check still holds, y_o + y_u = (x - v) W + R + v W - R = x W. No W - U is ever
   sent: the two-party mode needs no preparation traffic and no masked model at the user.
3. appending products (`ProductMask`), per growing operand: both halves of A and B from each party's
   seeded draws -> owner C_o (replaces its seeded C), user C_u (dealt), C_o + C_u = A op(B)
   (`he_runs.product_correlations`, BFV, a whole session's steps at once).
4. truncations (`TruncationMask`): the holder's r (seeded) -> one random OT per element with the
   holder choosing rho = bit 63 of r: the other party's k0, k1, the holder's k_rho
   (`ot_runs.random_ots`).
5. token choices (`TableMask`): the user's j* (from its stream, as the helper draws it) -> owner K,
   user K[j*] (`ot_runs.table_correlations`).

What each party sees is what those runs show it (their modules state it); no stage depends on data.
Reference: the helper's formulas are each request's `deal`; the stages produce the same correlations.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from permllm.errors import MaterialMismatch
from permllm.prg import Prg, PrgKey
from permllm.ring import top_bit
from protocols.beaver import ProductMask
from protocols.context import Role
from protocols.linear import LinearMask, keep_user_term
from protocols.material import MaterialRecord, QueuedMaterial
from protocols.permute import PermutationMask
from protocols.selection import TableMask, uniform_index
from protocols.trunc import TruncationMask
from protocols.two_party.plan import PlanContext


class Runners(Protocol):
    """The two-party runs the provider needs; both roles call each with their own arguments."""

    def permutations(self, perms, inputs, shapes) -> list[torch.Tensor]: ...

    def linear(self, requests) -> list[torch.Tensor]: ...

    def products(self, transpose: bool, a_parts, b_parts) -> list[torch.Tensor]: ...

    def random_ots(self, chooser: Role, choices, count: int): ...

    def tables(self, vocab: int, jstars, steps: int) -> list[torch.Tensor]: ...


class _Draws:
    """This party's seeded streams, named as protocols.material names them."""

    def __init__(self, seed: bytes):
        self.key = PrgKey(seed)

    def int64(self, index: int, name: str, shape) -> torch.Tensor:
        return Prg(self.key, f"{index}/{name}").int64(tuple(shape))

    def permutation(self, index: int, name: str, lengths) -> np.ndarray:
        return Prg(self.key, f"{index}/{name}").segment_permutation(list(lengths))


@dataclass
class LinearJob:
    """One weight's stacked linear correlation: the user's v (rows x d_in), the owner's w (d_in x d_out)."""

    rows: int
    d_in: int
    d_out: int
    v: torch.Tensor | None = None
    w: torch.Tensor | None = None


def _of(plan: PlanContext, kind: type) -> list[tuple[int, object]]:
    return [(call.index, r) for call in plan.calls for r in call.requests if isinstance(r, kind)]


def _gather_index(mask: PermutationMask, pi: np.ndarray) -> np.ndarray:
    """pi as a gather index (pi(t) = t[index]); for a re-share the inverse (scatter by pi)."""
    if not mask.inverse:
        return pi
    inverse = np.empty_like(pi)
    inverse[pi] = np.arange(len(pi), dtype=pi.dtype)
    return inverse


def make_material(
    ctx,
    plan: PlanContext,
    seed: bytes,
    *,
    weights: dict | None = None,
    runners: Runners | None = None,
    progress: Callable[[str], None] | None = None,
) -> QueuedMaterial:
    """This party's material for `plan`, made with the other party (see the module docstring).

    ctx: this party's PartyContext (role and channel; its material is not used).
    seed: this party's own 16-byte seed (nobody else holds it): its seeded draws and its OT randomness.
    weights: owner only, its LinearWeights by name (W as int32 or int64).
    runners: the two-party runs (default: oblivious transfer and BFV between the two parties).
    progress(stage): called as each stage starts."""
    owner = ctx.is_owner
    if owner and weights is None:
        raise MaterialMismatch("the owner's two-party material needs its weights")
    if runners is None:
        from protocols.two_party.runners import TwoPartyRunners

        runners = TwoPartyRunners(ctx, seed)
    draws = _Draws(seed)
    records = {call.index: MaterialRecord(call.index, call.kind, call.key) for call in plan.calls}
    kept: dict[int, tuple] = {}
    say = progress or (lambda stage: None)

    say("permutations")
    dealt = _permutations(owner, plan, draws, runners, records)
    say("linear")
    _linear(owner, plan, draws, runners, records, kept, weights, dealt)
    say("products")
    _products(owner, plan, draws, runners, records)
    say("truncations")
    _truncations(ctx.role, plan, draws, runners, records)
    say("tables")
    _tables(owner, plan, draws, runners, records)

    queue = QueuedMaterial(seed, [records[call.index] for call in plan.calls])
    for material in queue.pending():
        if material.index in kept:
            keep_user_term(material, *kept[material.index])
    return queue


def _permutations(owner: bool, plan, draws: _Draws, runners, records) -> torch.Tensor | None:
    """Stage 1. Returns, on the user's side, every dealt output's entries in plan order (the values the
    plan's dealt positions point at)."""
    masks = _of(plan, PermutationMask)
    if not masks:
        return None
    shapes = [tuple(m.shape) for _, m in masks]
    if owner:
        perms = [_gather_index(m, draws.permutation(i, m.pi, m.lengths)) for i, m in masks]
        for (i, m), b in zip(masks, runners.permutations(perms, None, shapes)):
            records[i].tensors[m.b] = b.contiguous()
        return None
    inputs = [draws.int64(i, m.a, m.shape) for i, m in masks]
    outs = runners.permutations(None, inputs, shapes)
    by_call = {}
    for (i, m), out in zip(masks, outs):
        records[i].tensors[m.out] = out.contiguous()
        by_call[(i, m.out)] = out
    flat = torch.empty(plan.dealt_entries, dtype=torch.int64)
    for share in plan.dealt:
        out = by_call[(share.index, share.name)].reshape(-1)
        flat[share.first : share.first + out.numel()] = out
    return flat


def _linear(owner: bool, plan, draws: _Draws, runners, records, kept, weights, dealt) -> None:
    """Stage 2: one stacked request per weight (all its calls' rows), all weights in one run."""
    by_weight: dict[str, list[tuple[int, LinearMask]]] = defaultdict(list)
    for i, m in _of(plan, LinearMask):
        by_weight[m.weight].append((i, m))
    if not by_weight:
        return
    names = list(by_weight)
    requests = []
    inputs: dict[str, list[torch.Tensor]] = {}
    for name in names:
        calls = by_weight[name]
        rows = sum(m.rows for _, m in calls)
        d_in, d_out = calls[0][1].d_in, calls[0][1].d_out
        if owner:
            weight = weights.get(name)
            if weight is None or weight.local is None:
                raise MaterialMismatch(f"the owner holds no weight {name!r} for the two-party linear correlation")
            requests.append(LinearJob(rows, d_in, d_out, v=None, w=weight.local))
        else:
            vs = [
                draws.int64(i, "v", (m.rows, m.d_in)) if m.v is None else dealt[m.v.reshape(-1)].reshape(m.v.shape)
                for i, m in calls
            ]
            inputs[name] = vs
            requests.append(LinearJob(rows, d_in, d_out, v=torch.cat(vs), w=None))
    for name, share in zip(names, runners.linear(requests)):
        first = 0
        for k, (i, m) in enumerate(by_weight[name]):
            part = share[first : first + m.rows].contiguous()
            first += m.rows
            if owner:
                records[i].tensors["M"] = part
            else:
                kept[i] = (part, None if m.v is None else inputs[name][k])


def _products(owner: bool, plan, draws: _Draws, runners, records) -> None:
    """Stage 3: one run per growing operand (a layer's keys or values), all its steps at once."""
    by_cache: dict[str, list[tuple[int, ProductMask]]] = defaultdict(list)
    for i, m in _of(plan, ProductMask):
        by_cache[m.cache.name].append((i, m))
    for calls in by_cache.values():
        a_parts = [draws.int64(i, "A", m.x_shape) for i, m in calls]
        b_parts = [draws.int64(i, "B", m.y_shape) for i, m in calls]
        shares = runners.products(calls[0][1].cache.transpose, a_parts, b_parts)
        for (i, _), c in zip(calls, shares):
            records[i].tensors["C"] = c.contiguous()


def _truncations(role: Role, plan, draws: _Draws, runners, records) -> None:
    """Stage 4: per holder, one batch of random OTs, the holder choosing the top bits of its r."""
    masks = _of(plan, TruncationMask)
    for holder in (Role.USER, Role.OWNER):
        mine = [(i, m) for i, m in masks if m.holder is holder]
        if not mine:
            continue
        sizes = [int(np.prod(m.shape)) for _, m in mine]
        if role is holder:
            rho = torch.cat([top_bit(draws.int64(i, "r", m.shape)).reshape(-1) for i, m in mine])
            pads = runners.random_ots(holder, rho.to(torch.uint8).numpy(), sum(sizes))
            parts = {"krho": pads}
        else:
            k0, k1 = runners.random_ots(holder, None, sum(sizes))
            parts = {"k0": k0, "k1": k1}
        first = 0
        for (i, m), size in zip(mine, sizes):
            for name, pad in parts.items():
                records[i].tensors[name] = pad[first : first + size].reshape(m.shape).contiguous()
            first += size


def _tables(owner: bool, plan, draws: _Draws, runners, records) -> None:
    """Stage 5: every token choice's table correlation in one run."""
    masks = _of(plan, TableMask)
    if not masks:
        return
    vocab = masks[0][1].vocab
    if any(m.vocab != vocab for _, m in masks):
        raise MaterialMismatch("the plan's token choices differ in vocabulary size")
    jstars = None
    if not owner:
        jstars = [uniform_index(lambda name, shape, i=i: draws.int64(i, name, shape), "jstar", vocab) for i, _ in masks]
    out = runners.tables(vocab, jstars, len(masks))
    for k, ((i, _), value) in enumerate(zip(masks, out)):
        if owner:
            records[i].tensors["K"] = value.contiguous()
        else:
            records[i].tensors["jstar"] = torch.tensor([jstars[k]], dtype=torch.int64)
            records[i].tensors["kstar"] = value.reshape(1).contiguous()
