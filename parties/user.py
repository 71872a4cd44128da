"""The user's role: send the hello, check the welcome, receive the masked weights and the helper's
material, run the online session and print the answer (steps of `parties.roles`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from parties.families import family
from parties.handshake import SEED_TAG, Plan, check_welcome, first_answer
from parties.metrics import Phases, peak_rss_mb
from parties.models import model_name
from parties.pinning import check_model_fingerprint
from parties.progress import progress_bar
from parties.user_input import UserRequest
from parties.user_online import EmbeddingReport, GenerationReport, OnlineSession
from parties.wire import SETUP_TIMEOUT_S, recv_json, recv_records, recv_stream_seed, require, send_json
from permllm.errors import ProtocolError
from permllm.prg import fresh_seed
from protocols.context import PartyContext, Role
from protocols.linear import precompute_user_terms
from protocols.material import QueuedMaterial
from protocols.selection import BFV


@dataclass
class UserReport:
    """The plan's prompt length, bytes per set-up phase, the online part (the answer and its per-token
    figures, or the embedding), seconds per phase, material records left (0 after a complete session)
    and peak memory."""

    prompt_tokens: int
    prepare_bytes: int
    offline_bytes: int
    online: GenerationReport | EmbeddingReport
    phases_s: dict
    material_left: int
    peak_rss_mb: float

    def to_dict(self) -> dict:
        return {
            "role": "user",
            "prompt_tokens": self.prompt_tokens,
            "prepare_bytes": self.prepare_bytes,
            "offline_bytes": self.offline_bytes,
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
) -> dict:
    """channels: dict with 'owner' and 'helper' Channels. Streams the answer (or prints the embedding);
    returns the user's report (`UserReport.to_dict()`). cache_dir: where W - U is kept between sessions
    (`parties.masks.MaskedCache`; None: fetched every session)."""
    fam = family(model_name(request.model))
    owner, helper = channels["owner"], channels["helper"]
    phases = Phases()
    prompt_ids, max_new_tokens = fam.user_input(tokenizer, request)
    plan = Plan(fam.name, len(prompt_ids), max_new_tokens, selection=request.selection)

    arch, welcome = handshake(owner, fam, plan, setup_timeout)
    check_model_fingerprint(welcome, request.expect_fingerprint, log)
    lookup = fam.user_lookup(owner, arch) if plan.selection == BFV else None
    seed = fresh_seed()
    send_json(helper, "user-plan", plan.for_helper(welcome["fingerprint"]))
    helper.send(SEED_TAG, seed)

    with phases.timed("prepare"):
        weights, prepare_bytes = prepare_weights(owner, fam, arch, welcome, setup_timeout, progress, cache_dir)

    with phases.timed("offline"):
        material = receive_material(helper, seed, setup_timeout, progress, fam.material_calls(arch, plan))
        precompute_user_terms(material, weights)  # the linear layers' input-independent shares
    offline_bytes = helper.stats.bytes_received

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
    ).to_dict()


def handshake(owner, fam, plan: Plan, setup_timeout: float):
    """user -> owner hello; owner -> user welcome, checked. Returns (the owner's architecture, the welcome)."""
    send_json(owner, "hello", plan.hello())
    welcome = first_answer(lambda: recv_json(owner, "welcome", timeout=setup_timeout), "owner")
    return check_welcome(welcome, plan, fam), welcome


def prepare_weights(owner, fam, arch, welcome: dict, setup_timeout: float, progress: bool, cache_dir):
    """user -> owner the digest of its cached W - U for this model and mask epoch (or ""); owner -> user
    whether it sends W - U, then every masked weight and their digest (`parties.masks`). Returns (the
    user's `LinearWeight`s by name, the W - U bytes received)."""
    from parties.masks import MaskedCache, masked_digest
    from parties.models import PROTOCOL_VERSION

    shapes = fam.linear_shapes(arch)
    epoch = require(welcome, "mask_epoch", int, "owner", "welcome")
    key = (PROTOCOL_VERSION, welcome["fingerprint"], welcome.get("weights_digest", ""), epoch)
    cache = None if cache_dir is None else MaskedCache(cache_dir)
    entry = None if cache is None else cache.load(key, shapes)
    send_json(owner, "cache", {"digest": "" if entry is None else entry[0]})
    if not require(recv_json(owner, "prepare", timeout=setup_timeout), "send", bool, "owner", "prepare"):
        if entry is None:
            raise ProtocolError("the owner sent no masked weights, and this user holds none for its model")
        arrays, received = entry[1], 0
    else:
        del entry
        arrays, received = receive_masked_weights(owner, shapes, setup_timeout, progress)
        digest = require(recv_json(owner, "prepare-end", timeout=setup_timeout), "digest", str, "owner", "prepare")
        if masked_digest(arrays.items()) != digest:
            raise ProtocolError("the masked weights the owner sent do not give the digest it announced")
        if cache is not None:
            cache.store(key, arrays, digest)
    return {name: fam.user_weight(name, arch, torch.from_numpy(a)) for name, a in arrays.items()}, received


def receive_masked_weights(owner, shapes: dict, setup_timeout: float, progress: bool) -> tuple[dict, int]:
    """owner -> user: every masked weight W - U (int64 arrays by name) and the bytes they took."""
    before = owner.stats.bytes_received
    arrays = {}
    bar = progress_bar(len(shapes), "user: receiving masked weights", unit="weight", enabled=progress)
    for name, (d_in, d_out, _) in shapes.items():
        arrays[name] = owner.recv(f"w.{name}", dtype=np.int64, shape=(d_in, d_out), timeout=setup_timeout)
        bar.update(1)
    bar.close()
    return arrays, owner.stats.bytes_received - before


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
