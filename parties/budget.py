"""The owner's query budget: how many sessions and positions one user key may run against the model.

Why: every session shows the user fresh permutations of the activations of every layer for every
position it runs, plus the permuted logits of every generated token. Li et al. (ACL 2026) align such
differently shuffled activations across many queries and solve for the weights; the exposure grows
with the number of queries, so the owner bounds it per authenticated user: `ChargedToPeer` charges the
CURVE public key the ZAP handler accepted on the user's channel (the hello's User-Id), not a key
taken from the configuration; `--insecure` sessions all count under one name.

The ledger is a JSON file the owner keeps across sessions and restarts:
    {"version": 1, "keys": {KEY: {"sessions": int, "positions": int}}}
A session reserves its whole plan (prompt tokens plus the token budget) when the owner accepts the
hello, before any weight is sent; when the session ends normally the unused part is given back, so
a session that fails or is killed keeps its full charge. Reads and writes hold an exclusive lock
on PATH.lock, and a write goes to a fresh 0600 file that is fsynced and renamed over PATH (then the
folder is fsynced), so concurrent owner processes sharing one ledger neither lose nor double-count a
session, and a crash leaves the old ledger or the new one, never a torn or world-readable file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from parties.security import write_atomically
from permllm.errors import ConfigError, ProtocolError

LEDGER_VERSION = 1
INSECURE_KEY = "insecure (no CURVE key)"


@dataclass(frozen=True)
class Reservation:
    key: str
    positions: int


class QueryBudget:
    """Limits per user key, kept in a ledger file. None means no limit of that kind."""

    def __init__(self, path: str | os.PathLike, *, max_sessions: int | None = None, max_positions: int | None = None):
        for name, value in (("--max-sessions-per-key", max_sessions), ("--max-positions-per-key", max_positions)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if max_sessions is None and max_positions is None:
            raise ConfigError("a query budget needs --max-sessions-per-key or --max-positions-per-key")
        self.path = Path(path)
        self.max_sessions = max_sessions
        self.max_positions = max_positions
        if self.path.is_dir():
            raise ConfigError(f"--budget-file {self.path} is a folder")
        with self._locked():
            self._load()  # a broken ledger is an error at start-up, not in the middle of a session

    def usage(self, key: str) -> dict:
        with self._locked():
            return dict(self._load().get(key, {"sessions": 0, "positions": 0}))

    def reserve(self, key: str, positions: int) -> Reservation:
        """Charge one session of `positions`; ProtocolError (sent to the user) when it would exceed a limit."""
        with self._locked():
            ledger = self._load()
            used = ledger.setdefault(key, {"sessions": 0, "positions": 0})
            if self.max_sessions is not None and used["sessions"] + 1 > self.max_sessions:
                raise ProtocolError(
                    f"query budget exhausted: this user key has run {used['sessions']} of its "
                    f"{self.max_sessions} sessions"
                )
            if self.max_positions is not None and used["positions"] + positions > self.max_positions:
                raise ProtocolError(
                    f"query budget exhausted: this user key has used {used['positions']} of its "
                    f"{self.max_positions} positions and asks for {positions} more"
                )
            used["sessions"] += 1
            used["positions"] += positions
            self._store(ledger)
        return Reservation(key, positions)

    def settle(self, reservation: Reservation, used_positions: int) -> None:
        """Give back the part of a reservation the session did not use."""
        unused = reservation.positions - max(0, min(used_positions, reservation.positions))
        if unused == 0:
            return
        with self._locked():
            ledger = self._load()
            entry = ledger.get(reservation.key)
            if entry is not None:
                entry["positions"] = max(0, entry["positions"] - unused)
                self._store(ledger)

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            keys = data["keys"]
            if data.get("version") != LEDGER_VERSION or not isinstance(keys, dict):
                raise ValueError("unknown layout")
            for entry in keys.values():
                if not all(type(entry.get(k)) is int and entry[k] >= 0 for k in ("sessions", "positions")):
                    raise ValueError("an entry is not {sessions, positions} counts")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"the query budget ledger {self.path} is unreadable ({exc}); "
                "fix or remove it (removing it forgets every charge)"
            ) from None
        return keys

    def _store(self, keys: dict) -> None:
        data = json.dumps({"version": LEDGER_VERSION, "keys": keys}, indent=1, sort_keys=True).encode("utf-8")
        write_atomically(self.path, data, 0o600)  # fsyncs the file, then its folder after the rename


class ChargedToPeer:
    """A QueryBudget charged to the key the user's channel authenticated with, whatever key the caller
    names: `channel` is the owner's CURVE-server ZmqChannel towards the user, and reserve() runs after
    the hello came in on it, so `channel.peer_user_id` is the accepted client key (z85)."""

    def __init__(self, budget: QueryBudget, channel):
        self.budget = budget
        self.channel = channel

    def reserve(self, _configured_key: str, positions: int) -> Reservation:
        key = self.channel.peer_user_id
        if not key:
            raise ProtocolError("the user's channel carries no authenticated CURVE key: refusing to run unbudgeted")
        return self.budget.reserve(key, positions)

    def settle(self, reservation: Reservation, used_positions: int) -> None:
        self.budget.settle(reservation, used_positions)

    def usage(self, key: str) -> dict:
        return self.budget.usage(key)
