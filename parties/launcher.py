"""`permllm demo`: owner, user and helper as three OS processes talking ZeroMQ over loopback
(`--mode two-party`: owner and user only, the material made between them).

The launcher only starts the roles, waits, and merges their reports into one summary; it never
sees a share. Every child is stopped when the demo ends, fails or is interrupted. Each role gets
its own keys folder (its secret key and the peers' public keys), and the prompt reaches the user
through a 0600 file in the launcher's private folder, never through a command line (which any
local user can read in `ps`).

Interrupts: while the roles run, SIGINT and SIGTERM only set a flag; the launcher waits by polling
(never a blocking Popen.wait, whose internal lock an exception raised inside it can leave held), so
a Ctrl-C at any moment ends the demo with status 130 and every role stopped; a second Ctrl-C cuts
the roles' grace period short.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from parties.demo_summary import format_session_line, format_summary, merge_reports
from permllm.errors import ConfigError

ROLES = ("owner", "helper", "user")
TWO_PARTY_ROLES = ("owner", "user")


def demo_roles(args) -> tuple[str, ...]:
    """The processes the demo starts: all three roles, or owner and user in two-party mode."""
    from parties.session import TWO_PARTY_MODE

    return TWO_PARTY_ROLES if getattr(args, "mode", None) == TWO_PARTY_MODE else ROLES


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
    if not 1 <= getattr(args, "sessions", 1) <= 100:
        raise ConfigError(f"--sessions must be between 1 and 100, got {args.sessions}")
    if not 1 <= args.max_new_tokens <= 1024:
        raise ConfigError(f"--max-new-tokens must be between 1 and 1024, got {args.max_new_tokens}")
    if args.model != "minilm" and args.prompt is not None:
        _check_prompt_fits(args.model, args.prompt, args.max_new_tokens)


def _check_prompt_fits(model: str, prompt: str, max_new_tokens: int) -> None:
    """Tokenize the prompt (the tokenizer is public and cheap) so an oversized one fails before any role starts."""
    from parties.models import load_tokenizer, max_positions
    from parties.roles import prepare_prompt

    prepare_prompt(load_tokenizer(model), prompt, max_new_tokens, max_positions(model))


def role_addresses(ports) -> dict[str, list[str]]:
    """Each role's address options on three loopback ports: the owner binds its front door for the users and
    its control channel for the helper, the user binds for the helper and asks the owner's front door for a
    session, the helper connects to the owner (which tells it each session's user address)."""
    owner_user, owner_helper, user_helper = (f"tcp://127.0.0.1:{p}" for p in ports)
    return {
        "owner": ["--listen-user", owner_user, "--listen-helper", owner_helper],
        "helper": ["--owner", owner_helper],
        "user": ["--owner", owner_user, "--listen-helper", user_helper],
    }


def role_commands(args, ports, reports: Path) -> dict[str, list[str]]:
    """The three roles' command lines for one session: `args` holds the demo's options (network, timeouts,
    threads, insecure, model, prompt, max_new_tokens, sampling flags), `ports` three free loopback ports,
    `reports` a private folder for the keys and each role's JSON report (`<role>.json`)."""
    base = [sys.executable, "-m", "parties.cli"]
    roles = demo_roles(args)
    addresses = role_addresses(ports)
    if roles == TWO_PARTY_ROLES:  # no helper: no helper addresses, and both say the mode
        mode = ["--mode", args.mode]
        addresses = {"owner": addresses["owner"][:2] + mode, "user": addresses["user"][:2] + mode}
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
    security = {role: ["--insecure"] for role in roles}
    if not getattr(args, "insecure", False):
        folders = role_key_folders(reports / "keys", roles)
        security = {role: ["--keys", str(folder)] for role, folder in folders.items()}
    if args.model == "minilm" and args.prompt is None:
        from permllm.model.prompts import MINILM_SENTENCES

        args.prompt = MINILM_SENTENCES[0]
    user = ["user", *addresses["user"], "--max-new-tokens", str(args.max_new_tokens), "--model", args.model]
    user = base + user + ["--report", str(reports / "user.json")] + common + security["user"]
    if "helper" in roles:
        user += ["--cache-dir", str(reports / "cache")]  # the demo's user keeps W - U for its later sessions
    if args.prompt is not None:
        user += ["--prompt-file", str(_private_file(reports / "prompt.txt", args.prompt.encode("utf-8")))]
    elif getattr(args, "prompt_file", None) is not None:
        user += ["--prompt-file", str(args.prompt_file)]
    if getattr(args, "expect_fingerprint", None) is not None:
        user += ["--expect-fingerprint", args.expect_fingerprint]
    for flag in ("temperature", "top_k", "top_p", "seed"):
        value = getattr(args, flag)
        if value is not None:
            user += [f"--{flag.replace('_', '-')}", str(value)]
    if args.sample:
        user.append("--sample")
    owner = ["owner", *addresses["owner"], "--model", args.model, "--report", str(reports / "owner.json")]
    commands = {"owner": base + owner + common + security["owner"], "user": user}
    if "helper" in roles:
        helper = ["helper", *addresses["helper"], "--quiet", "--report", str(reports / "helper.json")]
        if getattr(args, "pool_depth", None) is not None:
            helper += ["--pool-depth", str(args.pool_depth)]
        commands["helper"] = base + helper + common + security["helper"]
    return {role: commands[role] for role in ROLES if role in commands}


def role_key_folders(keys: Path, roles=ROLES) -> dict[str, Path]:
    """keys/ROLE for each of `roles`: ROLE.key (one `permllm keygen` per role) and the peers' .pub files."""
    from parties.security import generate_keypair

    folders = {role: keys / role for role in roles}
    publics = {role: generate_keypair(folder, role)[1] for role, folder in folders.items()}
    for role, folder in folders.items():
        for peer, public in publics.items():
            if peer != role:
                (folder / public.name).write_bytes(public.read_bytes())
    return folders


def _private_file(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _reap(processes: dict[str, subprocess.Popen], seconds: float, hurry: Callable[[], bool]) -> bool:
    """Poll until every role has exited (True) or `seconds` pass or `hurry()` says so (False)."""
    deadline = time.monotonic() + seconds
    while any(proc.poll() is None for proc in processes.values()):
        if time.monotonic() >= deadline or hurry():
            return False
        time.sleep(0.02)
    return True


def stop_roles(
    processes: dict[str, subprocess.Popen], *, grace_s: float = 5.0, hurry: Callable[[], bool] = lambda: False
) -> None:
    """SIGTERM every role still running, then kill whatever has not exited `grace_s` later (or as soon
    as `hurry()` is true). Only polls, so no signal can wedge it; returns within grace_s + 5 s."""
    for proc in processes.values():
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    if _reap(processes, grace_s, hurry):
        return
    for proc in processes.values():
        if proc.poll() is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
    _reap(processes, 5.0, lambda: False)


class _Interrupts:
    """While active (in the main thread), SIGINT and SIGTERM only count; a signal the process already
    ignored stays ignored (a demo started in the background)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signals: list[int] = []
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame):
        self.signals.append(signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_status(self) -> int:
        return 128 + self.signals[0]


def run_demo(args) -> int:
    from parties.cli_options import read_prompt

    args.prompt, args.prompt_file = read_prompt(args), None
    _validate(args)
    with tempfile.TemporaryDirectory(prefix="permllm-demo-") as tmp, _Interrupts() as interrupts:
        reports = Path(tmp)
        commands = role_commands(args, free_ports(3), reports)
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        security = "no encryption (--insecure)" if args.insecure else "CURVE-encrypted and authenticated"
        roles = demo_roles(args)
        services_ = tuple(r for r in roles if r != "user")
        who = "owner, helper and user as three" if "helper" in roles else "owner and user (two-party mode) as two"
        print(
            f"permllm demo: {who} processes over ZeroMQ on loopback, network '{args.network}', {security}",
            file=sys.stderr,
            flush=True,
        )
        processes: dict[str, subprocess.Popen] = {}
        sessions = getattr(args, "sessions", 1)
        try:
            for role in roles:
                if interrupts.signals:
                    break
                processes[role] = subprocess.Popen(commands[role], env=env)
            failed = None if interrupts.signals else _wait(processes, interrupts)
            for i in range(1, sessions):
                if failed or interrupts.signals:
                    break
                processes["user"] = subprocess.Popen(_user_command(commands["user"], reports, i), env=env)
                failed = _wait(processes, interrupts)
            if not failed and not interrupts.signals:  # every session ended: the services stop on SIGTERM
                stop_roles({r: processes[r] for r in services_}, grace_s=60.0)
                failed = next(((r, processes[r].returncode) for r in services_ if processes[r].returncode), None)
        finally:
            if interrupts.signals:
                print("\npermllm demo: interrupted; stopping the parties", file=sys.stderr, flush=True)
            stop_roles(processes, hurry=lambda: len(interrupts.signals) > 1)
        if interrupts.signals:
            return interrupts.exit_status
        if failed:
            role, code = failed
            print(
                f"permllm demo: the {role} exited with status {code}; the other parties were stopped", file=sys.stderr
            )
            return 1
        services = {role: json.loads((reports / f"{role}.json").read_text())["sessions"] for role in services_}
        per_session = []
        for i in range(sessions):
            user = json.loads((reports / ("user.json" if i == 0 else f"user-{i}.json")).read_text())
            merged = {"user": user, **{role: services[role][i] for role in services_}}
            per_session.append(merge_reports(merged, network=args.network))
        summary = dict(per_session[0])
        if sessions > 1:
            summary["sessions"] = per_session
    print(format_summary(summary))
    for i, session in enumerate(summary.get("sessions", [])[1:], start=2):
        print(format_session_line(i, session))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(summary, indent=2))
    return 0


def _user_command(first: list[str], reports: Path, i: int) -> list[str]:
    """Session i's user command: the first session's, writing its report to user-I.json."""
    return [f"{reports / f'user-{i}.json'}" if a == str(reports / "user.json") else a for a in first]


def _wait(processes, interrupts):
    """Poll the roles until the user has exited with 0 (None), a role failed ((role, status), at once: the
    owner or the helper service exiting at all before the user is a failure) or a signal came (None; the
    caller reads `interrupts`)."""
    while not interrupts.signals:
        for role, proc in processes.items():
            code = proc.poll()
            if code is None:
                continue
            if role == "user" and code == 0:
                return None
            return None if interrupts.signals else (role, code)
        time.sleep(0.05)
    return None
