"""Model families as the roles see them: how to prepare weights and what one online session runs.

Written once per architecture family (Llama-style decoder, BERT-style encoder); a role picks the
family from the public model name and never branches on it elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from permllm.errors import ConfigError


@dataclass(frozen=True)
class Family:
    """name: the model name; generates: a decoder (generation) or an encoder (one embedding)."""

    name: str
    generates: bool
    arch_from_config: Callable
    arch_from_dict: Callable
    linear_shapes: Callable
    owner_weights: Callable
    user_weight: Callable
    helper_weights: Callable
    driver: Callable  # (arch, weights, positions) -> SecureDecoder | SecureEncoder

    def max_positions(self, config) -> int:
        return int(getattr(config, "max_position_embeddings", None) or 2048)


def family(model: str) -> Family:
    if model == "smollm2":
        from permllm.model import decoder_weights as dw
        from permllm.model.secure_decoder import SecureDecoder

        return Family("smollm2", True, dw.DecoderArch.from_config, lambda d: dw.DecoderArch(**d), dw.linear_shapes,
                      dw.owner_weights, dw.user_weight, dw.helper_weights, SecureDecoder)
    if model == "minilm":
        from permllm.model import encoder_weights as ew
        from permllm.model.secure_encoder import SecureEncoder

        return Family("minilm", False, ew.EncoderArch.from_config, lambda d: ew.EncoderArch(**d), ew.linear_shapes,
                      ew.owner_weights, ew.user_weight, ew.helper_weights, SecureEncoder)
    raise ConfigError(f"unknown model {model!r}; choose smollm2 or minilm")


def run_session(fam: Family, ctx, driver, plan, **user_side) -> Any:
    """The online phase both roles (and the helper's dry run) run for this family.

    user_side (user only): prompt_ids, eos_ids, choose, on_token, trace; lookup for either role."""
    if fam.generates:
        from permllm.model.generation import generate

        return generate(ctx, driver, prompt_len=plan.prompt_tokens, max_new_tokens=plan.max_new_tokens, **user_side)
    return driver.embed(ctx, user_side.get("prompt_ids"), plan.prompt_tokens)
