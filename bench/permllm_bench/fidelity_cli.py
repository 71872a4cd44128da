"""`python -m permllm_bench.fidelity`: the fidelity report of SmolLM2-135M-Instruct on the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from permllm_bench.fidelity import TransformersReference
from permllm_bench.fidelity_report import fidelity_report, format_table


def select_prompts(spec: str, count: int) -> list[int]:
    """'all', a count 'N' (the first N), or comma-separated indices / ranges ('0,5,24-27')."""
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(count))
    if spec.isdigit():
        return list(range(min(int(spec), count)))
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
        except ValueError:
            raise SystemExit(f"--prompts: {part!r} is not an index or a range like 24-27") from None
    if any(not 0 <= i < count for i in out):
        raise SystemExit(f"prompt indices must lie in 0..{count - 1}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m permllm_bench.fidelity",
        description="Secure vs plaintext generation of SmolLM2-135M-Instruct.",
        allow_abbrev=False,
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

    indices = select_prompts(args.prompts, len(FIDELITY_PROMPTS))
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
