"""The demo's summary: one dict from the role reports (the keys the README and --json promise) and its
printed form. Helper mode merges the owner's, the user's and the helper's reports; two-party mode (no
helper) takes the offline figures from the owner's report (its traffic with the user, both ways)."""

from __future__ import annotations

from parties.formats import fmt_bytes, fmt_num, fmt_s


def _offline(reports: dict) -> dict:
    """The offline figures: the helper's (it dealt), or the owner's without a helper (made with the user)."""
    helper, owner = reports.get("helper"), reports["owner"]
    if helper is not None:
        return {
            "mode": "helper",
            "offline_s": helper["phases_s"].get("offline"),
            "offline_bytes": helper["offline_bytes"],
            "offline_calls": helper["calls"],
        }
    return {
        "mode": owner.get("mode", "two-party"),
        "offline_s": owner.get("offline_s"),
        "offline_bytes": owner.get("offline_bytes_sent", 0) + owner.get("offline_bytes_received", 0),
        "offline_bytes_sent": owner.get("offline_bytes_sent"),  # owner -> user
        "offline_bytes_received": owner.get("offline_bytes_received"),  # user -> owner
        "offline_calls": owner.get("offline_calls"),
    }


def merge_reports(reports: dict, network: str) -> dict:
    """One summary from the role reports (the keys the README and --json promise): "user", "owner" and,
    in helper mode, "helper"."""
    user, owner, helper = reports["user"], reports["owner"], reports.get("helper") or {}
    common = {
        "network": network,
        "prompt_tokens": user["prompt_tokens"],
        **_offline(reports),
        "prepare_s": owner["phases_s"].get("prepare"),
        "prepare_bytes": owner["prepare_bytes"],
        "model_load_s": owner["phases_s"].get("load"),
        "peak_rss_mb": {role: round(r["peak_rss_mb"], 1) for role, r in reports.items() if r is not None},
        # what the user waited after the handshake before its online phase (W - U, then the material)
        "setup_s": sum(user.get("phases_s", {}).get(k, 0.0) for k in ("prepare", "offline")),
        "user_phases_s": dict(user.get("phases_s", {})),
        "pool_depth": helper.get("pool_depth", 0),
        "served_from_pool": helper.get("served_from_pool", False),
    }
    if "embedding" in user:
        return {
            **common,
            "model": "minilm",
            "embedding": user["embedding"],
            "text": "",
            "token_ids": [],
            "generated_tokens": 0,
            "online_s": user["online_s"],
            "online_bytes": user["online_bytes"],
            "online_flights": user["online_flights"],
        }
    keys = ("text", "token_ids", "generated_tokens", "ttft_s", "decode_s_per_token", "decode_s_per_token_p90")
    keys += ("online_bytes_per_token", "online_bytes_per_token_up", "online_bytes_per_token_down")
    return {**common, **{k: user[k] for k in keys + ("flights_per_token", "prefill_flights", "prefill_bytes")}}


def format_session_line(i: int, s: dict) -> str:
    """One line per later session of `--sessions N`."""
    first = f"time to first token {fmt_s(s['ttft_s'])}, " if "ttft_s" in s else ""
    if "helper" not in s["peak_rss_mb"]:
        return (
            f"session {i}: {first}set-up {fmt_s(s.get('setup_s', 0.0))} (material made by owner and user), "
            f"offline {fmt_bytes(s['offline_bytes'])}, peak RSS owner {s['peak_rss_mb']['owner']:.0f} MB"
        )
    pooled = "material from the helper's pool" if s.get("served_from_pool") else "material dealt live"
    return (
        f"session {i}: {first}set-up {fmt_s(s.get('setup_s', 0.0))} ({pooled}), preparation "
        f"{fmt_bytes(s['prepare_bytes'])}, peak RSS owner {s['peak_rss_mb']['owner']:.0f} / helper "
        f"{s['peak_rss_mb']['helper']:.0f} MB"
    )


def _offline_row(s: dict) -> tuple:
    who = "helper" if s.get("mode", "helper") == "helper" else "two-party"
    return (f"offline ({who}): time / bytes", f"{fmt_s(s['offline_s'])} / {fmt_bytes(s['offline_bytes'])}")


def _rss_row(s: dict) -> tuple:
    roles = [r for r in ("owner", "user", "helper") if r in s["peak_rss_mb"]]
    return f"peak RSS {' / '.join(roles)}", " / ".join(f"{s['peak_rss_mb'][r]:.0f} MB" for r in roles)


def format_summary(s: dict) -> str:
    if "embedding" in s:
        rows = [
            ("sentence tokens", s["prompt_tokens"]),
            (
                "online time / bytes / flights",
                f"{fmt_s(s['online_s'])} / {fmt_bytes(s['online_bytes'])} / {s['online_flights']}",
            ),
            _offline_row(s),
            (
                "preparation (masked weights): time / bytes",
                f"{fmt_s(s['prepare_s'])} / {fmt_bytes(s['prepare_bytes'])}",
            ),
            _rss_row(s),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join([f"--- summary (network {s['network']}) ---"] + [f"{k:<{width}}  {v}" for k, v in rows])
    rows = [
        ("prompt tokens", s["prompt_tokens"]),
        ("generated tokens", s["generated_tokens"]),
        ("time to first token", fmt_s(s["ttft_s"])),
        ("online s per generated token (median)", fmt_s(s["decode_s_per_token"])),
        ("online bytes per token", fmt_bytes(s["online_bytes_per_token"])),
        ("flights per token", fmt_num(s["flights_per_token"])),
        ("prefill: flights / bytes", f"{s['prefill_flights']} / {fmt_bytes(s['prefill_bytes'])}"),
        _offline_row(s),
        ("preparation (masked weights): time / bytes", f"{fmt_s(s['prepare_s'])} / {fmt_bytes(s['prepare_bytes'])}"),
        _rss_row(s),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"--- summary (network {s['network']}) ---"] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
