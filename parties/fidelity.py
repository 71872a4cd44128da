"""Fidelity of private generation: the secure engine against the plaintext model, prompt by prompt.

Two measurements per prompt, both against a plaintext reference: the transformers model itself
(`TransformersReference`: `generate(do_sample=False)` and its forward logits), which the command line
and the SmolLM2 tests use, or the float64 `DecoderReference` of the same weights (the default of the
functions; `tests/test_model_loading.py::test_greedy_generation_matches_hf` shows its greedy tokens
equal transformers', and its logits match to ~2e-6 relative):

* greedy: the full private protocol (`parties.inprocess.private_generate_inprocess`: owner, user and
  an in-process dealer; the token chosen on the user's side under a permutation and recovered
  with the helper-dealt table of `protocols.selection`) against the reference's greedy continuation,
  both stopping after the eos token (`weights.config.eos_token_id`, included in the output as HF
  does). Identical means the two token lists are equal.
* teacher-forced: one secure session prefills the prompt and decodes the forced tokens one by one;
  after each forward pass the user opens the logits to itself (`protocols.basic.reveal_to`), and they
  are compared with the reference's logits at the same position: top-1 agreement, the largest absolute
  logit error, and the largest error relative to the reference's logit range (max - min) there.
  Position i is the one that predicts forced_ids[i], so len(forced_ids) positions are compared and the
  last forced token is never fed. The report forces the plaintext greedy continuation, so a secure
  top-1 that disagrees is exactly a token where secure greedy would leave the plaintext path.

Preparing the owner's weights (folding, encoding, masking: ~10 s for SmolLM2-135M on 2 cores) is done
once per report with `prepare_weights`; pass `prepared=` to `teacher_forced` / `greedy_agreement` to
reuse it. Without `prepared`, `greedy_agreement` calls `private_generate_inprocess` itself (which
prepares the weights on every call); with it, `_private_generate` runs the same session minus the
preparation.

    python -m parties.fidelity --prompts all --tokens 32 --json out.json

Measured 2026-12-01 against transformers (2 cores, all 28 FIDELITY_PROMPTS x 32 tokens, 81 min): 28/28
greedy continuations identical, 826/826 teacher-forced top-1 agreements, largest logit error 0.102
(2.1e-3 of the logit range, on "Hi"; 0.022-0.064 on every other prompt). The error is systematic
(fixed-point rounding; repeated runs differ by < 0.005) and largely common to all logits of a
position: even a reference top-1/top-2 margin of 0.003 did not flip.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from parties.inprocess import Seeds, deal, private_generate_inprocess, run_pair
from permllm.fixed import decode
from permllm.model.reference import DecoderReference
from permllm.prg import fresh_seed
from protocols.basic import reveal_to
from protocols.context import Role
from protocols.model.decoder_weights import DecoderArch, helper_weights, owner_weights, user_weight
from protocols.model.secure_decoder import SecureDecoder

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


SESSION_TIMEOUT_S = 3600.0


# ----------------------------------------------------------------------------------------------
# prepared weights
# ----------------------------------------------------------------------------------------------


@dataclass
class PreparedWeights:
    """The owner's folded, encoded and masked weights and the user's W - U, built once and reused.

    The weight masks U come from `seed`; each session still draws its own dealer seeds."""

    arch: DecoderArch
    seed: bytes
    owner: dict
    user: dict

    def mask(self, name: str) -> torch.Tensor:
        """U of weight `name`, for the dealer's dry run."""
        return self.owner[name].mask


def prepare_weights(weights, seed: bytes | None = None) -> PreparedWeights:
    """Fold, encode and mask `weights` (a DecoderWeights) for the owner and derive the user's W - U."""
    seed = seed or fresh_seed()
    arch = DecoderArch.from_config(weights.config)
    owner = owner_weights(weights, seed)
    user = {name: user_weight(name, arch, w.local - w.mask) for name, w in owner.items()}
    return PreparedWeights(arch=arch, seed=seed, owner=owner, user=user)


def _prepared_for(weights, prepared: PreparedWeights | None) -> PreparedWeights:
    if prepared is None:
        return prepare_weights(weights)
    if prepared.arch != DecoderArch.from_config(weights.config):
        raise ValueError("the prepared weights are for a different architecture")
    return prepared


# ----------------------------------------------------------------------------------------------
# teacher forcing
# ----------------------------------------------------------------------------------------------


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
    ctx, decoder: SecureDecoder, prompt_ids: list[int] | None, feed: list[int] | None, prompt_len: int, steps: int
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
    prepared: PreparedWeights | None = None,
    seeds: Seeds | None = None,
    timeout: float = SESSION_TIMEOUT_S,
) -> list[torch.Tensor]:
    """One secure session (owner, user, in-process dealer): the logits (vocab,) float64 the user sees
    after the prefill of `prompt_ids` and after each token of `feed`: 1 + len(feed) vectors."""
    prepared = _prepared_for(weights, prepared)
    seeds = seeds or Seeds.fresh()
    arch, prompt, feed = prepared.arch, [int(t) for t in prompt_ids], [int(t) for t in feed]
    if not prompt:
        raise ValueError("the prompt is empty")
    positions, steps = len(prompt) + len(feed), len(feed)

    def session(party_weights, ids, tokens):
        return lambda ctx: _forced_session(
            ctx, SecureDecoder(arch, party_weights, positions), ids, tokens, len(prompt), steps
        )

    owner_mat, user_mat = deal(session(helper_weights(arch), None, None), seeds, weight_mask=prepared.mask)
    run = run_pair(
        session(prepared.owner, None, None), session(prepared.user, prompt, feed), owner_mat, user_mat, timeout=timeout
    )
    if owner_mat.remaining or user_mat.remaining:
        raise RuntimeError("the session left dealt material unused: dry run and online run diverged")
    return run.user


def teacher_forced(
    weights,
    prompt_ids: Sequence[int],
    forced_ids: Sequence[int],
    *,
    prepared: PreparedWeights | None = None,
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


# ----------------------------------------------------------------------------------------------
# greedy generation
# ----------------------------------------------------------------------------------------------


def _private_generate(
    prepared: PreparedWeights,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    eos_ids=frozenset(),
    seeds: Seeds | None = None,
    on_token=None,
    timeout: float = SESSION_TIMEOUT_S,
) -> list[int]:
    """`parties.inprocess.private_generate_inprocess` with greedy choice, on weights prepared once:
    the same dry run, token selection and owner/user roles, minus the per-call weight preparation."""
    from protocols.model.generation import SamplingConfig, generate, token_chooser

    seeds = seeds or Seeds.fresh()
    arch = prepared.arch
    positions = len(prompt_ids) + max_new_tokens
    budget = dict(prompt_len=len(prompt_ids), max_new_tokens=max_new_tokens)
    helper = SecureDecoder(arch, helper_weights(arch), positions)
    owner_mat, user_mat = deal(lambda ctx: generate(ctx, helper, **budget), seeds, weight_mask=prepared.mask)
    choose = token_chooser(SamplingConfig())

    def owner(ctx):
        return generate(ctx, SecureDecoder(arch, prepared.owner, positions), **budget)

    def user(ctx):
        return generate(
            ctx,
            SecureDecoder(arch, prepared.user, positions),
            prompt_ids=list(prompt_ids),
            eos_ids=frozenset(eos_ids),
            choose=choose,
            on_token=on_token,
            **budget,
        )

    return run_pair(owner, user, owner_mat, user_mat, timeout=timeout).user


def greedy_agreement(
    weights,
    prompt_ids: Sequence[int],
    n: int,
    *,
    prepared: PreparedWeights | None = None,
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
        secure = private_generate_inprocess(
            weights, prompt, n, seeds=seeds, eos_ids=eos_ids, on_token=on_token, timeout=SESSION_TIMEOUT_S
        ).tokens
    else:
        secure = _private_generate(
            _prepared_for(weights, prepared), prompt, n, eos_ids=eos_ids, seeds=seeds, on_token=on_token
        )
    plain = (reference or DecoderReference(weights)).generate_greedy(prompt, n, stop_at_eos=eos is not None)
    return list(secure), plain


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (or the shorter length if one is a prefix); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def fidelity_report(
    weights,
    tokenizer,
    prompts: Sequence[str],
    n_tokens: int,
    *,
    teacher_forced_tokens: int | None = None,
    prepared: PreparedWeights | None = None,
    progress: bool = True,
    prompt_indices: Sequence[int] | None = None,
    reference=None,
) -> dict:
    """Greedy and teacher-forced fidelity over `prompts` (chat-templated with `chat_token_ids`).

    Per prompt: the secure and plaintext greedy continuations (n_tokens, eos-stopped) and, on the
    plaintext continuation's first `teacher_forced_tokens` tokens (default n_tokens; 0 skips it),
    the teacher-forced comparison. Returns {"rows": [...], "summary": {...}} (JSON-serialisable)."""
    from tqdm.auto import tqdm

    from permllm.model.prompts import chat_token_ids

    tf_tokens = n_tokens if teacher_forced_tokens is None else teacher_forced_tokens
    indices = list(prompt_indices) if prompt_indices is not None else list(range(len(prompts)))
    start = time.perf_counter()
    prepared_here = prepared is None
    prepared = _prepared_for(weights, prepared)
    prepare_s = time.perf_counter() - start if prepared_here else 0.0
    reference = reference or DecoderReference(weights)
    rows = []
    bar = tqdm(list(zip(indices, prompts)), desc="fidelity", unit="prompt", disable=not progress, file=sys.stderr)
    for index, text in bar:
        ids = chat_token_ids(tokenizer, text)
        t0 = time.perf_counter()
        secure, plain = greedy_agreement(weights, ids, n_tokens, prepared=prepared, reference=reference)
        greedy_s = time.perf_counter() - t0
        row = {
            "index": index,
            "prompt": text,
            "prompt_tokens": len(ids),
            "secure_ids": secure,
            "plain_ids": plain,
            "identical": secure == plain,
            "first_divergence": first_divergence(secure, plain),
            "secure_text": tokenizer.decode(secure),
            "plain_text": tokenizer.decode(plain),
            "greedy_s": greedy_s,
            "secure_s_per_token": greedy_s / max(1, len(secure)),
        }
        forced = plain[:tf_tokens]
        if forced:
            tf = teacher_forced(weights, ids, forced, prepared=prepared, reference=reference)
            row.update(
                tf_positions=tf.positions,
                tf_agreements=tf.agreements,
                tf_max_abs_error=tf.max_abs_error,
                tf_max_rel_error=tf.max_rel_error,
                tf_min_margin=min(tf.margins),
                tf_disagreements=tf.disagreements(),
                tf_s=tf.wall_s,
            )
        rows.append(row)
        done = sum(r["identical"] for r in rows)
        bar.set_postfix(
            identical=f"{done}/{len(rows)}", tf_err=f"{max(r.get('tf_max_abs_error', 0) for r in rows):.2e}"
        )
    bar.close()
    summary = summarize(
        rows,
        n_tokens=n_tokens,
        teacher_forced_tokens=tf_tokens,
        wall_s=time.perf_counter() - start,
        prepare_s=prepare_s,
    )
    summary["plaintext_reference"] = getattr(reference, "description", PLAINTEXT_REFERENCE)
    return {"rows": rows, "summary": summary}


def summarize(rows: list[dict], *, n_tokens: int, teacher_forced_tokens: int, wall_s: float, prepare_s: float) -> dict:
    positions = sum(r.get("tf_positions", 0) for r in rows)
    agreements = sum(r.get("tf_agreements", 0) for r in rows)
    identical = sum(r["identical"] for r in rows)
    secure_tokens = sum(len(r["secure_ids"]) for r in rows)
    return {
        "prompts": len(rows),
        "tokens": n_tokens,
        "teacher_forced_tokens": teacher_forced_tokens,
        "identical": identical,
        "fraction_identical": identical / len(rows) if rows else math.nan,
        "mismatching_prompts": [r["index"] for r in rows if not r["identical"]],
        "tf_positions": positions,
        "tf_agreements": agreements,
        "tf_agreement": agreements / positions if positions else math.nan,
        "max_abs_logit_error": max((r.get("tf_max_abs_error", 0.0) for r in rows), default=0.0),
        "max_rel_logit_error": max((r.get("tf_max_rel_error", 0.0) for r in rows), default=0.0),
        "secure_tokens": secure_tokens,
        "greedy_s": sum(r["greedy_s"] for r in rows),
        "teacher_forced_s": sum(r.get("tf_s", 0.0) for r in rows),
        "prepare_s": prepare_s,
        "wall_s": wall_s,
        "plaintext_reference": PLAINTEXT_REFERENCE,
    }


def format_table(report: dict) -> str:
    """A readable table, one line per prompt (len: prompt tokens; out: secure tokens generated; div: first
    differing token; s/tok: secure greedy wall time per token, dealing and prefill included), then the
    summary."""
    lines = [
        f"{'#':>3} {'len':>4} {'out':>4} {'greedy':>6} {'div':>4} {'tf top-1':>9} {'max |err|':>10} "
        f"{'rel err':>9} {'s/tok':>6}  prompt"
    ]
    for r in report["rows"]:
        greedy = "same" if r["identical"] else "DIFF"
        div = "-" if r["first_divergence"] is None else str(r["first_divergence"])
        tf = f"{r['tf_agreements']}/{r['tf_positions']}" if "tf_positions" in r else "-"
        err = f"{r['tf_max_abs_error']:.3e}" if "tf_positions" in r else "-"
        rel = f"{r['tf_max_rel_error']:.2e}" if "tf_positions" in r else "-"
        text = r["prompt"].replace("\n", " ")
        lines.append(
            f"{r['index']:>3} {r['prompt_tokens']:>4} {len(r['secure_ids']):>4} {greedy:>6} {div:>4} {tf:>9} "
            f"{err:>10} {rel:>9} "
            f"{r['secure_s_per_token']:>6.2f}  {text[:48] + ('...' if len(text) > 48 else '')}"
        )
    s = report["summary"]
    lines += [
        "",
        f"prompts                              {s['prompts']}",
        f"greedy continuations identical       {s['identical']}/{s['prompts']} ({100 * s['fraction_identical']:.1f} %)"
        f", up to {s['tokens']} tokens, eos-stopped",
        f"teacher-forced top-1 agreement       {s['tf_agreements']}/{s['tf_positions']} "
        f"({100 * s['tf_agreement']:.2f} %)",
        f"largest logit error (abs / rel)      {s['max_abs_logit_error']:.3e} / {s['max_rel_logit_error']:.2e}",
        f"wall time                            {s['wall_s']:.0f} s (greedy {s['greedy_s']:.0f} s, "
        f"teacher-forced {s['teacher_forced_s']:.0f} s, preparation {s['prepare_s']:.0f} s)",
        f"plaintext reference                  {s['plaintext_reference']}",
    ]
    if s["mismatching_prompts"]:
        lines.insert(-4, f"mismatching prompts                  {s['mismatching_prompts']}")
    return "\n".join(lines)


def _select(spec: str, count: int) -> list[int]:
    """'all', a count 'N' (the first N), or comma-separated indices / ranges ('0,5,24-27')."""
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(count))
    if spec.isdigit():
        return list(range(min(int(spec), count)))
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    if any(not 0 <= i < count for i in out):
        raise SystemExit(f"prompt indices must lie in 0..{count - 1}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m parties.fidelity", description="Secure vs plaintext generation of SmolLM2-135M-Instruct."
    )
    parser.add_argument(
        "--prompts", default="all", help="'all' (FIDELITY_PROMPTS), N (the first N) or indices like '0,5,24-27'"
    )
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt (eos-stopped)")
    parser.add_argument(
        "--teacher-forced-tokens",
        type=int,
        default=None,
        help="teacher-forced positions per prompt (default: --tokens; 0 skips)",
    )
    parser.add_argument("--json", default=None, help="write the full report here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from permllm.model.loading import decoder_weights_from_hf, find_smollm2_gguf, load_hf_decoder
    from permllm.model.prompts import FIDELITY_PROMPTS

    indices = _select(args.prompts, len(FIDELITY_PROMPTS))
    print("loading SmolLM2-135M-Instruct and preparing the owner's weights", file=sys.stderr)
    hf_model, tokenizer = load_hf_decoder(find_smollm2_gguf())
    weights = decoder_weights_from_hf(hf_model)
    reference = TransformersReference(hf_model, weights.config.eos_token_id)
    report = fidelity_report(
        weights,
        tokenizer,
        [FIDELITY_PROMPTS[i] for i in indices],
        args.tokens,
        teacher_forced_tokens=args.teacher_forced_tokens,
        progress=not args.no_progress,
        prompt_indices=indices,
        reference=reference,
    )
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
