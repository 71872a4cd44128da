"""CURVE on the ZeroMQ channels: key files, mutual authentication, refusal of unknown keys, CLI checks."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from parties.security import Curve, generate_keypair, load_public_key, load_secret_key
from permllm.errors import AuthenticationRefused, ChannelTimeout, ConfigError
from permllm.transport import ZmqChannel


@pytest.fixture()
def keys(tmp_path):
    for name in ("owner", "user", "mallory"):
        generate_keypair(tmp_path, name)
    return tmp_path


def test_keygen_writes_a_private_secret_key_and_a_public_key(keys):
    mode = stat.S_IMODE(os.stat(keys / "owner.key").st_mode)
    assert mode == 0o600
    public, _ = load_secret_key(keys / "owner.key")
    assert public == load_public_key(keys / "owner.pub")


def test_bad_key_files_are_clear_errors(tmp_path):
    (tmp_path / "bad.pub").write_text("not a key")
    with pytest.raises(ConfigError, match="not a z85 CURVE key"):
        load_public_key(tmp_path / "bad.pub")
    with pytest.raises(ConfigError, match="cannot read"):
        load_secret_key(tmp_path / "missing.key")


def _owner_user_channels(owner: Curve, user: Curve, timeout: float):
    """(owner's server channel towards the user, user's client channel towards the owner)."""
    server = ZmqChannel.bind("tcp://127.0.0.1:0", peer="user", timeout=timeout, **owner.socket_options("user", True))
    client = ZmqChannel.connect(server.endpoint, peer="owner", timeout=timeout, **user.socket_options("owner", False))
    return server, client


def test_known_peer_talks_and_unknown_key_is_refused(keys):
    logged = []
    owner = Curve(keys / "owner.key", {"user": keys / "user.pub"}, log=logged.append)
    user = Curve(keys / "user.key", {"owner": keys / "owner.pub"})
    mallory = Curve(keys / "mallory.key", {"owner": keys / "owner.pub"})
    channels = []
    try:
        server, client = _owner_user_channels(owner, user, timeout=3)
        channels += [server, client]
        client.send("hello", b"from the user")
        assert server.recv_bytes("hello") == b"from the user"

        server2, intruder = _owner_user_channels(owner, mallory, timeout=1)
        channels += [server2, intruder]
        intruder.send("hello", b"from mallory")
        with pytest.raises(ChannelTimeout):
            server2.recv_bytes("hello")
        mallory_public = load_public_key(keys / "mallory.pub").decode()
        assert any("unknown CURVE key" in line and mallory_public in line for line in logged)
        # the refused side learns it at once (libzmq reports the ZAP refusal to the client), not after
        # its timeout
        start = time.monotonic()
        with pytest.raises(AuthenticationRefused, match="peer 'owner' refused this party's CURVE key .ZAP status 400"):
            intruder.recv_bytes("welcome", timeout=30)
        assert time.monotonic() - start < 5
    finally:
        for ch in channels:
            ch.close()
        for c in (owner, user, mallory):
            c.close()


def test_a_wrong_server_key_times_out_saying_the_handshake_failed(keys):
    owner = Curve(keys / "owner.key", {"user": keys / "user.pub"})
    # the user was given mallory's public key as the owner's
    confused = Curve(keys / "user.key", {"owner": keys / "mallory.pub"})
    server, client = _owner_user_channels(owner, confused, timeout=3)
    try:
        client.send("hello", b"x")
        with pytest.raises(
            ChannelTimeout,
            match=r"waiting for tag 'welcome' from peer 'owner'; its CURVE handshake "
            r"failed \d+ times \(a wrong public key for the owner",
        ):
            client.recv_bytes("welcome", timeout=2)
    finally:
        for ch in (server, client):
            ch.close()
        for c in (owner, confused):
            c.close()


def _permllm(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "parties.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.processes
def test_roles_refuse_to_start_without_keys_or_insecure():
    proc = _permllm("helper", "--owner", "tcp://127.0.0.1:1")
    assert proc.returncode == 2
    assert "give --keys DIR" in proc.stderr and "--insecure" in proc.stderr


@pytest.mark.processes
def test_insecure_says_so_loudly():
    proc = _permllm(
        "helper",
        "--owner",
        "tcp://127.0.0.1:1",
        "--once",
        "--insecure",
        "--timeout",
        "0.5",
        "--setup-timeout",
        "0.5",
        "--quiet",
    )
    assert "WARNING: --insecure" in proc.stderr
    assert proc.returncode == 2  # nobody answers: a clear timeout error, no hang
    assert "timed out" in proc.stderr


@pytest.mark.processes
def test_keygen_command(tmp_path):
    proc = _permllm("keygen", "--role", "owner", "--out", str(tmp_path))
    assert proc.returncode == 0
    assert (tmp_path / "owner.key").exists() and (tmp_path / "owner.pub").exists()
