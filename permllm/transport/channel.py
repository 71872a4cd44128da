"""The `Channel` interface every transport implements, with the framing logic they all share.

A concrete transport (MemoryChannel, ZmqChannel) implements three primitives only:

* `_send_frame(header_bytes, payload_buffer)` hands one serialized frame to the transport;
* `_recv_frame(timeout_s)` returns the next `(header_buffer, payload_buffer)`, or None when nothing
  arrived within `timeout_s` seconds (None = wait forever); raises PeerGone when the peer has gone;
* `_close_transport()` releases the transport's resources.

Everything else is shared: payload conversion (`codec`), headers and their bounds (`frames`), and,
here, sequence numbers, flight depth, byte counters and validation of what arrives (tag, dtype,
shape, size, depth, order), all before anything is allocated or reshaped for the payload.

Wrappers such as `netsim.NetSim` override `_send` (which takes a `deliver_at_ns` keyword that is
stamped into the header) and `_receive` (which returns the validated header along with the payload)
so they can wrap any channel without touching its frames.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from permllm.errors import ChannelTimeout, PeerGone, ProtocolError
from permllm.transport.codec import as_byte_view, expected_dtype, payload_array, to_wire_array
from permllm.transport.frames import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_FLIGHT_DEPTH,
    Header,
    check_payload,
    check_shape,
    check_tag,
    decode_header,
    encode_header,
)

__all__ = ["DEFAULT_TIMEOUT_S", "Channel", "ChannelStats", "FlightClock", "Received", "to_wire_array"]

DEFAULT_TIMEOUT_S = 60.0


@dataclass
class ChannelStats:
    """Traffic counters of one channel. Bytes are real serialized bytes: len(header) + len(payload)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_sent(self, nbytes: int) -> None:
        """Count one outgoing frame of `nbytes` bytes."""
        with self._lock:
            self.bytes_sent += nbytes
            self.messages_sent += 1

    def record_received(self, nbytes: int) -> None:
        """Count one incoming frame of `nbytes` bytes."""
        with self._lock:
            self.bytes_received += nbytes
            self.messages_received += 1

    def snapshot(self) -> ChannelStats:
        """Return an independent copy of the counters (for computing differences)."""
        with self._lock:
            return ChannelStats(self.bytes_sent, self.bytes_received, self.messages_sent, self.messages_received)


class FlightClock:
    """Counts communication flights (sequential message rounds) of one party.

    `depth` is the largest depth received so far; each outgoing frame carries depth + 1. Share one
    FlightClock between all channels of a party so that a message relayed through a third party
    still counts the flights on its causal path. Thread-safe.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._lock = threading.Lock()

    @property
    def depth(self) -> int:
        """Largest flight depth observed on any received frame (0 before the first receipt)."""
        with self._lock:
            return self._depth

    def outgoing_depth(self) -> int:
        """Depth to stamp on a frame sent now: depth + 1."""
        with self._lock:
            return self._depth + 1

    def observe(self, depth: int) -> None:
        """Record the depth carried by a received frame.

        Raises ProtocolError, leaving the clock as it was, for a depth over MAX_FLIGHT_DEPTH (a peer
        claiming 2^32 - 1 would otherwise make every later send of this party unencodable)."""
        if not 0 <= depth <= MAX_FLIGHT_DEPTH:
            raise ProtocolError(f"flight depth {depth} outside 0..{MAX_FLIGHT_DEPTH}")
        with self._lock:
            if depth > self._depth:
                self._depth = depth


@dataclass(frozen=True)
class Received:
    """A validated incoming frame: its header and its payload buffer (bytes-like, exact length)."""

    header: Header
    payload: object


class Channel(ABC):
    """A message channel to one peer. See the module docstring for what subclasses implement.

    peer: the other side's name, used in every error message ("owner", "user", "helper").
    clock: the party's FlightClock (a new one when None).
    timeout: default receive (and, where the transport can block, send) timeout in seconds;
        math.inf waits forever.
    max_payload_bytes: largest payload sent or accepted; larger payloads or declarations raise ProtocolError.
    max_receive_bytes: largest payload accepted from the peer when it must be smaller than what this
        end sends (a peer that only sends control messages); None = max_payload_bytes.
    stats: counters to update (a new ChannelStats when None); wrappers pass the wrapped channel's.

    A channel is meant to be used by one thread at a time per direction; sending and receiving may
    happen on different threads.
    """

    def __init__(
        self,
        peer: str,
        *,
        clock: FlightClock | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_receive_bytes: int | None = None,
        stats: ChannelStats | None = None,
    ) -> None:
        if not isinstance(peer, str) or not peer:
            raise ValueError(f"peer must be a non-empty str, got {peer!r}")
        if max_payload_bytes <= 0:
            raise ValueError(f"max_payload_bytes must be positive, got {max_payload_bytes}")
        max_receive_bytes = max_payload_bytes if max_receive_bytes is None else max_receive_bytes
        if not 0 < max_receive_bytes <= max_payload_bytes:
            raise ValueError(f"max_receive_bytes must be in 1..max_payload_bytes, got {max_receive_bytes}")
        self._max_receive_bytes = int(max_receive_bytes)
        self._peer = peer
        self._clock = clock if clock is not None else FlightClock()
        self._stats = stats if stats is not None else ChannelStats()
        self._timeout = _check_timeout(timeout)
        self._max_payload_bytes = int(max_payload_bytes)
        self._send_seq = 0
        self._recv_seq = 0
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._closed = False

    # --- properties -------------------------------------------------------------------------
    @property
    def peer(self) -> str:
        """Name of the party at the other end."""
        return self._peer

    @property
    def stats(self) -> ChannelStats:
        """Traffic counters (serialized bytes and frames, both directions)."""
        return self._stats

    @property
    def clock(self) -> FlightClock:
        """The party's flight clock."""
        return self._clock

    @property
    def timeout(self) -> float:
        """Default receive timeout in seconds."""
        return self._timeout

    @property
    def max_payload_bytes(self) -> int:
        """Largest payload this end sends (and accepts, unless max_receive_bytes is smaller)."""
        return self._max_payload_bytes

    @property
    def max_receive_bytes(self) -> int:
        """Largest payload this end accepts from its peer."""
        return self._max_receive_bytes

    @property
    def closed(self) -> bool:
        """True once close() was called on this end."""
        return self._closed

    # --- public API -------------------------------------------------------------------------
    def send(self, tag: str, payload) -> None:
        """Send `payload` (numpy array, torch tensor or bytes) under `tag`.

        Raises ProtocolError on a bad tag, an unsupported dtype or a payload over max_payload_bytes,
        PeerGone when the channel or the peer is closed, ChannelTimeout when the transport cannot
        take the frame within the timeout.
        """
        self._send(tag, payload)

    def recv(self, tag: str, *, dtype=None, shape=None, timeout: float | None = None) -> np.ndarray:
        """Receive the next message, which must carry `tag`, and return it as a numpy array.

        dtype / shape: when given, the message must have exactly this dtype (numpy or torch dtype,
        or name) / shape. timeout: seconds to wait (None = the channel default).
        Returns an array viewing the received buffer (writable; copied only if misaligned).
        Raises ChannelTimeout, PeerGone, or ProtocolError (wrong tag, dtype, shape, size, order).
        """
        message = self._receive(tag, timeout)
        header = message.header
        if dtype is not None:
            expected = expected_dtype(dtype)
            if header.dtype != expected:
                raise ProtocolError(
                    f"peer {self.peer!r}, tag {tag!r}: expected dtype {expected}, "
                    f"received {header.dtype} (shape {header.shape})"
                )
        if shape is not None:
            expected_shape = tuple(int(d) for d in shape)
            if header.shape != expected_shape:
                raise ProtocolError(
                    f"peer {self.peer!r}, tag {tag!r}: expected shape {expected_shape}, "
                    f"received {header.shape} ({header.dtype})"
                )
        return payload_array(header, message.payload, self.peer)

    def recv_bytes(self, tag: str, *, max_len: int | None = None, timeout: float | None = None) -> bytes:
        """Receive the next message, which must be raw bytes under `tag`, and return them.

        max_len: when given, more bytes than this raise ProtocolError.
        Raises ChannelTimeout, PeerGone, or ProtocolError (wrong tag, not a 1-D uint8 message, too long).
        """
        message = self._receive(tag, timeout)
        header = message.header
        if header.dtype != np.dtype(np.uint8) or len(header.shape) != 1:
            raise ProtocolError(
                f"peer {self.peer!r}, tag {tag!r}: expected raw bytes, received {header.dtype} of shape {header.shape}"
            )
        if max_len is not None and header.shape[0] > max_len:
            raise ProtocolError(
                f"peer {self.peer!r}, tag {tag!r}: expected at most {max_len} bytes, received {header.shape[0]}"
            )
        return bytes(message.payload)

    def close(self) -> None:
        """Close this end (idempotent). The peer's pending and later receives raise PeerGone where
        the transport can tell (see each transport for how promptly)."""
        if self._closed:
            return
        self._closed = True
        self._close_transport()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(peer={self.peer!r}, closed={self.closed})"

    # --- hooks for wrappers ---------------------------------------------------------------
    def _send(self, tag: str, payload, *, deliver_at_ns: int = 0) -> int:
        """Frame and send `payload`, stamping `deliver_at_ns` (0 = no simulated delay) in the header.

        Returns the number of bytes of the frame (header + payload). Raises as `send`.
        """
        check_tag(tag)
        array = to_wire_array(payload)
        if array.nbytes > self._max_payload_bytes:
            raise ProtocolError(
                f"tag {tag!r} to peer {self.peer!r}: payload of {array.nbytes} bytes "
                f"is over the maximum of {self._max_payload_bytes}"
            )
        check_shape(tag, array.shape, array.dtype, self._max_payload_bytes)
        body = as_byte_view(array)
        with self._send_lock:
            if self._closed:
                raise PeerGone(f"cannot send tag {tag!r}: this end of the channel to peer {self.peer!r} is closed")
            header = encode_header(
                tag, array.dtype, array.shape, self._send_seq, self._clock.outgoing_depth(), deliver_at_ns
            )
            try:
                self._send_frame(header, body)
            except (ChannelTimeout, PeerGone) as exc:
                raise type(exc)(f"sending tag {tag!r} to peer {self.peer!r}: {exc}") from exc
            self._send_seq += 1
        nbytes = len(header) + len(body)
        self._stats.record_sent(nbytes)
        return nbytes

    def _receive(self, tag: str, timeout: float | None) -> Received:
        """Take the next frame, check that it is well formed, in order and carries `tag`.

        timeout: seconds (None = channel default). Returns the validated Received frame and
        records its depth on the flight clock. Raises ChannelTimeout, PeerGone, ProtocolError.
        """
        check_tag(tag)
        wait_s = self._timeout if timeout is None else _check_timeout(timeout)
        with self._recv_lock:
            if self._closed:
                raise PeerGone(f"cannot receive tag {tag!r}: this end of the channel to peer {self.peer!r} is closed")
            try:
                frame = self._recv_frame(None if math.isinf(wait_s) else wait_s)
            except PeerGone as exc:
                raise PeerGone(f"waiting for tag {tag!r} from peer {self.peer!r}: {exc}") from exc
            if frame is None:
                raise ChannelTimeout(
                    f"timed out after {wait_s:g} s waiting for tag {tag!r} from peer {self.peer!r}"
                    + self._timeout_hint()
                )
            header_buf, payload = frame
            try:
                header = decode_header(header_buf)
                check_payload(header, memoryview(payload).nbytes, self._max_receive_bytes)
            except ProtocolError as exc:
                raise ProtocolError(f"from peer {self.peer!r} while waiting for tag {tag!r}: {exc}") from exc
            expected_seq = self._recv_seq
            if header.seq != expected_seq:
                what = "replayed" if header.seq < expected_seq else "out-of-order"
                raise ProtocolError(
                    f"{what} frame from peer {self.peer!r}: expected seq {expected_seq}, received seq {header.seq} "
                    f"(tag {header.tag!r}, waiting for tag {tag!r})"
                )
            self._recv_seq += 1
        self._stats.record_received(memoryview(header_buf).nbytes + memoryview(payload).nbytes)
        if header.tag != tag:
            raise ProtocolError(
                f"peer {self.peer!r}: expected tag {tag!r}, received tag {header.tag!r} "
                f"(seq {header.seq}, {header.dtype}, shape {header.shape})"
            )
        self._clock.observe(header.depth)
        return Received(header, payload)

    def _timeout_hint(self) -> str:
        """What the transport knows about why nothing arrived (appended to a timeout's message)."""
        return ""

    # --- transport primitives ---------------------------------------------------------------
    @abstractmethod
    def _send_frame(self, header: bytes, payload: memoryview) -> None:
        """Hand one frame to the transport. Raises PeerGone / ChannelTimeout when it cannot."""

    @abstractmethod
    def _recv_frame(self, timeout_s: float | None):
        """Return the next (header_buffer, payload_buffer), or None after `timeout_s` seconds
        without a frame (None = wait forever). Raises PeerGone when the peer is known to be gone,
        ProtocolError when what arrived is not a two-part frame."""

    @abstractmethod
    def _close_transport(self) -> None:
        """Release the transport; called once by close()."""


def _check_timeout(timeout: float) -> float:
    """Validate a timeout in seconds: a positive number, math.inf for no limit."""
    value = float(timeout)
    if not value > 0:
        raise ValueError(f"timeout must be a positive number of seconds (math.inf for none), got {timeout!r}")
    return value
