"""The `permllm` command: the demo launcher and the three roles run by hand (options: parties/cli_options.py).

permllm demo                          owner, user and helper as three processes on this machine
permllm bench                         token-latency benchmarks under simulated networks
permllm make-checkpoint --shape S     a seeded random-weight checkpoint of a bigger model's shape
permllm keygen --role ROLE --out keys this machine's CURVE key pair (run once on each machine)
permllm owner --keys keys --listen-user tcp://0.0.0.0:5555 --listen-helper tcp://0.0.0.0:5556
permllm user  --keys keys --owner tcp://OWNER:5555 --listen-helper tcp://0.0.0.0:5557 --prompt-file q.txt
permllm helper --keys keys --owner tcp://OWNER:5556   (owner and helper serve until SIGTERM)
permllm owner|user --mode two-party ...                no helper: owner and user make the material
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from parties.cli_options import (
    COMMAND_GROUP,
    TWO_MACHINE_HELP,
    build_parser,
    read_prompt,
    sampling_from_args,
)
from permllm.errors import PermLLMError

__all__ = ["COMMAND_GROUP", "TWO_MACHINE_HELP", "build_parser", "main", "sampling_from_args"]


def _channel(addr, peer, bind, args, clock, curve, max_receive_bytes=None):
    """(the ZmqChannel, the channel the role uses: the same one or a NetSim around it). max_receive_bytes:
    the largest frame accepted from the peer (None: the default payload cap)."""
    from netsim import NetSim, parse_profile
    from permllm.transport import ZmqChannel

    profile = parse_profile(args.network)
    opener = ZmqChannel.bind if bind else ZmqChannel.connect
    options = {} if curve is None else curve.socket_options(peer, bind)
    # linger: a role's last message (e.g. the helper's end marker) must not be dropped at close
    channel = opener(
        addr,
        peer=peer,
        clock=clock,
        timeout=args.timeout,
        linger_s=5.0,
        max_receive_bytes=max_receive_bytes,
        **options,
    )
    return channel, (channel if profile.name == "none" else NetSim(channel, profile))


def _curve(args, role: str, peers: tuple[str, ...]):
    if role in ("owner", "helper"):
        peers = tuple(p for p in peers if p != "user")  # users: the authorised folder (`_authorised`)
    return _curve_with(args, role, peers)


def _authorised(args):
    """() -> the z85 keys of the authorised users: --users DIR's *.pub files and the keys folder's user.pub."""
    from parties.security import authorised_keys
    from permllm.errors import ConfigError

    if args.insecure:
        return lambda: set()
    users = getattr(args, "users", None)
    if users is not None and not os.path.isdir(users):
        raise ConfigError(f"--users {users} is not a folder")
    single = os.path.join(os.path.abspath(args.keys), "user.pub")
    if not authorised_keys(users, single):
        raise ConfigError(f"no authorised user: put users' public keys (*.pub) in --users DIR or {single}")
    return lambda: authorised_keys(users, single)


def _curve_with(args, role: str, peers: tuple[str, ...]):
    """This role's CURVE setup from --keys (after the custody checks), or None (with a loud warning)
    under --insecure."""
    from parties.security import INSECURE_WARNING, Curve, check_secret_key_custody
    from permllm.errors import ConfigError

    if args.insecure:
        print(f"permllm {role}: {INSECURE_WARNING}", file=sys.stderr, flush=True)
        return None
    if args.keys is None:
        raise ConfigError(
            f"give --keys DIR (with {role}.key and "
            + ", ".join(f"{p}.pub" for p in peers)
            + f"; see `permllm keygen --role {role}`) or --insecure"
        )
    keys = os.path.abspath(args.keys)
    secret = check_secret_key_custody(keys, role)
    return Curve(secret, {p: os.path.join(keys, f"{p}.pub") for p in peers})


def _query_budget(args):
    """The owner's QueryBudget from its options, or None; ConfigError for a half-given budget."""
    from permllm.errors import ConfigError

    limits = args.max_sessions_per_key, args.max_positions_per_key
    if args.budget_file is None:
        if any(v is not None for v in limits):
            raise ConfigError("--max-sessions-per-key and --max-positions-per-key need --budget-file PATH")
        return None
    from parties.budget import QueryBudget

    return QueryBudget(args.budget_file, max_sessions=limits[0], max_positions=limits[1])


def _write_report(path, report):
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


def _log(args, role):
    return (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))


def check_mode_options(parser, args) -> None:
    """The options each mode needs or refuses: a helper-mode owner or user needs --listen-helper, a
    two-party one takes none (no helper). A usage error (parser.error: exit status 2) otherwise."""
    from parties.session import TWO_PARTY_MODE

    if args.command not in ("owner", "user"):
        return
    listen = getattr(args, "listen_helper", None)
    if args.mode == TWO_PARTY_MODE and listen is not None:
        parser.error(f"permllm {args.command} --mode two-party has no helper: drop --listen-helper")
    if args.mode != TWO_PARTY_MODE and listen is None:
        parser.error(f"permllm {args.command} needs --listen-helper ADDRESS (or --mode two-party, with no helper)")


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    check_mode_options(parser, args)
    try:
        return _run_command(args)
    except PermLLMError as exc:
        print(f"permllm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"permllm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a peer or the system failed in a way no check foresaw: one line, not a trace
        if args.debug or os.environ.get("PERMLLM_DEBUG") == "1":
            traceback.print_exc()
        detail = str(exc).splitlines()[0][:300] if str(exc) else ""
        print(
            f"permllm {args.command}: error: unexpected {type(exc).__name__}: {detail} "
            "(run with --debug or PERMLLM_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


def _run_command(args) -> int:
    if args.command == "demo":
        from parties.launcher import run_demo

        return run_demo(args)
    if args.command == "keygen":
        from parties.security import generate_keypair

        secret, public = generate_keypair(args.out, args.role)
        print(
            f"wrote {secret} (secret: it stays on this, the {args.role}'s, machine) and {public} (give it to the peers)"
        )
        return 0
    if getattr(args, "plugin_command", None) is not None:
        return args.plugin_command.run(args)
    return _run_role(args)


PEERS = {"owner": ("user", "helper"), "user": ("owner", "helper"), "helper": ("owner", "user")}
TWO_PARTY_PEERS = {"owner": ("user",), "user": ("owner",)}


def peers(args) -> tuple[str, ...]:
    """The roles this command's role holds channels to (whose public keys it needs): no helper in two-party mode."""
    from parties.session import TWO_PARTY_MODE

    if getattr(args, "mode", None) == TWO_PARTY_MODE:
        return TWO_PARTY_PEERS[args.command]
    return PEERS[args.command]


def _run_role(args) -> int:
    from permllm.transport import FlightClock

    if args.threads is not None:
        import torch

        if args.threads < 1:
            from permllm.errors import ConfigError

            raise ConfigError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    clock = FlightClock()
    curve = _curve(args, args.command, peers(args))
    try:
        return _run_role_with(args, clock, curve)
    finally:
        if curve is not None:
            curve.close()


def _run_role_with(args, clock, curve) -> int:
    opened = []

    def channel(addr, peer, bind):
        from parties.wire import CONTROL_RECEIVE_BYTES

        # the helper's peers send it only control messages: plans, seeds and receipts
        cap = CONTROL_RECEIVE_BYTES if args.command == "helper" else None
        raw, used = _channel(addr, peer, bind, args, clock, curve, max_receive_bytes=cap)
        opened.append(used)
        return raw, used

    try:
        report = _run_role_on(args, channel, curve)
    finally:
        for ch in opened:
            ch.close()
    _write_report(args.report, report)
    return 0


def _run_role_on(args, channel, curve) -> dict:
    log = _log(args, args.command)
    if args.command in ("owner", "helper"):
        from parties.service import check_max_concurrent

        check_max_concurrent(args.max_concurrent)
        authorised = _authorised(args)
    if args.command == "owner":
        from parties.owner_service import serve_owner

        if curve is not None:
            curve.allow("user", authorised)
        return serve_owner(args, curve, log, once=args.once)
    if args.command == "helper":
        from parties.helper_service import serve_helper

        # the helper only works during set-up: its sends may wait while the others are still preparing
        args.timeout = max(args.timeout, args.setup_timeout)
        return serve_helper(args, curve, authorised, log, once=args.once)
    from parties.models import load_tokenizer
    from parties.roles import UserRequest, check_text, run_user
    from parties.session import TWO_PARTY_MODE
    from permllm.errors import ConfigError
    from permllm.model.prompts import DEMO_PROMPT

    sampling = sampling_from_args(args)
    prompt = read_prompt(args)
    prompt = DEMO_PROMPT if prompt is None else prompt
    check_text(prompt, "prompt")  # before the tokenizer, which takes seconds to load
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    tokenizer = load_tokenizer(args.model)
    request = UserRequest(args.model, prompt, args.max_new_tokens, sampling, args.expect_fingerprint)
    if args.mode == TWO_PARTY_MODE:  # no helper: one channel, to the owner
        owner_addr = _ask_for_session(args, None, curve)
        channels = {"owner": channel(owner_addr, "owner", False)[1]}
    else:
        raw_helper, helper = channel(args.listen_helper, "helper", True)
        owner_addr = _ask_for_session(args, raw_helper.endpoint, curve)
        channels = {"owner": channel(owner_addr, "owner", False)[1], "helper": helper}
    return run_user(
        channels,
        request,
        tokenizer,
        progress=not args.quiet,
        log=log,
        setup_timeout=args.setup_timeout,
        cache_dir=None if args.mode == TWO_PARTY_MODE else _cache_dir(args),
        mode=args.mode,
    )


def _cache_dir(args):
    if args.no_cache:
        return None
    if args.cache_dir is not None:
        return args.cache_dir
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "permllm", "masked-weights")


def _ask_for_session(args, helper_endpoint: str | None, curve) -> str:
    """user -> the owner's front door: this user's mode and (helper mode) its address for the helper;
    returns the address of the session's channel to the owner."""
    import zmq

    from parties.frontdoor import request_session, same_host, split_tcp
    from parties.models import PROTOCOL_VERSION
    from parties.session import HELPER_MODE

    message = {"protocol": PROTOCOL_VERSION, "mode": getattr(args, "mode", HELPER_MODE)}
    if helper_endpoint is not None:
        base, port = split_tcp(helper_endpoint, "--listen-helper")
        message.update(helper_host=base[len("tcp://") :], helper_port=int(port))
    context = curve.context if curve is not None else zmq.Context.instance()
    options = curve.client_options(curve.peers["owner"]) if curve is not None else {}
    reply = request_session(args.owner, message, context, options, timeout_s=args.setup_timeout)
    return same_host(args.owner, reply["user_port"], "--owner")


if __name__ == "__main__":
    sys.exit(main())
