"""Channel over one ZeroMQ PAIR socket (one socket per pair of parties).

Each message is a two-part ZeroMQ message [header, payload]. Payloads of 64 KiB and more are sent
zero-copy: `send` waits until libzmq has released the caller's buffer, so the caller may modify
its array as soon as `send` returns.

Peer death: a PAIR socket reports no disconnects, so a receive timeout (`ChannelTimeout`, default
60 s, configurable per channel and per call) is how a crashed or unreachable peer is detected.
An orderly `close()` additionally sends a one-part goodbye message, so the peer's next receive
raises `PeerGone` at once when that message makes it out before the socket closes (best effort:
the socket closes with the configured linger, 0 s by default, which may drop it).

Memory bound: the socket's ZMQ_MAXMSGSIZE is set to max_receive_bytes (max_payload_bytes unless
given; at least the largest header), so libzmq drops a connection that tries to send a larger message
part instead of allocating it; the receiver then sees a ChannelTimeout. ZMQ_MAXMSGSIZE is fixed when a
connection is made, so an end whose peer only sends control messages (the helper's) should be opened
with a small max_receive_bytes, while it still sends bulk frames up to max_payload_bytes; the
per-message limits of `recv` / `recv_bytes` apply after libzmq has taken the frame in. The receive
high-water mark is RECEIVE_HWM frames (the send side holds SEND_HWM of its own frames instead, so
as much traffic can be in flight as with libzmq's defaults): what a peer can make this end hold is
about RECEIVE_HWM * max_receive_bytes. Parts are read one by one: a message of more than two parts
is refused at its third part, and the channel then refuses every later receive (it is out of step).
Declared sizes within that bound are checked against the header before the payload is interpreted.

Encryption hook: pass CURVE keys (z85 text or 32 raw bytes, e.g. from `zmq.curve_keypair()`):
the server side (usually the binding one) passes `curve_server=True, curve_secret_key=...`, the
client passes `curve_server_key=<server public>, curve_public_key=..., curve_secret_key=...`.
A CURVE client watches its socket's handshake events (a ZeroMQ socket monitor): when the server
refuses its key (ZAP denies it, libzmq reports HANDSHAKE_FAILED_AUTH on the client too) the next
receive raises `AuthenticationRefused` at once instead of waiting for its timeout. A client with a
wrong server key never completes the handshake (libzmq only sees it fail and retries): its messages
are never delivered, and the receive's timeout says how many handshakes failed.
"""

from __future__ import annotations

import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from permllm.errors import AuthenticationRefused, ChannelTimeout, ConfigError, PeerGone, ProtocolError
from permllm.transport.channel import DEFAULT_TIMEOUT_S, Channel, FlightClock
from permllm.transport.frames import DEFAULT_MAX_PAYLOAD_BYTES, MAX_HEADER_LEN

GOODBYE = b"PLM1-BYE"
ZERO_COPY_MIN_BYTES = zmq.COPY_THRESHOLD
_HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
_HANDSHAKE_EVENTS = _HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED
RECEIVE_HWM = 8
SEND_HWM = 2000


class ZmqChannel(Channel):
    """A Channel over a connected or bound zmq PAIR socket. Build it with `bind` or `connect`.

    Not thread-safe: a ZeroMQ socket must be used (and closed) by one thread at a time.
    """

    def __init__(
        self,
        socket: zmq.Socket,
        peer: str,
        *,
        owned_context: zmq.Context | None = None,
        clock: FlightClock | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_receive_bytes: int | None = None,
    ) -> None:
        super().__init__(
            peer,
            clock=clock,
            timeout=timeout,
            max_payload_bytes=max_payload_bytes,
            max_receive_bytes=max_receive_bytes,
        )
        self._socket = socket
        self._owned_context = owned_context
        self._poller = zmq.Poller()
        self._poller.register(socket, zmq.POLLIN)
        self._monitor = None
        self._out_of_step = False
        self.failed_handshakes = 0
        """CURVE handshakes that failed since the last one that succeeded (clients only)."""
        self.peer_user_id: str | None = None
        """CURVE servers: the User-Id the ZAP handler gave the connection the last message came in on
        (pyzmq's authenticators: the client's public key in z85), None before that or without one."""
        self._reads_user_id = False

    def _watch_handshakes(self) -> None:
        """Follow this CURVE client socket's handshake events (see the module docstring)."""
        self._monitor = self._socket.get_monitor_socket(_HANDSHAKE_EVENTS)
        self._poller.register(self._monitor, zmq.POLLIN)

    def _timeout_hint(self) -> str:
        if not self.failed_handshakes:
            return ""
        return (
            f"; its CURVE handshake failed {self.failed_handshakes} times (a wrong public key for the "
            f"{self.peer}, or it is not a CURVE server)"
        )

    def _read_handshake_events(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise AuthenticationRefused(
                    f"peer {self.peer!r} refused this party's CURVE key (ZAP status {event['value']}): give each "
                    f"role the other's public key from the same `permllm keygen`"
                )
            if event["event"] & _HANDSHAKE_FAILED:
                self.failed_handshakes += 1
            elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.failed_handshakes = 0

    @classmethod
    def bind(cls, addr: str, *, peer: str, **options) -> ZmqChannel:
        """Bind a PAIR socket to `addr` (e.g. "tcp://127.0.0.1:0" for a free port; see `endpoint`).

        peer: the other party's name. options: see `_open`. Returns the channel.
        Raises ConfigError on bad CURVE options, zmq.ZMQError when the address cannot be bound.
        """
        return cls._open(addr, peer=peer, binding=True, **options)

    @classmethod
    def connect(cls, addr: str, *, peer: str, **options) -> ZmqChannel:
        """Connect a PAIR socket to `addr`, where the peer binds. Same options as `bind`."""
        return cls._open(addr, peer=peer, binding=False, **options)

    @classmethod
    def _open(
        cls,
        addr: str,
        *,
        peer: str,
        binding: bool,
        context: zmq.Context | None = None,
        clock: FlightClock | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_receive_bytes: int | None = None,
        linger_s: float = 0.0,
        curve_secret_key: bytes | None = None,
        curve_public_key: bytes | None = None,
        curve_server_key: bytes | None = None,
        curve_server: bool = False,
    ) -> ZmqChannel:
        """Create, configure and bind/connect the socket.

        context: a zmq.Context to use (a private one, terminated on close, when None).
        clock, timeout, max_payload_bytes, max_receive_bytes: as for Channel; timeout also bounds each
            send; ZMQ_MAXMSGSIZE is the receive bound.
        linger_s: how long close() may wait to flush unsent messages (0 = drop them).
        curve_*: CURVE keys, see the module docstring.
        """
        curve = _curve_options(curve_secret_key, curve_public_key, curve_server_key, curve_server)
        owned_context = zmq.Context() if context is None else None
        socket = (context or owned_context).socket(zmq.PAIR)
        try:
            socket.setsockopt(zmq.LINGER, int(linger_s * 1000))
            receive_cap = max_payload_bytes if max_receive_bytes is None else max_receive_bytes
            socket.setsockopt(zmq.MAXMSGSIZE, max(int(receive_cap), MAX_HEADER_LEN))
            socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
            socket.setsockopt(zmq.SNDHWM, SEND_HWM)
            send_timeout_s = float(timeout)
            socket.setsockopt(
                zmq.SNDTIMEO, -1 if send_timeout_s == float("inf") else max(1, int(send_timeout_s * 1000))
            )
            for option, value in curve:
                socket.setsockopt(option, value)
            channel = cls(
                socket,
                peer,
                owned_context=owned_context,
                clock=clock,
                timeout=timeout,
                max_payload_bytes=max_payload_bytes,
                max_receive_bytes=max_receive_bytes,
            )
            if curve_server_key is not None:
                channel._watch_handshakes()
            channel._reads_user_id = curve_server
            if binding:
                socket.bind(addr)
            else:
                socket.connect(addr)
            return channel
        except BaseException:
            socket.close(linger=0)
            if owned_context is not None:
                owned_context.term()
            raise

    @property
    def endpoint(self) -> str:
        """The socket's last bound or connected endpoint, e.g. "tcp://127.0.0.1:43127"."""
        return self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def _send_frame(self, header: bytes, payload: memoryview) -> None:
        """Send [header, payload]; large payloads zero-copy, waiting until libzmq releases them.
        Raises ChannelTimeout when the send (or the release) does not complete within the timeout."""
        timeout_s = -1 if self.timeout == float("inf") else self.timeout
        try:
            self._socket.send(header, zmq.SNDMORE)
            if payload.nbytes >= ZERO_COPY_MIN_BYTES:
                tracker = self._socket.send(payload, copy=False, track=True)
                tracker.wait(timeout_s)
            else:
                self._socket.send(payload)
        except zmq.Again as exc:
            raise ChannelTimeout(
                f"the send queue stayed full for {self.timeout:g} s (peer not reading or not connected)"
            ) from exc
        except zmq.NotDone as exc:
            raise ChannelTimeout(f"the payload was not transmitted within {self.timeout:g} s") from exc

    def _recv_frame(self, timeout_s: float | None):
        """Poll for the next message; return (header_buffer, payload_buffer) or None on timeout.
        Raises PeerGone on the peer's goodbye, ProtocolError on a message that is not 2 parts (read
        part by part: a third part is refused before any further part is taken)."""
        if self._out_of_step:
            raise ProtocolError(f"the channel to peer {self.peer!r} is out of step after a malformed message")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = dict(self._poller.poll(None if left is None else max(1, int(left * 1000))))
            if self._monitor is not None and self._monitor in ready:
                self._read_handshake_events()
            if self._socket in ready:
                break
            if deadline is not None and time.monotonic() >= deadline:
                return None
        header = self._socket.recv(copy=False)
        if self._reads_user_id:
            self.peer_user_id = _user_id(header)
        if not header.more:
            if header.bytes == GOODBYE:
                raise PeerGone(f"peer {self.peer!r} closed the channel")
            raise ProtocolError(f"expected a 2-part frame [header, payload] from peer {self.peer!r}, received 1 part")
        payload = self._socket.recv(copy=False)
        if payload.more:
            self._out_of_step = True
            raise ProtocolError(
                f"expected a 2-part frame [header, payload] from peer {self.peer!r}, received 3 parts "
                "(refused at the third, the rest left unread)"
            )
        return header.buffer, payload.buffer

    def _close_transport(self) -> None:
        """Send the goodbye message (best effort), close the socket and any private context."""
        try:
            self._socket.send(GOODBYE, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self._poller.unregister(self._socket)
        if self._monitor is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
        self._socket.close()
        if self._owned_context is not None:
            self._owned_context.term()


def _user_id(frame: zmq.Frame) -> str | None:
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:  # no ZAP handler gave one
        return None


def _curve_options(secret_key, public_key, server_key, server: bool) -> list[tuple[int, object]]:
    """Translate the CURVE keyword arguments into (sockopt, value) pairs; [] when none is given.

    Raises ConfigError on an incomplete or contradictory combination, or when libzmq lacks CURVE.
    """
    if not (secret_key or public_key or server_key or server):
        return []
    if not zmq.has("curve"):
        raise ConfigError("CURVE keys given but this libzmq was built without CURVE support")
    if server and server_key is not None:
        raise ConfigError("curve_server=True and curve_server_key are exclusive: a socket is either server or client")
    if server:
        if secret_key is None:
            raise ConfigError("a CURVE server needs curve_secret_key")
        return [(zmq.CURVE_SERVER, 1), (zmq.CURVE_SECRETKEY, secret_key)]
    if server_key is None:
        raise ConfigError("CURVE keys given without curve_server=True or curve_server_key")
    if secret_key is None or public_key is None:
        raise ConfigError("a CURVE client needs curve_secret_key, curve_public_key and curve_server_key")
    return [
        (zmq.CURVE_SERVERKEY, server_key),
        (zmq.CURVE_PUBLICKEY, public_key),
        (zmq.CURVE_SECRETKEY, secret_key),
    ]
