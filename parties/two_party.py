"""The two-party mode's offline phase at the owner and the user: their material, made together, no helper.

Both parties plan the session (`protocols.two_party.plan`: the helper's dry run of the same program,
on shape-only weights, so both get the same plan) and then make their material with each other over
their own channel (`protocols.two_party.provider.make_material`): the owner brings its weights W, the
user nothing but its fresh seed. No W - U is ever sent and the user holds no masked model; its online
driver runs on shape-only weights, every linear share having been kept by the provider.

The runs of the provider (oblivious transfer and BFV) can take minutes on a real model, so each receive
of the offline phase waits up to `MATERIAL_TIMEOUT_S` (or the set-up timeout when longer), never without
bound. The online phase keeps the channel's own timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from permllm.prg import fresh_seed
from permllm.transport.wrapper import WrappingChannel
from protocols.context import PartyContext

MATERIAL_TIMEOUT_S = 3600.0
"""The longest one receive of the two-party offline phase waits for the other party (seconds)."""

STAGES = ("permutations", "linear", "products", "truncations", "tables")
"""The provider's stages, in order (each announced by a progress line)."""


class PatientChannel(WrappingChannel):
    """`inner` with a longer default receive timeout: the offline phase's view of the session channel.
    Never closed itself (closing it would close the session's channel)."""

    def __init__(self, inner, timeout: float):
        super().__init__(inner)
        self.wait_s = max(float(timeout), inner.timeout)

    def _receive(self, tag: str, timeout: float | None):
        return self._inner._receive(tag, self.wait_s if timeout is None else timeout)


@dataclass
class OfflineRun:
    """What a party's two-party offline phase returns: its material, the seconds it took, the bytes it
    sent and received on the session channel, and the protocol calls the material covers."""

    material: object
    seconds: float
    bytes_sent: int
    bytes_received: int
    calls: int


def make_two_party_material(
    role,
    channel,
    fam,
    arch,
    plan,
    *,
    weights=None,
    runners=None,
    log=print,
    who: str = "",
    setup_timeout: float = 0.0,
) -> OfflineRun:
    """This party's material for `plan` (a `parties.handshake.Plan`), made with the other party over
    `channel`. weights: the owner's LinearWeights by name (None at the user). runners(ctx): the two-party
    runs to use (None: oblivious transfer and BFV). log: gets "WHO: making material (two-party): STAGE"
    as each stage starts."""
    from protocols.two_party.plan import plan_session
    from protocols.two_party.provider import make_material

    capacity = plan.prompt_tokens + plan.max_new_tokens
    start = time.perf_counter()
    sent, received = channel.stats.bytes_sent, channel.stats.bytes_received
    planned = plan_session(
        lambda pctx: fam.run_session(pctx, fam.driver(arch, fam.helper_weights(arch), capacity), plan)
    )
    ctx = PartyContext(role, PatientChannel(channel, max(MATERIAL_TIMEOUT_S, setup_timeout)), None)
    material = make_material(
        ctx,
        planned,
        fresh_seed(),
        weights=weights,
        runners=None if runners is None else runners(ctx),
        progress=lambda stage: log(f"{who}: making material (two-party): {stage}"),
    )
    return OfflineRun(
        material,
        time.perf_counter() - start,
        channel.stats.bytes_sent - sent,
        channel.stats.bytes_received - received,
        material.remaining,
    )
