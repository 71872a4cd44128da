"""The cost model behind the bench's figures: a profile's RTT and bandwidth, the latency floor, the derived
per-token and per-layer figures of a summary, what CURVE adds, and PermLLM's published protocol cost."""

from __future__ import annotations

import math

RATIO_LIMIT = 1.25
CURVE_FIGURES = ("ttft_s", "decode_s_per_token", "prepare_s", "offline_s", "wall_s")
PROFILE_KEYS = (
    "name",
    "rtt_ms",
    "mbit_s",
    "ttft_s",
    "decode_s_per_token",
    "decode_s_per_token_p90",
    "floor_s_per_token",
    "ratio",
    "flights_per_token",
    "flights_per_layer",
    "prefill_flights_per_layer",
    "online_bytes_per_token",
    "online_bytes_per_token_up",
    "online_bytes_per_token_down",
    "offline_s",
    "offline_bytes",
    "offline_s_per_token",
    "offline_bytes_per_token",
    "prepare_s",
    "prepare_bytes",
    "peak_rss_mb",
)


def profile_figures(spec: str) -> dict:
    """name, rtt_ms and mbit_s (None for unlimited bandwidth) of a profile spec."""
    from netsim import parse_profile

    p = parse_profile(spec)
    mbit = None if math.isinf(p.bandwidth_bps) else p.bandwidth_bps / 1e6
    return {"name": spec, "rtt_ms": p.rtt_s * 1e3, "mbit_s": mbit}


def floor_seconds(no_delay_s: float, flights: float, rtt_ms: float, nbytes: float, mbit_s: float | None) -> float:
    """The latency floor of one token: compute (the no-delay latency) plus every flight's one-way delay
    plus every byte (both directions, serialized) at the link's bandwidth (None: unlimited)."""
    if no_delay_s is None or flights is None or nbytes is None:
        raise ValueError("floor needs the no-delay latency, the flights and the bytes")
    if no_delay_s < 0 or flights < 0 or rtt_ms < 0 or nbytes < 0 or (mbit_s is not None and mbit_s <= 0):
        raise ValueError("floor: negative latency, flights, RTT or bytes, or non-positive bandwidth")
    transmit = 0.0 if mbit_s is None or math.isinf(mbit_s) else nbytes * 8 / (mbit_s * 1e6)
    return no_delay_s + flights * rtt_ms / 1e3 / 2 + transmit


def ratio(measured: float | None, floor: float | None) -> float | None:
    if measured is None or floor is None or floor <= 0:
        return None
    return measured / floor


PERMLLM_FORMULA = (
    "elements per layer = 15*h + 4*I + 5*H*L  [linear inputs QKV, out, MLP-in, MLP-out: 3h + I; "
    "appending Beaver QK^T, both send masked q and new k row: 4h; softmax 3 flights of H*L; "
    "appending Beaver scores.V, both send masked weights and new v row: 2(H*L + h); two LayerNorms 2*3h; "
    "GeLU 3*I]; per token outside the layers: masked one-hot embedding V, first LayerNorm 3h, lm_head h, "
    "permuted reveal of the logits 2V, plus the BFV ciphertexts; bytes = 4 * elements (float32 shares) + BFV; "
    "flights = 18 per layer + 1 (embedding) + 3 (first LayerNorm) + 1 (lm_head) + 2 (reveal) + 2 (BFV)"
)


def permllm_cost(
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    vocab: int,
    cache_len: int,
    *,
    bytes_per_element: int = 4,
    he_bytes: int = 0,
) -> dict:
    """PermLLM's online cost of one generated token for a model shape (see PERMLLM_FORMULA).

    cache_len: the KV cache length L after appending the new position. he_bytes: the BFV query and
    answer of the token choice (same scheme as ours; pass our measured size, 0 to leave it out)."""
    for name, v in (
        ("hidden", hidden),
        ("layers", layers),
        ("heads", heads),
        ("intermediate", intermediate),
        ("vocab", vocab),
        ("cache_len", cache_len),
        ("bytes_per_element", bytes_per_element),
    ):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    h, i, H, L = hidden, intermediate, heads, cache_len
    per_layer = 15 * h + 4 * i + 5 * H * L
    outside = vocab + 3 * h + h + 2 * vocab
    elements = layers * per_layer + outside
    flights_outside = 1 + 3 + 1 + 2 + 2
    return {
        "flights_per_layer": 18,
        "flights_per_token": 18 * layers + flights_outside,
        "elements_per_layer": per_layer,
        "elements_outside_layers": outside,
        "bytes_per_token": bytes_per_element * elements + he_bytes,
        "he_bytes": he_bytes,
        "cache_len": L,
        "bytes_per_element": bytes_per_element,
        "formula": PERMLLM_FORMULA,
    }


def _per_layer(flights, outside, layers):
    """Flights of one layer from a forward pass's flights; the flights outside the layers (embedding, final
    norm, lm_head, token choice) are the same for the prefill as for a decode step."""
    return (flights - outside) / layers if flights is not None and layers and outside is not None else None


def complete_summary(summary: dict) -> dict:
    """Add the derived figures in place: floors, ratios, flights per layer of a decode step and of the
    prefill, offline cost per generated token."""
    profiles = summary.get("profiles") or []
    none = next((p for p in profiles if p["name"] == "none"), None)
    no_delay = none.get("decode_s_per_token") if none else None
    layers = summary.get("model", {}).get("layers")
    outside = (summary.get("breakdown") or {}).get("outside_flights")
    if outside is None:
        outside = summary.get("model", {}).get("outside_flights_default")
    for p in profiles:
        p["floor_s_per_token"] = None
        if (
            no_delay is not None
            and p.get("flights_per_token") is not None
            and p.get("online_bytes_per_token") is not None
        ):
            p["floor_s_per_token"] = floor_seconds(
                no_delay, p["flights_per_token"], p["rtt_ms"], p["online_bytes_per_token"], p["mbit_s"]
            )
        p["ratio"] = ratio(p.get("decode_s_per_token"), p["floor_s_per_token"])
        p["within_limit"] = None if p["ratio"] is None else p["ratio"] <= RATIO_LIMIT
        p["flights_per_layer"] = _per_layer(p.get("flights_per_token"), outside, layers)
        p["prefill_flights_per_layer"] = _per_layer(p.get("prefill_flights"), outside, layers)
        gen = p.get("generated_tokens") or 0
        p["offline_s_per_token"] = p["offline_s"] / gen if gen and p.get("offline_s") is not None else None
        p["offline_bytes_per_token"] = p["offline_bytes"] / gen if gen and p.get("offline_bytes") is not None else None
    sweep = summary.get("sweep")
    if sweep and sweep.get("points"):
        base = next((q for q in sweep["points"] if q["rtt_ms"] == 0 and q["mbit_s"] is None), None)
        for q in sweep["points"]:
            q["floor_s_per_token"] = None
            if base and base.get("decode_s_per_token") is not None and q.get("flights") is not None:
                q["floor_s_per_token"] = floor_seconds(
                    base["decode_s_per_token"], q["flights"], q["rtt_ms"], q["bytes"], q["mbit_s"]
                )
            q["ratio"] = ratio(q.get("decode_s_per_token"), q["floor_s_per_token"])
    return summary


def curve_cost(encrypted: dict, plain: dict) -> dict:
    """What CURVE adds: the same session (profile, prompt, tokens) with encryption on and off."""
    added = {}
    for key in CURVE_FIGURES:
        on, off = encrypted.get(key), plain.get(key)
        added[key] = None if on is None or off is None else on - off
    return {
        "profile": encrypted.get("name"),
        "encrypted": {k: encrypted.get(k) for k in CURVE_FIGURES},
        "plain": {k: plain.get(k) for k in CURVE_FIGURES},
        "added": added,
        "same_tokens": encrypted.get("token_ids") == plain.get("token_ids"),
    }


def bfv_token_bytes(vocab: int) -> int:
    """Bytes of one BFV token query and its answer (the ciphertexts of the token choice), measured."""
    import numpy as np

    from permllm.he import IndexLookupClient, IndexLookupServer

    client = IndexLookupClient(vocab)
    server = IndexLookupServer(client.public_context())
    query = client.query(0)
    answer = server.answer(query, np.arange(vocab, dtype=np.int64))
    return sum(len(q) for q in query) + len(answer)
