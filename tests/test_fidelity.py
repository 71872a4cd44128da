"""Fidelity of private generation on the real SmolLM2-135M-Instruct against plaintext transformers.

CI runs a reduced set (3 greedy prompts x 8 tokens, 2 teacher-forced prompts x 16 positions: 1 min 55 s
on 2 idle cores, model loading included, peak RSS ~10 GB); `-m slow` runs the whole FIDELITY_PROMPTS
set x 32 tokens (measured 2026-12-01 against transformers, 81 min on 2 cores: 28/28 identical, 826/826
teacher-forced top-1, largest logit error 0.102).
The plaintext side is the transformers model loaded from the same GGUF file
(`fidelity.TransformersReference`: its own greedy `generate` and its forward logits); the report's
plumbing is tested on the tiny model against the float64 `DecoderReference`.

The secure logit error is almost entirely systematic (fixed-point rounding of weights and of the
re-shared activations, the same in every run; repeated runs differ by < 0.005), so the reduced set
uses prompts whose reference top-1/top-2 margins along the compared positions are >= 0.167 (greedy)
and >= 0.244 (teacher-forced), several times the error: a near-tie (the set has margins down to 0.003)
may legitimately flip and is left to the slow run's 95 % / 99.5 % thresholds.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from parties.session import prepare_model
from permllm.model.prompts import FIDELITY_PROMPTS, chat_token_ids
from permllm_bench import fidelity, fidelity_cli, fidelity_report
from tests.tiny_model import tiny_decoder

# The reduced CI set: (FIDELITY_PROMPTS index, chat-templated length).
GREEDY_CI = {"short": 2, "medium": 15, "long": 26}  # 32, 47 and 178 tokens; min margins over 8 tokens .167/1.40/.457
GREEDY_CI_TOKENS = 8
TEACHER_FORCED_CI = [14, 24]  # 44 and 141 tokens; min reference margins over 16 positions .582 / .244
TEACHER_FORCED_CI_POSITIONS = 16
MIN_AGREEMENT = 0.995
# Largest |secure - reference| logit over the 2 x 16 positions: measured 0.046-0.053 in 4 runs (the
# full 28 x 32 run: 0.022-0.064 per prompt, 0.102 on "Hi"); relative to the logit range (max - min,
# ~50): 0.93e-3-1.03e-3 (full run: 2.1e-3). Bounds: ~3x the measured CI values.
MAX_ABS_LOGIT_ERROR = 0.15
MAX_REL_LOGIT_ERROR = 3e-3
MIN_IDENTICAL = 0.95
FULL_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(weights, tokenizer, prepared owner/user weights, reference): loaded and prepared once."""
    from permllm.model.loading import decoder_weights_from_hf, load_hf_decoder

    hf_model, tokenizer = load_hf_decoder(smollm2_gguf)
    weights = decoder_weights_from_hf(hf_model)
    reference = fidelity.TransformersReference(hf_model, weights.config.eos_token_id)
    return weights, tokenizer, prepare_model(weights), reference


def _ids(tokenizer, index: int) -> list[int]:
    return chat_token_ids(tokenizer, FIDELITY_PROMPTS[index])


# ----------------------------------------------------------------------------------------------
# CI: reduced set on SmolLM2
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(GREEDY_CI))
def test_greedy_continuation_identical_reduced(smollm2, kind):
    weights, tokenizer, prepared, ref = smollm2
    ids = _ids(tokenizer, GREEDY_CI[kind])
    # the short prompt goes through parties.session.private_generate_inprocess itself (it prepares
    # the weights again); the others reuse the prepared weights in the same session code
    secure, plain = fidelity.greedy_agreement(
        weights, ids, GREEDY_CI_TOKENS, reference=ref, prepared=None if kind == "short" else prepared
    )
    assert len(plain) == GREEDY_CI_TOKENS
    assert secure == plain, (
        f"diverges at {fidelity.first_divergence(secure, plain)}: "
        f"{tokenizer.decode(secure)!r} vs {tokenizer.decode(plain)!r}"
    )


def test_teacher_forced_reduced(smollm2):
    weights, tokenizer, prepared, ref = smollm2
    results = []
    for index in TEACHER_FORCED_CI:
        ids = _ids(tokenizer, index)
        forced = ref.generate_greedy(ids, TEACHER_FORCED_CI_POSITIONS)
        assert len(forced) == TEACHER_FORCED_CI_POSITIONS
        results.append(fidelity.teacher_forced(weights, ids, forced, prepared=prepared, reference=ref))
    positions = sum(r.positions for r in results)
    agreements = sum(r.agreements for r in results)
    assert positions == 32
    # >= 99.5 % of 32 positions is ceil(31.84) = 32: no disagreement at all is allowed here
    assert agreements >= math.ceil(MIN_AGREEMENT * positions), [r.disagreements() for r in results]
    worst = max(r.max_abs_error for r in results)
    assert worst < MAX_ABS_LOGIT_ERROR, f"largest logit error {worst}"
    assert max(r.max_rel_error for r in results) < MAX_REL_LOGIT_ERROR
    for r in results:  # the compared positions are the forced tokens' predictions
        assert r.reference_top1 == r.forced_ids


# ----------------------------------------------------------------------------------------------
# CI: the report's plumbing, on the tiny random model (seconds)
# ----------------------------------------------------------------------------------------------


class _ToyTokenizer:
    """Enough of a tokenizer for fidelity_report: a fixed chat template over character codes."""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_tensors=None):
        return [1, 5] + [3 + ord(c) % 90 for c in messages[-1]["content"]] + [6]

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_report_on_tiny_model():
    weights = tiny_decoder(seed=3)
    prompts = ["ab", "a longer toy prompt"]
    report = fidelity_report.fidelity_report(
        weights, _ToyTokenizer(), prompts, 4, teacher_forced_tokens=3, progress=False, prompt_indices=[7, 9]
    )
    rows, summary = report["rows"], report["summary"]
    assert [r["index"] for r in rows] == [7, 9]
    for r in rows:
        assert r["identical"] and r["first_divergence"] is None
        assert r["tf_positions"] == min(3, len(r["plain_ids"])) and r["tf_agreements"] == r["tf_positions"]
        # the secure side stops at eos like the reference (eos included)
        eos = weights.config.eos_token_id
        assert eos not in r["plain_ids"][:-1]
    assert summary["prompts"] == 2 and summary["fraction_identical"] == 1.0 and summary["tf_agreement"] == 1.0
    assert 0 < summary["max_abs_logit_error"] < 1e-2
    json.dumps(report)  # JSON-serialisable as written by the CLI
    table = fidelity_report.format_table(report)
    assert "2/2 (100.0 %)" in table and "a longer toy prompt" in table


def test_helpers():
    assert fidelity.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert fidelity.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert fidelity.first_divergence([1, 2], [1, 2, 2]) == 2
    assert fidelity_cli.select_prompts("all", 5) == [0, 1, 2, 3, 4]
    assert fidelity_cli.select_prompts("3", 5) == [0, 1, 2]
    assert fidelity_cli.select_prompts("0,2-4", 5) == [0, 2, 3, 4]
    with pytest.raises(ValueError):
        fidelity.teacher_forced(tiny_decoder(seed=1), [1, 2], [])


# ----------------------------------------------------------------------------------------------
# slow: the full set
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)  # 81 minutes on 2 cores (README, Fidelity)
def test_full_fidelity_report(smollm2):
    weights, tokenizer, prepared, ref = smollm2
    assert len(FIDELITY_PROMPTS) >= 20
    report = fidelity_report.fidelity_report(
        weights, tokenizer, FIDELITY_PROMPTS, FULL_TOKENS, prepared=prepared, reference=ref
    )
    assert report["summary"]["plaintext_reference"] == fidelity.TRANSFORMERS_REFERENCE
    print("\n" + fidelity_report.format_table(report))
    if os.environ.get("PERMLLM_FIDELITY_JSON"):
        with open(os.environ["PERMLLM_FIDELITY_JSON"], "w") as f:
            json.dump(report, f, indent=1)
    summary = report["summary"]
    assert summary["prompts"] == len(FIDELITY_PROMPTS)
    # 28 prompts: >= 95 % identical means at most one differing continuation
    assert summary["fraction_identical"] >= MIN_IDENTICAL, summary["mismatching_prompts"]
    # ~830 positions: >= 99.5 % allows at most ~4 top-1 disagreements
    assert summary["tf_agreement"] >= MIN_AGREEMENT
