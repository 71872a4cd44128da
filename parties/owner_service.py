"""`permllm owner` as a service: load the model once, then serve sessions until SIGTERM.

Sockets (all bound by the owner):
  --listen-user    the front door (`parties.frontdoor`): a user asks for a session there
  --listen-helper  the control channel to the one helper service: per session, the owner tells it
                   {"session", "owner_port", "user_host", "user_port", "user_key"}
  per session      two PAIR sockets on free ports of the same hosts: the session's channel to the user
                   (its own ZAP domain, accepting only the key the request authenticated with) and to
                   the helper (the helper's key); the session (`parties.owner.serve_session`) runs on
                   them in its own thread.
Budgets are charged to the key the session's user channel authenticated with (`ChargedToPeer`).

With --mode two-party there is no helper: no --listen-helper, no control channel, and each session has
its channel to the user only (owner and user make the material on it, `parties.two_party`). A request
for the other mode than the owner's gets a session channel on which its hello is refused in the
welcome (`parties.owner.refuse_mode`): the user learns why, and no helper is told of it.
"""

from __future__ import annotations

import secrets
import threading

import zmq

from parties.frontdoor import WILDCARD_HOSTS, FrontDoor, port_of, split_tcp
from parties.service import POLL_S, Sessions, terminate_context
from parties.wire import send_json
from permllm.errors import ConfigError
from permllm.transport import FlightClock


def open_channel(addr: str, peer: str, bind: bool, args, options: dict, clock=None):
    """(the ZmqChannel, the channel the session uses: the same one or a NetSim around it)."""
    from netsim import NetSim, parse_profile
    from permllm.transport import ZmqChannel

    profile = parse_profile(args.network)
    opener = ZmqChannel.bind if bind else ZmqChannel.connect
    channel = opener(addr, peer=peer, clock=clock or FlightClock(), timeout=args.timeout, linger_s=5.0, **options)
    return channel, (channel if profile.name == "none" else NetSim(channel, profile))


def serve_owner(args, curve, log, *, once: bool = False, stop=None) -> dict:
    """Serve sessions on `args` (listen_user, listen_helper, model, budget options, timeouts) until
    SIGTERM, or one session with once=True (its error is raised). Returns the service report."""
    from parties.budget import INSECURE_KEY, ChargedToPeer
    from parties.cli import _query_budget
    from parties.owner import load_owner_model, refuse_mode, serve_session
    from parties.session import HELPER_MODE

    mode = getattr(args, "mode", HELPER_MODE)
    helper_mode = mode == HELPER_MODE
    user_base, _ = split_tcp(args.listen_user, "--listen-user")
    helper_base = split_tcp(args.listen_helper, "--listen-helper")[0] if helper_mode else None
    budget = _query_budget(args)
    from parties.masks import MaskSeeds

    masks = MaskSeeds(args.state, rotate=args.rotate_masks)
    loaded = load_owner_model(args.model, log)
    context = curve.context if curve is not None else zmq.Context()
    sessions = Sessions("owner", 1 if once else args.max_concurrent, args.report, log)
    door = FrontDoor(args.listen_user, context, curve.server_options("user") if curve else {})
    control = None
    if helper_mode:
        control = open_channel(args.listen_helper, "helper", True, args, _server(curve, "helper", context))[1]
    control_lock = threading.Lock()
    sessions.install_signals()
    if stop is not None:  # a caller in-process stops the service by setting its event
        sessions.stopping = stop
    log(
        f"owner: serving {loaded.offer.model} at {args.listen_user} ({mode} mode, up to "
        f"{sessions.max_concurrent} sessions at once)"
    )
    served = 0
    try:
        while not sessions.stopping.is_set() and not (once and served):
            request = door.poll(POLL_S)
            if request is None:
                continue
            if sessions.full():
                door.reply(request.identity, {"busy": f"serving {sessions.running} sessions, the most it runs at once"})
                continue
            tag = secrets.token_hex(6)
            key = request.user_key if curve is not None else INSECURE_KEY
            asked = request.message.get("mode", HELPER_MODE)
            with_helper = helper_mode and asked == mode  # a mismatched request is refused in its welcome
            try:
                helper_host, helper_port = _user_helper_address(request) if with_helper else (None, None)
                domain = f"user-{tag}"
                if curve is not None:
                    curve.allow(domain, request.user_key.encode())
                raw_user, user = open_channel(f"{user_base}:*", "user", True, args, _server(curve, domain, context))
                opened = [user]
                if with_helper:
                    raw_helper, helper = open_channel(
                        f"{helper_base}:*", "helper", True, args, _server(curve, "helper", context)
                    )
                    opened.append(helper)
            except (ConfigError, zmq.ZMQError) as exc:
                door.reply(request.identity, {"error": str(exc)})
                continue
            order = None
            if with_helper:
                order = {
                    "session": tag,
                    "owner_port": port_of(raw_helper.endpoint),
                    "user_host": helper_host,
                    "user_port": helper_port,
                    "user_key": request.user_key or "",
                }
            channels = {"user": user, "helper": helper} if with_helper else {"user": user}
            session_budget = ChargedToPeer(budget, raw_user) if budget is not None and curve is not None else budget

            def run(channels=channels, order=order, session_budget=session_budget, key=key, asked=asked):
                if asked != mode:
                    refuse_mode(channels["user"], asked, mode, args.setup_timeout)
                if order is not None:
                    with control_lock:
                        send_json(control, "session", order)
                report = serve_session(
                    channels,
                    loaded,
                    progress=False,
                    log=log,
                    setup_timeout=args.setup_timeout,
                    budget=session_budget,
                    user_key=key,
                    masks=masks,
                    mode=mode,
                )
                return {**report, "user_key": key}

            def cleanup(channels=tuple(opened), domain=domain):
                for channel in channels:
                    channel.close()
                if curve is not None:
                    curve.forget(domain)

            sessions.start(tag, run, cleanup)
            door.reply(request.identity, {"session": tag, "user_port": port_of(raw_user.endpoint)})
            log(f"owner: session {tag} for user key {key[:12]}... started ({sessions.running} running)")
            served += 1
        sessions.finish(once, served, args.drain_s)
    finally:
        sessions.restore_signals()
        door.close()
        with control_lock:
            if control is not None:
                control.close()
        if curve is None:
            terminate_context(context, 15.0, log)
    return sessions.outcome(once)


def _server(curve, domain: str, context) -> dict:
    return curve.server_options(domain) if curve is not None else {"context": context}


def _user_helper_address(request) -> tuple[str, int]:
    """(host, port) where the helper reaches this user: the host the request names, or, for a user
    listening on every interface, the address its request came from."""
    host, port = request.message.get("helper_host"), request.message.get("helper_port")
    if not isinstance(host, str) or len(host) > 255 or type(port) is not int or not 0 < port < 65536:
        raise ConfigError("the session request needs helper_host (text) and helper_port (1..65535)")
    if host in WILDCARD_HOSTS:
        if not request.peer_address:
            raise ConfigError("the user listens for the helper on every interface and its address is unknown")
        host = request.peer_address
    return host, port
