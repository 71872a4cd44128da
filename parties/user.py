"""The user's role: send the hello, check the welcome, receive the masked weights and the helper's
material, run the online session and print the answer (steps of `parties.roles`). In two-party mode
there is no helper and no W - U: the user makes its material with the owner instead (`parties.two_party`)
and runs its online session on shape-only weights."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from parties.families import family
from parties.handshake import SEED_TAG, Plan, check_welcome, first_answer
from parties.metrics import Phases, peak_rss_mb
from parties.models import model_name
from parties.pinning import check_model_fingerprint
from parties.progress import progress_bar
from parties.session import HELPER_MODE, TWO_PARTY_MODE
from parties.user_input import UserRequest
from parties.user_online import EmbeddingReport, GenerationReport, OnlineSession
from parties.wire import SETUP_TIMEOUT_S, recv_json, recv_records, recv_stream_seed, require, send_json
from permllm.errors import ConfigError, ProtocolError
from permllm.prg import fresh_seed
from protocols.context import PartyContext, Role
from protocols.linear import precompute_weight_terms, user_term_inputs, user_terms_missing
from protocols.material import QueuedMaterial
from protocols.selection import BFV


@dataclass
class UserReport:
    """The plan's prompt length, bytes per set-up phase, the online part (the answer and its per-token
    figures, or the embedding), seconds per phase, material records left (0 after a complete session)
    and peak memory. mode: "helper" or "two-party"; offline_s, offline_bytes_sent / _received: the
    offline phase's seconds and traffic at the user (helper mode: on the channel to the helper;
    two-party: to and from the owner); offline_bytes: helper mode, what the helper sent; two-party,
    both directions together."""

    prompt_tokens: int
    prepare_bytes: int
    offline_bytes: int
    online: GenerationReport | EmbeddingReport
    phases_s: dict
    material_left: int
    peak_rss_mb: float
    mode: str = HELPER_MODE
    offline_s: float = 0.0
    offline_bytes_sent: int = 0
    offline_bytes_received: int = 0

    def to_dict(self) -> dict:
        return {
            "role": "user",
            "mode": self.mode,
            "prompt_tokens": self.prompt_tokens,
            "prepare_bytes": self.prepare_bytes,
            "offline_bytes": self.offline_bytes,
            "offline_s": self.offline_s,
            "offline_bytes_sent": self.offline_bytes_sent,
            "offline_bytes_received": self.offline_bytes_received,
            **self.online.to_dict(),
            "phases_s": self.phases_s,
            "material_left": self.material_left,
            "peak_rss_mb": self.peak_rss_mb,
        }


def run_user(
    channels,
    request: UserRequest,
    tokenizer,
    *,
    progress: bool = True,
    log=print,
    out=sys.stdout,
    setup_timeout: float = SETUP_TIMEOUT_S,
    cache_dir=None,
    mode: str = HELPER_MODE,
    runners=None,
) -> dict:
    """channels: dict with 'owner' and 'helper' Channels ('owner' only in two-party mode). Streams the
    answer (or prints the embedding); returns the user's report (`UserReport.to_dict()`). cache_dir:
    where W - U is kept between sessions (`parties.masks.MaskedCache`; None: fetched every session).
    mode: "helper" or "two-party" (the material made with the owner; no helper, no W - U, no cache).
    runners(ctx): two-party runs to use instead of oblivious transfer and BFV (tests)."""
    fam = family(model_name(request.model))
    if mode == TWO_PARTY_MODE and request.selection == BFV:
        raise ConfigError('the "bfv" token selection has no two-party mode: use "table"')
    phases = Phases()
    prompt_ids, max_new_tokens = fam.user_input(tokenizer, request)
    plan = Plan(fam.name, len(prompt_ids), max_new_tokens, selection=request.selection, mode=mode)
    if mode == TWO_PARTY_MODE:
        return _run_two_party(
            channels["owner"], fam, plan, prompt_ids, request, tokenizer, phases, log, out, setup_timeout, runners
        )
    owner, helper = channels["owner"], channels["helper"]

    arch, welcome = handshake(owner, fam, plan, setup_timeout)
    check_model_fingerprint(welcome, request.expect_fingerprint, log)
    lookup = fam.user_lookup(owner, arch) if plan.selection == BFV else None
    seed = fresh_seed()
    send_json(helper, "user-plan", plan.for_helper(welcome["fingerprint"]))
    helper.send(SEED_TAG, seed)

    with phases.timed("prepare"):
        masked, prepare_bytes = prepare_weights(owner, fam, arch, welcome, setup_timeout, progress, cache_dir)

    with phases.timed("offline"):
        try:
            material = receive_material(helper, seed, setup_timeout, progress, fam.material_calls(arch, plan))
            weights = precompute_shares(fam, arch, material, masked)
        finally:
            masked.close()
    offline_bytes = helper.stats.bytes_received
    offline_sent = helper.stats.bytes_sent

    ctx = PartyContext(Role.USER, owner, material)
    driver = fam.driver(arch, weights, plan.prompt_tokens + plan.max_new_tokens)
    session = OnlineSession(ctx, driver, plan, prompt_ids, lookup, welcome, phases)
    online = fam.user_online(session, request, tokenizer, out)

    return UserReport(
        prompt_tokens=plan.prompt_tokens,
        prepare_bytes=prepare_bytes,
        offline_bytes=offline_bytes,
        online=online,
        phases_s=phases.seconds,
        material_left=material.remaining,
        peak_rss_mb=peak_rss_mb(),
        offline_s=phases.seconds["offline"],
        offline_bytes_sent=offline_sent,
        offline_bytes_received=offline_bytes,
    ).to_dict()


def _run_two_party(owner, fam, plan, prompt_ids, request, tokenizer, phases, log, out, setup_timeout, runners):
    """`run_user` in two-party mode: handshake, the material made with the owner, the online session."""
    from parties.two_party import make_two_party_material

    arch, welcome = handshake(owner, fam, plan, setup_timeout)
    check_model_fingerprint(welcome, request.expect_fingerprint, log)
    with phases.timed("offline"):
        offline = make_two_party_material(
            Role.USER, owner, fam, arch, plan, runners=runners, log=log, who="user", setup_timeout=setup_timeout
        )
    material = offline.material
    ctx = PartyContext(Role.USER, owner, material)
    # every linear share is kept by the provider: the user's driver holds shapes only, no W - U
    driver = fam.driver(arch, fam.helper_weights(arch), plan.prompt_tokens + plan.max_new_tokens)
    session = OnlineSession(ctx, driver, plan, prompt_ids, None, welcome, phases)
    online = fam.user_online(session, request, tokenizer, out)
    return UserReport(
        prompt_tokens=plan.prompt_tokens,
        prepare_bytes=0,
        offline_bytes=offline.bytes_sent + offline.bytes_received,
        online=online,
        phases_s=phases.seconds,
        material_left=material.remaining,
        peak_rss_mb=peak_rss_mb(),
        mode=TWO_PARTY_MODE,
        offline_s=offline.seconds,
        offline_bytes_sent=offline.bytes_sent,
        offline_bytes_received=offline.bytes_received,
    ).to_dict()


def handshake(owner, fam, plan: Plan, setup_timeout: float):
    """user -> owner hello; owner -> user welcome, checked. Returns (the owner's architecture, the welcome)."""
    send_json(owner, "hello", plan.hello())
    welcome = first_answer(lambda: recv_json(owner, "welcome", timeout=setup_timeout), "owner")
    return check_welcome(welcome, plan, fam), welcome


def prepare_weights(owner, fam, arch, welcome: dict, setup_timeout: float, progress: bool, cache_dir):
    """user -> owner the digest of its cached W - U for this model and mask epoch (or ""); owner -> user
    whether it sends W - U, then every masked weight by row blocks and their digest (`parties.masks`).
    Each block goes to disk as it arrives: the cache entry's file, or an unnamed private temporary
    file without a cache. Returns (a `MaskedFile` of every W - U, checked against its digest; the W - U
    bytes received)."""
    from parties.masks import MaskedCache, MaskedDigest, MaskedFile, private_scratch_file
    from parties.models import PROTOCOL_VERSION

    shapes = fam.linear_shapes(arch)
    epoch = require(welcome, "mask_epoch", int, "owner", "welcome")
    key = (PROTOCOL_VERSION, welcome["fingerprint"], welcome.get("weights_digest", ""), epoch)
    cache = None if cache_dir is None else MaskedCache(cache_dir)
    entry = None if cache is None else cache.open(key, shapes)
    try:
        send_json(owner, "cache", {"digest": "" if entry is None else entry[0]})
        send = require(recv_json(owner, "prepare", timeout=setup_timeout), "send", bool, "owner", "prepare")
    except BaseException:
        if entry is not None:
            entry[1].close()
        raise
    if not send:
        if entry is None:
            raise ProtocolError("the owner sent no masked weights, and this user holds none for its model")
        return entry[1], 0
    if entry is not None:
        entry[1].close()
    digest, received = MaskedDigest(), {}
    weights = receive_masked_weights(owner, shapes, digest, received, setup_timeout, progress)

    def announced() -> str:
        want = require(recv_json(owner, "prepare-end", timeout=setup_timeout), "digest", str, "owner", "prepare")
        if digest.hexdigest() != want:
            raise ProtocolError("the masked weights the owner sent do not give the digest it announced")
        return want

    if cache is not None:
        cache.store_stream(key, weights, announced)
        return cache.data_file(key, shapes), received["bytes"]
    scratch = private_scratch_file()
    try:
        for _, blocks in weights:
            for block in blocks:
                scratch.write(memoryview(block).cast("B"))
        scratch.flush()
        announced()
    except BaseException:
        scratch.close()
        raise
    return MaskedFile(scratch, shapes), received["bytes"]


def receive_masked_weights(owner, shapes: dict, digest, received: dict, setup_timeout: float, progress: bool):
    """owner -> user: every masked weight W - U as int64 row blocks (`w.NAME`, shape (rows, d_out)).
    Yields [(d_in, d_out), the weight's blocks (a generator: consume it before the next weight)], feeds
    `digest` (a `MaskedDigest`) and finally sets received["bytes"] to the bytes they took."""
    before = owner.stats.bytes_received
    bar = progress_bar(len(shapes), "user: receiving masked weights", unit="weight", enabled=progress)

    def blocks(name: str, d_in: int, d_out: int):
        rows = 0
        while rows < d_in:
            block = owner.recv(f"w.{name}", dtype=np.int64, timeout=setup_timeout)
            if block.ndim != 2 or block.shape[1] != d_out or not 1 <= block.shape[0] <= d_in - rows:
                raise ProtocolError(
                    f"the owner sent a block of shape {block.shape} for {name} (rows {rows} of {d_in}, {d_out} columns)"
                )
            digest.update(block)
            rows += block.shape[0]
            yield block

    for name, (d_in, d_out, *_) in shapes.items():
        digest.begin(name, (d_in, d_out))
        yield (d_in, d_out), blocks(name, d_in, d_out)
        bar.update(1)
    bar.close()
    received["bytes"] = owner.stats.bytes_received - before


def precompute_shares(fam, arch, material, masked) -> dict:
    """The user's linear shares for every call queued in `material` (`protocols.linear`), from W~
    read back from `masked` (a `MaskedFile`) one weight, by row blocks, at a time. Returns the user's
    `LinearWeight`s by name: shape only (no W~ held online) where every call's share is precomputed,
    the whole W~ for a weight with a call that could not be (none in the decoder or the encoder)."""
    weights = fam.helper_weights(arch)
    for name, calls in user_term_inputs(material).items():
        precompute_weight_terms(calls, weights[name].d_out, masked.blocks(name))
    for name in user_terms_missing(material):
        weights[name].local = masked.whole(name)
    return weights


def receive_material(helper, seed: bytes, setup_timeout: float, progress: bool, calls: int) -> QueuedMaterial:
    """helper -> user: the material stream for the whole session, at most `calls` records (the plan's
    protocol calls; ProtocolError past them)."""
    seed, _ = recv_stream_seed(helper, seed, timeout=setup_timeout)  # the helper's when pooled
    material = QueuedMaterial(seed, max_records=calls)
    bar = progress_bar(calls, "user: receiving offline material", unit="call", enabled=progress)

    def keep(record):
        material.extend([record])
        bar.update(1)

    recv_records(helper, keep, timeout=setup_timeout, max_records=calls)
    bar.close()
    return material
