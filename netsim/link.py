"""Simulated link: a FIFO serialization model per direction, and `NetSim`, a Channel wrapper using it.

The sender never sleeps. It computes when the frame would arrive and stamps that time
(deliver_at_ns) into the frame header; the receiver waits until then before returning the message:

    depart    = max(now, link_free)
    link_free = depart + nbytes * 8 / bandwidth      (frames queue behind each other: FIFO)
    deliver   = link_free + rtt / 2

nbytes is the real serialized size (header + payload). With RealClock both processes read the same
wall clock, so the stamp means the same thing on both sides.
"""

from __future__ import annotations

import threading

import numpy as np

from netsim.clock import Clock, RealClock
from netsim.profiles import Profile, parse_profile
from permllm.errors import ChannelTimeout, ProtocolError
from permllm.transport.channel import Channel, Received, to_wire_array
from permllm.transport.frames import check_tag, header_length
from permllm.transport.wrapper import WrappingChannel

MAX_SIMULATED_DELAY_S = 86400.0
"""Longest simulated delay a receiver accepts from a frame's stamp (one day)."""


class Link:
    """Timing state of one direction of a link: when the wire is next free. Thread-safe."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._free_ns = 0
        self._lock = threading.Lock()

    def schedule(self, now_ns: int, nbytes: int) -> int:
        """Schedule a frame of `nbytes` bytes handed over at `now_ns`; return its delivery time in ns."""
        with self._lock:
            depart_ns = max(now_ns, self._free_ns)
            self._free_ns = depart_ns + self.profile.transmit_ns(nbytes)
            return self._free_ns + self.profile.one_way_ns


class NetSim(WrappingChannel):
    """A Channel that delays another channel's traffic as if it crossed a link with `profile`.

    inner: the channel carrying the frames (any Channel; NetSim owns it and closes it).
    profile: a Profile or a spec accepted by `parse_profile` ("wan", "10,1000", ...).
    clock: time source (RealClock() when None; FakeClock in tests). Both ends of a simulated link
        must use NetSim with clocks showing the same time.

    peer, stats, flight clock, timeout and size limit are the inner channel's: traffic is counted
    once. The receive timeout covers the wait for the frame to arrive on the inner channel and, on
    its own, the simulated delay that follows (see `_receive`).
    """

    def __init__(self, inner: Channel, profile: Profile | str, clock: Clock | None = None) -> None:
        super().__init__(inner)
        self._time = clock if clock is not None else RealClock()
        self._link = Link(parse_profile(profile))

    @property
    def profile(self) -> Profile:
        """The simulated link's profile."""
        return self._link.profile

    def set_profile(self, profile: Profile | str) -> None:
        """Switch the simulated link to `profile` from the next frame on (a sweep changes it between tokens).

        Frames already stamped keep their delivery times; the new link starts free."""
        self._link = Link(parse_profile(profile))

    @property
    def time_source(self) -> Clock:
        """The clock used to stamp and wait for delivery times."""
        return self._time

    def _send(self, tag: str, payload, *, deliver_at_ns: int = 0) -> int:
        """Stamp the simulated delivery time and send through the inner channel (no sleeping).

        deliver_at_ns: an earliest delivery time imposed by an outer wrapper (the later one wins).
        Returns the frame size in bytes; raises as Channel.send.
        """
        check_tag(tag)
        array: np.ndarray = to_wire_array(payload)
        nbytes = header_length(len(tag), array.ndim) + array.nbytes
        deliver_ns = max(self._link.schedule(self._time.now_ns(), nbytes), deliver_at_ns)
        return self._inner._send(tag, array, deliver_at_ns=deliver_ns)

    def _receive(self, tag: str, timeout: float | None) -> Received:
        """Receive through the inner channel, then wait until the frame's deliver_at time.

        The stamp comes from the peer, so the wait is bounded: a frame due more than
        MAX_SIMULATED_DELAY_S from now raises ProtocolError, one due after the receive's timeout
        (None = the channel's) raises ChannelTimeout at once; neither sleeps."""
        message = self._inner._receive(tag, timeout)
        deliver_at_ns = message.header.deliver_at_ns
        if deliver_at_ns:
            wait_s = (deliver_at_ns - self._time.now_ns()) / 1e9
            if wait_s > MAX_SIMULATED_DELAY_S:
                raise ProtocolError(
                    f"peer {self.peer!r}, tag {tag!r}: frame stamped for delivery {wait_s:.3g} s from now, "
                    f"over the simulator's maximum of {MAX_SIMULATED_DELAY_S:g} s (clocks out of step?)"
                )
            limit_s = self.timeout if timeout is None else timeout
            if wait_s > limit_s:
                raise ChannelTimeout(
                    f"peer {self.peer!r}, tag {tag!r}: the simulated link delivers this frame in {wait_s:.3g} s, "
                    f"after the receive timeout of {limit_s:g} s"
                )
            self._time.sleep_until(deliver_at_ns)
        return message
