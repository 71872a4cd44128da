"""The fidelity report over a list of prompts (greedy and teacher-forced, `permllm_bench.fidelity`), its
summary and its table."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from parties.progress import progress_bar
from parties.session import PreparedModel
from permllm.model.reference import DecoderReference
from permllm_bench.fidelity import (
    PLAINTEXT_REFERENCE,
    first_divergence,
    greedy_agreement,
    prepared_for,
    teacher_forced,
)
from permllm_bench.tables import grid


def fidelity_report(
    weights,
    tokenizer,
    prompts: Sequence[str],
    n_tokens: int,
    *,
    teacher_forced_tokens: int | None = None,
    prepared: PreparedModel | None = None,
    progress: bool = True,
    prompt_indices: Sequence[int] | None = None,
    reference=None,
) -> dict:
    """Greedy and teacher-forced fidelity over `prompts` (chat-templated with `chat_token_ids`).

    Per prompt: the secure and plaintext greedy continuations (n_tokens, eos-stopped) and, on the
    plaintext continuation's first `teacher_forced_tokens` tokens (default n_tokens; 0 skips it),
    the teacher-forced comparison. Returns {"rows": [...], "summary": {...}} (JSON-serialisable)."""
    from permllm.model.prompts import chat_token_ids

    tf_tokens = n_tokens if teacher_forced_tokens is None else teacher_forced_tokens
    indices = list(prompt_indices) if prompt_indices is not None else list(range(len(prompts)))
    start = time.perf_counter()
    prepared_here = prepared is None
    prepared = prepared_for(weights, prepared)
    prepare_s = time.perf_counter() - start if prepared_here else 0.0
    reference = reference or DecoderReference(weights)
    rows = []
    bar = progress_bar(len(prompts), "fidelity", unit="prompt", enabled=progress)
    for index, text in zip(indices, prompts):
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
        bar.update(1)
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
    rows = []
    for r in report["rows"]:
        forced = "tf_positions" in r
        text = r["prompt"].replace("\n", " ")
        rows.append(
            [
                r["index"],
                r["prompt_tokens"],
                len(r["secure_ids"]),
                "same" if r["identical"] else "DIFF",
                "-" if r["first_divergence"] is None else r["first_divergence"],
                f"{r['tf_agreements']}/{r['tf_positions']}" if forced else "-",
                f"{r['tf_max_abs_error']:.3e}" if forced else "-",
                f"{r['tf_max_rel_error']:.2e}" if forced else "-",
                f"{r['secure_s_per_token']:.2f}",
                text[:48] + ("..." if len(text) > 48 else ""),
            ]
        )
    header = ["#", "len", "out", "greedy", "div", "tf top-1", "max |err|", "rel err", "s/tok", "prompt"]
    lines = [grid(header, rows, left=(len(header) - 1,))]
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
