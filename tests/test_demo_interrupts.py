"""Ctrl-C at any moment of `permllm demo` (parties/launcher.py): status 130 within seconds, every role gone.

The demo runs in a forked child process (this process has paid for the heavy imports already, so a case
costs well under a second) with its three roles replaced by stand-ins (`sleep` under a shell that writes
its pid first). SIGINT reaches the launcher only, not the roles, at delays spread over the start of the
roles and the wait, so that it lands in Popen, in poll and in sleep; one case has a role that ignores
SIGTERM (the launcher kills it after its grace period), and one sends a second SIGINT during that grace
period, which cuts it short."""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from parties import launcher
from parties.cli import build_parser, main

BANNER = b"permllm demo: owner, helper and user as three processes"
DELAYS_S = [0.0, 0.001, 0.002, 0.003, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.35]
CASES = [(d, 1, False) for d in DELAYS_S] + [(0.5, 1, False), (1.0, 1, False), (0.3, 1, True), (0.3, 2, True)]


@pytest.fixture(scope="module", autouse=True)
def _imports_done_before_forking():
    """The demo's own imports (netsim and what it pulls in take seconds) happen once, here."""
    build_parser().parse_args(["demo", "--network", "none", "--insecure"])
    from netsim import parse_profile

    parse_profile("none")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _demo_in_child(pids: Path, stubborn: bool, stderr_fd: int) -> None:
    """The forked child: the demo with stand-in roles, its stderr on `stderr_fd`; never returns."""
    code = 99
    try:
        os.dup2(stderr_fd, 2)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter at a terminal
        role = ["/bin/sh", "-c", 'touch "$0/$$"; exec sleep 60', str(pids)]
        ignores_term = ["/bin/sh", "-c", 'trap "" TERM; touch "$0/$$"; exec sleep 60', str(pids)]
        commands = {"owner": ignores_term if stubborn else role, "helper": role, "user": role}
        launcher.role_commands = lambda args, ports, reports: commands
        code = main(["demo", "--network", "none", "--insecure"])
    finally:
        os._exit(code)


def _read_until(fd: int, needle: bytes, limit_s: float) -> bytes:
    data, deadline = b"", time.monotonic() + limit_s
    while needle not in data and time.monotonic() < deadline:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def _wait_status(pid: int, limit_s: float) -> int | None:
    """The child's exit code (-N when killed by signal N), or None when it is still running after limit_s."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    return None


@pytest.mark.processes
@pytest.mark.parametrize(("delay_s", "signals", "stubborn"), CASES)
def test_sigint_at_any_point_ends_the_demo_with_130_and_no_role_left(tmp_path, delay_s, signals, stubborn):
    pids = tmp_path / "pids"
    pids.mkdir()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        _demo_in_child(pids, stubborn, write_end)
    os.close(write_end)
    code = None
    try:
        err = _read_until(read_end, BANNER, 20)
        assert BANNER in err, err
        if stubborn:  # the stubborn owner must have installed its trap before the signal
            deadline = time.monotonic() + 10
            while len(list(pids.iterdir())) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(delay_s)
        sent = time.monotonic()
        os.kill(child, signal.SIGINT)
        if signals == 2:
            time.sleep(0.5)  # inside the stubborn owner's grace period
            os.kill(child, signal.SIGINT)
        code = _wait_status(child, 20)
        elapsed = time.monotonic() - sent
        err += _read_until(read_end, b"\0", 2)  # the rest, up to the pipe's end
    finally:
        os.close(read_end)
        if code is None:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
    text = err.decode(errors="replace")
    assert code == 130, text
    # a stubborn role costs the 5 s grace unless a second Ctrl-C cuts it short
    assert elapsed < (8.0 if stubborn and signals == 1 else 3.0), elapsed
    assert "interrupted; stopping the parties" in text and "Traceback" not in text
    if stubborn and signals == 1:
        assert elapsed >= 4.5, elapsed  # the grace period was given
    started = [int(p.name) for p in pids.iterdir()]
    assert [pid for pid in started if _alive(pid)] == []
