"""Private generation: prefill, then token by token, with the token chosen on the user's side.

`generate(ctx, ...)` is called by the owner, the user and the helper's dry run alike.
    user:  knows the prompt ids, chooses tokens, decides when to stop, streams text
    owner: knows only the prompt length and the budget (public), learns nothing else
    helper (dry run): deals material for the whole budget
Stopping: after each chosen token the user tells the owner whether to go on (one int64 sent in the
same flight as the next embedding message, so it adds no flight). This reveals the answer's length
to the owner, as any protocol that stops early must.
Token selection: `selection` names the mode of `protocols.selection.select_token` ("table", with
helper-dealt material, by default; "bfv" takes a `lookup` on both parties and is not secure yet).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from permllm.errors import ConfigError
from protocols.selection import TABLE, select_token


@dataclass(frozen=True)
class SamplingConfig:
    """How the user chooses tokens. temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass
class GenerationTrace:
    """Per-token timings, flights and bytes (filled on each party's side)."""

    start: float = 0.0
    start_depth: int = 0
    token_times: list[float] = field(default_factory=list)
    token_depths: list[int] = field(default_factory=list)
    token_bytes: list[tuple[int, int]] = field(default_factory=list)

    def mark(self, ctx) -> None:
        self.token_times.append(time.perf_counter())
        self.token_depths.append(ctx.channel.clock.depth)
        stats = ctx.channel.stats
        self.token_bytes.append((stats.bytes_sent, stats.bytes_received))


def token_chooser(sampling: SamplingConfig) -> Callable[[np.ndarray], int]:
    """The user's choice over permuted logits (argmax, or temperature/top-k/top-p sampling)."""
    from permllm.sampling import choose_token

    generator = np.random.default_rng(sampling.seed)
    return lambda logits: choose_token(
        logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, generator=generator
    )


def generate(
    ctx,
    decoder,
    *,
    prompt_len: int,
    max_new_tokens: int,
    prompt_ids: list[int] | None = None,
    eos_ids: frozenset[int] = frozenset(),
    choose: Callable[[np.ndarray], int] | None = None,
    selection: str = TABLE,
    lookup=None,
    on_token: Callable[[int], None] | None = None,
    trace: GenerationTrace | None = None,
) -> list[int] | None:
    """Generate up to max_new_tokens privately; returns the token ids on the user's side."""
    if prompt_len < 1:
        raise ConfigError("the prompt is empty")
    if max_new_tokens < 1:
        raise ConfigError("max_new_tokens must be at least 1")
    if trace is not None:
        trace.start = time.perf_counter()
        trace.start_depth = 0 if ctx.dealing else ctx.channel.clock.depth
    logits = decoder.forward(ctx, prompt_ids, prompt_len, for_selection=True)
    choose = decoder.normalized_chooser(choose)  # the final norm of a decode step is folded into the choice
    tokens: list[int] = []
    for step in range(max_new_tokens):
        token = select_token(ctx, logits, choose, lookup, mode=selection)
        last_by_budget = step == max_new_tokens - 1
        if not ctx.dealing and trace is not None:
            trace.mark(ctx)
        if ctx.dealing:
            go_on = not last_by_budget
        elif ctx.is_owner:
            go_on = not last_by_budget and bool(ctx.channel.recv("continue", dtype=np.int64, shape=(1,))[0])
        else:
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            go_on = not last_by_budget and token not in eos_ids
            if not last_by_budget:
                ctx.channel.send("continue", np.array([int(go_on)], dtype=np.int64))
        if not go_on:
            break
        logits = decoder.forward(ctx, [token] if token is not None else None, 1, for_selection=True)
    return None if ctx.dealing or ctx.is_owner else tokens
