"""The messages and checks of a session's handshake (steps 1 and 2 of `parties.roles`).

Every check raises ProtocolError (or ConfigError for a plan the model cannot hold) naming the first
field that is missing, malformed or different; nothing here touches weights or material.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from parties.families import MAX_ARCH_DIMENSION, family
from parties.models import PROTOCOL_VERSION, fingerprint
from parties.session import HELPER_MODE
from parties.wire import require
from permllm.errors import ChannelTimeout, ConfigError, ProtocolError
from permllm.fixed import ACT_BITS, WEIGHT_BITS
from protocols.selection import SELECTION_MODES, TABLE

SEED_TAG = "seed"
"""The tag of the 16-byte PRG seed the owner and the user each send the helper (the dealer's, fresh
for every session)."""
MASK_SEED_TAG = "mask-seed"
"""The tag of the owner's 16-byte weight-mask seed, sent to the helper after its dealer seed (long-lived:
`parties.masks`)."""

PLAN_FIELDS = {"protocol": int, "session": str, "fingerprint": str, "prompt_tokens": int, "max_new_tokens": int}
"""The fields of the owner's and the user's plan that the helper requires to agree."""


@dataclass
class Plan:
    """What the user asks for; all of it is public to the three parties."""

    model: str
    prompt_tokens: int
    max_new_tokens: int
    session: str = field(default_factory=lambda: secrets.token_hex(8))
    selection: str = TABLE  # the token selection mode (protocols.selection)
    mode: str = HELPER_MODE  # who makes the material: "helper" or "two-party" (parties.session.MODES)

    def hello(self) -> dict:
        """user -> owner: the user's opening message."""
        return {
            "protocol": PROTOCOL_VERSION,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "max_new_tokens": self.max_new_tokens,
            "act_bits": ACT_BITS,
            "weight_bits": WEIGHT_BITS,
            "session": self.session,
            "selection": self.selection,
            "mode": self.mode,
        }

    def for_helper(self, card: str) -> dict:
        """user -> helper: the plan the helper compares with the owner's (`check_plans`)."""
        return {
            "protocol": PROTOCOL_VERSION,
            "session": self.session,
            "fingerprint": card,
            "prompt_tokens": self.prompt_tokens,
            "max_new_tokens": self.max_new_tokens,
            "selection": self.selection,
        }


@dataclass(frozen=True)
class Offer:
    """What the owner publishes about its model: the architecture, its fingerprint and limits."""

    model: str
    arch: Any
    max_positions: int
    eos_token_id: int | None
    weights_digest: str = ""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.model, self.arch.to_dict())

    def welcome(self, plan: Plan) -> dict:
        """owner -> user: the answer to an accepted hello."""
        return {
            "protocol": PROTOCOL_VERSION,
            "model": self.model,
            "arch": self.arch.to_dict(),
            "fingerprint": self.fingerprint,
            "weights_digest": self.weights_digest,
            "session": plan.session,
            "max_positions": self.max_positions,
            "eos_token_id": self.eos_token_id,
        }

    def for_helper(self, plan: Plan) -> dict:
        """owner -> helper: the plan as the user sends it, with the model and its architecture (`check_plans`)."""
        return {**plan.for_helper(self.fingerprint), "arch": self.arch.to_dict(), "model": self.model}


OFFERED_SELECTIONS = (TABLE,)
"""The token selections an owner accepts: "bfv" is kept for a helper-free mode, but its reply flood does
not hide the permutation from the user yet (SECURITY.md), so no owner offers it."""


def mode_mismatch(user_mode, owner_mode: str) -> str:
    """The refusal of a session whose user asks for another mode than the owner serves."""
    return (
        f"mode mismatch: the user asks for a {user_mode!r:.40} session, the owner serves {owner_mode!r} "
        "sessions (start both with the same --mode)"
    )


def check_hello(
    hello: dict, model: str, max_positions: int, offered=OFFERED_SELECTIONS, mode: str = HELPER_MODE
) -> Plan:
    """The owner's check of the user's hello; raises ProtocolError naming the first mismatch.
    The token budget is the model family's: at least 1 for a decoder, 0 for an encoder (one embedding).
    A hello without a selection asks for "table"; one the owner does not offer is refused. A hello
    without a mode asks for "helper"; a mode other than the owner's `mode` is refused."""
    asked = hello.get("mode", HELPER_MODE)
    if asked != mode:
        raise ProtocolError(mode_mismatch(asked, mode))
    expected = {"protocol": PROTOCOL_VERSION, "model": model, "act_bits": ACT_BITS, "weight_bits": WEIGHT_BITS}
    for key, want in expected.items():
        if hello.get(key) != want:
            raise ProtocolError(f"{key} mismatch: the user has {hello.get(key)!r}, the owner {want!r}")
    prompt, budget = hello.get("prompt_tokens"), hello.get("max_new_tokens")
    if (
        not isinstance(prompt, int)
        or not isinstance(budget, int)
        or prompt < 1
        or not family(model).accepts_budget(budget)
    ):
        raise ProtocolError(f"bad plan: prompt_tokens={prompt!r}, max_new_tokens={budget!r}")
    if prompt + budget > max_positions:
        raise ProtocolError(f"prompt ({prompt}) plus budget ({budget}) exceeds the model's {max_positions} positions")
    selection = hello.get("selection", TABLE)
    if selection not in offered:
        raise ProtocolError(f"token selection {selection!r:.40} is not offered (the owner offers {', '.join(offered)})")
    return Plan(model, prompt, budget, str(hello.get("session")), selection, mode)


def check_welcome(welcome: dict, plan: Plan, fam):
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


def check_plans(owner_plan: dict, user_plan: dict):
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
    if prompt < 1 or not fam.accepts_budget(budget) or prompt + budget > MAX_ARCH_DIMENSION:
        raise ProtocolError(f"bad plan: prompt_tokens={prompt}, max_new_tokens={budget}")
    selection, theirs = owner_plan.get("selection", TABLE), user_plan.get("selection", TABLE)
    if theirs != selection:
        raise ProtocolError(f"selection mismatch between the owner ({selection!r:.40}) and the user ({theirs!r:.40})")
    if selection not in SELECTION_MODES:
        raise ProtocolError(f"unknown token selection {selection!r:.40}")
    return fam, arch, Plan(fam.name, prompt, budget, owner_plan["session"], selection)


def first_answer(receive, peer: str):
    """The first message from a peer; a timeout says what usually causes it."""
    try:
        return receive()
    except ChannelTimeout as exc:
        raise ChannelTimeout(
            f"{exc}. The {peer} is not running, not reachable at that address, or refused "
            f"this role's CURVE key (check --keys on both sides)"
        ) from None
