"""The plaintext baseline of the bench: transformers' greedy generate of the same prompt on the same machine."""

from __future__ import annotations

import time

from parties.metrics import median, percentile, steps


def plaintext_seconds_per_token(hf_model, prompt_ids: list[int], max_new_tokens: int, eos_id=None) -> dict:
    """Greedy `generate` with transformers; s/token = median gap between consecutive token choices."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    stamp = Stamp()
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.no_grad():
        hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=eos_id
        )  # warm-up
        start = time.perf_counter()
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=eos_id,
            logits_processor=LogitsProcessorList([stamp]),
        )
    gaps = steps(stamp.times)
    return {
        "s_per_token": median(gaps),
        "s_per_token_p90": percentile(gaps, 0.9),
        "ttft_s": stamp.times[0] - start if stamp.times else None,
        "tokens": len(stamp.times),
        "token_ids": out[0, len(prompt_ids) :].tolist(),
        "threads": torch.get_num_threads(),
    }
