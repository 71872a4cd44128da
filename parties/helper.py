"""The helper's role: check that the owner and the user describe the same session, then deal the
material for its whole budget to both (steps 2 and 4 of `parties.roles`)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass

from parties.handshake import MASK_SEED_TAG, SEED_TAG, check_plans, first_answer
from parties.metrics import Phases, peak_rss_mb
from parties.models import fingerprint
from parties.progress import progress_bar
from parties.wire import (
    SETUP_TIMEOUT_S,
    abort_records,
    await_receipt,
    finish_records,
    recv_json,
    send_record,
    send_stream_seed,
)
from permllm.errors import ConfigError, ProtocolError

SEED_BYTES = 16


@dataclass
class HelperReport:
    """Seconds per phase, the dealt calls, the bytes streamed to the owner and the user, peak memory,
    the pool's depth (0: no pool), whether this session was served from it and how long it waited for a
    pooled session being dealt."""

    phases_s: dict
    calls: int
    offline_bytes: int
    peak_rss_mb: float
    pool_depth: int = 0
    served_from_pool: bool = False
    pool_wait_s: float = 0.0

    def to_dict(self) -> dict:
        return {"role": "helper", **asdict(self)}


def run_helper(
    channels,
    *,
    progress: bool = True,
    log=print,
    setup_timeout: float = SETUP_TIMEOUT_S,
    pool=None,
    user_key: str = "",
) -> dict:
    """channels: dict with 'owner' and 'user' Channels. Serves the session from `pool` (a
    `parties.helper_pool.MaterialPool`) when it holds one for this user key, model, plan and mask seed,
    otherwise deals it live; streams, then asks the pool to deal the next one ahead. Returns the helper's
    report (`HelperReport.to_dict()`)."""
    from parties.helper_pool import PoolKey

    owner, user = channels["owner"], channels["user"]
    phases = Phases()
    fam, arch, plan, owner_seed, mask_seed, user_seed = handshake(owner, user, setup_timeout)
    key = PoolKey.of(user_key, fingerprint(fam.name, arch.to_dict()), plan, mask_seed)
    pooled, waited = pool.take(key, timeout=setup_timeout) if pool is not None else (None, 0.0)
    what = f"a {plan.prompt_tokens}-token prompt and {plan.max_new_tokens} new tokens"
    with phases.timed("offline"):
        if pooled is not None:
            log(f"helper: serving {what} from its pool")
            send_stream_seed(owner, pooled.owner_seed)
            send_stream_seed(user, pooled.user_seed)
            calls = pooled.calls
            while pooled.records:  # each record is forgotten once sent
                owner_record, user_record = pooled.records.popleft()
                send_record(owner, owner_record)
                send_record(user, user_record)
        else:
            log(f"helper: dealing material for {what}")
            for channel in (owner, user):
                send_stream_seed(channel, None)
            with pool.live() if pool is not None else nullcontext():
                calls = deal(owner, user, fam, arch, plan, owner_seed, user_seed, progress, mask_seed=mask_seed)
        for channel in (owner, user):
            finish_records(channel, calls)
        for channel in (owner, user):
            await_receipt(channel, calls, timeout=setup_timeout)
    if pool is not None:
        pool.refill(key, fam, arch, plan)
    return HelperReport(
        phases_s=phases.seconds,
        calls=calls,
        offline_bytes=owner.stats.bytes_sent + user.stats.bytes_sent,
        peak_rss_mb=peak_rss_mb(),
        pool_depth=0 if pool is None else pool.depth,
        served_from_pool=pooled is not None,
        pool_wait_s=waited,
    ).to_dict()


def handshake(owner, user, setup_timeout: float):
    """owner -> helper its plan, its dealer seed and its mask seed, user -> helper its plan and seed; the
    plans must agree. Returns (family, arch, plan, owner seed, mask seed, user seed); a refusal goes to
    both material streams."""
    owner_plan = first_answer(lambda: recv_json(owner, "owner-plan", timeout=setup_timeout), "owner")
    owner_seed = owner.recv_bytes(SEED_TAG, max_len=SEED_BYTES, timeout=setup_timeout)
    mask_seed = owner.recv_bytes(MASK_SEED_TAG, max_len=SEED_BYTES, timeout=setup_timeout)
    user_plan = recv_json(user, "user-plan", timeout=setup_timeout)
    user_seed = user.recv_bytes(SEED_TAG, max_len=SEED_BYTES, timeout=setup_timeout)
    try:
        fam, arch, plan = check_plans(owner_plan, user_plan)
        if {len(owner_seed), len(mask_seed), len(user_seed)} != {SEED_BYTES}:
            raise ProtocolError(f"seeds must be {SEED_BYTES} bytes")
    except (ProtocolError, ConfigError) as exc:
        for channel in (owner, user):  # both are waiting for material: tell them why none comes
            abort_records(channel, f"the helper refused the session: {exc}")
        raise
    return fam, arch, plan, owner_seed, mask_seed, user_seed


def deal(owner, user, fam, arch, plan, owner_seed: bytes, user_seed: bytes, progress: bool, *, mask_seed=None) -> int:
    """The helper's dry run of the online session: each protocol call's material, streamed to the owner
    and the user as it is dealt; the weight masks U come from `mask_seed` (the owner's dealer seed when
    None). Returns the number of calls."""
    bar = progress_bar(None, "helper: dealing", unit="call", enabled=progress)

    def sink(owner_record, user_record):
        send_record(owner, owner_record)
        send_record(user, user_record)
        bar.update(1)

    calls = deal_to(fam, arch, plan, owner_seed, user_seed, mask_seed or owner_seed, sink)
    bar.close()
    return calls


def deal_to(fam, arch, plan, owner_seed: bytes, user_seed: bytes, mask_seed: bytes, sink) -> int:
    """The dry run behind `deal`: hands sink(owner_record, user_record) each call's records in call
    order. Each v @ U is computed with U drawn by row blocks from `mask_seed`
    (`decoder_weights.mask_product`): the helper never holds a whole mask. Returns the number of calls."""
    from protocols.context import DealerContext
    from protocols.material import Dealer
    from protocols.model.decoder_weights import mask_product

    shapes = fam.linear_shapes(arch)

    def product(name, v):
        d_in, d_out, _ = shapes[name]
        return mask_product(mask_seed, name, d_in, d_out, v)

    dealer = Dealer(owner_seed, user_seed, sink=sink)
    driver = fam.driver(arch, fam.helper_weights(arch), plan.prompt_tokens + plan.max_new_tokens)
    fam.run_session(DealerContext(dealer, mask_product=product), driver, plan)
    dealer.flush()
    return dealer.calls
