"""In-process channel pair over thread-safe queues, for tests and single-process runs.

Frames are really serialized (header bytes plus a private copy of the payload bytes), so byte counts
are the same as over ZeroMQ and the receiver never shares memory with the sender's array.
Closing one end makes the other end's pending and later receives raise PeerGone at once (after any
frames sent before the close have been read) and its sends raise PeerGone.
"""

from __future__ import annotations

import queue
import threading

from permllm.errors import PeerGone
from permllm.transport.channel import DEFAULT_TIMEOUT_S, Channel, FlightClock
from permllm.transport.frames import DEFAULT_MAX_PAYLOAD_BYTES

_PEER_CLOSED = object()  # queued into a side's inbox when the other side closes
_LOCAL_CLOSED = object()  # queued into a side's own inbox to wake a receive blocked on it


class _PairState:
    """What both ends of a pair share: which sides are closed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed = [False, False]


class MemoryChannel(Channel):
    """One end of an in-memory channel pair. Create pairs with `MemoryChannel.pair`."""

    def __init__(
        self,
        peer: str,
        *,
        inbox: queue.Queue,
        outbox: queue.Queue,
        state: _PairState,
        side: int,
        clock: FlightClock | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        super().__init__(peer, clock=clock, timeout=timeout, max_payload_bytes=max_payload_bytes)
        self._inbox = inbox
        self._outbox = outbox
        self._state = state
        self._side = side
        self._peer_closed = False

    @classmethod
    def pair(
        cls,
        name_a: str = "owner",
        name_b: str = "user",
        clock_a: FlightClock | None = None,
        clock_b: FlightClock | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> tuple[MemoryChannel, MemoryChannel]:
        """Create two connected ends.

        name_a / name_b: the parties' names; the end held by party A has `peer == name_b` and vice
        versa. clock_a / clock_b: each party's FlightClock (new ones when None).
        timeout / max_payload_bytes: as for Channel, applied to both ends.
        Returns (end of A, end of B).
        """
        a_to_b: queue.Queue = queue.Queue()
        b_to_a: queue.Queue = queue.Queue()
        state = _PairState()
        common = {"state": state, "timeout": timeout, "max_payload_bytes": max_payload_bytes}
        end_a = cls(name_b, inbox=b_to_a, outbox=a_to_b, side=0, clock=clock_a, **common)
        end_b = cls(name_a, inbox=a_to_b, outbox=b_to_a, side=1, clock=clock_b, **common)
        return end_a, end_b

    def _send_frame(self, header: bytes, payload: memoryview) -> None:
        """Queue a copy of the frame for the peer. Raises PeerGone when the peer has closed."""
        with self._state.lock:
            if self._state.closed[1 - self._side]:
                raise PeerGone(f"peer {self.peer!r} closed the channel")
            self._outbox.put((bytes(header), bytearray(payload)))

    def _recv_frame(self, timeout_s: float | None):
        """Return the next queued frame, None on timeout; raise PeerGone once the peer has closed."""
        if self._peer_closed:
            raise PeerGone(f"peer {self.peer!r} closed the channel")
        try:
            item = self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if item is _PEER_CLOSED:
            self._peer_closed = True
            raise PeerGone(f"peer {self.peer!r} closed the channel")
        if item is _LOCAL_CLOSED:
            raise PeerGone("this end was closed while receiving")
        return item

    def _close_transport(self) -> None:
        """Mark this side closed and wake the peer's and this side's pending receives."""
        with self._state.lock:
            self._state.closed[self._side] = True
            self._outbox.put(_PEER_CLOSED)
        self._inbox.put(_LOCAL_CLOSED)
