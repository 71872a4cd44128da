"""Prompt input (--prompt TEXT, --prompt -, --prompt-file), the demo handing the prompt to the user role
through a private file, model pinning with --expect-fingerprint, and one-line errors for the unexpected."""

from __future__ import annotations

import functools
import io
import os
import stat
import sys
import types

import pytest

from parties import launcher
from parties.cli import build_parser, main
from parties.cli_options import read_prompt
from permllm.errors import ConfigError, ProtocolError

SECRET = "what is my salary of 123456 in euros?"


def _user_args(*extra):
    return build_parser().parse_args(
        ["user", "--owner", "tcp://127.0.0.1:1", "--listen-helper", "tcp://127.0.0.1:2", *extra]
    )


def test_prompt_from_a_file_from_stdin_and_from_the_command_line(tmp_path, monkeypatch):
    path = tmp_path / "q.txt"
    path.write_bytes(("  café ☕\nsecond line\n\n").encode())
    assert read_prompt(_user_args("--prompt-file", str(path))) == "  café ☕\nsecond line"
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(b"from stdin\r\n")))
    assert read_prompt(_user_args("--prompt", "-")) == "from stdin"
    assert read_prompt(_user_args("--prompt", "plain")) == "plain"
    assert read_prompt(_user_args()) is None


def test_bad_prompt_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xff\xfe")
    with pytest.raises(ConfigError, match="the prompt is not valid UTF-8"):
        read_prompt(_user_args("--prompt-file", str(bad)))
    with pytest.raises(ConfigError, match=f"cannot read --prompt-file {tmp_path / 'missing'}: No such file"):
        read_prompt(_user_args("--prompt-file", str(tmp_path / "missing")))
    big = tmp_path / "big.txt"
    big.write_bytes(b"a" * ((1 << 20) + 1))
    with pytest.raises(ConfigError, match="longer than 1048576 bytes"):
        read_prompt(_user_args("--prompt-file", str(big)))
    with pytest.raises(SystemExit):
        _user_args("--prompt", "x", "--prompt-file", str(bad))
    assert "not allowed with argument" in capsys.readouterr().err


def _demo_args(*extra):
    return build_parser().parse_args(["demo", "--network", "none", *extra])


@pytest.mark.parametrize("insecure", [True, False])
def test_the_demo_never_puts_the_prompt_on_a_command_line(tmp_path, insecure):
    args = _demo_args("--prompt", SECRET, *(["--insecure"] if insecure else []))
    commands = launcher.role_commands(args, [5001, 5002, 5003], tmp_path)
    for role, argv in commands.items():
        assert not any(SECRET in a or "123456" in a for a in argv), (role, argv)
        assert "--prompt" not in argv
    user = commands["user"]
    path = user[user.index("--prompt-file") + 1]
    assert open(path, encoding="utf-8").read() == SECRET
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.path.dirname(path) == str(tmp_path)
    assert ("--expect-fingerprint" in user) is False  # nothing pinned unless asked


def test_the_demo_passes_a_pinned_fingerprint_on(tmp_path):
    args = _demo_args("--insecure", "--expect-fingerprint", "AB" * 32)
    user = launcher.role_commands(args, [5001, 5002, 5003], tmp_path)["user"]
    assert user[user.index("--expect-fingerprint") + 1] == "ab" * 32


def test_a_malformed_fingerprint_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        _user_args("--expect-fingerprint", "12zz")
    assert "--expect-fingerprint must be 64 hex digits" in capsys.readouterr().err


def test_the_weights_digest_covers_every_tensor():
    from parties.pinning import weights_digest
    from tests.tiny_model import tiny_decoder

    weights = tiny_decoder(seed=3)
    digest = weights_digest(weights)
    assert digest == weights_digest(tiny_decoder(seed=3)) and len(digest) == 64
    weights.layers[-1].w_down[0, 0] += 1e-3
    assert weights_digest(weights) != digest
    other = tiny_decoder(seed=3)
    other.final_norm[-1] = -other.final_norm[-1]
    assert weights_digest(other) not in (digest, weights_digest(weights))


class _Recording:
    """A channel end that records the tags of the messages it received."""

    def __init__(self, inner, tags):
        self._inner, self.tags = inner, tags

    def recv_bytes(self, tag, *a, **k):
        message = self._inner.recv_bytes(tag, *a, **k)
        self.tags.append(tag)
        return message

    def recv(self, tag, *a, **k):
        message = self._inner.recv(tag, *a, **k)
        self.tags.append(tag)
        return message

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _pinned_session(monkeypatch, weights, expect):
    import parties.roles as roles
    from tests.three_roles import run_three_roles

    received = {"owner": [], "helper": []}
    monkeypatch.setattr(roles, "UserRequest", functools.partial(roles.UserRequest, expect_fingerprint=expect))

    def wrap(channel, receiver):
        return _Recording(channel, received[receiver]) if receiver in received and channel.peer == "user" else channel

    reports, errors, _ = run_three_roles(weights, "a question", 2, wrap=wrap, timeout=10)
    return reports, errors, received


def test_a_pinned_fingerprint_runs_the_session_and_a_wrong_one_stops_before_any_share(monkeypatch):
    from parties.families import family
    from parties.models import fingerprint
    from parties.pinning import model_fingerprint, weights_digest
    from tests.tiny_model import tiny_decoder

    weights = tiny_decoder(seed=4)
    arch = family("smollm2").arch_from_config(weights.config).to_dict()
    pin = model_fingerprint({"fingerprint": fingerprint("smollm2", arch), "weights_digest": weights_digest(weights)})
    reports, errors, received = _pinned_session(monkeypatch, weights, pin)
    assert not errors, errors
    assert reports["user"]["generated_tokens"] == 2
    # past the welcome: the online phase ran (the table selection sends no BFV context)
    assert received["owner"][0] == "hello" and "lin.embed" in received["owner"] and "user-plan" in received["helper"]

    wrong = "0" * 64
    reports, errors, received = _pinned_session(monkeypatch, weights, wrong)
    assert isinstance(errors.get("user"), ProtocolError), errors
    assert str(errors["user"]) == (
        f"the owner serves a different model: its fingerprint is {pin}, --expect-fingerprint is {wrong}; "
        "the session stopped before any share of the prompt was sent"
    )
    assert received["owner"] == ["hello"]  # the owner got the hello (the prompt's length), then nothing
    assert received["helper"] == []


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    import parties.security as security

    def broken(out_dir, name):
        raise RuntimeError("the disk said no\nsecond line")

    monkeypatch.setattr(security, "generate_keypair", broken)
    monkeypatch.delenv("PERMLLM_DEBUG", raising=False)
    assert main(["keygen", "--role", "user", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == (
        "permllm keygen: error: unexpected RuntimeError: the disk said no "
        "(run with --debug or PERMLLM_DEBUG=1 for the traceback)\n"
    )
    assert main(["keygen", "--role", "user", "--out", str(tmp_path), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith("for the traceback)")
    monkeypatch.setenv("PERMLLM_DEBUG", "1")
    assert main(["keygen", "--role", "user", "--out", str(tmp_path)]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["helper", "--keys", "k", "--owner", "tcp://127.0.0.1:1", "--user", "u"],  # not --users
        ["demo", "--session", "2"],  # not --sessions
        ["owner", "--keys", "k", "--listen-user", "tcp://*:1", "--listen-helper", "tcp://*:2", "--max-conc", "3"],
    ],
)
def test_an_abbreviated_option_is_refused_not_guessed(argv, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "unrecognized arguments" in capsys.readouterr().err
