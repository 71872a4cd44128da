"""Model families as the roles see them: how to prepare weights and what one online session runs.

Written once per architecture family (Llama-style decoder, BERT-style encoder); a role picks the
family from the public model name and never branches on it elsewhere: what differs between a
generating decoder and an embedding encoder (the token budget, the HE index lookup of token
selection, the online session, the user's input and output) is a method of the family.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from permllm.errors import ConfigError, ProtocolError

MAX_ARCH_DIMENSION = 1 << 20
"""The largest size a peer may declare for any architecture field (SmolLM2's largest is its 49152-token
vocabulary): a malformed or hostile handshake cannot make a role allocate without bound."""
MAX_LINEAR_ELEMENTS = 1 << 31
"""The most linear-weight elements a received architecture may imply (16 GiB of ring words; SmolLM2
has 1.3e8): together with MAX_ARCH_DIMENSION this bounds what the user and the helper allocate."""


@dataclass(frozen=True)
class Family:
    """name: the model name; the callables come from the family's weight module and secure driver."""

    name: str
    arch_from_config: Callable
    arch_from_dict: Callable
    linear_shapes: Callable
    owner_weights: Callable
    user_weight: Callable
    helper_weights: Callable
    driver: Callable  # (arch, weights, positions) -> SecureDecoder | SecureEncoder

    def max_positions(self, config) -> int:
        return int(getattr(config, "max_position_embeddings", None) or 2048)

    def received_arch(self, message, sender: str):
        """The architecture a peer sent, checked field by field and for its total size; ProtocolError
        naming the sender otherwise."""
        try:
            arch = self.arch_from_dict(message)
            elements = sum(d_in * d_out for d_in, d_out, _ in self.linear_shapes(arch).values())
        except ProtocolError as exc:
            raise ProtocolError(f"the {sender} sent a bad architecture: {exc}") from None
        if elements > MAX_LINEAR_ELEMENTS:
            raise ProtocolError(
                f"the {sender} sent an architecture of {elements} linear-weight elements "
                f"(at most {MAX_LINEAR_ELEMENTS} accepted)"
            )
        return arch

    # ------------------------------------------------------------------ what differs between families
    def accepts_budget(self, max_new_tokens: int) -> bool:
        """Whether a plan may ask for this many new tokens."""
        raise NotImplementedError

    def owner_lookup(self, user, timeout: float, vocab: int):
        """The owner's side of token selection, set up from the user's HE context (None if unused)."""
        raise NotImplementedError

    def user_lookup(self, owner, arch):
        """The user's side of token selection; sends its HE public context to the owner (None if unused)."""
        raise NotImplementedError

    def run_session(self, ctx, driver, plan, **user_side) -> Any:
        """The online phase both roles (and the helper's dry run) run. user_side (user only): prompt_ids,
        eos_ids, choose, on_token, trace; lookup: either role's token-selection side, or None."""
        raise NotImplementedError

    def positions_run(self, driver, plan) -> int:
        """The positions a finished session actually ran through the model (what a query budget charges)."""
        raise NotImplementedError

    def material_calls(self, arch, plan) -> int:
        """The number of protocol calls (material records per party) the helper deals for `plan`: the
        bound a party holds the helper's material stream to (`parties.wire.recv_records`)."""
        raise NotImplementedError

    def user_input(self, tokenizer, request) -> tuple[list[int], int]:
        """The user's token ids and the token budget of its plan, from a `UserRequest`."""
        raise NotImplementedError

    def user_online(self, session, request, tokenizer, out):
        """The user's online phase: runs the session (a `parties.user_online.OnlineSession`), writes the
        answer to `out`, returns the online part of the user's report."""
        raise NotImplementedError


class DecoderFamily(Family):
    """A Llama-style decoder: generates up to the token budget, choosing tokens by the plan's selection."""

    def accepts_budget(self, max_new_tokens: int) -> bool:
        return max_new_tokens >= 1

    def owner_lookup(self, user, timeout: float, vocab: int):
        from permllm.he import DEFAULT_MAX_CONTEXT_BYTES, IndexLookupServer

        context = user.recv_bytes("he.context", max_len=DEFAULT_MAX_CONTEXT_BYTES, timeout=timeout)
        return IndexLookupServer(context, vocab_size=vocab)

    def user_lookup(self, owner, arch):
        from permllm.he import IndexLookupClient

        client = IndexLookupClient(arch.vocab)
        owner.send("he.context", client.public_context())
        return client

    def run_session(self, ctx, driver, plan, lookup=None, **user_side) -> Any:
        from protocols.model.generation import generate

        budget = dict(prompt_len=plan.prompt_tokens, max_new_tokens=plan.max_new_tokens)
        return generate(ctx, driver, **budget, lookup=lookup, selection=plan.selection, **user_side)

    def positions_run(self, driver, plan) -> int:
        return driver.position + 1  # the last chosen token is never fed back

    def material_calls(self, arch, plan) -> int:
        # prefill: embedding, 12 per layer, final norm, lm_head, the token's selection (2); each later
        # token: embedding, 11 per layer (second norm folded), the folded final norm's reveal, lm_head,
        # selection (2). tests/test_peer_input.py checks this against the dealer's count.
        prefill, per_token = 12 * arch.layers + 5, 11 * arch.layers + 5
        return prefill + (plan.max_new_tokens - 1) * per_token

    def user_input(self, tokenizer, request) -> tuple[list[int], int]:
        from parties.user_input import prepare_prompt

        return prepare_prompt(tokenizer, request.prompt, request.max_new_tokens), request.max_new_tokens

    def user_online(self, session, request, tokenizer, out):
        from parties.user_online import stream_answer

        return stream_answer(self, session, request, tokenizer, out)


class EncoderFamily(Family):
    """A BERT-style encoder: one embedding of the prompt, no token budget and no token selection."""

    def accepts_budget(self, max_new_tokens: int) -> bool:
        return max_new_tokens == 0

    def owner_lookup(self, user, timeout: float, vocab: int):
        return None

    def user_lookup(self, owner, arch):
        return None

    def run_session(self, ctx, driver, plan, lookup=None, prompt_ids=None) -> Any:
        return driver.embed(ctx, prompt_ids, plan.prompt_tokens)

    def positions_run(self, driver, plan) -> int:
        return plan.prompt_tokens

    def material_calls(self, arch, plan) -> int:
        return 12 * arch.layers + 3  # embedding, its norm, 12 per layer, pooling, reveal

    def user_input(self, tokenizer, request) -> tuple[list[int], int]:
        from parties.user_input import prepare_sentence

        return prepare_sentence(tokenizer, request.prompt), 0

    def user_online(self, session, request, tokenizer, out):
        from parties.user_online import print_embedding

        return print_embedding(self, session, out)


def family(model: str) -> Family:
    """The family of a model by its public name (`smollm2`, `minilm`, or `llama:NAME` for a checkpoint)."""
    if model == "smollm2" or model.startswith("llama:") and len(model) > len("llama:"):
        from protocols.model import decoder_weights as dw
        from protocols.model.secure_decoder import SecureDecoder

        return DecoderFamily(
            model,
            dw.DecoderArch.from_config,
            arch_reader(dw.DecoderArch),
            dw.linear_shapes,
            dw.owner_weights,
            dw.user_weight,
            dw.helper_weights,
            SecureDecoder,
        )
    if model == "minilm":
        from protocols.model import encoder_weights as ew
        from protocols.model.secure_encoder import SecureEncoder

        return EncoderFamily(
            "minilm",
            ew.EncoderArch.from_config,
            arch_reader(ew.EncoderArch),
            ew.linear_shapes,
            ew.owner_weights,
            ew.user_weight,
            ew.helper_weights,
            SecureEncoder,
        )
    raise ConfigError(f"unknown model {model!r}; choose smollm2, minilm or llama:NAME (a Llama-style checkpoint)")


def arch_reader(cls) -> Callable[[Any], Any]:
    """A checked reader of an architecture received in a handshake: exactly the dataclass's fields, each
    of its type, integers in [1, MAX_ARCH_DIMENSION], floats finite and positive; ProtocolError otherwise."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}

    def read(message):
        if not isinstance(message, dict):
            raise ProtocolError(f"the architecture is not a JSON object: {message!r:.80}")
        if set(message) != set(fields):
            missing, extra = sorted(set(fields) - set(message)), sorted(set(message) - set(fields))
            raise ProtocolError(f"the architecture has missing fields {missing} and unknown fields {extra}")
        for name, kind in fields.items():
            value = message[name]
            if kind in ("int", int):
                ok = type(value) is int and 1 <= value <= MAX_ARCH_DIMENSION
            elif kind in ("float", float):
                ok = type(value) in (int, float) and math.isfinite(value) and value > 0
            else:
                ok = type(value) is bool
            if not ok:
                raise ProtocolError(f"architecture field {name!r} has an invalid value {value!r:.40}")
        return cls(**message)

    return read
