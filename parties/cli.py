"""The `permllm` command: the demo launcher and the three roles run by hand.

permllm demo                      owner, user and helper as three processes on this machine
permllm bench                     token-latency benchmarks under simulated networks
permllm keygen --out keys         CURVE key pairs for the three roles
permllm owner --keys keys --listen-user tcp://0.0.0.0:5555 --listen-helper tcp://0.0.0.0:5556
permllm user  --keys keys --owner tcp://OWNER:5555 --listen-helper tcp://0.0.0.0:5557 --prompt "..."
permllm helper --keys keys --owner tcp://OWNER:5556 --user tcp://USER:5557
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from permllm.errors import PermLLMError

TWO_MACHINE_HELP = """\
A session by hand on three machines (or three terminals):
  once:   permllm keygen --out keys     (owner.key/.pub, user.key/.pub, helper.key/.pub)
          give each machine a folder with its own ROLE.key and the other two .pub files
  owner:  permllm owner  --keys keys --listen-user tcp://0.0.0.0:5555 --listen-helper tcp://0.0.0.0:5556
  user:   permllm user   --keys keys --owner tcp://OWNER_HOST:5555 --listen-helper tcp://0.0.0.0:5557 --prompt "..."
  helper: permllm helper --keys keys --owner tcp://OWNER_HOST:5556 --user tcp://USER_HOST:5557
The owner and the user bind; the user connects to the owner; the helper connects to both. Every
channel is CURVE-encrypted and mutually authenticated (--insecure turns that off, for local
experiments only). The owner holds the weights, the user the prompt; the helper only deals
randomness before the online phase. Start them in any order: each waits up to --setup-timeout for
the others. The owner can cap what one user key may run with --budget-file and
--max-sessions-per-key / --max-positions-per-key. --network adds simulated delays on top of the
real network and is meant for one machine: it needs the parties' clocks to agree (default none).
"""


COMMAND_GROUP = "permllm.commands"


def plugin_commands() -> dict:
    """Subcommands installed packages add through the entry-point group "permllm.commands" (`permllm bench`
    from permllm_bench): name -> an object with help, description, add_arguments(parser) and run(args)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.load() for ep in entry_points(group=COMMAND_GROUP)}


def _add_security(p):
    p.add_argument(
        "--keys",
        default=None,
        metavar="DIR",
        help="folder with this role's CURVE secret key ROLE.key and the peers' public keys PEER.pub "
        "(from `permllm keygen`); required unless --insecure",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="no encryption or authentication of the channels (local experiments only)",
    )


def _network(spec: str) -> str:
    from netsim import parse_profile

    try:
        parse_profile(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec


def _add_network(p, default):
    p.add_argument(
        "--network",
        default=default,
        type=_network,
        help="simulated link: lan, wan (10 ms, 1 Gbit/s), wan-slow (50 ms, 100 Mbit/s), none, "
        f"or RTT_ms,Mbit_s (default {default})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the other party during the online phase (default 60)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="compute threads of this process (default: torch's; the demo uses 1 per role)",
    )
    p.add_argument(
        "--setup-timeout",
        type=float,
        default=900.0,
        help="seconds to wait for the others during set-up: model load, preparation, dealing (default 900)",
    )


def _model_spec(spec: str) -> str:
    from parties.models import check_model_spec
    from permllm.errors import ConfigError

    try:
        return check_model_spec(spec)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


MODEL_HELP = (
    "smollm2 (default), minilm (a sentence-embedding encoder), or the path of a Llama-style "
    "checkpoint: a .gguf file or a folder with config.json and the tokenizer files"
)


def _add_generation(p):
    p.add_argument("--prompt", default=None, help="the question (default: a built-in one)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="token budget (default 48)")
    p.add_argument("--model", default="smollm2", type=_model_spec, help=MODEL_HELP)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature (implies --sample; default 0.7)"
    )
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens when sampling")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass when sampling")
    p.add_argument("--seed", type=int, default=None, help="seed of the user's sampling (masks stay cryptographic)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="permllm", description="Private two-party LLM inference (PermLLM-style).")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="run owner, user and helper as three local processes",
        description="Starts owner, user and helper as separate processes talking ZeroMQ over "
        "loopback, asks the model a question privately and prints a summary.",
    )
    _add_generation(demo)
    _add_network(demo, "wan")
    demo.add_argument("--json", dest="json_path", default=None, help="also write the summary as JSON here")
    demo.add_argument(
        "--insecure",
        action="store_true",
        help="run without CURVE (by default the demo makes fresh keys for the three roles)",
    )

    keygen = sub.add_parser(
        "keygen",
        help="write a CURVE key pair for one role",
        description="Writes NAME.key (secret, mode 0600) and NAME.pub into --out. Give each role "
        "its own .key and the .pub files of its peers, in one folder per role.",
    )
    keygen.add_argument("--out", required=True, help="folder to write the keys into")
    keygen.add_argument(
        "--name", action="append", default=None, help="role name (repeatable; default: owner, user and helper)"
    )

    for name, command in plugin_commands().items():
        plugin = sub.add_parser(name, help=command.help, description=command.description)
        command.add_arguments(plugin)
        plugin.set_defaults(plugin_command=command)

    owner = sub.add_parser(
        "owner",
        help="the model owner (holds the weights)",
        epilog=TWO_MACHINE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    owner.add_argument("--model", default="smollm2", type=_model_spec, help=MODEL_HELP)
    owner.add_argument("--listen-user", required=True, help="ZeroMQ address to bind for the user")
    owner.add_argument("--listen-helper", required=True, help="ZeroMQ address to bind for the helper")
    _add_network(owner, "none")
    _add_security(owner)
    owner.add_argument(
        "--budget-file",
        default=None,
        metavar="PATH",
        help="query budget ledger (JSON, kept across sessions): sessions and positions run per user "
        "key; needs --max-sessions-per-key and/or --max-positions-per-key",
    )
    owner.add_argument(
        "--max-sessions-per-key",
        type=int,
        default=None,
        metavar="N",
        help="refuse a user key after N sessions (counted in --budget-file)",
    )
    owner.add_argument(
        "--max-positions-per-key",
        type=int,
        default=None,
        metavar="N",
        help="refuse a session that would take a user key past N positions in all (prompt tokens "
        "plus generated tokens, counted in --budget-file)",
    )
    owner.add_argument("--report", default=None, help="write this role's report (JSON) here")
    owner.add_argument("--quiet", action="store_true", help="no progress bars or status lines")

    user = sub.add_parser(
        "user",
        help="the user (holds the prompt, sees the answer)",
        epilog=TWO_MACHINE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_generation(user)
    user.add_argument("--owner", required=True, help="the owner's ZeroMQ address for the user")
    user.add_argument("--listen-helper", required=True, help="ZeroMQ address to bind for the helper")
    _add_network(user, "none")
    _add_security(user)
    user.add_argument("--report", default=None, help="write this role's report (JSON) here")
    user.add_argument("--quiet", action="store_true", help="no progress bars or status lines")

    helper = sub.add_parser(
        "helper",
        help="the offline helper (deals correlated randomness)",
        epilog=TWO_MACHINE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    helper.add_argument("--owner", required=True, help="the owner's ZeroMQ address for the helper")
    helper.add_argument("--user", required=True, help="the user's ZeroMQ address for the helper")
    _add_network(helper, "none")
    _add_security(helper)
    helper.add_argument("--report", default=None, help="write this role's report (JSON) here")
    helper.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    return parser


def sampling_from_args(args):
    from permllm.errors import ConfigError
    from protocols.model.generation import SamplingConfig

    sampling = args.sample or args.temperature is not None or args.top_k is not None or args.top_p is not None
    if not sampling:
        return SamplingConfig(seed=args.seed)
    temperature = 0.7 if args.temperature is None else args.temperature
    if temperature <= 0:
        raise ConfigError("--temperature must be positive when sampling")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError("--top-p must be in (0, 1]")
    return SamplingConfig(temperature=temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _channel(addr, peer, bind, args, clock, curve):
    from netsim import NetSim, parse_profile
    from permllm.transport import ZmqChannel

    profile = parse_profile(args.network)
    opener = ZmqChannel.bind if bind else ZmqChannel.connect
    options = {} if curve is None else curve.socket_options(peer, bind)
    # linger: a role's last message (e.g. the helper's end marker) must not be dropped at close
    channel = opener(addr, peer=peer, clock=clock, timeout=args.timeout, linger_s=5.0, **options)
    return channel if profile.name == "none" else NetSim(channel, profile)


def _curve(args, role: str, peers: tuple[str, ...]):
    """This role's CURVE setup from --keys, or None (with a loud warning) under --insecure."""
    from parties.security import INSECURE_WARNING, Curve
    from permllm.errors import ConfigError

    if args.insecure:
        print(f"permllm {role}: {INSECURE_WARNING}", file=sys.stderr, flush=True)
        return None
    if args.keys is None:
        raise ConfigError(
            f"give --keys DIR (with {role}.key and "
            + ", ".join(f"{p}.pub" for p in peers)
            + "; see `permllm keygen`) or --insecure"
        )
    keys = os.path.abspath(args.keys)
    return Curve(os.path.join(keys, f"{role}.key"), {p: os.path.join(keys, f"{p}.pub") for p in peers})


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


def _user_key(curve) -> str:
    from parties.budget import INSECURE_KEY

    return INSECURE_KEY if curve is None else curve.peers["user"].decode("ascii")


def _write_report(path, report):
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


def _log(args, role):
    return (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from parties.launcher import run_demo

            return run_demo(args)
        if args.command == "keygen":
            from parties.security import generate_keypair

            for name in args.name or ["owner", "user", "helper"]:
                secret, public = generate_keypair(args.out, name)
                print(f"wrote {secret} (secret: keep it on the {name}'s machine) and {public}")
            return 0
        if getattr(args, "plugin_command", None) is not None:
            return args.plugin_command.run(args)
        return _run_role(args)
    except PermLLMError as exc:
        print(f"permllm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"permllm {args.command}: interrupted", file=sys.stderr)
        return 130


PEERS = {"owner": ("user", "helper"), "user": ("owner", "helper"), "helper": ("owner", "user")}


def _run_role(args) -> int:
    from permllm.transport import FlightClock

    if args.threads is not None:
        import torch

        if args.threads < 1:
            from permllm.errors import ConfigError

            raise ConfigError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    clock = FlightClock()
    curve = _curve(args, args.command, PEERS[args.command])
    try:
        return _run_role_with(args, clock, curve)
    finally:
        if curve is not None:
            curve.close()


def _run_role_with(args, clock, curve) -> int:
    if args.command == "owner":
        from parties.roles import run_owner

        budget, user_key = _query_budget(args), _user_key(curve)
        channels = {
            "user": _channel(args.listen_user, "user", True, args, clock, curve),
            "helper": _channel(args.listen_helper, "helper", True, args, clock, curve),
        }
        try:
            report = run_owner(
                channels,
                args.model,
                progress=not args.quiet,
                log=_log(args, "owner"),
                setup_timeout=args.setup_timeout,
                budget=budget,
                user_key=user_key,
            )
        finally:
            for ch in channels.values():
                ch.close()
    elif args.command == "helper":
        from parties.roles import run_helper

        # the helper only works during set-up: its sends may wait while the others are still preparing
        args.timeout = max(args.timeout, args.setup_timeout)
        channels = {
            "owner": _channel(args.owner, "owner", False, args, clock, curve),
            "user": _channel(args.user, "user", False, args, clock, curve),
        }
        try:
            report = run_helper(
                channels, progress=not args.quiet, log=_log(args, "helper"), setup_timeout=args.setup_timeout
            )
        finally:
            for ch in channels.values():
                ch.close()
    else:
        from parties.models import load_tokenizer
        from parties.roles import UserRequest, check_text, run_user
        from permllm.errors import ConfigError
        from permllm.model.prompts import DEMO_PROMPT

        sampling = sampling_from_args(args)
        prompt = DEMO_PROMPT if args.prompt is None else args.prompt
        check_text(prompt, "prompt")  # before the tokenizer, which takes seconds to load
        if args.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be at least 1")
        tokenizer = load_tokenizer(args.model)
        request = UserRequest(args.model, prompt, args.max_new_tokens, sampling)
        channels = {
            "owner": _channel(args.owner, "owner", False, args, clock, curve),
            "helper": _channel(args.listen_helper, "helper", True, args, clock, curve),
        }
        try:
            report = run_user(
                channels,
                request,
                tokenizer,
                progress=not args.quiet,
                log=_log(args, "user"),
                setup_timeout=args.setup_timeout,
            )
        finally:
            for ch in channels.values():
                ch.close()
    _write_report(args.report, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
