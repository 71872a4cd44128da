"""Owner and user in one process (two threads over an in-memory channel), and in-process dealing.

The building blocks of the protocol tests and of `parties.session` (whole model sessions in one
process). The process launcher (`parties.launcher`) runs the same role code over ZeroMQ instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from permllm.errors import PermLLMError
from permllm.prg import fresh_seed
from permllm.transport.memory import MemoryChannel
from protocols.context import DealerContext, PartyContext, Role
from protocols.material import Dealer, MaterialRecord, QueuedMaterial


@dataclass
class PairRun:
    """What a two-party run returns: each role's result and the traffic it caused."""

    owner: Any
    user: Any
    flights: int
    bytes_owner_to_user: int
    bytes_user_to_owner: int
    messages: int

    @property
    def bytes_total(self) -> int:
        return self.bytes_owner_to_user + self.bytes_user_to_owner


@dataclass
class Seeds:
    owner: bytes
    user: bytes

    @staticmethod
    def fresh() -> Seeds:
        return Seeds(fresh_seed(), fresh_seed())


def deal_records(
    dry_run: Callable[[DealerContext], Any], seeds: Seeds, weight_mask=None
) -> tuple[list[MaterialRecord], list[MaterialRecord]]:
    """Run the helper's dry run; returns the (owner, user) records it dealt, one pair per protocol call."""
    dealer = Dealer(seeds.owner, seeds.user)
    dry_run(DealerContext(dealer, weight_mask or _no_weights))
    return dealer.take_records()


def deal(
    dry_run: Callable[[DealerContext], Any], seeds: Seeds, weight_mask=None
) -> tuple[QueuedMaterial, QueuedMaterial]:
    """Run the helper's dry run and hand each party its queued material."""
    owner_records, user_records = deal_records(dry_run, seeds, weight_mask)
    return QueuedMaterial(seeds.owner, owner_records), QueuedMaterial(seeds.user, user_records)


def _no_weights(name: str):
    raise PermLLMError(f"the dry run asked for the mask of weight {name!r} but none was configured")


class PartyFailed(PermLLMError):
    """A party's thread raised; the message says which party and why."""


def run_pair(
    owner: Callable[[PartyContext], Any],
    user: Callable[[PartyContext], Any],
    owner_material,
    user_material,
    *,
    wrap_channel: Callable | None = None,
    timeout: float = 120.0,
) -> PairRun:
    """Run owner(ctx) and user(ctx) concurrently over a fresh in-memory channel pair.

    wrap_channel(channel) may wrap each party's channel (e.g. in netsim). The first exception of
    either party is re-raised after both threads stop (the other side sees the channel closed)."""
    owner_channel, user_channel = MemoryChannel.pair("owner", "user", timeout=timeout)
    channels = {Role.OWNER: owner_channel, Role.USER: user_channel}
    if wrap_channel is not None:
        channels = {role: wrap_channel(ch) for role, ch in channels.items()}
    contexts = {
        Role.OWNER: PartyContext(Role.OWNER, channels[Role.OWNER], owner_material),
        Role.USER: PartyContext(Role.USER, channels[Role.USER], user_material),
    }
    results: dict[Role, Any] = {}
    errors: dict[Role, BaseException] = {}

    def target(role: Role, fn):
        try:
            results[role] = fn(contexts[role])
        except BaseException as exc:  # re-raised in the caller's thread below
            errors[role] = exc
            channels[role].close()

    threads = [
        threading.Thread(target=target, args=(Role.OWNER, owner), name="owner", daemon=True),
        threading.Thread(target=target, args=(Role.USER, user), name="user", daemon=True),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if any(t.is_alive() for t in threads):
        for ch in channels.values():
            ch.close()
        raise PartyFailed(f"a party did not finish within {timeout} s")
    if errors:
        role, exc = next(iter(errors.items()))
        if isinstance(exc, PermLLMError) or isinstance(exc, (ValueError, OverflowError)):
            raise exc
        raise PartyFailed(f"the {role.value} failed: {exc!r}") from exc
    o_stats, u_stats = channels[Role.OWNER].stats, channels[Role.USER].stats
    return PairRun(
        owner=results[Role.OWNER],
        user=results[Role.USER],
        flights=max(channels[Role.OWNER].clock.depth, channels[Role.USER].clock.depth),
        bytes_owner_to_user=o_stats.bytes_sent,
        bytes_user_to_owner=u_stats.bytes_sent,
        messages=o_stats.messages_sent + u_stats.messages_sent,
    )
