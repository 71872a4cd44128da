"""`WrappingChannel`: a Channel that passes everything to another channel, the base of channel wrappers.

A wrapper (netsim.NetSim, the tests' recording channel) shares the inner channel's peer, flight clock,
stats, timeout and size limit, so traffic is counted once, and overrides only the hooks it changes
(`_send`, `_receive`). The raw frame primitives go straight to the inner channel (for tests of bad frames),
and closing the wrapper closes the inner channel.
"""

from __future__ import annotations

from permllm.transport.channel import Channel, Received

__all__ = ["WrappingChannel"]


class WrappingChannel(Channel):
    """A Channel over `inner` (which it owns and closes) that changes nothing until a subclass overrides a hook."""

    def __init__(self, inner: Channel) -> None:
        super().__init__(
            inner.peer,
            clock=inner.clock,
            stats=inner.stats,
            timeout=inner.timeout,
            max_payload_bytes=inner.max_payload_bytes,
            max_receive_bytes=inner.max_receive_bytes,
        )
        self._inner = inner

    @property
    def inner(self) -> Channel:
        """The wrapped channel."""
        return self._inner

    @property
    def closed(self) -> bool:
        """True once this wrapper or the inner channel was closed."""
        return self._closed or self._inner.closed

    def _send(self, tag: str, payload, *, deliver_at_ns: int = 0) -> int:
        """Send through the inner channel; returns the frame size in bytes."""
        return self._inner._send(tag, payload, deliver_at_ns=deliver_at_ns)

    def _receive(self, tag: str, timeout: float | None) -> Received:
        """Receive through the inner channel."""
        return self._inner._receive(tag, timeout)

    def _send_frame(self, header: bytes, payload: memoryview) -> None:
        """Raw: passes a frame straight to the inner channel."""
        self._inner._send_frame(header, payload)

    def _recv_frame(self, timeout_s: float | None):
        """Raw: takes a frame straight from the inner channel."""
        return self._inner._recv_frame(timeout_s)

    def _close_transport(self) -> None:
        """Close the inner channel."""
        self._inner.close()
