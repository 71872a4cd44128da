"""`--mode two-party` at the owner and the user: their role functions over an in-memory channel (the tiny
decoder, the two-party runs replaced by the clear-text test double), the mode refusals, the command
line's usage errors, and one `permllm demo --mode two-party` run for when the real runs are there."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading

import pytest
import torch

from parties.launcher import free_ports
from parties.session import TWO_PARTY_MODE
from permllm.errors import ConfigError, ProtocolError
from permllm.transport.channel import FlightClock
from permllm.transport.memory import MemoryChannel
from tests.clear_runners import ClearRunners
from tests.three_roles import TinyTokenizer, _shallow_copy, run_three_roles
from tests.tiny_model import tiny_decoder

PROMPT, BUDGET = "a private question", 3


def run_two_roles(weights, prompt, budget, *, owner_mode=TWO_PARTY_MODE, user_mode=TWO_PARTY_MODE, timeout=60):
    """Owner and user of parties.roles in two threads over one in-memory channel pair, the two-party runs
    by ClearRunners (seeded). Returns (reports by role, exceptions by role, the user's output, the
    progress lines by role)."""
    import permllm.model.loading as loading
    from parties.roles import UserRequest, run_owner, run_user

    owner_end, user_end = MemoryChannel.pair("owner", "user", FlightClock(), FlightClock(), timeout=timeout)
    channels = {"owner": {"user": owner_end}, "user": {"owner": user_end}}
    if owner_mode != TWO_PARTY_MODE:  # a helper channel nobody serves: a refusal comes before it is used
        channels["owner"]["helper"] = MemoryChannel.pair("owner", "helper", timeout=timeout)[0]
    lines = {"owner": [], "user": []}
    runners = {"owner": lambda ctx: ClearRunners(ctx, seed=11), "user": lambda ctx: ClearRunners(ctx, seed=12)}
    printed = io.StringIO()
    roles = {
        "owner": lambda: run_owner(
            channels["owner"],
            "smollm2",
            progress=False,
            log=lines["owner"].append,
            mode=owner_mode,
            runners=runners["owner"],
        ),
        "user": lambda: run_user(
            channels["user"],
            UserRequest("smollm2", prompt, budget),
            TinyTokenizer(),
            progress=False,
            log=lines["user"].append,
            out=printed,
            mode=user_mode,
            runners=runners["user"],
        ),
    }
    reports, errors = {}, {}

    def target(role):
        try:
            reports[role] = roles[role]()
        except BaseException as exc:  # returned to the test
            errors[role] = exc
            for ch in channels[role].values():
                ch.close()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loading, "load_model", lambda name, tokenizer=True, dtype=None: (_shallow_copy(weights), None))
        threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in roles]
        for t in threads:
            t.start()
        for t in threads:
            t.join(3 * timeout)
    assert all(not t.is_alive() for t in threads), "a role did not finish"
    return reports, errors, printed.getvalue(), lines


def test_two_party_roles_answer_with_the_tokens_of_helper_mode():
    weights = tiny_decoder(seed=3)
    helper_reports, errors, _ = run_three_roles(weights, PROMPT, BUDGET)
    assert not errors, errors
    reports, errors, printed, lines = run_two_roles(weights, PROMPT, BUDGET)
    assert not errors, errors
    user, owner = reports["user"], reports["owner"]
    assert user["token_ids"] == helper_reports["user"]["token_ids"]  # greedy: the same tokens
    assert user["generated_tokens"] == BUDGET and printed.strip()
    for report in (user, owner):
        assert report["mode"] == TWO_PARTY_MODE
        assert report["material_left"] == 0
        assert report["prepare_bytes"] == 0  # no W - U in two-party mode
        assert report["offline_s"] > 0
    # one channel: what one side sent in the offline phase is what the other received
    assert owner["offline_bytes_sent"] == user["offline_bytes_received"] > 0
    assert owner["offline_bytes_received"] == user["offline_bytes_sent"] > 0
    assert owner["offline_bytes"] == owner["offline_bytes_sent"] + owner["offline_bytes_received"]
    assert owner["offline_calls"] == helper_reports["helper"]["calls"]
    assert helper_reports["user"]["mode"] == "helper" and helper_reports["owner"]["mode"] == "helper"
    # the online phase is the helper mode's: the same bytes per token both ways
    for key in ("online_bytes_per_token_up", "online_bytes_per_token_down", "flights_per_token", "prefill_bytes"):
        assert user[key] == helper_reports["user"][key], key
    stages = ["permutations", "linear", "products", "truncations", "tables"]
    for role in ("owner", "user"):
        made = [line for line in lines[role] if "making material (two-party)" in line]
        assert made == [f"{role}: making material (two-party): {s}" for s in stages]


@pytest.mark.parametrize("owner_mode,user_mode", [("helper", TWO_PARTY_MODE), (TWO_PARTY_MODE, "helper")])
def test_an_owner_in_the_other_mode_refuses_the_hello_in_its_welcome(owner_mode, user_mode):
    if owner_mode == "helper":
        reports, errors, _, _ = run_two_roles(
            tiny_decoder(seed=3), PROMPT, BUDGET, owner_mode=owner_mode, user_mode=user_mode, timeout=10
        )
    else:
        reports, errors, _, _ = _helper_user_against_two_party_owner()
    assert not reports
    assert isinstance(errors["owner"], ProtocolError) and "mode mismatch" in str(errors["owner"])
    assert isinstance(errors["user"], ProtocolError)
    assert f"the user asks for a '{user_mode}' session, the owner serves '{owner_mode}'" in str(errors["user"])


def _helper_user_against_two_party_owner():
    """A helper-mode user (with a helper channel nobody serves) against a two-party owner."""
    import permllm.model.loading as loading
    from parties.roles import UserRequest, run_owner, run_user

    owner_end, user_end = MemoryChannel.pair("owner", "user", FlightClock(), FlightClock(), timeout=10)
    helper_end, _ = MemoryChannel.pair("user", "helper", timeout=10)
    reports, errors = {}, {}
    roles = {
        "owner": lambda: run_owner(
            {"user": owner_end}, "smollm2", progress=False, log=lambda *a: None, mode=TWO_PARTY_MODE
        ),
        "user": lambda: run_user(
            {"owner": user_end, "helper": helper_end},
            UserRequest("smollm2", PROMPT, BUDGET),
            TinyTokenizer(),
            progress=False,
            log=lambda *a: None,
            out=io.StringIO(),
        ),
    }

    def target(role):
        try:
            reports[role] = roles[role]()
        except BaseException as exc:  # returned to the test
            errors[role] = exc

    with pytest.MonkeyPatch.context() as mp:
        weights = tiny_decoder(seed=3)
        mp.setattr(loading, "load_model", lambda name, tokenizer=True, dtype=None: (_shallow_copy(weights), None))
        threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in roles]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert all(not t.is_alive() for t in threads)
    return reports, errors, "", {}


def test_the_bfv_selection_has_no_two_party_mode():
    from parties.roles import UserRequest, run_user

    owner_end, _ = MemoryChannel.pair("user", "owner", timeout=5)
    request = UserRequest("smollm2", PROMPT, BUDGET, selection="bfv")
    with pytest.raises(ConfigError, match="bfv"):
        run_user(
            {"owner": owner_end}, request, TinyTokenizer(), progress=False, log=lambda *a: None, mode=TWO_PARTY_MODE
        )


def test_the_hello_carries_the_mode_and_a_hello_without_one_asks_for_the_helper():
    from parties.handshake import Plan, check_hello

    hello = Plan("smollm2", 4, 2, session="s", mode=TWO_PARTY_MODE).hello()
    assert hello["mode"] == TWO_PARTY_MODE
    assert check_hello(hello, "smollm2", 100, mode=TWO_PARTY_MODE).mode == TWO_PARTY_MODE
    del hello["mode"]
    assert check_hello(hello, "smollm2", 100).mode == "helper"
    with pytest.raises(ProtocolError, match="mode mismatch"):
        check_hello(hello, "smollm2", 100, mode=TWO_PARTY_MODE)
    with pytest.raises(ProtocolError, match="mode mismatch"):
        check_hello({**hello, "mode": "three-party"}, "smollm2", 100)


def _cli(*argv):
    from parties.cli import main

    return main(list(argv))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["owner", "--listen-user", "tcp://127.0.0.1:1", "--insecure"], "--listen-helper"),
        (["user", "--owner", "tcp://127.0.0.1:1", "--insecure"], "--listen-helper"),
        (
            [
                "owner",
                "--mode",
                "two-party",
                "--listen-user",
                "tcp://127.0.0.1:1",
                "--listen-helper",
                "tcp://127.0.0.1:2",
                "--insecure",
            ],
            "--listen-helper",
        ),
        (
            [
                "user",
                "--mode",
                "two-party",
                "--owner",
                "tcp://127.0.0.1:1",
                "--listen-helper",
                "tcp://127.0.0.1:2",
                "--insecure",
            ],
            "--listen-helper",
        ),
    ],
)
def test_the_usage_errors_of_the_modes(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _cli(*argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.processes
def test_the_demo_and_the_roles_list_the_mode():
    for command in ("demo", "owner", "user"):
        out = subprocess.run(
            [sys.executable, "-m", "parties.cli", command, "--help"], capture_output=True, text=True, timeout=120
        ).stdout
        assert "--mode {helper,two-party}" in out, command


@pytest.fixture
def clear_runs(monkeypatch):
    """The two-party runs by ClearRunners wherever the default (oblivious transfer and BFV) would be used:
    for the services and the command line, which take no runners."""
    import protocols.two_party.provider as provider

    original = provider.make_material

    def make_material(ctx, plan, seed, *, runners=None, **options):
        runners = ClearRunners(ctx, seed=13 if ctx.is_owner else 14) if runners is None else runners
        return original(ctx, plan, seed, runners=runners, **options)

    monkeypatch.setattr(provider, "make_material", make_material)


def _two_keys(tmp_path):
    """Keys folders of an owner and a user only (no helper key anywhere)."""
    from parties.security import generate_keypair

    folders = {r: tmp_path / r for r in ("owner", "user")}
    publics = {r: generate_keypair(folders[r], r)[1] for r in folders}
    for role, folder in folders.items():
        for peer, public in publics.items():
            if peer != role:
                (folder / public.name).write_bytes(public.read_bytes())
    return folders


def _owner_service(folders, front, mode, *, once=False, stop=None):
    from parties.cli import _authorised, _curve, build_parser, peers
    from parties.owner_service import serve_owner

    argv = ["owner", "--mode", mode, "--listen-user", front, "--keys", str(folders["owner"]), "--quiet"]
    argv += ["--timeout", "20", "--setup-timeout", "30"]
    if mode != TWO_PARTY_MODE:
        argv += ["--listen-helper", f"tcp://127.0.0.1:{free_ports(1)[0]}"]
    args = build_parser().parse_args(argv)
    curve = _curve(args, "owner", peers(args))
    try:
        curve.allow("user", _authorised(args))
        return serve_owner(args, curve, lambda *a: None, once=once, stop=stop)
    finally:
        curve.close()


def _cli_user(folders, front, mode, out):
    """One user session as `permllm user --mode MODE` runs it (CURVE, ZeroMQ), the tiny tokenizer."""
    from parties.cli import _ask_for_session, _curve, build_parser, peers
    from parties.owner_service import open_channel
    from parties.roles import UserRequest, run_user

    argv = ["user", "--mode", mode, "--owner", front, "--keys", str(folders["user"]), "--quiet"]
    argv += ["--timeout", "20", "--setup-timeout", "30"]
    listen = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    if mode != TWO_PARTY_MODE:
        argv += ["--listen-helper", listen]
    args = build_parser().parse_args(argv)
    curve = _curve(args, "user", peers(args))
    opened = []
    try:
        channels = {}
        helper_endpoint = None
        if mode != TWO_PARTY_MODE:  # a helper channel nobody serves
            raw, channels["helper"] = open_channel(listen, "helper", True, args, curve.socket_options("helper", True))
            opened.append(channels["helper"])
            helper_endpoint = raw.endpoint
        owner_addr = _ask_for_session(args, helper_endpoint, curve)
        channels["owner"] = open_channel(owner_addr, "owner", False, args, curve.socket_options("owner", False))[1]
        opened.append(channels["owner"])
        request = UserRequest("smollm2", PROMPT, BUDGET)
        return run_user(channels, request, TinyTokenizer(), progress=False, log=lambda *a: None, out=out, mode=mode)
    finally:
        for channel in opened:
            channel.close()
        curve.close()


def _loaded_tiny(monkeypatch):
    import permllm.model.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda name, tokenizer=True, dtype=None: (tiny_decoder(seed=3), None))


def test_the_owner_service_serves_two_party_sessions_over_curve_with_no_helper(tmp_path, monkeypatch, clear_runs):
    _loaded_tiny(monkeypatch)
    folders = _two_keys(tmp_path)
    front = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    stop, result = threading.Event(), {}
    service = threading.Thread(
        target=lambda: result.update(report=_owner_service(folders, front, TWO_PARTY_MODE, stop=stop)), daemon=True
    )
    service.start()
    try:
        user = _cli_user(folders, front, TWO_PARTY_MODE, io.StringIO())
    finally:
        stop.set()
        service.join(60)
    assert not service.is_alive()
    baseline, errors, _ = run_three_roles(tiny_decoder(seed=3), PROMPT, BUDGET)
    assert not errors, errors
    assert user["mode"] == TWO_PARTY_MODE and user["token_ids"] == baseline["user"]["token_ids"]
    (session,) = result["report"]["sessions"]
    assert session["mode"] == TWO_PARTY_MODE and session["material_left"] == 0
    assert session["offline_bytes_sent"] == user["offline_bytes_received"]


def test_a_service_in_the_other_mode_refuses_the_session_and_both_sides_fail(tmp_path, monkeypatch, clear_runs):
    _loaded_tiny(monkeypatch)
    from parties.security import generate_keypair

    folders = _two_keys(tmp_path)
    helper_public = generate_keypair(tmp_path / "helper", "helper")[1]  # the helper-mode user's peer
    (folders["user"] / helper_public.name).write_bytes(helper_public.read_bytes())
    front = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    outcome = {}

    def owner():
        try:
            outcome["owner"] = _owner_service(folders, front, TWO_PARTY_MODE, once=True)
        except BaseException as exc:  # returned to the test
            outcome["owner"] = exc

    service = threading.Thread(target=owner, daemon=True)
    service.start()
    with pytest.raises(ProtocolError, match="mode mismatch: the user asks for a 'helper' session"):
        _cli_user(folders, front, "helper", io.StringIO())
    service.join(60)
    assert not service.is_alive()
    assert isinstance(outcome["owner"], ProtocolError) and "mode mismatch" in str(outcome["owner"])


def test_the_two_party_demo_starts_owner_and_user_only_and_merges_their_reports(tmp_path):
    from parties.cli import build_parser
    from parties.demo_summary import format_summary, merge_reports
    from parties.launcher import role_commands

    args = build_parser().parse_args(["demo", "--mode", "two-party", "--prompt", "hi", "--max-new-tokens", "2"])
    commands = role_commands(args, [5001, 5002, 5003], tmp_path)
    assert set(commands) == {"owner", "user"}
    for role, command in commands.items():
        assert command[command.index("--mode") + 1] == TWO_PARTY_MODE
        assert "--listen-helper" not in command and "--insecure" not in command
        assert not (tmp_path / "keys" / role / "helper.pub").exists()
    assert not (tmp_path / "keys" / "helper").exists()
    owner = {
        "phases_s": {"load": 1.0, "offline": 2.0, "online": 3.0},
        "prepare_bytes": 0,
        "peak_rss_mb": 10.0,
        "mode": TWO_PARTY_MODE,
        "offline_s": 2.0,
        "offline_bytes_sent": 300,
        "offline_bytes_received": 200,
        "offline_calls": 7,
    }
    user = {"prompt_tokens": 3, "phases_s": {"offline": 2.5}, "peak_rss_mb": 5.0, "text": "x", "token_ids": [4]}
    user.update({k: 1 for k in ("generated_tokens", "ttft_s", "decode_s_per_token", "decode_s_per_token_p90")})
    for key in ("online_bytes_per_token", "online_bytes_per_token_up", "online_bytes_per_token_down"):
        user[key] = 10
    user.update(flights_per_token=4, prefill_flights=5, prefill_bytes=6)
    summary = merge_reports({"user": user, "owner": owner}, network="none")
    assert summary["mode"] == TWO_PARTY_MODE
    assert (summary["offline_s"], summary["offline_bytes"], summary["offline_calls"]) == (2.0, 500, 7)
    assert (summary["offline_bytes_sent"], summary["offline_bytes_received"]) == (300, 200)
    assert set(summary["peak_rss_mb"]) == {"owner", "user"}
    printed = format_summary(summary)
    assert "offline (two-party): time / bytes" in printed and "peak RSS owner / user " in printed


@pytest.mark.processes
@pytest.mark.model
@pytest.mark.timeout(1800)
def test_the_two_party_demo_runs_two_processes_and_answers_like_helper_mode(tmp_path):
    """`permllm demo --mode two-party` on a tiny Llama checkpoint (SmolLM2's tokenizer): two processes, no
    helper, the tokens of the helper mode. Needs the real two-party runs (protocols.two_party.runners):
    skipped until they are there."""
    pytest.importorskip("protocols.two_party.runners")
    from transformers import AutoTokenizer

    from permllm.model.loading import SMOLLM2_GGUF, find_smollm2_gguf
    from tests.tiny_model import tiny_hf_llama

    model = tiny_hf_llama(3, hidden=64, intermediate=96, max_position_embeddings=512)
    with torch.no_grad():  # larger logit gaps, so no greedy step is a near tie
        model.lm_head.weight.mul_(40)
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(
        str(find_smollm2_gguf().parent), gguf_file=SMOLLM2_GGUF, local_files_only=True
    )
    tokenizer.save_pretrained(folder)
    common = ["--model", str(folder), "--network", "none", "--prompt", "Name three colours.", "--max-new-tokens", "3"]
    results = {}
    for mode in ("helper", TWO_PARTY_MODE):
        out = tmp_path / f"{mode}.json"
        proc = subprocess.run(
            [sys.executable, "-m", "parties.cli", "demo", "--mode", mode, *common, "--json", str(out)],
            capture_output=True,
            text=True,
            timeout=1700,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[mode] = json.loads(out.read_text())
    two = results[TWO_PARTY_MODE]
    assert two["mode"] == TWO_PARTY_MODE and results["helper"]["mode"] == "helper"
    assert two["token_ids"] == results["helper"]["token_ids"]
    assert two["prepare_bytes"] == 0 and two["offline_bytes"] > 0 and two["offline_s"] > 0
    assert set(two["peak_rss_mb"]) == {"owner", "user"}
    assert two["flights_per_token"] == results["helper"]["flights_per_token"]
