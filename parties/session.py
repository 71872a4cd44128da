"""A whole private session in one process: prepare a model once, then run sessions on it.

`prepare_model(weights, seed)` does the per-model work of a real session's set-up: the owner folds,
encodes and masks its weights with the mask seed (W + U at the owner) and the user's side gets W - U.
`PreparedModel.session` runs one session on it: the helper's dry run deals the material (with fresh
dealer seeds unless given), then owner and user run in two threads over an in-memory channel
(`parties.inprocess.run_pair`, optionally netsim-wrapped). `generate` and `embed` are the two
sessions the roles run; the harnesses (benchmarks, fidelity) and the tests build on them.

The code paths are the three-process demo's minus ZeroMQ and the handshakes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from parties.families import Family, family
from parties.inprocess import PairRun, Seeds, deal_records, run_pair
from permllm.errors import ConfigError
from protocols.linear import precompute_user_terms
from protocols.material import QueuedMaterial
from protocols.model.decoder_weights import masked_weight

SESSION_TIMEOUT_S = 3600.0
HELPER_MODE = "helper"
TWO_PARTY_MODE = "two-party"
MODES = (HELPER_MODE, TWO_PARTY_MODE)


@dataclass
class SessionRun:
    """What one in-process session returns.

    pair: each role's result and the online traffic (flights, bytes per direction).
    dealt_call_bytes: material bytes (owner's + user's record) of every dealt protocol call, in order.
    deal_s / deal_end: the dry run's wall time and its perf_counter() end (two-party mode: the making
        of the material by both parties, plans included).
    material_left: dealt calls neither party used (generation that stopped at eos leaves some).
    offline: two-party mode only: the traffic of making the material (flights, bytes per direction).
    """

    pair: PairRun
    dealt_call_bytes: list[int]
    deal_s: float
    deal_end: float
    online_s: float
    material_left: int
    offline: PairRun | None = None

    @property
    def dealt_calls(self) -> int:
        return len(self.dealt_call_bytes)


@dataclass
class PreparedModel:
    """One model's prepared weights: the owner's W + U (`owner`), the user's W - U (`user`), the masks U
    from `seed`, and the BFV keys of the "bfv" token choice (decoders; made on first use, only in that mode)."""

    family: Family
    arch: Any
    seed: bytes
    owner: dict
    user: dict
    prepare_s: float
    _lookup: tuple | None = field(default=None, repr=False)
    _masks: dict = field(default_factory=dict, repr=False)

    def mask(self, name: str):
        """U of weight `name`, for the dealer's dry run, regenerated from the seed as the helper does
        (kept after its first use: this stands for the helper's memory, not the owner's)."""
        if name not in self._masks:
            from protocols.model.decoder_weights import weight_mask

            w = self.owner[name]
            self._masks[name] = weight_mask(self.seed, name, w.d_in, w.d_out)
        return self._masks[name]

    def lookup(self) -> tuple:
        """(IndexLookupClient, IndexLookupServer): the user's BFV keys and the owner's side of the lookup."""
        if self._lookup is None:
            from permllm.he import IndexLookupClient, IndexLookupServer

            client = IndexLookupClient(self.arch.vocab)
            self._lookup = (client, IndexLookupServer(client.public_context()))
        return self._lookup

    def session(
        self,
        capacity: int,
        helper: Callable,
        owner: Callable,
        user: Callable,
        *,
        seeds: Seeds | None = None,
        hooks: Mapping[str, list] | None = None,
        wrap_channel=None,
        timeout: float = SESSION_TIMEOUT_S,
        mode: str = HELPER_MODE,
        runners=None,
    ) -> SessionRun:
        """Deal, then run owner and user. helper / owner / user are (ctx, driver) -> result, each given its
        own driver (SecureDecoder / SecureEncoder for `capacity` positions) on the dummy, the owner's or
        the user's weights. hooks: step hooks per "helper" / "owner" / "user" driver (measurement).
        seeds: the dealer's seeds (fresh ones when None; two-party mode: each party's own seed).
        mode: "helper" (the helper's dry run deals) or "two-party" (owner and user make the material
        together first, `protocols.two_party`; the user then holds no W - U). runners(ctx): two-party
        runs to use instead of oblivious transfer and BFV (tests)."""
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; choose {' or '.join(MODES)}")
        if mode == TWO_PARTY_MODE:
            return self._two_party_session(capacity, helper, owner, user, seeds, hooks, wrap_channel, timeout, runners)
        fam, arch, hooks = self.family, self.arch, hooks or {}
        drivers = {
            "helper": fam.driver(arch, fam.helper_weights(arch), capacity),
            "owner": fam.driver(arch, self.owner, capacity),
            "user": fam.driver(arch, self.user, capacity),
        }
        for side, driver in drivers.items():
            driver.step_hooks.extend(hooks.get(side, ()))
        seeds = seeds or Seeds.fresh()
        end = {}

        def dry_run(ctx):
            helper(ctx, drivers["helper"])
            end["time"] = time.perf_counter()

        start = time.perf_counter()
        owner_records, user_records = deal_records(dry_run, seeds, weight_mask=self.mask)
        call_bytes = [o.nbytes + u.nbytes for o, u in zip(owner_records, user_records)]
        owner_mat, user_mat = QueuedMaterial(seeds.owner, owner_records), QueuedMaterial(seeds.user, user_records)
        del owner_records, user_records  # the queues free each call's material once it is used
        precompute_user_terms(user_mat, self.user)  # the user's input-independent linear shares
        return _run_online(
            owner,
            user,
            drivers,
            owner_mat,
            user_mat,
            wrap_channel,
            timeout,
            dealt_call_bytes=call_bytes,
            deal_s=end["time"] - start,
            deal_end=end["time"],
        )

    def _two_party_session(self, capacity, plan_program, owner, user, seeds, hooks, wrap_channel, timeout, runners):
        from protocols.two_party.plan import plan_session
        from protocols.two_party.provider import make_material

        fam, arch, hooks = self.family, self.arch, hooks or {}
        shape_only = fam.helper_weights(arch)
        drivers = {"owner": fam.driver(arch, self.owner, capacity), "user": fam.driver(arch, shape_only, capacity)}
        for side, driver in drivers.items():
            driver.step_hooks.extend(hooks.get(side, ()))
        seeds = seeds or Seeds.fresh()

        def making(seed: bytes, weights):
            def make(ctx):
                plan = plan_session(lambda pctx: plan_program(pctx, fam.driver(arch, shape_only, capacity)))
                return make_material(
                    ctx, plan, seed, weights=weights, runners=None if runners is None else runners(ctx)
                )

            return make

        start = time.perf_counter()
        offline = run_pair(
            making(seeds.owner, self.owner),
            making(seeds.user, None),
            None,
            None,
            wrap_channel=wrap_channel,
            timeout=timeout,
        )
        made = time.perf_counter()
        owner_mat, user_mat = offline.owner, offline.user
        return _run_online(
            owner,
            user,
            drivers,
            owner_mat,
            user_mat,
            wrap_channel,
            timeout,
            dealt_call_bytes=[0] * owner_mat.remaining,
            deal_s=made - start,
            deal_end=made,
            offline=offline,
        )


def _run_online(owner, user, drivers, owner_mat, user_mat, wrap_channel, timeout, **made) -> SessionRun:
    """The online phase of either mode on the made material; `made` names how it was made (SessionRun's
    dealt_call_bytes, deal_s, deal_end and, in two-party mode, offline)."""
    online = time.perf_counter()
    pair = run_pair(
        lambda ctx: owner(ctx, drivers["owner"]),
        lambda ctx: user(ctx, drivers["user"]),
        owner_mat,
        user_mat,
        wrap_channel=wrap_channel,
        timeout=timeout,
    )
    return SessionRun(
        pair=pair,
        online_s=time.perf_counter() - online,
        material_left=max(owner_mat.remaining, user_mat.remaining),
        **made,
    )


def prepare_model(weights, seed: bytes | None = None, *, progress=None) -> PreparedModel:
    """Prepare `weights` (DecoderWeights: a Llama-style decoder; EncoderWeights: a BERT-style encoder)
    with mask seed `seed` (fresh when None). progress(n) is called as weights are done."""
    from permllm.model.weights import EncoderWeights
    from permllm.prg import fresh_seed

    fam = family("minilm" if isinstance(weights, EncoderWeights) else "smollm2")
    seed = seed or fresh_seed()
    start = time.perf_counter()
    arch = fam.arch_from_config(weights.config)
    owner = fam.owner_weights(weights, progress=progress)
    user = {name: fam.user_weight(name, arch, masked_weight(w, seed)) for name, w in owner.items()}
    return PreparedModel(fam, arch, seed, owner, user, time.perf_counter() - start)


@dataclass
class SessionResult:
    """What a model session returns besides its output: the session (traffic, dealing)."""

    session: SessionRun

    @property
    def run(self) -> PairRun:
        return self.session.pair

    @property
    def dealt_calls(self) -> int:
        return self.session.dealt_calls


@dataclass
class LocalGeneration(SessionResult):
    """Result of an in-process private generation: the user's tokens and its GenerationTrace."""

    tokens: list[int]
    user_trace: Any


def generate(
    prepared: PreparedModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    seeds: Seeds | None = None,
    sampling=None,
    eos_ids=frozenset(),
    wrap_channel=None,
    on_token=None,
    trace=None,
    hooks: Mapping[str, list] | None = None,
    timeout: float = SESSION_TIMEOUT_S,
    selection: str = "table",
    mode: str = HELPER_MODE,
    runners=None,
) -> LocalGeneration:
    """One private generation session on a prepared decoder: the dealer's dry run covers the whole budget,
    each token is chosen on the user's side under a permutation and recovered with the `selection` mode
    (`protocols.selection`; "bfv" makes the BFV keys once per preparation). on_token(t) runs on the
    user's thread after each choice; trace (a GenerationTrace, made when None) gets its marks."""
    from protocols.model.generation import GenerationTrace, SamplingConfig, token_chooser
    from protocols.model.generation import generate as generate_tokens

    client, server = prepared.lookup() if selection == "bfv" else (None, None)
    budget = dict(prompt_len=len(prompt_ids), max_new_tokens=max_new_tokens, selection=selection)
    trace = GenerationTrace() if trace is None else trace
    choose = token_chooser(sampling or SamplingConfig())
    run = prepared.session(
        len(prompt_ids) + max_new_tokens,
        lambda ctx, dec: generate_tokens(ctx, dec, **budget),
        lambda ctx, dec: generate_tokens(ctx, dec, lookup=server, **budget),
        lambda ctx, dec: generate_tokens(
            ctx,
            dec,
            prompt_ids=list(prompt_ids),
            eos_ids=frozenset(eos_ids),
            choose=choose,
            lookup=client,
            on_token=on_token,
            trace=trace,
            **budget,
        ),
        seeds=seeds,
        hooks=hooks,
        wrap_channel=wrap_channel,
        timeout=timeout,
        mode=mode,
        runners=runners,
    )
    return LocalGeneration(session=run, tokens=run.pair.user, user_trace=trace)


def private_generate_inprocess(weights, prompt_ids: list[int], max_new_tokens: int, *, seeds=None, **options):
    """Prepare `weights` (a DecoderWeights) with seeds.owner as the mask seed, then `generate` with `seeds`
    as the dealer's seeds; options as `generate`'s."""
    seeds = seeds or Seeds.fresh()
    return generate(prepare_model(weights, seeds.owner), prompt_ids, max_new_tokens, seeds=seeds, **options)


@dataclass
class LocalEmbedding(SessionResult):
    """Result of an in-process private embedding: (hidden,) for one sentence, (sentences, hidden) for
    several (float64, user side); the session's traffic is that of all sentences together."""

    embedding: np.ndarray


def embed(
    prepared: PreparedModel,
    token_ids,
    *,
    seeds: Seeds | None = None,
    normalize: bool | None = None,
    wrap_channel=None,
    timeout: float = SESSION_TIMEOUT_S,
    mode: str = HELPER_MODE,
    runners=None,
) -> LocalEmbedding:
    """One private embedding session on a prepared encoder. token_ids: one sentence (list of ids, special
    tokens included) or a list of sentences, embedded one after another in the same session."""
    batch = len(token_ids) > 0 and not isinstance(token_ids[0], (int, np.integer))
    sentences = [list(map(int, s)) for s in token_ids] if batch else [list(map(int, token_ids))]
    if not sentences or any(len(s) == 0 for s in sentences):
        raise ValueError("every sentence needs at least one token")

    def sentences_of(with_tokens: bool):
        return lambda ctx, enc: [
            enc.embed(ctx, s if with_tokens else None, len(s), normalize=normalize) for s in sentences
        ]

    run = prepared.session(
        max(len(s) for s in sentences),
        sentences_of(False),
        sentences_of(False),
        sentences_of(True),
        seeds=seeds,
        wrap_channel=wrap_channel,
        timeout=timeout,
        mode=mode,
        runners=runners,
    )
    embedding = np.stack(run.pair.user) if batch else run.pair.user[0]
    return LocalEmbedding(session=run, embedding=embedding)


def private_embed_inprocess(weights, token_ids, *, seeds=None, **options) -> LocalEmbedding:
    """Prepare `weights` (an EncoderWeights) with seeds.owner as the mask seed, then `embed` with `seeds`
    as the dealer's seeds; options as `embed`'s."""
    seeds = seeds or Seeds.fresh()
    return embed(prepare_model(weights, seeds.owner), token_ids, seeds=seeds, **options)
