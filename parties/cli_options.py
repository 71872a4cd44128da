"""The `permllm` command line: its parser (options of every subcommand) and the option readers the
roles and the demo share (prompt input, sampling). `parties.cli` runs what the parser describes."""

from __future__ import annotations

import argparse
import sys

from permllm.errors import ConfigError

MAX_PROMPT_BYTES = 1 << 20

TWO_MACHINE_HELP = """\
A session by hand on three machines (or three terminals):
  once, on each machine: permllm keygen --role ROLE --out keys   (ROLE.key stays there, 0600)
          copy only the .pub files: each keys folder holds its own ROLE.key and the other two .pub files
  owner:  permllm owner  --keys keys --listen-user tcp://0.0.0.0:5555 --listen-helper tcp://0.0.0.0:5556
  user:   permllm user   --keys keys --owner tcp://OWNER_HOST:5555 --listen-helper tcp://0.0.0.0:5557 --prompt-file q
  helper: permllm helper --keys keys --owner tcp://OWNER_HOST:5556
The owner and the helper are services: they serve sessions until SIGTERM (--max-concurrent at once),
for every user whose public key is in --users DIR (or is the keys folder's user.pub). A user asks the
owner's front door for a session and gets its own session sockets; the owner tells the helper where
that user listens. The user keeps the masked weights in --cache-dir, so only its first session (per
mask epoch: --rotate-masks on the owner starts a new one) receives them. Every
channel is CURVE-encrypted and mutually authenticated (--insecure turns that off, for local
experiments only). The owner holds the weights, the user the prompt; the helper only deals
randomness before the online phase. Start them in any order: each waits up to --setup-timeout for
the others. The owner can cap what one user key may run with --budget-file and
--max-sessions-per-key / --max-positions-per-key. --network adds simulated delays on top of the
real network and is meant for one machine: it needs the parties' clocks to agree (default none).
"""


COMMAND_GROUP = "permllm.commands"

MODE_HELP = (
    "'helper' (the offline helper deals the correlated randomness; default) or 'two-party' (owner and user "
    "make it by HE and OT: no helper, no W - U at the user; slow, see docs). Owner and user must agree"
)


def _add_mode(p):
    from parties.session import HELPER_MODE, MODES

    p.add_argument("--mode", choices=MODES, default=HELPER_MODE, help=MODE_HELP)


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

    try:
        return check_model_spec(spec)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


MODEL_HELP = (
    "smollm2 (default), minilm (a sentence-embedding encoder), or the path of a Llama-style "
    "checkpoint: a .gguf file or a folder with config.json and the tokenizer files"
)


def _add_generation(p):
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--prompt",
        default=None,
        help="the question (default: a built-in one); '-' reads it from standard input. Text on the command "
        "line is visible to other local users (ps): prefer --prompt-file or '-' for anything private",
    )
    source.add_argument("--prompt-file", default=None, metavar="PATH", help="read the question from this file")
    p.add_argument("--max-new-tokens", type=int, default=48, help="token budget (default 48)")
    p.add_argument("--model", default="smollm2", type=_model_spec, help=MODEL_HELP)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature (implies --sample; default 0.7)"
    )
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens when sampling")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass when sampling")
    p.add_argument("--seed", type=int, default=None, help="seed of the user's sampling (masks stay cryptographic)")
    p.add_argument(
        "--expect-fingerprint",
        default=None,
        metavar="HEX",
        type=_fingerprint,
        help="the owner's model fingerprint (architecture and weights digest) to pin; the session stops "
        "before any prompt share is sent when the owner's differs (the user logs the fingerprint it sees)",
    )


def _fingerprint(text: str) -> str:
    from parties.pinning import normalize_fingerprint

    try:
        return normalize_fingerprint(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_debug(p):
    p.add_argument(
        "--debug", action="store_true", help="show the traceback of an unexpected error (or set PERMLLM_DEBUG=1)"
    )


def _role_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    """The subcommand of one role, its epilog showing the three roles on separate machines."""
    return sub.add_parser(
        name,
        help=help_text,
        epilog=TWO_MACHINE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )


def _pool_depth(text: str) -> int:
    try:
        depth = int(text)
    except ValueError:
        depth = -1
    if not 0 <= depth <= 8:
        raise argparse.ArgumentTypeError(f"--pool-depth must be an integer from 0 to 8, got {text!r}")
    return depth


def _add_pool_depth(p):
    from parties.helper_pool import DEFAULT_POOL_DEPTH

    p.add_argument(
        "--pool-depth",
        type=_pool_depth,
        default=DEFAULT_POOL_DEPTH,
        metavar="N",
        help="the helper deals up to N sessions per user key ahead of time, while idle, for the plan that "
        f"key used last; a matching session is served from them (0: deal every session live; default "
        f"{DEFAULT_POOL_DEPTH})",
    )


def _add_service(p):
    from parties.service import DEFAULT_DRAIN_S, DEFAULT_MAX_CONCURRENT

    p.add_argument(
        "--users",
        default=None,
        metavar="DIR",
        help="folder of authorised users' CURVE public keys (*.pub): any of them may run a session "
        "(the keys folder's user.pub, when there, is authorised too)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=DEFAULT_MAX_CONCURRENT,
        metavar="N",
        help=f"sessions served at once; more wait (default {DEFAULT_MAX_CONCURRENT})",
    )
    p.add_argument(
        "--drain-s",
        type=float,
        default=DEFAULT_DRAIN_S,
        metavar="S",
        help=f"on SIGTERM, seconds the running sessions may take to finish before they are ended "
        f"(default {DEFAULT_DRAIN_S:g})",
    )
    p.add_argument("--once", action="store_true", help="serve one session, then exit with its outcome")


def _add_role_output(p):
    p.add_argument("--report", default=None, help="write this role's report (JSON) here")
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines")


def build_parser() -> argparse.ArgumentParser:
    from parties.security import ROLES

    parser = argparse.ArgumentParser(
        prog="permllm", description="Private two-party LLM inference (PermLLM-style).", allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        allow_abbrev=False,
        help="run owner, user and helper as three local processes",
        description="Starts owner, user and helper as separate processes talking ZeroMQ over "
        "loopback, asks the model a question privately and prints a summary.",
    )
    _add_generation(demo)
    _add_mode(demo)
    _add_network(demo, "wan")
    demo.add_argument("--json", dest="json_path", default=None, help="also write the summary as JSON here")
    demo.add_argument(
        "--sessions",
        type=int,
        default=1,
        metavar="N",
        help="run N user sessions one after another (the same user key) against one owner and one helper "
        "service; the JSON adds `sessions`, one summary per session (default 1)",
    )
    _add_pool_depth(demo)
    demo.add_argument(
        "--insecure",
        action="store_true",
        help="run without CURVE (by default the demo makes fresh keys for the three roles)",
    )

    keygen = sub.add_parser(
        "keygen",
        allow_abbrev=False,
        help="write this machine's CURVE key pair for one role",
        description="Writes ROLE.key (secret, mode 0600) and ROLE.pub (mode 0644) into --out. Run it on the "
        "machine of that role; copy only ROLE.pub to the other two.",
    )
    keygen.add_argument("--role", required=True, choices=ROLES, help="the role this machine plays")
    keygen.add_argument("--out", required=True, help="folder to write the keys into")

    for name, command in plugin_commands().items():
        plugin = sub.add_parser(name, help=command.help, description=command.description, allow_abbrev=False)
        command.add_arguments(plugin)
        plugin.set_defaults(plugin_command=command)

    owner = _role_parser(sub, "owner", "the model owner (holds the weights)")
    owner.add_argument("--model", default="smollm2", type=_model_spec, help=MODEL_HELP)
    owner.add_argument("--listen-user", required=True, help="ZeroMQ address to bind for the user")
    owner.add_argument(
        "--listen-helper", default=None, help="ZeroMQ address to bind for the helper (helper mode only; required there)"
    )
    _add_mode(owner)
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
    _add_service(owner)
    owner.add_argument(
        "--state",
        default=None,
        metavar="DIR",
        help="folder for the long-lived weight-mask seeds (masks.json, 0600): users keep their W - U across "
        "restarts (default: kept in memory, so only while this service runs)",
    )
    owner.add_argument(
        "--rotate-masks",
        action="store_true",
        help="start a new mask epoch: forget every mask seed, so every user fetches W - U again",
    )
    _add_role_output(owner)

    user = _role_parser(sub, "user", "the user (holds the prompt, sees the answer)")
    _add_generation(user)
    user.add_argument("--owner", required=True, help="the owner's ZeroMQ address for the user")
    user.add_argument(
        "--listen-helper", default=None, help="ZeroMQ address to bind for the helper (helper mode only; required there)"
    )
    _add_mode(user)
    user.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="where the masked weights W - U are kept between sessions (default $XDG_CACHE_HOME/permllm "
        "or ~/.cache/permllm; folder 0700, files 0600)",
    )
    user.add_argument("--no-cache", action="store_true", help="keep no masked weights: fetch them every session")
    _add_network(user, "none")
    _add_security(user)
    _add_role_output(user)

    helper = _role_parser(sub, "helper", "the offline helper (deals correlated randomness)")
    helper.add_argument("--owner", required=True, help="the owner's ZeroMQ address for the helper")
    _add_network(helper, "none")
    _add_security(helper)
    _add_service(helper)
    _add_pool_depth(helper)
    _add_role_output(helper)
    for command in sub.choices.values():
        _add_debug(command)
    return parser


def read_prompt(args) -> str | None:
    """The prompt from --prompt TEXT, --prompt - (standard input) or --prompt-file PATH; None for the
    built-in one. Trailing line breaks of a file or stream are dropped; ConfigError for unreadable input."""
    if getattr(args, "prompt_file", None) is not None:
        path = args.prompt_file
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_PROMPT_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read --prompt-file {path}: {exc.strerror}") from None
        return _decode_prompt(raw, f"--prompt-file {path}")
    if args.prompt == "-":
        return _decode_prompt(sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1), "standard input")
    return args.prompt


def _decode_prompt(raw: bytes, source: str) -> str:
    if len(raw) > MAX_PROMPT_BYTES:
        raise ConfigError(f"the prompt from {source} is longer than {MAX_PROMPT_BYTES} bytes")
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError("the prompt is not valid UTF-8") from None


def sampling_from_args(args):
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
