"""The owner's query budget per user key (parties/budget.py): the ledger, its limits, and a session refused
in the handshake once a key has used its budget."""

from __future__ import annotations

import json
import threading

import pytest

from parties.budget import QueryBudget
from permllm.errors import ConfigError, ProtocolError
from tests.three_roles import run_three_roles
from tests.tiny_model import tiny_decoder


def test_sessions_and_positions_are_counted_per_key(tmp_path):
    ledger = tmp_path / "budget.json"
    budget = QueryBudget(ledger, max_sessions=2, max_positions=100)
    r = budget.reserve("alice", 60)
    assert budget.usage("alice") == {"sessions": 1, "positions": 60}
    budget.settle(r, 25)  # the session stopped early: 35 positions come back
    assert budget.usage("alice") == {"sessions": 1, "positions": 25}
    with pytest.raises(ProtocolError, match="used 25 of its 100 positions and asks for 80 more"):
        budget.reserve("alice", 80)
    budget.reserve("alice", 75)
    with pytest.raises(ProtocolError, match="run 2 of its 2 sessions"):
        budget.reserve("alice", 1)
    assert budget.usage("bob") == {"sessions": 0, "positions": 0}
    budget.reserve("bob", 100)
    # kept across owner restarts
    again = QueryBudget(ledger, max_sessions=2, max_positions=100)
    assert again.usage("alice") == {"sessions": 2, "positions": 100} and again.usage("bob")["positions"] == 100
    assert json.loads(ledger.read_text())["version"] == 1


def test_a_session_that_used_its_whole_plan_keeps_its_charge(tmp_path):
    budget = QueryBudget(tmp_path / "b.json", max_positions=50)
    r = budget.reserve("k", 30)
    budget.settle(r, 30)
    budget.settle(r, 99)  # more than reserved cannot be charged after the fact, nor refund below zero
    assert budget.usage("k")["positions"] == 30


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '{"version": 2, "keys": {}}',
        '{"version": 1, "keys": []}',
        '{"version": 1, "keys": {"k": {"sessions": -1, "positions": 0}}}',
    ],
)
def test_a_broken_ledger_is_a_clear_error_at_start(tmp_path, content):
    path = tmp_path / "b.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="ledger .* is unreadable"):
        QueryBudget(path, max_sessions=1)


def test_bad_limits(tmp_path):
    with pytest.raises(ConfigError, match="needs --max-sessions-per-key or --max-positions-per-key"):
        QueryBudget(tmp_path / "b.json")
    with pytest.raises(ConfigError, match="at least 1"):
        QueryBudget(tmp_path / "b.json", max_positions=0)
    with pytest.raises(ConfigError, match="is a folder"):
        QueryBudget(tmp_path, max_sessions=1)


def test_concurrent_owners_sharing_a_ledger_never_lose_a_charge(tmp_path):
    path = tmp_path / "b.json"
    budgets = [QueryBudget(path, max_sessions=1000) for _ in range(4)]
    threads = [threading.Thread(target=lambda b=b: [b.reserve("k", 1) for _ in range(50)]) for b in budgets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert budgets[0].usage("k") == {"sessions": 200, "positions": 200}


def test_owner_refuses_a_user_over_its_budget_in_the_handshake(tmp_path):
    """Three roles in-process on the tiny model: the first session (11-token prompt + 3 tokens = 14
    positions) fits a 20-position budget, the second is refused before any weight is sent, with the
    reason on the user's side and the helper's."""
    weights = tiny_decoder(seed=5)
    budget = QueryBudget(tmp_path / "b.json", max_positions=20)
    options = {"budget": budget, "user_key": "user-key-1"}
    reports, errors, printed = run_three_roles(weights, "a question", 3, owner_options=options, timeout=20)
    assert not errors, errors
    assert reports["user"]["generated_tokens"] == 3 and printed.strip()
    positions = reports["user"]["prompt_tokens"] + 3
    assert budget.usage("user-key-1") == {"sessions": 1, "positions": positions}

    reports, errors, printed = run_three_roles(weights, "a question", 3, owner_options=options, timeout=5)
    assert isinstance(errors.get("owner"), ProtocolError) and "query budget exhausted" in str(errors["owner"])
    assert isinstance(errors.get("user"), ProtocolError), errors
    assert positions == 14
    assert str(errors["user"]) == (
        "owner ended the session: query budget exhausted: this user key has used 14 of "
        "its 20 positions and asks for 14 more"
    )
    assert isinstance(errors.get("helper"), ProtocolError), errors
    assert "the owner refused the session: query budget exhausted" in str(errors["helper"])
    assert printed == "" and "user" not in reports
    assert budget.usage("user-key-1") == {"sessions": 1, "positions": positions}


@pytest.mark.processes
@pytest.mark.parametrize(
    "options,message",
    [
        (["--max-sessions-per-key", "3"], "need --budget-file PATH"),
        (["--budget-file", "{tmp}/b.json"], "needs --max-sessions-per-key or --max-positions-per-key"),
        (["--budget-file", "{tmp}/b.json", "--max-positions-per-key", "0"], "at least 1"),
    ],
)
def test_owner_budget_options_are_checked_before_any_work(tmp_path, options, message):
    import subprocess
    import sys
    import time

    from parties.launcher import free_ports

    a, b = free_ports(2)
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "parties.cli",
            "owner",
            "--listen-user",
            f"tcp://127.0.0.1:{a}",
            "--listen-helper",
            f"tcp://127.0.0.1:{b}",
            "--insecure",
            "--quiet",
            *[o.format(tmp=tmp_path) for o in options],
        ],
        capture_output=True,
        timeout=60,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "permllm owner: error:" in err and message in err, err[-800:]
    assert "Traceback" not in err and time.monotonic() - start < 30


def test_the_ledger_is_private_fsynced_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import os
    import stat

    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ledger = tmp_path / "b.json"
    ledger.write_text('{"version": 1, "keys": {}}')
    os.chmod(ledger, 0o644)
    QueryBudget(ledger, max_sessions=3).reserve("k", 5)
    assert stat.S_IMODE(os.stat(ledger).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "b.json.lock").st_mode) == 0o600
    assert synced == ["file", "folder"]  # the new file before the rename, the folder after it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.json.lock"]


def test_a_session_is_charged_to_the_key_the_channel_authenticated(tmp_path):
    """CURVE for real: the owner's server channel accepts the user's key; whatever key name the caller
    passes, ChargedToPeer charges the z85 public key the ZAP handler accepted for the hello."""
    from parties.budget import ChargedToPeer
    from parties.security import Curve, generate_keypair, load_public_key
    from parties.wire import recv_json, send_json
    from permllm.transport import ZmqChannel

    for role in ("owner", "user"):
        generate_keypair(tmp_path, role)
    owner = Curve(tmp_path / "owner.key", {"user": tmp_path / "user.pub"}, log=lambda msg: None)
    user = Curve(tmp_path / "user.key", {"owner": tmp_path / "owner.pub"})
    server = ZmqChannel.bind("tcp://127.0.0.1:0", peer="user", timeout=10, **owner.socket_options("user", True))
    client = ZmqChannel.connect(server.endpoint, peer="owner", timeout=10, **user.socket_options("owner", False))
    try:
        budget = ChargedToPeer(QueryBudget(tmp_path / "b.json", max_sessions=1), server)
        assert server.peer_user_id is None
        with pytest.raises(ProtocolError, match="no authenticated CURVE key"):
            budget.reserve("configured-name", 3)  # nothing received yet: no key to charge, so no session
        send_json(client, "hello", {"n": 1})
        assert recv_json(server, "hello") == {"n": 1}
        budget.reserve("configured-name", 3)
    finally:
        for c in (client, server, owner, user):
            c.close()
    user_key = load_public_key(tmp_path / "user.pub").decode("ascii")
    assert server.peer_user_id == user_key
    assert budget.usage(user_key) == {"sessions": 1, "positions": 3}
    assert budget.usage("configured-name") == {"sessions": 0, "positions": 0}


def test_an_insecure_channel_has_no_authenticated_key():
    from permllm.transport import ZmqChannel

    server = ZmqChannel.bind("tcp://127.0.0.1:0", peer="user", timeout=5)
    client = ZmqChannel.connect(server.endpoint, peer="owner", timeout=5)
    try:
        client.send("hello", b"x")
        assert server.recv_bytes("hello", max_len=8) == b"x"
        assert server.peer_user_id is None
    finally:
        client.close()
        server.close()
