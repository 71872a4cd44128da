"""The owner's role: load the model, answer the user's hello, send the masked weights, take the
helper's material, run the online session (steps of `parties.roles`)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from parties.families import family
from parties.handshake import MASK_SEED_TAG, SEED_TAG, Offer, check_hello
from parties.masks import MaskedDigest
from parties.metrics import Phases, peak_rss_mb
from parties.models import model_name
from parties.pinning import weights_digest
from parties.progress import progress_bar
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
    user), material records not consumed (0 after a complete session) and peak memory."""

    phases_s: dict
    prepare_bytes: int
    offline_bytes: int
    online_bytes_sent: int
    online_bytes_received: int
    material_left: int
    peak_rss_mb: float

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
    """channels: dict with 'user' and 'helper' Channels; model: a model spec. Loads the model, then runs
    one session (`serve_session`, whose options these are). Returns the owner's report."""
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
) -> dict:
    """One session on a loaded model. channels: dict with 'user' and 'helper' Channels. Returns the
    owner's report (`OwnerReport.to_dict()`).

    budget: a `parties.budget.QueryBudget` charged for this session under `user_key` (the user's CURVE
    public key) before any weight is sent; a user over its budget is refused in the welcome.
    masks: the `parties.masks.MaskSeeds` the weight mask comes from (fresh ones, for this session only,
    when None); a user whose cached W - U is current gets none sent (`parties.masks`)."""
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
        material, offline_bytes = receive_material(helper, seed, setup_timeout, calls)

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
    ).to_dict()


def handshake(user, helper, fam, offer: Offer, setup_timeout: float, budget, user_key: str, epoch: int = 0):
    """user -> owner hello; owner -> user welcome, or the refusal (also to the helper) and the error raised.
    Returns (plan, the budget reservation or None)."""
    hello = recv_json(user, "hello", timeout=setup_timeout)
    try:
        plan = check_hello(hello, fam.name, offer.max_positions)
        reservation = None if budget is None else budget.reserve(user_key, plan.prompt_tokens + plan.max_new_tokens)
    except (ProtocolError, ConfigError) as exc:
        send_json(user, "welcome", {"error": str(exc)})
        try:  # best effort: the refusal itself is what this role reports
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
