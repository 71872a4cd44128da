"""Analysis of in-process runs: one decode step broken down by layer part, and decode cost against the
KV cache length (runs from `permllm_bench.inprocess_runs`)."""

from __future__ import annotations

from parties.metrics import median
from permllm_bench.config import SCALING_WINDOW

BREAKDOWN_ORDER = (
    "embedding",
    "norm",
    "qkv",
    "scores",
    "softmax",
    "weighted_values",
    "out_proj",
    "mlp",
    "final_norm",
    "lm_head",
    "selection",
)
LAYER_PARTS = ("norm", "qkv", "scores", "softmax", "weighted_values", "out_proj", "mlp")
OUTSIDE_PARTS = ("embedding", "final_norm", "lm_head", "selection")
PART_LABELS = {
    "embedding": "embedding",
    "norm": "RMSNorms (decode: 1 per layer, the second is folded into the MLP)",
    "qkv": "QKV projection + rescale",
    "scores": "attention scores QK^T",
    "softmax": "softmax",
    "weighted_values": "weighted values + rescale",
    "out_proj": "output projection",
    "mlp": "MLP (gate/up, SwiGLU with the folded RMSNorm, down)",
    "final_norm": "final RMSNorm (decode: its reveal only, folded into the token choice)",
    "lm_head": "lm_head",
    "selection": "selection (rest of the token)",
}


def breakdown_from_run(run, layers: int, prompt_tokens: int) -> dict:
    """Per-part medians over the decode steps of a run with part recorders (user's view; owner's too)."""
    user_fw, owner_fw = run.user_parts.forwards(), run.owner_parts.forwards()
    times, depths, bytes_marks = run.trace.token_times, run.trace.token_depths, run.trace.token_bytes
    per_step = []
    for s in range(1, len(times)):
        if s >= len(user_fw):
            break
        step_s = times[s] - times[s - 1]
        step_f = depths[s] - depths[s - 1]
        up = bytes_marks[s][0] - bytes_marks[s - 1][0]
        down = bytes_marks[s][1] - bytes_marks[s - 1][1]
        acc = {
            p: {
                "seconds": 0.0,
                "flights": 0,
                "bytes_user_to_owner": 0,
                "bytes_owner_to_user": 0,
                "calls": 0,
                "owner_seconds": 0.0,
                "owner_flights": 0,
            }
            for p in BREAKDOWN_ORDER
        }
        for e in user_fw[s]:
            a = acc[e[0]]
            a["seconds"] += e[2] - e[1]
            a["flights"] += e[4] - e[3]
            a["bytes_user_to_owner"] += e[6] - e[5]
            a["bytes_owner_to_user"] += e[8] - e[7]
            a["calls"] += 1
        for e in owner_fw[s] if s < len(owner_fw) else []:
            acc[e[0]]["owner_seconds"] += e[2] - e[1]
            acc[e[0]]["owner_flights"] += e[4] - e[3]
        sel = acc["selection"]
        named = [acc[p] for p in BREAKDOWN_ORDER if p != "selection"]
        sel["seconds"] = step_s - sum(a["seconds"] for a in named)
        sel["flights"] = step_f - sum(a["flights"] for a in named)
        sel["bytes_user_to_owner"] = up - sum(a["bytes_user_to_owner"] for a in named)
        sel["bytes_owner_to_user"] = down - sum(a["bytes_owner_to_user"] for a in named)
        per_step.append((step_s, step_f, up, down, acc))
    if not per_step:
        raise ValueError("the breakdown run has no decode step")
    parts = []
    for p in BREAKDOWN_ORDER:
        vals = [st[4][p] for st in per_step]
        parts.append({"part": p, "label": PART_LABELS[p], **{k: median([v[k] for v in vals]) for k in vals[0]}})
    in_layer = sum(r["flights"] for r in parts if r["part"] in LAYER_PARTS)
    outside = sum(r["flights"] for r in parts if r["part"] in OUTSIDE_PARTS)
    dealing = run.dealing[1 : len(run.trace.token_times)]
    return {
        "mode": "in-process owner+user threads, in-memory channel, no delay",
        "steps": len(per_step),
        "prompt_tokens": prompt_tokens,
        "cache_length": prompt_tokens + (len(per_step) + 1) // 2,
        "step_s": median([st[0] for st in per_step]),
        "flights": median([st[1] for st in per_step]),
        "bytes_user_to_owner": median([st[2] for st in per_step]),
        "bytes_owner_to_user": median([st[3] for st in per_step]),
        "parts": parts,
        "layer_flights": in_layer,
        "flights_per_layer": in_layer / layers,
        "outside_flights": outside,
        "offline_per_token": {
            "seconds": median([d["seconds"] for d in dealing]),
            "bytes": median([d["bytes"] for d in dealing]),
            "calls": median([d["calls"] for d in dealing]),
        }
        if dealing
        else None,
        "step_seconds_all": [st[0] for st in per_step],
    }


def scaling_rows(run, prompt_tokens: int, positions: list[int]) -> list[dict]:
    """Decode figures at generated positions (median over SCALING_WINDOW steps from each position)."""
    times, depths, nbytes = run.steps("time"), run.steps("depth"), run.steps("bytes")
    rows = []
    for k in positions:
        window = list(range(k - 1, min(k - 1 + SCALING_WINDOW, len(times))))
        if not window or window[0] >= len(times):
            continue
        deal = run.dealing[k] if k < len(run.dealing) else None
        rows.append(
            {
                "prompt_tokens": prompt_tokens,
                "position": k,
                "cache_length": prompt_tokens + k,
                "decode_s_per_token": median([times[i] for i in window]),
                "steps": len(window),
                "flights": depths[k - 1],
                "bytes": nbytes[k - 1],
                "offline_bytes": deal["bytes"] if deal else None,
                "offline_s": deal["seconds"] if deal else None,
            }
        )
    return rows
