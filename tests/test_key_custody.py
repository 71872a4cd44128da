"""Key custody (parties/security.py): one role's pair per `permllm keygen`, modes that never let others read a
secret key, and roles that refuse a keys folder holding another role's secret or a readable secret key."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from parties.launcher import role_key_folders
from parties.security import check_secret_key_custody, generate_keypair, load_public_key, load_secret_key
from permllm.errors import ConfigError


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_keygen_modes_and_no_leftover_temporary_files(tmp_path):
    old_umask = os.umask(0)  # the modes are set explicitly, not left to the umask
    try:
        secret, public = generate_keypair(tmp_path, "owner")
    finally:
        os.umask(old_umask)
    assert (_mode(secret), _mode(public)) == (0o600, 0o644)
    assert load_secret_key(secret)[0] == load_public_key(public)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["owner.key", "owner.pub"]


def test_keygen_over_a_world_readable_secret_key_leaves_it_private(tmp_path):
    old = tmp_path / "user.key"
    old.write_bytes(b"x" * 40 + b"\n")
    os.chmod(old, 0o644)
    before = os.stat(old).st_ino
    generate_keypair(tmp_path, "user")
    assert _mode(old) == 0o600
    assert os.stat(old).st_ino != before  # a new file renamed over the old one, not the old one rewritten
    assert old.read_bytes() != b"x" * 40 + b"\n"


@pytest.mark.processes
def test_keygen_command_writes_one_role(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "parties.cli", "keygen", "--role", "helper", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["helper.key", "helper.pub"]
    bad = subprocess.run(
        [sys.executable, "-m", "parties.cli", "keygen", "--role", "mallory", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "invalid choice: 'mallory'" in bad.stderr


def test_a_folder_with_another_roles_secret_key_is_refused(tmp_path):
    generate_keypair(tmp_path, "user")
    assert check_secret_key_custody(tmp_path, "user") == tmp_path / "user.key"
    generate_keypair(tmp_path, "owner")
    with pytest.raises(ConfigError) as refused:
        check_secret_key_custody(tmp_path, "user")
    message = str(refused.value)
    assert str(tmp_path / "owner.key") in message and "the owner's secret key" in message
    assert "non-collusion" in message


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_secret_key_readable_by_others_is_refused_with_the_fix(tmp_path, mode):
    secret, _ = generate_keypair(tmp_path, "helper")
    os.chmod(secret, mode)
    with pytest.raises(ConfigError, match=f"readable by group or others \\(mode {mode:04o}\\); run `chmod 600 "):
        check_secret_key_custody(tmp_path, "helper")
    os.chmod(secret, 0o400)  # read-only for its owner is fine
    assert check_secret_key_custody(tmp_path, "helper") == secret


def test_a_missing_secret_key_names_the_keygen_command(tmp_path):
    with pytest.raises(ConfigError, match="permllm keygen --role owner"):
        check_secret_key_custody(tmp_path, "owner")


@pytest.mark.processes
def test_a_role_process_refuses_a_shared_keys_folder_before_opening_sockets(tmp_path):
    for role in ("owner", "user", "helper"):
        generate_keypair(tmp_path, role)
    proc = subprocess.run(
        [sys.executable, "-m", "parties.cli", "helper", "--keys", str(tmp_path)]
        + ["--owner", "tcp://127.0.0.1:1", "--setup-timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"permllm helper: error: {tmp_path / 'owner.key'} is the owner's secret key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_demo_gives_each_role_its_own_folder(tmp_path):
    folders = role_key_folders(tmp_path / "keys")
    publics = {role: load_secret_key(folder / f"{role}.key")[0] for role, folder in folders.items()}
    for role, folder in folders.items():
        peers = sorted(set(folders) - {role})
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [f"{role}.key", f"{role}.pub"] + [f"{p}.pub" for p in peers]
        )
        assert check_secret_key_custody(folder, role) == folder / f"{role}.key"
        for peer in peers:
            assert load_public_key(folder / f"{peer}.pub") == publics[peer]
