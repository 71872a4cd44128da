"""Fidelity of private generation: the secure engine against the plaintext model, prompt by prompt.

Two measurements per prompt, both against a plaintext reference: the transformers model itself
(`TransformersReference`: `generate(do_sample=False)` and its forward logits), which the command line
and the SmolLM2 tests use, or the float64 `DecoderReference` of the same weights (the default of the
functions; `tests/test_model_loading.py::test_greedy_generation_matches_hf` checks its greedy tokens
against transformers' and its logits to a small relative error):

* greedy: the full private protocol (`parties.session.generate`: owner, user and an in-process dealer;
  the token chosen on the user's side under a permutation and recovered with the helper-dealt table
  of `protocols.selection`) against the
  reference's greedy continuation, both stopping after the eos token (`weights.config.eos_token_id`,
  included in the output as HF does). Identical means the two token lists are equal.
* teacher-forced: one secure session prefills the prompt and decodes the forced tokens one by one;
  after each forward pass the user opens the logits to itself (`protocols.basic.reveal_to`), and they
  are compared with the reference's logits at the same position: top-1 agreement, the largest absolute
  logit error, and the largest error relative to the reference's logit range (max - min) there.
  Position i is the one that predicts forced_ids[i], so len(forced_ids) positions are compared and the
  last forced token is never fed. The report forces the plaintext greedy continuation, so a secure
  top-1 that disagrees is exactly a token where secure greedy would leave the plaintext path.

Preparing the owner's weights (folding, encoding, masking) is done once per report with
`parties.session.prepare_model`; pass `prepared=` to `teacher_forced` / `greedy_agreement` to reuse it
(each session still draws its own dealer seeds). Without it, `greedy_agreement` runs
`private_generate_inprocess`, which prepares the weights itself. The report and its table are in
`permllm_bench.fidelity_report`, the command line in `permllm_bench.fidelity_cli`:

    python -m permllm_bench.fidelity --prompts all --tokens 32 --json out.json
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from parties.inprocess import Seeds
from parties.session import SESSION_TIMEOUT_S, PreparedModel, generate, prepare_model, private_generate_inprocess
from permllm.fixed import decode
from permllm.model.reference import DecoderReference
from protocols.basic import reveal_to
from protocols.context import Role

PLAINTEXT_REFERENCE = (
    "float64 DecoderReference (its greedy tokens equal transformers' generate(do_sample=False): "
    "tests/test_model_loading.py::test_greedy_generation_matches_hf)"
)
TRANSFORMERS_REFERENCE = "transformers AutoModelForCausalLM (float32): generate(do_sample=False) and forward logits"


class TransformersReference:
    """The plaintext transformers model behind DecoderReference's interface: prefill / decode return its
    forward logits as float64 (decode runs the whole sequence again, which is cheap at these lengths and
    needs no cache API), generate_greedy is transformers' own generate."""

    description = TRANSFORMERS_REFERENCE

    def __init__(self, hf_model, eos_token_id: int | None):
        self.model = hf_model
        self.eos_token_id = eos_token_id
        self._ids: list[int] = []

    @torch.no_grad()
    def prefill(self, ids) -> torch.Tensor:
        self._ids = [int(t) for t in ids]
        return self.model(torch.tensor([self._ids])).logits[0].double()

    @torch.no_grad()
    def decode(self, token: int) -> torch.Tensor:
        self._ids.append(int(token))
        return self.model(torch.tensor([self._ids])).logits[0, -1].double()

    @torch.no_grad()
    def generate_greedy(self, ids, n: int, stop_at_eos: bool = True) -> list[int]:
        prompt = torch.tensor([list(ids)])
        eos = self.eos_token_id if stop_at_eos else None
        out = self.model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos if eos is not None else 0,
        )
        return [int(t) for t in out[0, prompt.shape[1] :]]


def prepared_for(weights, prepared: PreparedModel | None) -> PreparedModel:
    if prepared is None:
        return prepare_model(weights)
    if prepared.arch != prepared.family.arch_from_config(weights.config):
        raise ValueError("the prepared weights are for a different architecture")
    return prepared


@dataclass
class TeacherForcedResult:
    """Secure vs reference logits at each position; position i predicts forced_ids[i]."""

    prompt_len: int
    forced_ids: list[int]
    secure_top1: list[int]
    reference_top1: list[int]
    abs_errors: list[float]  # per position: max over the vocabulary of |secure - reference|
    rel_errors: list[float]  # per position: abs_errors / (max - min of the reference logits)
    margins: list[float]  # per position: reference top-1 minus top-2 logit
    wall_s: float

    @property
    def positions(self) -> int:
        return len(self.secure_top1)

    @property
    def agreements(self) -> int:
        return sum(s == r for s, r in zip(self.secure_top1, self.reference_top1))

    @property
    def agreement(self) -> float:
        return self.agreements / self.positions if self.positions else 1.0

    @property
    def max_abs_error(self) -> float:
        return max(self.abs_errors, default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max(self.rel_errors, default=0.0)

    def disagreements(self) -> list[dict]:
        """The positions whose top-1 differs, with the reference's top-1/top-2 margin there."""
        return [
            {"position": i, "secure": s, "reference": r, "reference_margin": m}
            for i, (s, r, m) in enumerate(zip(self.secure_top1, self.reference_top1, self.margins))
            if s != r
        ]


def _forced_session(
    ctx, decoder, prompt_ids: list[int] | None, feed: list[int] | None, prompt_len: int, steps: int
) -> list[torch.Tensor]:
    """Prefill, then `steps` single-token decodes; after each forward pass the logits are opened to the
    user. The user passes the token ids; the owner and the dealer's dry run pass None."""
    logits_seen = []
    for step in range(steps + 1):
        if step == 0:
            ids, count = prompt_ids, prompt_len
        else:
            ids, count = (None if feed is None else [feed[step - 1]]), 1
        logits = decoder.forward(ctx, ids, count)
        opened = reveal_to(ctx, Role.USER, logits, tag="logits")
        if opened is not None:
            logits_seen.append(decode(opened, logits.bits).reshape(-1))
    return logits_seen  # empty on the owner's side and in the dry run


def secure_forced_logits(
    weights,
    prompt_ids: Sequence[int],
    feed: Sequence[int],
    *,
    prepared: PreparedModel | None = None,
    seeds: Seeds | None = None,
    timeout: float = SESSION_TIMEOUT_S,
) -> list[torch.Tensor]:
    """One secure session (owner, user, in-process dealer): the logits (vocab,) float64 the user sees
    after the prefill of `prompt_ids` and after each token of `feed`: 1 + len(feed) vectors."""
    prepared = prepared_for(weights, prepared)
    prompt, feed = [int(t) for t in prompt_ids], [int(t) for t in feed]
    if not prompt:
        raise ValueError("the prompt is empty")
    steps = len(feed)
    run = prepared.session(
        len(prompt) + steps,
        lambda ctx, dec: _forced_session(ctx, dec, None, None, len(prompt), steps),
        lambda ctx, dec: _forced_session(ctx, dec, None, None, len(prompt), steps),
        lambda ctx, dec: _forced_session(ctx, dec, prompt, feed, len(prompt), steps),
        seeds=seeds,
        timeout=timeout,
    )
    if run.material_left:
        raise RuntimeError("the session left dealt material unused: dry run and online run diverged")
    return run.pair.user


def teacher_forced(
    weights,
    prompt_ids: Sequence[int],
    forced_ids: Sequence[int],
    *,
    prepared: PreparedModel | None = None,
    seeds: Seeds | None = None,
    reference: DecoderReference | None = None,
) -> TeacherForcedResult:
    """Secure vs float64 reference logits at each of the len(forced_ids) positions that predict a
    forced token (the prefill's last position, then after each of forced_ids[:-1])."""
    forced = [int(t) for t in forced_ids]
    if not forced:
        raise ValueError("teacher forcing needs at least one forced token")
    start = time.perf_counter()
    secure = secure_forced_logits(weights, prompt_ids, forced[:-1], prepared=prepared, seeds=seeds)
    wall = time.perf_counter() - start

    ref = reference or DecoderReference(weights)
    want = [ref.prefill(list(prompt_ids))[-1]] + [ref.decode(t) for t in forced[:-1]]
    result = TeacherForcedResult(len(prompt_ids), forced, [], [], [], [], [], wall)
    for got, w in zip(secure, want):
        err = float(torch.max(torch.abs(got - w)))
        top2 = torch.topk(w, 2).values
        result.secure_top1.append(int(torch.argmax(got)))
        result.reference_top1.append(int(torch.argmax(w)))
        result.abs_errors.append(err)
        result.rel_errors.append(err / float(w.max() - w.min()))
        result.margins.append(float(top2[0] - top2[1]))
    return result


def greedy_agreement(
    weights,
    prompt_ids: Sequence[int],
    n: int,
    *,
    prepared: PreparedModel | None = None,
    seeds: Seeds | None = None,
    reference: DecoderReference | None = None,
    on_token: Callable[[int], None] | None = None,
) -> tuple[list[int], list[int]]:
    """(secure_ids, plain_ids): up to n greedy tokens from the private protocol and from the float64
    reference, both stopping after eos (included). Without `prepared` the secure side is exactly
    `private_generate_inprocess`."""
    prompt = [int(t) for t in prompt_ids]
    eos = weights.config.eos_token_id
    eos_ids = frozenset() if eos is None else frozenset({int(eos)})
    if prepared is None:
        secure = private_generate_inprocess(weights, prompt, n, seeds=seeds, eos_ids=eos_ids, on_token=on_token)
    else:
        secure = generate(prepared_for(weights, prepared), prompt, n, seeds=seeds, eos_ids=eos_ids, on_token=on_token)
    plain = (reference or DecoderReference(weights)).generate_greedy(prompt, n, stop_at_eos=eos is not None)
    return list(secure.tokens), plain


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (or the shorter length if one is a prefix); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


if __name__ == "__main__":
    from permllm_bench.fidelity_cli import main

    raise SystemExit(main())
