"""The helper's material pool: sessions dealt ahead of time, while the helper is idle.

After a session for a user key, the helper deals the next session for the same key, model, plan and
weight-mask seed in a background thread, with dealer seeds it draws itself (`fresh_seed`, the
cryptographic PRG), and keeps the records in memory. The next session that matches is served from the
pool: the helper hands the owner and the user the seed it dealt each one's records from (each on its
own channel, first on the material stream: `parties.wire.send_stream_seed`) and streams the stored
records, so the session waits for no dealing. A session that matches nothing in the pool is dealt
live, as without a pool. Each pooled session is handed out once and forgotten.

Bounds: at most `depth` pooled sessions per user key (one plan per key: a key's new plan replaces its
pooled sessions for the old one) and `max_keys` keys (the least recently served key is dropped). A
pooled session holds its records (SmolLM2-135M, a 37-token prompt and 8 new tokens: ~180 MB).
Background dealing pauses, between protocol calls, while a live session deals.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from permllm.prg import fresh_seed

DEFAULT_POOL_DEPTH = 1
MAX_POOL_KEYS = 4
"""The most user keys the pool keeps sessions for at once."""
BACKGROUND_NICE = 10
"""The niceness of the background dealing thread (Linux: per thread)."""


@dataclass(frozen=True)
class PoolKey:
    """What a pooled session must match: the user key, the model fingerprint, the plan and the mask seed."""

    user_key: str
    fingerprint: str
    prompt_tokens: int
    max_new_tokens: int
    selection: str
    mask_seed: bytes = field(repr=False)

    @staticmethod
    def of(user_key: str, card: str, plan, mask_seed: bytes) -> PoolKey:
        return PoolKey(user_key, card, plan.prompt_tokens, plan.max_new_tokens, plan.selection, bytes(mask_seed))


@dataclass
class PooledSession:
    """One session dealt ahead: the dealer seeds and the (owner, user) records in call order."""

    owner_seed: bytes = field(repr=False)
    user_seed: bytes = field(repr=False)
    records: deque = field(default_factory=deque, repr=False)

    @property
    def calls(self) -> int:
        return len(self.records)

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes + u.nbytes for o, u in self.records)


class PoolStopped(Exception):
    """Raised inside a background deal when the pool closes."""


class MaterialPool:
    """Pooled sessions by `PoolKey` and the background thread that deals them.

    deal(fam, arch, plan, owner_seed, user_seed, mask_seed, sink): the helper's dealing function
    (`parties.helper.deal_to`), called with a sink(owner_record, user_record)."""

    def __init__(self, deal, depth: int = DEFAULT_POOL_DEPTH, *, max_keys: int = MAX_POOL_KEYS, log=print):
        if depth < 0 or max_keys < 1:
            raise ValueError(f"pool depth must be >= 0 and max_keys >= 1, got {depth}, {max_keys}")
        self.depth = depth
        self.max_keys = max_keys
        self._deal = deal
        self._log = log
        self._lock = threading.Condition()
        self._ready: OrderedDict[str, tuple[PoolKey, list[PooledSession]]] = OrderedDict()
        self._jobs: list[tuple[PoolKey, tuple]] = []
        self._dealing: PoolKey | None = None
        self._live = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self.dealt = 0

    # -- what a session asks -------------------------------------------------------------------

    def take(self, key: PoolKey, *, timeout: float) -> tuple[PooledSession | None, float]:
        """The pooled session for `key`, removed from the pool, or None (deal live). Waits (up to
        `timeout` seconds) for a background deal of this very key that is under way: it is further
        along than a live deal would be; one only queued is dropped (`refill` queues it again after the
        live session). Returns (the session or None, seconds waited)."""
        import time

        start = time.monotonic()
        with self._lock:
            while self._dealing == key and not self._closed and time.monotonic() - start < timeout:
                self._lock.wait(min(1.0, timeout))
            entry = self._ready.get(key.user_key)
            session = None
            if entry is not None and entry[0] == key and entry[1]:
                session = entry[1].pop(0)
                self._ready.move_to_end(key.user_key)
            else:  # dealt live now: a queued deal for this key would only compete with it
                self._jobs = [(k, job) for k, job in self._jobs if k != key]
            return session, time.monotonic() - start

    def refill(self, key: PoolKey, fam, arch, plan) -> None:
        """Deal sessions for `key` in the background until its pool holds `depth` (a no-op at depth 0)."""
        if self.depth == 0:
            return
        with self._lock:
            if self._closed:
                return
            entry = self._ready.get(key.user_key)
            if entry is None or entry[0] != key:  # a new plan for this key replaces the old one's sessions
                entry = self._ready[key.user_key] = (key, [])
            self._ready.move_to_end(key.user_key)
            while len(self._ready) > self.max_keys:
                self._ready.popitem(last=False)
            self._jobs = [(k, job) for k, job in self._jobs if k.user_key != key.user_key]
            queued = int(self._dealing == key)
            for _ in range(self.depth - len(entry[1]) - queued):
                self._jobs.append((key, (fam, arch, plan)))
            if self._jobs and self._thread is None:
                self._thread = threading.Thread(target=self._work, name="helper-pool", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def ready(self, key: PoolKey) -> int:
        """How many sessions the pool holds for `key` now."""
        with self._lock:
            entry = self._ready.get(key.user_key)
            return len(entry[1]) if entry is not None and entry[0] == key else 0

    def live(self):
        """A context manager a live deal runs in: background dealing pauses meanwhile."""
        return _Live(self)

    def close(self) -> None:
        """Stop the background thread (an unfinished deal is dropped) and forget every pooled session."""
        with self._lock:
            self._closed = True
            self._jobs.clear()
            self._ready.clear()
            self._lock.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(30)

    # -- the background thread -----------------------------------------------------------------

    def _work(self) -> None:
        _lower_priority()
        while True:
            with self._lock:
                while not self._jobs and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                key, (fam, arch, plan) = self._jobs.pop(0)
                self._dealing = key
            session = PooledSession(fresh_seed(), fresh_seed())
            try:
                self._deal(fam, arch, plan, session.owner_seed, session.user_seed, key.mask_seed, self._sink(session))
            except PoolStopped:
                return
            except Exception as exc:  # a failed background deal costs only its pooled session
                self._log(f"helper: dealing a session ahead failed: {exc}")
                session = None
            with self._lock:
                self._dealing = None
                entry = self._ready.get(key.user_key)
                if session is not None and entry is not None and entry[0] == key and len(entry[1]) < self.depth:
                    entry[1].append(session)
                    self.dealt += 1
                self._lock.notify_all()

    def _sink(self, session: PooledSession):
        def keep(owner_record, user_record):
            with self._lock:
                while self._live and not self._closed:  # live sessions first
                    self._lock.wait()
                if self._closed:
                    raise PoolStopped
            session.records.append((owner_record, user_record))

        return keep


class _Live:
    def __init__(self, pool: MaterialPool):
        self.pool = pool

    def __enter__(self):
        with self.pool._lock:
            self.pool._live += 1

    def __exit__(self, *exc):
        with self.pool._lock:
            self.pool._live -= 1
            self.pool._lock.notify_all()


def _lower_priority() -> None:
    """Raise this thread's niceness where the platform allows it (Linux: per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):
        pass
