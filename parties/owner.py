"""The owner's role: load the model, answer the user's hello, send the masked weights, take the
helper's material, run the online session (steps of `parties.roles`). In two-party mode there is no
helper and no W - U: the owner makes its material with the user instead (`parties.two_party`)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from parties.families import family
from parties.handshake import MASK_SEED_TAG, SEED_TAG, Offer, check_hello, mode_mismatch
from parties.masks import MaskedDigest
from parties.metrics import Phases, peak_rss_mb
from parties.models import model_name
from parties.pinning import weights_digest
from parties.progress import progress_bar
from parties.session import HELPER_MODE, TWO_PARTY_MODE
from parties.wire import SETUP_TIMEOUT_S, recv_json, recv_records, recv_stream_seed, require, send_json
from permllm.errors import ConfigError, PermLLMError, ProtocolError
from permllm.prg import fresh_seed
from protocols.context import PartyContext, Role
from protocols.material import QueuedMaterial
from protocols.model.decoder_weights import masked_blocks
from protocols.selection import BFV


@dataclass
class OwnerReport:
    """Seconds per phase, bytes per phase (the online ones on the owner's side of its channel to the
    user), material records not consumed (0 after a complete session) and peak memory.

    mode: "helper" or "two-party". offline_s: the offline phase's seconds; offline_bytes_sent /
    offline_bytes_received: its traffic at the owner (helper mode: on the channel to the helper;
    two-party: to and from the user); offline_bytes: helper mode, the material received; two-party,
    both directions together. offline_calls: the protocol calls the material covers."""

    phases_s: dict
    prepare_bytes: int
    offline_bytes: int
    online_bytes_sent: int
    online_bytes_received: int
    material_left: int
    peak_rss_mb: float
    mode: str = HELPER_MODE
    offline_s: float = 0.0
    offline_bytes_sent: int = 0
    offline_bytes_received: int = 0
    offline_calls: int = 0

    def to_dict(self) -> dict:
        return {"role": "owner", **asdict(self)}


@dataclass
class LoadedModel:
    """What an owner loads once and serves every session from: the family, the folded and encoded
    weights (no mask: each session's W - U is derived from its mask seed while it is sent) and the offer."""

    fam: Any
    prepared: dict
    offer: Offer
    load_s: float = 0.0


def load_owner_model(model: str, log=print, progress: bool = True) -> LoadedModel:
    """model: a model spec (`parties.models`: a bundled name or a checkpoint path). Loads float32 (no
    float64 copy), folds and encodes one weight at a time and frees the floats as it goes."""
    from permllm.memory import return_large_frees
    from permllm.model.loading import load_model

    return_large_frees()  # the session's 8 MB blocks of W - U go back to the system once sent
    fam = family(model_name(model))
    start = time.perf_counter()
    log("owner: loading the model")
    weights, _ = load_model(model, tokenizer=False, dtype=torch.float32)
    offer = Offer(
        fam.name,
        fam.arch_from_config(weights.config),
        fam.max_positions(weights.config),
        getattr(weights.config, "eos_token_id", None),
        weights_digest(weights),
    )
    log("owner: folding and encoding the weights")
    bar = progress_bar(len(fam.linear_shapes(offer.arch)), "owner: encoding weights", unit="weight", enabled=progress)
    prepared = fam.owner_weights(weights, progress=bar.update, release=True)
    bar.close()
    del weights
    return LoadedModel(fam, prepared, offer, time.perf_counter() - start)


def run_owner(channels, model: str, *, log=print, **options) -> dict:
    """channels: dict with 'user' and 'helper' Channels ('user' only in two-party mode); model: a model
    spec. Loads the model, then runs one session (`serve_session`, whose options these are). Returns the
    owner's report."""
    return serve_session(channels, load_owner_model(model, log), log=log, **options)


def serve_session(
    channels,
    loaded: LoadedModel,
    *,
    progress: bool = True,
    log=print,
    setup_timeout: float = SETUP_TIMEOUT_S,
    budget=None,
    user_key: str = "",
    masks=None,
    mode: str = HELPER_MODE,
    runners=None,
) -> dict:
    """One session on a loaded model. channels: dict with 'user' and 'helper' Channels ('user' only in
    two-party mode). Returns the owner's report (`OwnerReport.to_dict()`).

    budget: a `parties.budget.QueryBudget` charged for this session under `user_key` (the user's CURVE
    public key) before any weight is sent; a user over its budget is refused in the welcome.
    masks: the `parties.masks.MaskSeeds` the weight mask comes from (fresh ones, for this session only,
    when None); a user whose cached W - U is current gets none sent (`parties.masks`).
    mode: "helper" (the helper deals the material) or "two-party" (owner and user make it together:
    no helper channel, no W - U; a hello asking for the other mode is refused in the welcome).
    runners(ctx): two-party runs to use instead of oblivious transfer and BFV (tests)."""
    if mode == TWO_PARTY_MODE:
        return _serve_two_party(channels["user"], loaded, log, setup_timeout, budget, user_key, runners)
    from parties.masks import MaskSeeds

    fam, offer = loaded.fam, loaded.offer
    masks = MaskSeeds() if masks is None else masks
    mask_seed, epoch, known_digest = masks.entry(user_key, offer.weights_digest)
    user, helper = channels["user"], channels["helper"]
    phases = Phases()
    phases.seconds["load"] = loaded.load_s

    plan, reservation = handshake(user, helper, fam, offer, setup_timeout, budget, user_key, epoch)
    lookup = fam.owner_lookup(user, setup_timeout, offer.arch.vocab) if plan.selection == BFV else None
    seed = fresh_seed()  # the dealer's, fresh for every session
    send_json(helper, "owner-plan", offer.for_helper(plan))
    helper.send(SEED_TAG, seed)
    helper.send(MASK_SEED_TAG, mask_seed)

    with phases.timed("prepare"):
        cached = require(recv_json(user, "cache", timeout=setup_timeout), "digest", str, "user", "cache")
        prepared = loaded.prepared
        # A seed with no digest was never sent whole: the digest is kept before "prepare-end" goes out,
        # so no user can hold a current entry for it and W - U is sent without being derived twice.
        if cached and cached == known_digest:
            log("owner: the user holds the current W - U: nothing to send")
            send_json(user, "prepare", {"send": False})
            prepare_bytes = 0
        else:
            log("owner: sending W - U to the user")
            send_json(user, "prepare", {"send": True})
            prepare_bytes, digest = send_masked_weights(user, prepared, mask_seed)
            if digest != known_digest:
                masks.remember_digest(user_key, offer.weights_digest, digest)
            send_json(user, "prepare-end", {"digest": digest})

    with phases.timed("offline"):
        calls = fam.material_calls(offer.arch, plan)
        helper_sent = helper.stats.bytes_sent
        material, offline_bytes = receive_material(helper, seed, setup_timeout, calls)
    offline_calls = material.remaining

    ctx = PartyContext(Role.OWNER, user, material)
    driver = fam.driver(offer.arch, prepared, plan.prompt_tokens + plan.max_new_tokens)
    sent_before, received_before = user.stats.bytes_sent, user.stats.bytes_received
    with phases.timed("online"):
        fam.run_session(ctx, driver, plan, lookup=lookup)
    if reservation is not None:
        budget.settle(reservation, fam.positions_run(driver, plan))

    return OwnerReport(
        phases_s=phases.seconds,
        prepare_bytes=prepare_bytes,
        offline_bytes=offline_bytes,
        online_bytes_sent=user.stats.bytes_sent - sent_before,
        online_bytes_received=user.stats.bytes_received - received_before,
        material_left=material.remaining,
        peak_rss_mb=peak_rss_mb(),
        offline_s=phases.seconds["offline"],
        offline_bytes_sent=helper.stats.bytes_sent - helper_sent,
        offline_bytes_received=offline_bytes,
        offline_calls=offline_calls,
    ).to_dict()


def _serve_two_party(user, loaded: LoadedModel, log, setup_timeout, budget, user_key, runners) -> dict:
    """`serve_session` in two-party mode: handshake, the material made with the user, the online session."""
    from parties.two_party import make_two_party_material

    fam, offer = loaded.fam, loaded.offer
    phases = Phases()
    phases.seconds["load"] = loaded.load_s
    plan, reservation = handshake(user, None, fam, offer, setup_timeout, budget, user_key, mode=TWO_PARTY_MODE)
    with phases.timed("offline"):
        offline = make_two_party_material(
            Role.OWNER,
            user,
            fam,
            offer.arch,
            plan,
            weights=loaded.prepared,
            runners=runners,
            log=log,
            who="owner",
            setup_timeout=setup_timeout,
        )
    material = offline.material
    ctx = PartyContext(Role.OWNER, user, material)
    driver = fam.driver(offer.arch, loaded.prepared, plan.prompt_tokens + plan.max_new_tokens)
    sent_before, received_before = user.stats.bytes_sent, user.stats.bytes_received
    with phases.timed("online"):
        fam.run_session(ctx, driver, plan)
    if reservation is not None:
        budget.settle(reservation, fam.positions_run(driver, plan))
    return OwnerReport(
        phases_s=phases.seconds,
        prepare_bytes=0,
        offline_bytes=offline.bytes_sent + offline.bytes_received,
        online_bytes_sent=user.stats.bytes_sent - sent_before,
        online_bytes_received=user.stats.bytes_received - received_before,
        material_left=material.remaining,
        peak_rss_mb=peak_rss_mb(),
        mode=TWO_PARTY_MODE,
        offline_s=offline.seconds,
        offline_bytes_sent=offline.bytes_sent,
        offline_bytes_received=offline.bytes_received,
        offline_calls=offline.calls,
    ).to_dict()


def handshake(
    user,
    helper,
    fam,
    offer: Offer,
    setup_timeout: float,
    budget,
    user_key: str,
    epoch: int = 0,
    mode: str = HELPER_MODE,
):
    """user -> owner hello; owner -> user welcome, or the refusal (also to the helper, when there is
    one) and the error raised. Returns (plan, the budget reservation or None)."""
    hello = recv_json(user, "hello", timeout=setup_timeout)
    try:
        plan = check_hello(hello, fam.name, offer.max_positions, mode=mode)
        reservation = None if budget is None else budget.reserve(user_key, plan.prompt_tokens + plan.max_new_tokens)
    except (ProtocolError, ConfigError) as exc:
        send_json(user, "welcome", {"error": str(exc)})
        try:  # best effort: the refusal itself is what this role reports
            if helper is not None:
                send_json(helper, "owner-plan", {"error": f"the owner refused the session: {exc}"})
        except PermLLMError:
            pass
        raise
    send_json(user, "welcome", {**offer.welcome(plan), "mask_epoch": epoch})
    return plan, reservation


def send_masked_weights(user, prepared: dict, mask_seed: bytes) -> tuple[int, str]:
    """owner -> user: every masked weight W - U by row blocks of at most 8 MB (`w.NAME`, int64
    (rows, d_out), `masked_blocks`), U drawn from `mask_seed` as each block is built: the owner holds
    one block at a time, and the channel's send waits while the user's receive queue is full.
    Returns (the bytes sent, their `masked_digest`)."""
    sent_before = user.stats.bytes_sent
    digest = MaskedDigest()
    for name, w in prepared.items():
        digest.begin(name, (w.d_in, w.d_out))
        for _, _, block in masked_blocks(w, mask_seed):
            user.send(f"w.{name}", block)
            digest.update(block.numpy())
    return user.stats.bytes_sent - sent_before, digest.hexdigest()


def receive_material(helper, seed: bytes, setup_timeout: float, calls: int) -> tuple[QueuedMaterial, int]:
    """helper -> owner: the material stream for the whole session, at most `calls` records (the plan's
    protocol calls; ProtocolError past them). Returns it and the bytes received."""
    seed, _ = recv_stream_seed(helper, seed, timeout=setup_timeout)  # the helper's when pooled
    material = QueuedMaterial(seed, max_records=calls)
    received_before = helper.stats.bytes_received
    recv_records(helper, lambda record: material.extend([record]), timeout=setup_timeout, max_records=calls)
    return material, helper.stats.bytes_received - received_before


def refuse_mode(user, asked, mode: str, setup_timeout: float) -> None:
    """A session request for another mode than the owner's (`mode`): user -> owner hello; owner -> user
    the refusal in the welcome; ProtocolError raised (this session's outcome)."""
    message = mode_mismatch(asked, mode)
    recv_json(user, "hello", timeout=setup_timeout)
    send_json(user, "welcome", {"error": message})
    raise ProtocolError(message)
