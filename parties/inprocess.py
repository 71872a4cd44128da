"""Owner and user in one process (two threads over an in-memory channel), and in-process dealing.

Used by the protocol tests, the fidelity tests and the benchmarks' no-process mode. The process
launcher (`parties.launcher`) runs the same role code over ZeroMQ instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from permllm.errors import PermLLMError
from permllm.prg import fresh_seed
from permllm.transport.memory import MemoryChannel
from protocols.context import DealerContext, PartyContext, Role
from protocols.material import Dealer, QueuedMaterial


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


def deal(
    dry_run: Callable[[DealerContext], Any], seeds: Seeds, weight_mask=None
) -> tuple[QueuedMaterial, QueuedMaterial]:
    """Run the helper's dry run and hand each party its queued material."""
    dealer = Dealer(seeds.owner, seeds.user)
    dry_run(DealerContext(dealer, weight_mask or _no_weights))
    owner_records, user_records = dealer.take_records()
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


@dataclass
class LocalGeneration:
    """Result of an in-process private generation."""

    tokens: list[int]
    run: PairRun
    user_trace: Any
    dealt_calls: int


def private_generate_inprocess(
    weights,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    seeds: Seeds | None = None,
    sampling=None,
    eos_ids=frozenset(),
    wrap_channel=None,
    on_token=None,
    timeout: float = 3600.0,
    selection: str = "table",
) -> LocalGeneration:
    """Owner, user and an in-process dealer generate privately from `weights` (a DecoderWeights).

    The same code paths as the three-process demo, minus ZeroMQ: weights are folded, encoded and
    masked, the dealer runs its dry run for the whole budget, then owner and user run in two threads.
    selection: the token selection mode (`protocols.selection`); "bfv" makes a BFV key pair here."""
    from protocols.model.decoder_weights import DecoderArch, helper_weights, owner_weights, user_weight
    from protocols.model.generation import GenerationTrace, SamplingConfig, generate, token_chooser
    from protocols.model.secure_decoder import SecureDecoder

    seeds = seeds or Seeds.fresh()
    arch = DecoderArch.from_config(weights.config)
    positions = len(prompt_ids) + max_new_tokens
    owner_w = owner_weights(weights, seeds.owner)
    user_w = {name: user_weight(name, arch, w.local - w.mask) for name, w in owner_w.items()}
    masks = {name: w.mask for name, w in owner_w.items()}

    helper_decoder = SecureDecoder(arch, helper_weights(arch), positions)
    owner_mat, user_mat = deal(
        lambda ctx: generate(
            ctx, helper_decoder, prompt_len=len(prompt_ids), max_new_tokens=max_new_tokens, selection=selection
        ),
        seeds,
        weight_mask=masks.__getitem__,
    )
    dealt_calls = owner_mat.remaining
    client = server = None
    if selection == "bfv":
        from permllm.he import IndexLookupClient, IndexLookupServer

        client = IndexLookupClient(arch.vocab)
        server = IndexLookupServer(client.public_context())
    choose = token_chooser(sampling or SamplingConfig())
    trace = GenerationTrace()

    def owner(ctx):
        return generate(
            ctx,
            SecureDecoder(arch, owner_w, positions),
            prompt_len=len(prompt_ids),
            max_new_tokens=max_new_tokens,
            selection=selection,
            lookup=server,
        )

    def user(ctx):
        return generate(
            ctx,
            SecureDecoder(arch, user_w, positions),
            prompt_len=len(prompt_ids),
            max_new_tokens=max_new_tokens,
            prompt_ids=list(prompt_ids),
            eos_ids=frozenset(eos_ids),
            choose=choose,
            selection=selection,
            lookup=client,
            on_token=on_token,
            trace=trace,
        )

    run = run_pair(owner, user, owner_mat, user_mat, wrap_channel=wrap_channel, timeout=timeout)
    return LocalGeneration(tokens=run.user, run=run, user_trace=trace, dealt_calls=dealt_calls)


@dataclass
class LocalEmbedding:
    """Result of an in-process private embedding.

    embedding: (hidden,) for one sentence, (sentences, hidden) for several (float64, user side).
    run: the two-party run (traffic of all sentences together).
    dealt_calls: protocol calls the helper dealt for the session.
    """

    embedding: np.ndarray
    run: Any
    dealt_calls: int


def private_embed_inprocess(
    weights,
    token_ids,
    *,
    seeds=None,
    normalize: bool | None = None,
    wrap_channel=None,
    timeout: float = 3600.0,
) -> LocalEmbedding:
    """Owner, user and an in-process dealer embed privately with `weights` (an EncoderWeights).

    token_ids: one sentence (list of ids, special tokens included) or a list of sentences, embedded
    one after another in the same session. The same code paths as a three-party run, minus the
    network: weights are folded, encoded and masked, the dealer runs its dry run for all sentences,
    then owner and user run in two threads (`parties.inprocess.run_pair`)."""
    from protocols.model.encoder_weights import EncoderArch, helper_weights, owner_weights, user_weight
    from protocols.model.secure_encoder import SecureEncoder

    batch = len(token_ids) > 0 and not isinstance(token_ids[0], (int, np.integer))
    sentences = [list(map(int, s)) for s in token_ids] if batch else [list(map(int, token_ids))]
    if not sentences or any(len(s) == 0 for s in sentences):
        raise ValueError("every sentence needs at least one token")
    seeds = seeds or Seeds.fresh()
    arch = EncoderArch.from_config(weights.config)
    max_tokens = max(len(s) for s in sentences)
    owner_w = owner_weights(weights, seeds.owner)
    user_w = {name: user_weight(name, arch, w.local - w.mask) for name, w in owner_w.items()}
    masks = {name: w.mask for name, w in owner_w.items()}

    def session(ctx, encoder: SecureEncoder, with_tokens: bool):
        return [encoder.embed(ctx, s if with_tokens else None, len(s), normalize=normalize) for s in sentences]

    owner_mat, user_mat = deal(
        lambda ctx: session(ctx, SecureEncoder(arch, helper_weights(arch), max_tokens), False),
        seeds,
        weight_mask=masks.__getitem__,
    )
    dealt_calls = owner_mat.remaining
    run = run_pair(
        lambda ctx: session(ctx, SecureEncoder(arch, owner_w, max_tokens), False),
        lambda ctx: session(ctx, SecureEncoder(arch, user_w, max_tokens), True),
        owner_mat,
        user_mat,
        wrap_channel=wrap_channel,
        timeout=timeout,
    )
    embedding = np.stack(run.user) if batch else run.user[0]
    return LocalEmbedding(embedding=embedding, run=run, dealt_calls=dealt_calls)
