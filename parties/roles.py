"""The three roles of a session, each run in its own process over ZeroMQ.

Session, in order (every arrow is framed messages on one channel; nothing is pickled):
  1. user -> owner   hello: model, prompt length, token budget, fixed-point scales, session id
     owner -> user   welcome: public architecture and its fingerprint (or an error naming the mismatch)
     user -> owner   the BFV public context, only with the "bfv" token selection (not offered yet)
  2. owner -> helper its seed and the architecture; user -> helper its seed and the plan
  3. preparation     owner -> user: every masked weight W - U (once per session)
  4. offline         helper -> owner, helper -> user: the material for the whole budget
  5. online          owner <-> user: prefill and generation
Each role returns a report (timings, traffic, peak memory) that the launcher merges.
"""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from parties.families import MAX_ARCH_DIMENSION, family, run_session
from parties.metrics import Phases, median_step, peak_rss_mb, percentile_step
from parties.models import PROTOCOL_VERSION, fingerprint, model_name
from parties.wire import (
    SETUP_TIMEOUT_S,
    abort_records,
    await_receipt,
    finish_records,
    recv_json,
    recv_records,
    require,
    send_json,
    send_record,
)
from permllm.errors import ChannelTimeout, ConfigError, PermLLMError, ProtocolError
from permllm.fixed import ACT_BITS, WEIGHT_BITS
from permllm.prg import fresh_seed
from protocols.context import PartyContext, Role
from protocols.material import QueuedMaterial
from protocols.selection import SELECTION_MODES, TABLE

SEED_TAG = "seed"


def _progress(total, desc, enabled, unit="it"):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True
    )


@dataclass
class Plan:
    """What the user asks for; all of it is public to the three parties."""

    model: str
    prompt_tokens: int
    max_new_tokens: int
    session: str = field(default_factory=lambda: secrets.token_hex(8))
    selection: str = TABLE  # the token selection mode (protocols.selection)

    def hello(self) -> dict:
        return {
            "protocol": PROTOCOL_VERSION,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "max_new_tokens": self.max_new_tokens,
            "act_bits": ACT_BITS,
            "weight_bits": WEIGHT_BITS,
            "session": self.session,
            "selection": self.selection,
        }


OFFERED_SELECTIONS = (TABLE,)
"""The token selections an owner accepts: "bfv" is kept for a helper-free mode, but its reply flood does
not hide the permutation from the user yet (SECURITY.md), so no owner offers it."""


def check_hello(
    hello: dict, model: str, max_positions: int, generates: bool = True, offered=OFFERED_SELECTIONS
) -> Plan:
    """The owner's check of the user's hello; raises ProtocolError naming the first mismatch.
    A decoder needs a token budget of at least 1; an encoder (one embedding) takes 0. A hello without
    a selection asks for "table"; one the owner does not offer is refused."""
    expected = {"protocol": PROTOCOL_VERSION, "model": model, "act_bits": ACT_BITS, "weight_bits": WEIGHT_BITS}
    for key, want in expected.items():
        if hello.get(key) != want:
            raise ProtocolError(f"{key} mismatch: the user has {hello.get(key)!r}, the owner {want!r}")
    prompt, budget = hello.get("prompt_tokens"), hello.get("max_new_tokens")
    if (
        not isinstance(prompt, int)
        or not isinstance(budget, int)
        or prompt < 1
        or (budget < 1 if generates else budget != 0)
    ):
        raise ProtocolError(f"bad plan: prompt_tokens={prompt!r}, max_new_tokens={budget!r}")
    if prompt + budget > max_positions:
        raise ProtocolError(f"prompt ({prompt}) plus budget ({budget}) exceeds the model's {max_positions} positions")
    selection = hello.get("selection", TABLE)
    if selection not in offered:
        raise ProtocolError(f"token selection {selection!r:.40} is not offered (the owner offers {', '.join(offered)})")
    return Plan(model, prompt, budget, str(hello.get("session")), selection)


def _first_answer(receive, peer: str):
    """The first message from a peer; a timeout says what usually causes it."""
    try:
        return receive()
    except ChannelTimeout as exc:
        raise ChannelTimeout(
            f"{exc}. The {peer} is not running, not reachable at that address, or refused "
            f"this role's CURVE key (check --keys on both sides)"
        ) from None


# ------------------------------------------------------------------------------------------ owner
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
    name or a checkpoint path). Returns the owner's report.

    budget: a `parties.budget.QueryBudget` charged for this session under `user_key` (the user's CURVE
    public key) before any weight is sent; a user over its budget is refused in the welcome."""
    from permllm.he import IndexLookupServer
    from permllm.model.loading import load_model

    spec, model = model, model_name(model)
    fam = family(model)
    phases = Phases()
    user, helper = channels["user"], channels["helper"]
    with phases.timed("load"):
        log("owner: loading the model")
        weights, _ = load_model(spec, tokenizer=False)
        arch = fam.arch_from_config(weights.config)
        max_positions = fam.max_positions(weights.config)
    arch_dict = arch.to_dict()
    card = fingerprint(model, arch_dict)

    hello = recv_json(user, "hello", timeout=setup_timeout)
    reservation = None
    try:
        plan = check_hello(hello, model, max_positions, fam.generates)
        if budget is not None:
            reservation = budget.reserve(user_key, plan.prompt_tokens + plan.max_new_tokens)
    except (ProtocolError, ConfigError) as exc:
        send_json(user, "welcome", {"error": str(exc)})
        try:  # best effort: the refusal itself is what this role reports
            send_json(helper, "owner-plan", {"error": f"the owner refused the session: {exc}"})
        except PermLLMError:
            pass
        raise
    send_json(
        user,
        "welcome",
        {
            "protocol": PROTOCOL_VERSION,
            "model": model,
            "arch": arch_dict,
            "fingerprint": card,
            "session": plan.session,
            "max_positions": max_positions,
            "eos_token_id": getattr(weights.config, "eos_token_id", None),
        },
    )
    server = None
    if fam.generates and plan.selection == "bfv":
        server = IndexLookupServer(user.recv_bytes("he.context", max_len=96 << 20, timeout=setup_timeout))

    seed = fresh_seed()
    send_json(
        helper,
        "owner-plan",
        {
            "protocol": PROTOCOL_VERSION,
            "session": plan.session,
            "arch": arch_dict,
            "fingerprint": card,
            "model": model,
            "prompt_tokens": plan.prompt_tokens,
            "max_new_tokens": plan.max_new_tokens,
            "selection": plan.selection,
        },
    )
    helper.send(SEED_TAG, seed)

    with phases.timed("prepare"):
        log("owner: folding, encoding and masking the weights; sending W - U to the user")
        bar = _progress(None, "owner: preparing weights", progress)
        prepared = fam.owner_weights(weights, seed, progress=bar.update)
        del weights
        sent_before = user.stats.bytes_sent
        for name, w in prepared.items():
            user.send(f"w.{name}", w.local - w.mask)
        bar.close()
    prepare_bytes = user.stats.bytes_sent - sent_before

    material = QueuedMaterial(seed)
    with phases.timed("offline"):
        received_before = helper.stats.bytes_received
        recv_records(helper, lambda r: material.extend([r]), timeout=setup_timeout)
    offline_bytes = helper.stats.bytes_received - received_before

    positions = plan.prompt_tokens + plan.max_new_tokens
    ctx = PartyContext(Role.OWNER, user, material)
    online_before = (user.stats.bytes_sent, user.stats.bytes_received, user.clock.depth)
    driver = fam.driver(arch, prepared, positions)
    with phases.timed("online"):
        run_session(fam, ctx, driver, plan, **({"lookup": server} if fam.generates else {}))
    if reservation is not None:
        # a decoder's last chosen token is never fed back; an encoder runs its prompt once
        budget.settle(reservation, driver.position + 1 if fam.generates else plan.prompt_tokens)
    return {
        "role": "owner",
        "phases_s": phases.seconds,
        "prepare_bytes": prepare_bytes,
        "offline_bytes": offline_bytes,
        "online_bytes_sent": user.stats.bytes_sent - online_before[0],
        "online_bytes_received": user.stats.bytes_received - online_before[1],
        "material_left": material.remaining,
        "peak_rss_mb": peak_rss_mb(),
    }


# ------------------------------------------------------------------------------------------ helper
def run_helper(channels, *, progress: bool = True, log=print, setup_timeout: float = SETUP_TIMEOUT_S) -> dict:
    """channels: dict with 'owner' and 'user' Channels. Deals, streams, returns the helper's report."""
    from protocols.context import DealerContext
    from protocols.material import Dealer
    from protocols.model.decoder_weights import weight_mask

    owner, user = channels["owner"], channels["user"]
    phases = Phases()
    owner_plan = _first_answer(lambda: recv_json(owner, "owner-plan", timeout=setup_timeout), "owner")
    owner_seed = owner.recv_bytes(SEED_TAG, max_len=16, timeout=setup_timeout)
    user_plan = recv_json(user, "user-plan", timeout=setup_timeout)
    user_seed = user.recv_bytes(SEED_TAG, max_len=16, timeout=setup_timeout)
    try:
        fam, arch, plan = _check_plans(owner_plan, user_plan)
        if len(owner_seed) != 16 or len(user_seed) != 16:
            raise ProtocolError("seeds must be 16 bytes")
    except (ProtocolError, ConfigError) as exc:
        for channel in (owner, user):  # both are waiting for material: tell them why none comes
            abort_records(channel, f"the helper refused the session: {exc}")
        raise
    prompt, budget = plan.prompt_tokens, plan.max_new_tokens
    shapes = fam.linear_shapes(arch)
    masks: dict = {}

    def mask_of(name):
        if name not in masks:
            d_in, d_out, _ = shapes[name]
            masks[name] = weight_mask(owner_seed, name, d_in, d_out)
        return masks[name]

    bar = _progress(None, "helper: dealing", progress, unit="call")

    def sink(owner_record, user_record):
        send_record(owner, owner_record)
        send_record(user, user_record)
        bar.update(1)

    log(f"helper: dealing material for a {prompt}-token prompt and {budget} new tokens")
    with phases.timed("offline"):
        dealer = Dealer(owner_seed, user_seed, sink=sink)
        run_session(
            fam, DealerContext(dealer, mask_of), fam.driver(arch, fam.helper_weights(arch), prompt + budget), plan
        )
        dealer.flush()
        finish_records(owner, dealer.calls)
        finish_records(user, dealer.calls)
        await_receipt(owner, dealer.calls, timeout=setup_timeout)
        await_receipt(user, dealer.calls, timeout=setup_timeout)
    bar.close()
    return {
        "role": "helper",
        "phases_s": phases.seconds,
        "calls": dealer.calls,
        "offline_bytes": owner.stats.bytes_sent + user.stats.bytes_sent,
        "peak_rss_mb": peak_rss_mb(),
    }


PLAN_FIELDS = {"protocol": int, "session": str, "fingerprint": str, "prompt_tokens": int, "max_new_tokens": int}


def _check_plans(owner_plan: dict, user_plan: dict):
    """The helper's check that the owner and the user describe the same session: (family, arch, plan);
    ProtocolError naming the first field that is missing, malformed or different."""
    for key, kind in PLAN_FIELDS.items():
        mine = require(owner_plan, key, kind, "owner", "owner-plan")
        theirs = require(user_plan, key, kind, "user", "user-plan")
        if mine != theirs:
            raise ProtocolError(f"{key} mismatch between the owner ({mine!r}) and the user ({theirs!r})")
    if owner_plan["protocol"] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol mismatch: the parties speak {owner_plan['protocol']}, the helper {PROTOCOL_VERSION}"
        )
    fam = family(require(owner_plan, "model", str, "owner", "owner-plan"))
    arch = fam.received_arch(owner_plan.get("arch"), "owner")
    if fingerprint(fam.name, arch.to_dict()) != owner_plan["fingerprint"]:
        raise ProtocolError("the owner's model fingerprint does not match its architecture")
    prompt, budget = owner_plan["prompt_tokens"], owner_plan["max_new_tokens"]
    if prompt < 1 or (budget < 1 if fam.generates else budget != 0) or prompt + budget > MAX_ARCH_DIMENSION:
        raise ProtocolError(f"bad plan: prompt_tokens={prompt}, max_new_tokens={budget}")
    selection, theirs = owner_plan.get("selection", TABLE), user_plan.get("selection", TABLE)
    if theirs != selection:
        raise ProtocolError(f"selection mismatch between the owner ({selection!r:.40}) and the user ({theirs!r:.40})")
    if selection not in SELECTION_MODES:
        raise ProtocolError(f"unknown token selection {selection!r:.40}")
    return fam, arch, Plan(fam.name, prompt, budget, owner_plan["session"], selection)


# ------------------------------------------------------------------------------------------ user
@dataclass
class UserRequest:
    model: str
    prompt: str
    max_new_tokens: int
    sampling: object = None
    selection: str = TABLE


def check_text(text, what: str) -> None:
    """A non-empty, valid UTF-8 string, or a ConfigError saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"the {what} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"the {what} is not valid UTF-8") from None


def prepare_prompt(tokenizer, prompt: str, max_new_tokens: int, max_positions: int | None = None) -> list[int]:
    """The chat-templated prompt ids; clear errors for input that cannot work, before any work."""
    from permllm.model.prompts import chat_token_ids

    check_text(prompt, "prompt")
    if max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    ids = chat_token_ids(tokenizer, prompt)
    if max_positions is not None and len(ids) + max_new_tokens > max_positions:
        raise ConfigError(
            f"the prompt ({len(ids)} tokens) plus --max-new-tokens ({max_new_tokens}) exceeds the "
            f"model's {max_positions} positions"
        )
    return ids


def prepare_sentence(tokenizer, sentence: str) -> list[int]:
    """[CLS] sentence [SEP] ids for an encoder (truncated like sentence-transformers)."""
    check_text(sentence, "sentence")
    return list(tokenizer(sentence, truncation=True)["input_ids"])


def _check_welcome(welcome: dict, plan: Plan, fam):
    """The user's check of the owner's welcome: the same protocol, model and session, an architecture
    that matches its fingerprint and room for the plan. Returns the architecture."""
    for key, want in (("protocol", PROTOCOL_VERSION), ("model", plan.model), ("session", plan.session)):
        got = welcome.get(key)
        if got != want:
            raise ProtocolError(f"{key} mismatch: the owner has {got!r:.60}, the user {want!r}")
    arch = fam.received_arch(welcome.get("arch"), "owner")
    if require(welcome, "fingerprint", str, "owner", "welcome") != fingerprint(plan.model, arch.to_dict()):
        raise ProtocolError("the owner's model fingerprint does not match its architecture")
    max_positions = require(welcome, "max_positions", int, "owner", "welcome")
    if plan.prompt_tokens + plan.max_new_tokens > max_positions:
        raise ConfigError(
            f"the prompt ({plan.prompt_tokens} tokens) plus the budget ({plan.max_new_tokens}) exceeds "
            f"the model's {max_positions} positions"
        )
    return arch


def run_user(
    channels,
    request: UserRequest,
    tokenizer,
    *,
    progress: bool = True,
    log=print,
    out=sys.stdout,
    setup_timeout: float = SETUP_TIMEOUT_S,
) -> dict:
    """channels: dict with 'owner' and 'helper' Channels. Streams the answer (or prints the embedding);
    returns the user's report."""
    from permllm.he import IndexLookupClient
    from protocols.model.generation import GenerationTrace, SamplingConfig, token_chooser

    name = model_name(request.model)
    fam = family(name)
    owner, helper = channels["owner"], channels["helper"]
    phases = Phases()
    if fam.generates:
        prompt_ids = prepare_prompt(tokenizer, request.prompt, request.max_new_tokens)
        plan = Plan(name, len(prompt_ids), request.max_new_tokens, selection=request.selection)
    else:
        prompt_ids = prepare_sentence(tokenizer, request.prompt)
        plan = Plan(name, len(prompt_ids), 0)
    send_json(owner, "hello", plan.hello())
    welcome = _first_answer(lambda: recv_json(owner, "welcome", timeout=setup_timeout), "owner")
    arch = _check_welcome(welcome, plan, fam)
    client = None
    if fam.generates and plan.selection == "bfv":
        client = IndexLookupClient(arch.vocab)
        owner.send("he.context", client.public_context())

    seed = fresh_seed()
    send_json(
        helper,
        "user-plan",
        {
            "protocol": PROTOCOL_VERSION,
            "session": plan.session,
            "fingerprint": welcome["fingerprint"],
            "prompt_tokens": plan.prompt_tokens,
            "max_new_tokens": plan.max_new_tokens,
            "selection": plan.selection,
        },
    )
    helper.send(SEED_TAG, seed)

    shapes = fam.linear_shapes(arch)
    weights = {}
    with phases.timed("prepare"):
        bar = _progress(len(shapes), "user: receiving masked weights", progress, unit="weight")
        for name, (d_in, d_out, _) in shapes.items():
            array = owner.recv(f"w.{name}", dtype=np.int64, shape=(d_in, d_out), timeout=setup_timeout)
            weights[name] = fam.user_weight(name, arch, torch.from_numpy(array))
            bar.update(1)
        bar.close()
    prepare_bytes = owner.stats.bytes_received

    material = QueuedMaterial(seed)
    with phases.timed("offline"):
        bar = _progress(None, "user: receiving offline material", progress, unit="call")

        def keep(record):
            material.extend([record])
            bar.update(1)

        recv_records(helper, keep, timeout=setup_timeout)
        bar.close()
    offline_bytes = helper.stats.bytes_received

    ctx = PartyContext(Role.USER, owner, material)
    driver = fam.driver(arch, weights, plan.prompt_tokens + plan.max_new_tokens)
    online_start = (owner.stats.bytes_sent, owner.stats.bytes_received, owner.clock.depth)
    report = {
        "role": "user",
        "prompt_tokens": plan.prompt_tokens,
        "prepare_bytes": prepare_bytes,
        "offline_bytes": offline_bytes,
    }
    if not fam.generates:
        with phases.timed("online"):
            embedding = run_session(fam, ctx, driver, plan, prompt_ids=prompt_ids)
        out.write(
            "embedding ("
            + str(len(embedding))
            + " dims, L2-normalised): "
            + " ".join(f"{v:+.4f}" for v in embedding[:8])
            + " ...\n"
        )
        out.flush()
        report.update(
            {
                "embedding": [float(v) for v in embedding],
                "text": "",
                "token_ids": [],
                "generated_tokens": 0,
                "online_s": phases.seconds["online"],
                "online_bytes": owner.stats.bytes_sent + owner.stats.bytes_received - online_start[0] - online_start[1],
                "online_flights": owner.clock.depth - online_start[2],
            }
        )
    else:
        eos = {i for i in (tokenizer.eos_token_id, welcome.get("eos_token_id")) if isinstance(i, int)}
        trace = GenerationTrace()
        tokens: list[int] = []
        printed = [""]

        def stream(token):
            tokens.append(token)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            out.write(text[len(printed[0]) :])
            out.flush()
            printed[0] = text

        choose = token_chooser(request.sampling or SamplingConfig())
        with phases.timed("online"):
            run_session(
                fam,
                ctx,
                driver,
                plan,
                prompt_ids=prompt_ids,
                eos_ids=frozenset(eos),
                choose=choose,
                lookup=client,
                on_token=stream,
                trace=trace,
            )
        out.write("\n")
        out.flush()
        byte_marks = [s + r for s, r in trace.token_bytes]
        report.update(
            {
                "generated_tokens": len(tokens),
                "token_ids": tokens,
                "text": tokenizer.decode(tokens, skip_special_tokens=True),
                "ttft_s": trace.token_times[0] - trace.start if trace.token_times else None,
                "decode_s_per_token": median_step(trace.token_times),
                "decode_s_per_token_p90": percentile_step(trace.token_times, 0.9),
                "online_bytes_per_token": median_step(byte_marks),
                "online_bytes_per_token_up": median_step([s for s, _ in trace.token_bytes]),
                "online_bytes_per_token_down": median_step([r for _, r in trace.token_bytes]),
                "prefill_bytes": byte_marks[0] - online_start[0] - online_start[1] if byte_marks else None,
                "flights_per_token": median_step(trace.token_depths),
                "prefill_flights": trace.token_depths[0] - trace.start_depth if trace.token_depths else None,
            }
        )
    report.update({"phases_s": phases.seconds, "material_left": material.remaining, "peak_rss_mb": peak_rss_mb()})
    return report
