"""What the owner and helper services share: session threads, the stop signal, the service report.

A service runs each session in its own thread on its own channels; a session that fails (a user killed
mid-decode: a receive timeout, PeerGone, a ProtocolError) is logged and recorded in the report, and
only that session ends. SIGTERM (and SIGINT) make `stopping` true: the service stops accepting, waits
up to `drain_s` for the running sessions, then terminates its ZeroMQ context, which makes every
blocked socket call of the sessions still running fail at once (ETERM), so they end and close their
channels; the service then exits 0.

The report (`--report PATH`) is rewritten after every session (0600 JSON, replaced atomically):
{"role": ROLE, "service": true, "sessions": [each session's report, in the order they ended]}; a failed
session's entry is {"session": TAG, "error": TEXT}.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

from parties.security import write_atomically
from permllm.errors import ConfigError

DEFAULT_MAX_CONCURRENT = 2
"""Sessions a service runs at once unless told otherwise: two keep a 2-core machine busy without
making either session's compute threads fight over one core for long."""
DEFAULT_DRAIN_S = 30.0
POLL_S = 0.2


def check_max_concurrent(n: int) -> int:
    if not 1 <= n <= 64:
        raise ConfigError(f"--max-concurrent must be between 1 and 64, got {n}")
    return n


class Sessions:
    """The running session threads of one service, the reports of the ended ones and the stop flag."""

    def __init__(self, role: str, max_concurrent: int, report_path=None, log=print):
        self.role = role
        self.max_concurrent = check_max_concurrent(max_concurrent)
        self.report_path = report_path
        self.log = log
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[str, threading.Thread] = {}
        self.reports: list[dict] = []
        self.errors: dict[str, BaseException] = {}
        self._previous: dict = {}

    def install_signals(self) -> None:
        """SIGTERM and SIGINT set `stopping` (main thread only; a signal already ignored stays ignored)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, lambda signum, frame: self.stopping.set())

    def restore_signals(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def full(self) -> bool:
        return self.running >= self.max_concurrent

    def start(self, tag: str, run, cleanup) -> None:
        """Run `run()` (returns the session's report dict) in a new thread named after `tag`; `cleanup()`
        runs after it whatever happens (closing the session's channels)."""

        def target():
            try:
                report = {**run(), "session": tag}
                self.log(f"permllm {self.role}: session {tag} done")
            except BaseException as exc:  # one session's failure ends only that session
                self.errors[tag] = exc
                report = {"session": tag, "error": f"{type(exc).__name__}: {exc}"[:2000]}
                self.log(f"permllm {self.role}: session {tag} failed: {report['error']}")
            finally:
                try:
                    cleanup()
                except Exception as exc:  # closing a channel of a failed session
                    self.log(f"permllm {self.role}: session {tag}: closing its channels failed: {exc}")
            with self._lock:
                self.reports.append(report)
                self._running.pop(tag, None)
                self._write_report()

        thread = threading.Thread(target=target, name=f"{self.role}-session-{tag}", daemon=True)
        with self._lock:
            self._running[tag] = thread
        thread.start()

    def join(self, tag: str) -> None:
        with self._lock:
            thread = self._running.get(tag)
        if thread is not None:
            thread.join()

    def drain(self, seconds: float) -> bool:
        """Wait up to `seconds` for the running sessions; True when none is left."""
        deadline = time.monotonic() + seconds
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.running

    def finish(self, once: bool, served: int, drain_s: float) -> None:
        """After the accept loop: with `once`, wait for the one session served; otherwise give the running
        sessions up to `drain_s` seconds (the caller then ends the rest by closing their context)."""
        if once and served:
            self.drain(float("inf"))
            return
        self.log(f"{self.role}: stopping; waiting up to {drain_s:g} s for {self.running} running sessions")
        if not self.drain(drain_s):
            self.log(f"{self.role}: ending {self.running} sessions that did not finish in time")

    def outcome(self, once: bool) -> dict:
        """The service report; with `once`, the served session's error is raised instead."""
        if once and self.errors:
            raise next(iter(self.errors.values()))
        return self.report()

    def report(self) -> dict:
        return {"role": self.role, "service": True, "sessions": self.reports}

    def _write_report(self) -> None:
        if self.report_path:
            write_atomically(Path(self.report_path), json.dumps(self.report(), indent=2).encode(), 0o600)


def terminate_context(context, seconds: float, log) -> None:
    """context.term() in a thread, waited for up to `seconds`: the sessions still running get ETERM on
    their next socket call and close their sockets, which lets term() return."""
    done = threading.Event()

    def term():
        context.term()
        done.set()

    threading.Thread(target=term, name="zmq-term", daemon=True).start()
    if not done.wait(seconds):
        log(f"the ZeroMQ context did not close within {seconds:g} s; exiting anyway")
