"""Faults: a peer killed or frozen mid-session, a failing role under the demo launcher, bad user input.

Process tests (marked `processes`) run the three roles by hand as OS processes, as `parties.launcher`
does (`python -m parties.cli owner/user/helper ... --timeout 5`, free loopback ports, CURVE keys made
for the test), and act on the owner at a moment read from the user's own output:
  * mid-prefill: the user's offline-material progress bar is cleared (tqdm prints "\\r<spaces>\\r"
    when a bar with leave=False closes), i.e. the user has all its material and has entered the
    prefill; the owner is killed 1 s later. The simulated link has a 20 ms round trip ("20,100000"),
    which makes the prefill's ~370 sequential flights last 4 s or more on top of its computation, so
    the kill lands inside the prefill even on a fast machine; the test then checks, from the user's
    error, that the user was waiting for an online-phase message and had printed no token.
  * mid-decode and frozen peer: the user has printed its first token on stdout.
Each then expects the user to exit non-zero within its 5 s timeout plus a 15 s margin, naming the owner,
and no process of the session left running. The margin: after the timeout the user closes its channels,
which linger up to 5 s on messages queued for the dead owner (parties/cli.py _channel, linger_s=5.0),
then the interpreter exits; measured 11.9-12.1 s after a SIGKILL and 6.9 s after a SIGSTOP (nothing is
queued: the stopped owner's kernel still accepts the bytes) on a busy 2-core machine.
These load the real model (~40 s of set-up each): three such sessions in all.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from parties.launcher import free_ports, role_addresses

pytestmark = pytest.mark.processes  # every test here starts OS processes

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 5
MARGIN_S = 15  # the role channels linger 5 s at close (parties/cli.py _channel), plus process teardown
HELPER_TIMEOUT_S = 300
SET_UP_LIMIT_S = 240
ONLINE_TAG = re.compile(r"'(L\d+\.\w+\.\w+|lin\.[\w.]+|prod\.L\d+\.[kv]|trunc|fnorm\.\w+|sel\.\w+|continue)'")
ENV = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _cli(*args: str | bytes, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    """Run `python -m parties.cli ARGS` (arguments may be bytes); returns (completed, seconds)."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "parties.cli", *args], capture_output=True, cwd=REPO, env=ENV, timeout=timeout
    )
    return proc, time.monotonic() - start


def _marked_env(marker: str) -> dict:
    """The environment for a test's processes: every process they start inherits the marker."""
    return dict(ENV, PERMLLM_FAULT_TEST=marker)


def _processes_with(marker: str) -> list[str]:
    """Command lines of live (not zombie) processes started under `_marked_env(marker)`."""
    needle = f"PERMLLM_FAULT_TEST={marker}".encode()
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in environ and state != "Z":
            alive.append(cmdline)
    return alive


def _left_running(marker: str, grace_s: float = 5.0) -> list[str]:
    """The marked processes still alive after up to `grace_s` seconds (killed ones take a moment to go)."""
    deadline = time.monotonic() + grace_s
    while (alive := _processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _security_args(tmp_path, role: str) -> list[str]:
    """The role's CURVE keys folder (its secret key, the peers' public keys) when the CLI has --keys."""
    from parties.cli import build_parser

    user_parser = build_parser()._subparsers._group_actions[0].choices["user"]
    if not any("--keys" in action.option_strings for action in user_parser._actions):
        return []
    from parties.launcher import role_key_folders

    keys = tmp_path / "keys"
    if not keys.exists():
        role_key_folders(keys)
    return ["--keys", str(keys / role)]


class _Output:
    """Collects a pipe's bytes in a thread."""

    def __init__(self, stream):
        self.data = b""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream):
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                return
            with self._lock:
                self.data += chunk

    def text(self) -> str:
        with self._lock:
            return self.data.decode(errors="replace")

    def join(self, timeout=5):
        self._thread.join(timeout)


class Session:
    """owner, helper and user started by hand, as parties.launcher does, on fresh loopback ports."""

    def __init__(self, tmp_path, *, max_new_tokens: int, network: str = "none", prompt: str = "Hi"):
        addresses = role_addresses(free_ports(3))
        self.marker = uuid.uuid4().hex
        common = ["--network", network]
        timeout = ["--timeout", str(TIMEOUT_S)]
        # The helper streams its material while the owner and the user are still preparing, and its sends
        # are bounded by --timeout, not --setup-timeout (see test_helper_streams_material_within_the_setup_
        # timeout): with 5 s it can fail on a busy machine before any fault is injected. Its timeout plays
        # no part in these tests (it has finished when the owner is killed), so it gets a long one.
        helper_timeout = ["--timeout", str(HELPER_TIMEOUT_S)]
        base = [sys.executable, "-m", "parties.cli"]
        commands = {
            "owner": base
            + ["owner", *addresses["owner"], "--once"]
            + common
            + _security_args(tmp_path, "owner")
            + timeout,
            "helper": base
            + ["helper", *addresses["helper"], "--quiet", "--once"]
            + common
            + _security_args(tmp_path, "helper")
            + helper_timeout,
            "user": base
            + ["user", *addresses["user"], "--prompt", prompt, "--max-new-tokens", str(max_new_tokens)]
            + common
            + _security_args(tmp_path, "user")
            + timeout,
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.out: dict[str, _Output] = {}
        self.err: dict[str, _Output] = {}
        for role, command in commands.items():
            proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=_marked_env(self.marker)
            )
            self.procs[role] = proc
            self.out[role], self.err[role] = _Output(proc.stdout), _Output(proc.stderr)

    def wait_until(self, condition, limit_s: float, what: str) -> None:
        deadline = time.monotonic() + limit_s
        while not condition():
            failed = {r: p.returncode for r, p in self.procs.items() if p.poll() not in (None, 0)}
            if failed:
                raise AssertionError(f"waiting for {what}: {failed} exited early\n{self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {limit_s} s\n{self.describe()}")
            time.sleep(0.02)

    def user_in_prefill(self) -> bool:
        """The user's offline-material bar has been cleared: it has entered the online phase."""
        data = self.err["user"].data
        segments = re.split(rb"[\r\n]", data)
        marks = [i for i, seg in enumerate(segments) if b"receiving offline material" in seg]
        return bool(marks) and any(seg and not seg.strip() for seg in segments[marks[-1] + 1 :])

    def user_printed_a_token(self) -> bool:
        return bool(self.out["user"].data.strip())

    def wait_user_exit(self, since: float) -> tuple[int, float]:
        return self.wait_exit("user", since)

    def wait_exit(self, role: str, since: float) -> tuple[int, float]:
        try:
            code = self.procs[role].wait(TIMEOUT_S + MARGIN_S + 30)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - since

    def describe(self) -> str:
        return "\n".join(
            f"--- {r} (exit {p.poll()}) stderr tail:\n{self.err[r].text()[-1500:]}" for r, p in self.procs.items()
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()  # SIGKILL also ends a stopped process
        for role, proc in self.procs.items():
            proc.wait(30)
            self.out[role].join()
            self.err[role].join()


@pytest.fixture
def session_factory(tmp_path):
    sessions: list[Session] = []

    def make(**kwargs) -> Session:
        sessions.append(Session(tmp_path, **kwargs))
        return sessions[-1]

    yield make
    for s in sessions:
        s.stop()


def _assert_user_lost_the_owner(s: Session, code, elapsed: float) -> str:
    return _assert_lost(s, "user", "owner", code, elapsed)


def _assert_lost(s: Session, role: str, peer: str, code, elapsed: float) -> str:
    """`role` exited non-zero within its timeout plus the margin, its last line an error naming `peer`."""
    err = s.err[role].text()
    assert code is not None and code != 0, f"{role} exit {code}\n{s.describe()}"
    assert elapsed <= TIMEOUT_S + MARGIN_S, f"the {role} took {elapsed:.1f} s to give up\n{s.describe()}"
    last = err.strip().splitlines()[-1]
    print(f"\n{role} exit {code} {elapsed:.1f} s after the fault: {last}")
    assert f"permllm {role}: error:" in last and peer in last, last
    return last


def _assert_nothing_left(s: Session) -> None:
    s.stop()
    assert all(p.returncode is not None for p in s.procs.values())
    assert _left_running(s.marker) == []


@pytest.mark.model
def test_owner_killed_mid_prefill(session_factory):
    s = session_factory(max_new_tokens=1, network="20,100000")
    s.wait_until(s.user_in_prefill, SET_UP_LIMIT_S, "start of the user's prefill")
    time.sleep(1.0)
    assert s.procs["owner"].poll() is None and not s.user_printed_a_token()
    s.procs["owner"].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    code, elapsed = s.wait_user_exit(killed)
    last = _assert_user_lost_the_owner(s, code, elapsed)
    assert s.out["user"].text().strip() == "", "the user printed a token: the kill was not mid-prefill"
    assert ONLINE_TAG.search(last), f"the user was not in the online phase: {last}"
    assert s.procs["helper"].wait(5) == 0  # the helper had finished dealing
    _assert_nothing_left(s)


@pytest.mark.model
@pytest.mark.parametrize("killed, survivor", [("owner", "user"), ("user", "owner")], ids=["owner", "user"])
def test_party_killed_mid_decode(session_factory, killed, survivor):
    """One party dies after the user's first token; the other, waiting for its next message, gives up within
    its timeout and names the dead party."""
    s = session_factory(max_new_tokens=4)
    s.wait_until(s.user_printed_a_token, SET_UP_LIMIT_S, "first token")
    s.procs[killed].send_signal(signal.SIGKILL)
    since = time.monotonic()
    code, elapsed = s.wait_exit(survivor, since)
    last = _assert_lost(s, survivor, killed, code, elapsed)
    assert ONLINE_TAG.search(last), last
    assert s.out["user"].text().strip(), "no token was printed"
    assert s.procs["helper"].wait(5) == 0
    _assert_nothing_left(s)


@pytest.mark.model
def test_owner_that_stops_answering(session_factory):
    s = session_factory(max_new_tokens=3)
    s.wait_until(s.user_printed_a_token, SET_UP_LIMIT_S, "first token")
    s.procs["owner"].send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    code, elapsed = s.wait_user_exit(stopped)
    last = _assert_user_lost_the_owner(s, code, elapsed)
    assert "timed out" in last and f"{TIMEOUT_S:g} s" in last, last
    assert elapsed >= TIMEOUT_S - 0.5  # it waited for its timeout, not less
    _assert_nothing_left(s)  # SIGKILL ends the stopped owner


# ------------------------------------------------------------------------------------------ the demo launcher
def test_demo_stops_every_role_when_one_fails(monkeypatch, capsys):
    """run_demo with the roles replaced by stand-ins: the user fails at once, owner and helper would run
    for two minutes. The launcher must return non-zero at once, say which role failed, stop the others."""
    from parties import launcher
    from parties.cli import build_parser

    marker = uuid.uuid4().hex
    monkeypatch.setenv("PERMLLM_FAULT_TEST", marker)  # run_demo passes its environment on to the roles
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    failing = [sys.executable, "-c", "import sys; print('user: cannot go on', file=sys.stderr); sys.exit(3)"]
    monkeypatch.setattr(
        launcher, "role_commands", lambda args, ports, reports: {"owner": sleeper, "helper": sleeper, "user": failing}
    )
    args = build_parser().parse_args(["demo", "--network", "none", "--max-new-tokens", "2"])
    start = time.monotonic()
    code = launcher.run_demo(args)
    elapsed = time.monotonic() - start
    assert code == 1
    assert elapsed < 15, elapsed
    assert "the user exited with status 3; the other parties were stopped" in capsys.readouterr().err
    assert _left_running(marker) == []


@pytest.mark.model
def test_demo_with_a_role_rejecting_its_options_fails_and_leaves_nothing(tmp_path):
    """--top-p 2 is refused by the user role (the launcher does not check sampling options itself, so the
    three processes start): the demo must exit non-zero, pass the user's message on, stop the owner
    (busy loading the model) and the helper. A launcher that refused it up front passes too."""
    marker = uuid.uuid4().hex
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "parties.cli", "demo", "--network", "none", "--max-new-tokens", "2", "--top-p", "2"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_marked_env(marker),
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "--top-p must be in (0, 1]" in proc.stderr, proc.stderr[-2000:]
    if "three processes" in proc.stderr:  # the launcher started the roles: it must name the failed one
        assert re.search(r"the user exited with status \d+; the other parties were stopped", proc.stderr)
    assert elapsed < 60, elapsed
    assert _left_running(marker) == []


DEMO_BAD_INPUT = [
    (["--max-new-tokens", "0"], "--max-new-tokens must be between 1 and 1024, got 0"),
    (["--max-new-tokens", "100000"], "--max-new-tokens must be between 1 and 1024, got 100000"),
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", " \t\n "], "the prompt is empty"),
    ([b"--prompt", b"caf\xc3\xa9 \xff\xfe"], "the prompt is not valid UTF-8"),
    (["--network", "foo"], "--network: unknown network profile 'foo'"),
    (["--network=-5,100"], "need RTT_ms >= 0"),
    (["--network", "10,0"], "Mbit_s > 0"),
]


@pytest.mark.parametrize(
    "args,message",
    DEMO_BAD_INPUT,
    ids=["zero-tokens", "budget", "empty", "blank", "utf8", "network-name", "network-rtt", "network-bandwidth"],
)
def test_demo_rejects_bad_input_before_starting_anything(args, message):
    proc, elapsed = _cli("demo", *args)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, err[-2000:]
    assert "permllm demo: error: " in err and message in err, err[-2000:]
    assert "three processes" not in err  # rejected before any role was started
    assert "Traceback" not in err
    assert elapsed < 15, elapsed  # interpreter start-up and imports only (~1.5 s idle)


def _until_processes_start(command, marker, limit_s=60) -> tuple[int | None, str, bool]:
    """Run the demo until it exits or announces it started the roles (then stop its whole group)."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=_marked_env(marker),
        start_new_session=True,
    )
    err = _Output(proc.stderr)
    out = _Output(proc.stdout)
    deadline = time.monotonic() + limit_s
    started = False
    while proc.poll() is None and time.monotonic() < deadline:
        if "three processes" in err.text():
            started = True
            break
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    err.join()
    out.join()
    return proc.returncode, err.text(), started


@pytest.mark.model
def test_demo_rejects_a_prompt_longer_than_the_context_before_starting_the_roles():
    """~9000 tokens for 8192 positions: the launcher tokenizes the prompt (public tokenizer, a few seconds)
    and refuses before any role starts; a launcher that started the roles is stopped at once."""
    marker = uuid.uuid4().hex
    prompt = "word " * 9000  # ~9000 tokens > 8192 positions
    start = time.monotonic()
    code, err, started = _until_processes_start(
        [sys.executable, "-m", "parties.cli", "demo", "--network", "none", "--max-new-tokens", "8", "--prompt", prompt],
        marker,
    )
    assert _left_running(marker) == []
    assert not started, "the demo started the three roles for a prompt that cannot fit"
    assert code == 2 and "permllm demo: error:" in err and "exceeds the model's 8192 positions" in err, err[-1500:]
    assert "Traceback" not in err
    # the tokenizer and the public config only: ~5 s idle, ~15-20 s on a busy 2-core machine; loading the
    # model and starting the roles would take 40 s and more
    assert time.monotonic() - start < 45


# ------------------------------------------------------------------------------------------ the roles by hand
def _user_role(*args: str | bytes, tmp_path) -> tuple[subprocess.CompletedProcess, float]:
    a, b = free_ports(2)
    return _cli(
        "user",
        "--owner",
        f"tcp://127.0.0.1:{a}",
        "--listen-helper",
        f"tcp://127.0.0.1:{b}",
        "--timeout",
        "3",
        "--setup-timeout",
        "20",
        *_security_args(tmp_path, "user"),
        *args,
    )


@pytest.mark.model
@pytest.mark.parametrize(
    "prompt, message",
    [("  ", "the prompt is empty"), (b"caf\xff\xfe", "the prompt is not valid UTF-8")],
    ids=["empty", "utf8"],
)
def test_user_role_rejects_a_bad_prompt_before_connecting(tmp_path, prompt, message):
    proc, elapsed = _user_role("--prompt", prompt, tmp_path=tmp_path)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2 and f"permllm user: error: {message}" in err, err[-2000:]
    assert "Traceback" not in err
    assert elapsed < 20, elapsed  # the tokenizer load (~3-7 s) and no wait for the owner (20 s set-up timeout)


@pytest.mark.parametrize(
    "role, addresses, spec",
    [
        ("helper", ["--owner", "tcp://127.0.0.1:{a}"], "foo"),
        ("user", ["--owner", "tcp://127.0.0.1:{a}", "--listen-helper", "tcp://127.0.0.1:{b}"], "-5,100"),
        ("owner", ["--listen-user", "tcp://127.0.0.1:{a}", "--listen-helper", "tcp://127.0.0.1:{b}"], "10,0"),
    ],
    ids=["helper", "user", "owner"],
)
def test_roles_reject_an_absurd_network_with_a_clear_error(tmp_path, role, addresses, spec):
    """Every role checks --network when it parses its arguments, before keys, sockets or the tokenizer."""
    a, b = free_ports(2)
    addresses = [address.format(a=a, b=b) for address in addresses]
    proc, elapsed = _cli(role, *addresses, "--quiet", f"--network={spec}", *_security_args(tmp_path, role))
    err = proc.stderr.decode(errors="replace")
    assert elapsed < 15, elapsed
    assert proc.returncode == 2 and "--network" in err and spec in err, err[-1500:]
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------ the helper's stream
def _helper_process_with_stand_ins(
    arch, prompt_tokens: int, budget: int, *, helper_args: list[str], read_after_s: float
) -> dict:
    """`permllm helper` as a real process (no CURVE), dealing to an owner and a user played by two threads
    of this test over ZeroMQ. The stand-ins send their plans and seeds, then take the streamed material
    only after `read_after_s` seconds, as parties still busy preparing do.
    Returns {'helper': exit status, 'stderr': ..., 'owner'/'user': record count or the exception}."""
    from parties.models import PROTOCOL_VERSION, fingerprint
    from parties.roles import SEED_TAG
    from parties.wire import recv_records, recv_stream_seed, send_json
    from permllm.transport import ZmqChannel

    arch = arch.to_dict()
    card = fingerprint("smollm2", arch)
    ports = free_ports(3)  # the owner's control channel, the user's socket for the helper, the session's
    control = ZmqChannel.bind(f"tcp://127.0.0.1:{ports[0]}", peer="helper", timeout=30)
    peers = {
        name: ZmqChannel.bind(f"tcp://127.0.0.1:{port}", peer="helper", timeout=30)
        for name, port in (("owner", ports[2]), ("user", ports[1]))
    }
    order = {"session": "s1", "owner_port": ports[2], "user_host": "127.0.0.1", "user_port": ports[1], "user_key": ""}
    marker = uuid.uuid4().hex
    helper = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "parties.cli",
            "helper",
            "--owner",
            f"tcp://127.0.0.1:{ports[0]}",
            "--insecure",
            "--quiet",
            "--once",
            *helper_args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=_marked_env(marker),
    )
    send_json(control, "session", order)
    err = _Output(helper.stderr)
    results: dict[str, object] = {}

    def peer(name):
        ch = peers[name]
        try:
            if name == "owner":
                send_json(
                    ch,
                    "owner-plan",
                    {
                        "protocol": PROTOCOL_VERSION,
                        "session": "s",
                        "model": "smollm2",
                        "arch": arch,
                        "fingerprint": card,
                        "prompt_tokens": prompt_tokens,
                        "max_new_tokens": budget,
                    },
                )
            else:
                send_json(
                    ch,
                    "user-plan",
                    {
                        "protocol": PROTOCOL_VERSION,
                        "session": "s",
                        "fingerprint": card,
                        "prompt_tokens": prompt_tokens,
                        "max_new_tokens": budget,
                    },
                )
            ch.send(SEED_TAG, bytes([len(name)]) * 16)
            if name == "owner":
                ch.send("mask-seed", b"m" * 16)
            time.sleep(read_after_s)
            recv_stream_seed(ch, bytes(16), timeout=10)
            results[name] = recv_records(ch, lambda record: None, timeout=10)
        except Exception as exc:  # reported by the caller
            results[name] = exc

    threads = [threading.Thread(target=peer, args=(n,), daemon=True) for n in peers]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        results["helper"] = helper.wait(30)
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        err.join()
        for ch in [*peers.values(), control]:
            ch.close()
    results["stderr"] = err.text()
    assert _left_running(marker) == []
    return results


def test_helper_waits_for_busy_parties_within_the_setup_timeout():
    """~46 MB of material (a 256-wide model, a 256-token prompt) with --timeout 1 and --setup-timeout 60:
    the owner and the user start reading only after 4 s; the helper's sends must wait for them (they are
    set-up traffic), not give up after the 1 s online timeout."""
    from protocols.model.decoder_weights import DecoderArch
    from tests.tiny_model import decoder_config

    arch = DecoderArch.from_config(decoder_config(hidden=256, head_dim=64, intermediate=1024, vocab=8192))
    r = _helper_process_with_stand_ins(
        arch, 256, 2, helper_args=["--timeout", "1", "--setup-timeout", "60"], read_after_s=4.0
    )
    assert r["helper"] == 0, r["stderr"][-1500:]
    assert isinstance(r["owner"], int) and r["owner"] == r["user"] > 0, r


def test_helper_last_records_survive_its_exit(tiny_decoder_arch):
    """Tiny model, 120 tokens (~2.7 MB in ~7000 frames for the user): dealing takes ~2 s, the parties start
    reading after 8 s, so the helper has queued its last records (and the end marker) long before anyone
    reads. ZeroMQ drops what is still queued when a socket closes: with linger 0 the user waited for the
    set-up timeout, and with the roles' 5 s linger (parties/cli.py _channel) a user busy longer than that
    (taking in the masked weights under `wan`, seen in the bench) did too. The helper now stays until
    each receiver confirms the whole stream (`parties.wire.await_receipt`)."""
    r = _helper_process_with_stand_ins(tiny_decoder_arch, 8, 120, helper_args=[], read_after_s=8.0)
    assert r["helper"] == 0, r["stderr"][-1500:]
    # dealt calls on the 2-layer model: 29 for the prefill's token (27 in the forward pass, the reveal and the
    # table selection), 27 per decode token (the forward pass with its folded norms takes 25)
    assert r["owner"] == r["user"] == 29 + 119 * 27, f"received: owner {r['owner']!r}, user {r['user']!r}"
