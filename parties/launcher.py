"""`permllm demo`: owner, user and helper as three OS processes talking ZeroMQ over loopback.

The launcher only starts the roles, waits, and merges their reports into one summary; it never
sees a share. Every child is stopped when the demo ends, fails or is interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from permllm.errors import ConfigError

ROLES = ("owner", "helper", "user")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (bound then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _validate(args) -> None:
    from netsim import parse_profile

    try:
        parse_profile(args.network)
    except ValueError as exc:
        raise ConfigError(f"--network: {exc}") from None
    if args.prompt is not None:
        from parties.roles import check_text

        check_text(args.prompt, "prompt")
    if not 1 <= args.max_new_tokens <= 1024:
        raise ConfigError(f"--max-new-tokens must be between 1 and 1024, got {args.max_new_tokens}")
    if args.model != "minilm" and args.prompt is not None:
        _check_prompt_fits(args.model, args.prompt, args.max_new_tokens)


def _check_prompt_fits(model: str, prompt: str, max_new_tokens: int) -> None:
    """Tokenize the prompt (the tokenizer is public and cheap) so an oversized one fails before any role starts."""
    from parties.models import load_tokenizer, max_positions
    from parties.roles import prepare_prompt

    prepare_prompt(load_tokenizer(model), prompt, max_new_tokens, max_positions(model))


def role_commands(args, ports, reports: Path) -> dict[str, list[str]]:
    """The three roles' command lines for one session: `args` holds the demo's options (network, timeouts,
    threads, insecure, model, prompt, max_new_tokens, sampling flags), `ports` three free loopback ports,
    `reports` a private folder for the keys and each role's JSON report (`<role>.json`)."""
    base = [sys.executable, "-m", "parties.cli"]
    owner_user, owner_helper, user_helper = (f"tcp://127.0.0.1:{p}" for p in ports)
    # three roles share this machine's cores: one compute thread each avoids oversubscription
    threads = args.threads if args.threads is not None else 1
    common = [
        "--network",
        args.network,
        "--timeout",
        str(args.timeout),
        "--setup-timeout",
        str(args.setup_timeout),
        "--threads",
        str(threads),
    ]
    if getattr(args, "insecure", False):
        common.append("--insecure")
    else:
        from parties.security import generate_keypair

        keys = reports / "keys"
        for role in ROLES:
            generate_keypair(keys, role)
        common += ["--keys", str(keys)]
    if args.model == "minilm" and args.prompt is None:
        from permllm.model.prompts import MINILM_SENTENCES

        args.prompt = MINILM_SENTENCES[0]
    user = (
        base
        + [
            "user",
            "--owner",
            owner_user,
            "--listen-helper",
            user_helper,
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--model",
            args.model,
            "--report",
            str(reports / "user.json"),
        ]
        + common
    )
    if args.prompt is not None:
        user += ["--prompt", args.prompt]
    for flag in ("temperature", "top_k", "top_p", "seed"):
        value = getattr(args, flag)
        if value is not None:
            user += [f"--{flag.replace('_', '-')}", str(value)]
    if args.sample:
        user.append("--sample")
    return {
        "owner": base
        + [
            "owner",
            "--listen-user",
            owner_user,
            "--listen-helper",
            owner_helper,
            "--model",
            args.model,
            "--report",
            str(reports / "owner.json"),
        ]
        + common,
        "helper": base
        + [
            "helper",
            "--owner",
            owner_helper,
            "--user",
            user_helper,
            "--quiet",
            "--report",
            str(reports / "helper.json"),
        ]
        + common,
        "user": user,
    }


def stop_roles(processes: dict[str, subprocess.Popen]) -> None:
    """SIGTERM every role still running, then kill whatever has not exited 5 s later."""
    for proc in processes.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for proc in processes.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_demo(args) -> int:
    _validate(args)
    with tempfile.TemporaryDirectory(prefix="permllm-demo-") as tmp:
        reports = Path(tmp)
        commands = role_commands(args, free_ports(3), reports)
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        security = "no encryption (--insecure)" if args.insecure else "CURVE-encrypted and authenticated"
        print(
            f"permllm demo: owner, helper and user as three processes over ZeroMQ on loopback, "
            f"network '{args.network}', {security}",
            file=sys.stderr,
            flush=True,
        )
        processes: dict[str, subprocess.Popen] = {}
        try:
            for role in ROLES:
                processes[role] = subprocess.Popen(commands[role], env=env)
            failed = _wait(processes)
        except KeyboardInterrupt:
            print("\npermllm demo: interrupted; stopping the parties", file=sys.stderr)
            stop_roles(processes)
            return 130
        finally:
            stop_roles(processes)
        if failed:
            role, code = failed
            print(
                f"permllm demo: the {role} exited with status {code}; the other parties were stopped", file=sys.stderr
            )
            return 1
        summary = merge_reports(
            {role: json.loads((reports / f"{role}.json").read_text()) for role in ROLES}, network=args.network
        )
    print(format_summary(summary))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(summary, indent=2))
    return 0


def _wait(processes):
    """Wait for all roles; on the first failure return (role, status) at once."""
    while True:
        running = False
        for role, proc in processes.items():
            code = proc.poll()
            if code is None:
                running = True
            elif code != 0:
                return role, code
        if not running:
            return None
        time.sleep(0.05)


def merge_reports(reports: dict, network: str) -> dict:
    """One summary from the three role reports (the keys the README and --json promise)."""
    user, owner, helper = reports["user"], reports["owner"], reports["helper"]
    common = {
        "network": network,
        "prompt_tokens": user["prompt_tokens"],
        "offline_s": helper["phases_s"].get("offline"),
        "offline_bytes": helper["offline_bytes"],
        "offline_calls": helper["calls"],
        "prepare_s": owner["phases_s"].get("prepare"),
        "prepare_bytes": owner["prepare_bytes"],
        "model_load_s": owner["phases_s"].get("load"),
        "peak_rss_mb": {role: round(reports[role]["peak_rss_mb"], 1) for role in ROLES},
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
    return {
        **common,
        "text": user["text"],
        "token_ids": user["token_ids"],
        "generated_tokens": user["generated_tokens"],
        "ttft_s": user["ttft_s"],
        "decode_s_per_token": user["decode_s_per_token"],
        "decode_s_per_token_p90": user["decode_s_per_token_p90"],
        "online_bytes_per_token": user["online_bytes_per_token"],
        "online_bytes_per_token_up": user["online_bytes_per_token_up"],
        "online_bytes_per_token_down": user["online_bytes_per_token_down"],
        "flights_per_token": user["flights_per_token"],
        "prefill_flights": user["prefill_flights"],
        "prefill_bytes": user["prefill_bytes"],
    }


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


def _fmt_count(x) -> str:
    return "-" if x is None else (f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}")


def _fmt_s(x) -> str:
    return "-" if x is None else f"{x:.3f} s"


def format_summary(s: dict) -> str:
    if "embedding" in s:
        rows = [
            ("sentence tokens", s["prompt_tokens"]),
            (
                "online time / bytes / flights",
                f"{_fmt_s(s['online_s'])} / {_fmt_bytes(s['online_bytes'])} / {s['online_flights']}",
            ),
            ("offline (helper): time / bytes", f"{_fmt_s(s['offline_s'])} / {_fmt_bytes(s['offline_bytes'])}"),
            (
                "preparation (masked weights): time / bytes",
                f"{_fmt_s(s['prepare_s'])} / {_fmt_bytes(s['prepare_bytes'])}",
            ),
            (
                "peak RSS owner / user / helper",
                " / ".join(f"{s['peak_rss_mb'][r]:.0f} MB" for r in ("owner", "user", "helper")),
            ),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join([f"--- summary (network {s['network']}) ---"] + [f"{k:<{width}}  {v}" for k, v in rows])
    rows = [
        ("prompt tokens", s["prompt_tokens"]),
        ("generated tokens", s["generated_tokens"]),
        ("time to first token", _fmt_s(s["ttft_s"])),
        ("online s per generated token (median)", _fmt_s(s["decode_s_per_token"])),
        ("online bytes per token", _fmt_bytes(s["online_bytes_per_token"])),
        ("flights per token", _fmt_count(s["flights_per_token"])),
        ("prefill: flights / bytes", f"{s['prefill_flights']} / {_fmt_bytes(s['prefill_bytes'])}"),
        ("offline (helper): time / bytes", f"{_fmt_s(s['offline_s'])} / {_fmt_bytes(s['offline_bytes'])}"),
        ("preparation (masked weights): time / bytes", f"{_fmt_s(s['prepare_s'])} / {_fmt_bytes(s['prepare_bytes'])}"),
        (
            "peak RSS owner / user / helper",
            " / ".join(f"{s['peak_rss_mb'][r]:.0f} MB" for r in ("owner", "user", "helper")),
        ),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"--- summary (network {s['network']}) ---"] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
