"""The owner service's front door: where a user asks for a session and learns where to hold it.

user -> owner   request {"protocol", "helper_host", "helper_port"}: the user's address for the helper
                (host "" when the user listens on every interface: the owner then uses the address
                the request came from)
owner -> user   reply {"session": tag, "user_port": P} (the user connects its session channel to the
                owner's host, port P), {"busy": reason} (every session slot is taken: ask again later)
                or {"error": reason}

One ROUTER socket (owner) and one DEALER socket per request (user), each message a single JSON frame
(bounded by `parties.wire.parse_json`), nothing else. Under CURVE the front door is a CURVE server in
ZAP domain "user": any key of the authorised users is accepted, and the request carries the key its
connection authenticated with (the ZAP User-Id), which the session is then bound to.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import zmq

from parties.wire import MAX_JSON_BYTES, parse_json
from permllm.errors import AuthenticationRefused, ChannelTimeout, ConfigError, ProtocolError

BUSY_RETRY_S = 1.0
WILDCARD_HOSTS = ("0.0.0.0", "*", "::", "[::]", "")


def split_tcp(addr: str, what: str) -> tuple[str, str]:
    """("tcp://HOST", "PORT") of a tcp:// address; ConfigError for another transport or no port."""
    if not addr.startswith("tcp://") or ":" not in addr[6:]:
        raise ConfigError(f"{what} must be a tcp://HOST:PORT address, got {addr!r}")
    base, port = addr.rsplit(":", 1)
    return base, port


def same_host(addr: str, port: int | str, what: str) -> str:
    """`addr` with its port replaced by `port`."""
    return f"{split_tcp(addr, what)[0]}:{port}"


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


@dataclass
class Request:
    """A session request as the front door received it."""

    identity: bytes
    message: dict
    user_key: str | None  # the z85 CURVE key the connection authenticated with (None without CURVE)
    peer_address: str  # the IP address the request came from ("" when unknown)


class FrontDoor:
    """The owner's ROUTER socket at `addr`. `options`: CURVE server options (`Curve.server_options`) or {}."""

    def __init__(self, addr: str, context: zmq.Context, curve_options: dict):
        self._socket = context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 1000)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_JSON_BYTES)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if curve_options:
            self._socket.setsockopt(zmq.CURVE_SERVER, 1)
            self._socket.setsockopt(zmq.CURVE_SECRETKEY, curve_options["curve_secret_key"])
        self._socket.bind(addr)

    def poll(self, timeout_s: float) -> Request | None:
        """The next well-formed request within `timeout_s`, or None. A malformed one is answered with an
        error and skipped."""
        if not self._socket.poll(max(1, int(timeout_s * 1000))):
            return None
        parts = self._socket.recv_multipart(copy=False)
        identity = parts[0].bytes
        body = parts[-1]
        user_key = _prop(body, "User-Id")
        peer = _prop(body, "Peer-Address") or ""
        try:
            if len(parts) != 3 or parts[1].bytes != b"":
                raise ProtocolError("a session request is one JSON frame after an empty delimiter")
            message = parse_json(body.bytes, "user", "session-request")
        except ProtocolError as exc:
            self.reply(identity, {"error": str(exc)})
            return None
        return Request(identity, message, user_key, peer)

    def reply(self, identity: bytes, message: dict) -> None:
        try:
            self._socket.send_multipart([identity, b"", json.dumps(message, sort_keys=True).encode()], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the user has gone: nothing to tell it

    def close(self) -> None:
        self._socket.close()


def _prop(frame: zmq.Frame, name: str) -> str | None:
    try:
        return frame.get(name) or None
    except zmq.ZMQError:
        return None


def request_session(addr: str, message: dict, context: zmq.Context, curve_options: dict, *, timeout_s: float) -> dict:
    """user -> owner: ask the front door at `addr` for a session; returns the owner's reply. A busy owner
    is asked again every BUSY_RETRY_S until `timeout_s` has passed. `curve_options`: CURVE client
    options (`Curve.client_options(owner key)`) or {}. Raises ChannelTimeout (no reply in time) or
    ProtocolError (the owner's error, or a malformed reply)."""
    deadline = time.monotonic() + timeout_s
    busy = None
    while True:
        reply = _ask_once(addr, message, context, curve_options, max(0.1, deadline - time.monotonic()))
        if "busy" not in reply:
            break
        busy = str(reply["busy"])[:300]
        if time.monotonic() + BUSY_RETRY_S >= deadline:
            raise ChannelTimeout(f"the owner stayed busy for {timeout_s:g} s: {busy}")
        time.sleep(BUSY_RETRY_S)
    if "error" in reply:
        raise ProtocolError(f"the owner refused the session: {str(reply['error'])[:1000]}")
    port = reply.get("user_port")
    if type(port) is not int or not 0 < port < 65536 or not isinstance(reply.get("session"), str):
        raise ProtocolError("the owner's front door sent a malformed reply")
    return reply


def _ask_once(addr, message, context, curve_options, timeout_s) -> dict:
    socket = context.socket(zmq.DEALER)
    try:
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_JSON_BYTES)
        for option, key in (
            (zmq.CURVE_SERVERKEY, "curve_server_key"),
            (zmq.CURVE_PUBLICKEY, "curve_public_key"),
            (zmq.CURVE_SECRETKEY, "curve_secret_key"),
        ):
            if key in curve_options:
                socket.setsockopt(option, curve_options[key])
        monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH) if curve_options else None
        socket.connect(addr)
        socket.send_multipart([b"", json.dumps(message, sort_keys=True).encode()])
        if not _reply_ready(socket, monitor, timeout_s):
            raise ChannelTimeout(
                f"no answer from the owner's front door at {addr} within {timeout_s:g} s: it is not running, "
                "not reachable there, or refused this user's CURVE key (is user.pub among its authorised users?)"
            )
        parts = socket.recv_multipart()
        if len(parts) != 2 or parts[0] != b"":
            raise ProtocolError("the owner's front door sent a malformed reply")
        return parse_json(parts[1], "owner", "session-reply")
    finally:
        if monitor is not None:
            socket.disable_monitor()
            monitor.close(linger=0)
        socket.close(linger=0)


def _reply_ready(socket, monitor, timeout_s: float) -> bool:
    """Wait for the reply; AuthenticationRefused as soon as the owner's ZAP handler refuses this key."""
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    if monitor is not None:
        poller.register(monitor, zmq.POLLIN)
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        ready = dict(poller.poll(max(1, int(left * 1000))))
        if socket in ready:
            return True
        if monitor is not None and monitor in ready:
            monitor.recv_multipart()
            raise AuthenticationRefused(
                "the owner refused this user's CURVE key: it is not among the owner's authorised users (--users)"
            )
    return False
