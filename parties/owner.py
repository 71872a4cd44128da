"""The owner's role: load the model, answer the user's hello, send the masked weights, take the
helper's material, run the online session (steps of `parties.roles`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from parties.families import family
from parties.handshake import SEED_TAG, Offer, check_hello
from parties.metrics import Phases, peak_rss_mb
from parties.models import model_name
from parties.pinning import weights_digest
from parties.progress import progress_bar
from parties.wire import SETUP_TIMEOUT_S, recv_json, recv_records, send_json
from permllm.errors import ConfigError, PermLLMError, ProtocolError
from permllm.prg import fresh_seed
from protocols.context import PartyContext, Role
from protocols.material import QueuedMaterial
from protocols.model.decoder_weights import masked_weight
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


def run_owner(
    channels,
    model: str,
    *,
    progress: bool = True,
    log=print,
    setup_timeout: float = SETUP_TIMEOUT_S,
    budget=None,
    user_key: str = "",
) -> dict:
    """channels: dict with 'user' and 'helper' Channels; model: a model spec (`parties.models`: a bundled
    name or a checkpoint path). Returns the owner's report (`OwnerReport.to_dict()`).

    budget: a `parties.budget.QueryBudget` charged for this session under `user_key` (the user's CURVE
    public key) before any weight is sent; a user over its budget is refused in the welcome."""
    from permllm.model.loading import load_model

    fam = family(model_name(model))
    user, helper = channels["user"], channels["helper"]
    phases = Phases()
    with phases.timed("load"):
        log("owner: loading the model")
        weights, _ = load_model(model, tokenizer=False, dtype=torch.float32)  # float32: no float64 copy
        offer = Offer(
            fam.name,
            fam.arch_from_config(weights.config),
            fam.max_positions(weights.config),
            getattr(weights.config, "eos_token_id", None),
            weights_digest(weights),
        )

    plan, reservation = handshake(user, helper, fam, offer, setup_timeout, budget, user_key)
    lookup = fam.owner_lookup(user, setup_timeout, offer.arch.vocab) if plan.selection == BFV else None
    seed = fresh_seed()
    send_json(helper, "owner-plan", offer.for_helper(plan))
    helper.send(SEED_TAG, seed)

    with phases.timed("prepare"):
        log("owner: folding, encoding and masking the weights; sending W - U to the user")
        total = len(fam.linear_shapes(offer.arch))
        bar = progress_bar(total, "owner: preparing weights", unit="weight", enabled=progress)
        prepared = fam.owner_weights(weights, progress=bar.update, release=True)  # frees the floats as it goes
        bar.close()
        del weights  # only the prepared weights stay in memory for the session
        prepare_bytes = send_masked_weights(user, prepared, seed)

    with phases.timed("offline"):
        material, offline_bytes = receive_material(helper, seed, setup_timeout)

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


def handshake(user, helper, fam, offer: Offer, setup_timeout: float, budget, user_key: str):
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
    send_json(user, "welcome", offer.welcome(plan))
    return plan, reservation


def send_masked_weights(user, prepared: dict, seed: bytes) -> int:
    """owner -> user: every masked weight W - U, one message each, U drawn from `seed` by row blocks
    as each is built (`masked_weight`). Returns the bytes sent."""
    sent_before = user.stats.bytes_sent
    for name, w in prepared.items():
        user.send(f"w.{name}", masked_weight(w, seed))
    return user.stats.bytes_sent - sent_before


def receive_material(helper, seed: bytes, setup_timeout: float) -> tuple[QueuedMaterial, int]:
    """helper -> owner: the material stream for the whole session. Returns it and the bytes received."""
    material = QueuedMaterial(seed)
    received_before = helper.stats.bytes_received
    recv_records(helper, lambda record: material.extend([record]), timeout=setup_timeout)
    return material, helper.stats.bytes_received - received_before
