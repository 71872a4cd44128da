"""`permllm helper` as a service: connect to the owner's control channel and deal every session it
announces, until SIGTERM (with --once: one session, or a timeout error when none is announced within
--setup-timeout).

Per announced session {"session", "owner_port", "user_host", "user_port", "user_key"} the helper checks
that the user key is one of its authorised users (under CURVE), connects a channel to the owner's
per-session port (on the host of --owner) and one to the user (a CURVE server whose public key is that
user key, so the helper deals only to the user the owner authenticated and the helper itself
authorises), and runs `parties.helper.run_helper` on them in a thread of its own.
"""

from __future__ import annotations

import threading
import time

import zmq

from parties.frontdoor import same_host
from parties.owner_service import open_channel
from parties.service import POLL_S, Sessions, terminate_context
from parties.wire import parse_json, require
from permllm.errors import ChannelTimeout, PeerGone, ProtocolError


def serve_helper(args, curve, authorised, log, *, once: bool = False, stop=None) -> dict:
    """Deal the sessions the owner at `args.owner` announces. authorised(): the z85 user keys accepted
    (under CURVE). Returns the service report; with once=True one session, whose error is raised."""
    from parties.helper import deal_to, run_helper
    from parties.helper_pool import MaterialPool

    context = curve.context if curve is not None else zmq.Context()
    options = curve.socket_options("owner", False) if curve is not None else {"context": context}
    control_raw, control = open_channel(args.owner, "owner", False, args, options)
    sessions = Sessions("helper", 1 if once else args.max_concurrent, args.report, log)
    slots = threading.Semaphore(sessions.max_concurrent)
    sessions.install_signals()
    if stop is not None:  # a caller in-process stops the service by setting its event
        sessions.stopping = stop
    served = 0
    started = time.monotonic()
    depth = 0 if once else getattr(args, "pool_depth", 0)
    pool = MaterialPool(deal_to, depth, log=log) if depth else None
    try:
        while not sessions.stopping.is_set() and not (once and served):
            try:
                raw = control.recv_bytes("session", max_len=4096, timeout=POLL_S)
            except ChannelTimeout:
                if once and time.monotonic() - started > args.setup_timeout:
                    raise ChannelTimeout(
                        f"timed out: no session announced by the owner at {args.owner} within "
                        f"{args.setup_timeout:g} s (--setup-timeout); is it running and reachable?"
                    ) from None
                continue
            except PeerGone:
                log("helper: the owner closed its control channel; waiting for it to come back")
                continue
            try:
                order = _order(parse_json(raw, "owner", "session"), curve, authorised)
            except ProtocolError as exc:
                log(f"helper: refused a session: {exc}")
                continue
            tag = order["session"]
            owner_addr = same_host(args.owner, order["owner_port"], "--owner")
            user_addr = f"tcp://{order['user_host']}:{order['user_port']}"
            user_key = order["user_key"].encode()

            opened: list = []

            def run(owner_addr=owner_addr, user_addr=user_addr, user_key=user_key, opened=opened):
                with slots:
                    to_owner = open_channel(owner_addr, "owner", False, args, options)[1]
                    opened.append(to_owner)
                    user_options = curve.client_options(user_key) if curve is not None else {"context": context}
                    to_user = open_channel(user_addr, "user", False, args, user_options)[1]
                    opened.append(to_user)
                    channels = {"owner": to_owner, "user": to_user}
                    return run_helper(
                        channels,
                        progress=False,
                        log=log,
                        setup_timeout=args.setup_timeout,
                        pool=pool,
                        user_key=user_key.decode(),
                    )

            def cleanup(opened=opened):
                for channel in opened:
                    channel.close()

            sessions.start(tag, run, cleanup)
            served += 1
        sessions.finish(once, served, args.drain_s)
    finally:
        if pool is not None:
            pool.close()
        sessions.restore_signals()
        control.close()
        if curve is None:
            terminate_context(context, 15.0, log)
    return sessions.outcome(once)


def _order(message: dict, curve, authorised) -> dict:
    """The owner's session announcement, checked: ProtocolError for a malformed one or an unknown user."""
    tag = require(message, "session", str, "owner", "session")
    for key in ("owner_port", "user_port"):
        if not 0 < require(message, key, int, "owner", "session") < 65536:
            raise ProtocolError(f"the owner's session {key} is out of range")
    host = require(message, "user_host", str, "owner", "session")
    if not host or len(host) > 255 or any(c in host for c in "/ \t\n"):
        raise ProtocolError(f"the owner's session names no usable user host ({host!r:.60})")
    if not tag.isalnum() or len(tag) > 32:
        raise ProtocolError("the owner's session tag is not a short alphanumeric name")
    key = require(message, "user_key", str, "owner", "session")
    if curve is not None and key.encode() not in authorised():
        raise ProtocolError(f"the user key {key[:12]}... is not among this helper's authorised users")
    return message
