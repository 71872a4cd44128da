"""The owner and helper services: one of each, users with two different CURVE keys, sessions one after
another and at the same time over real ZeroMQ sockets on loopback (threads of this process, the tiny
decoder standing in for SmolLM2). Each session gets the tokens it gets alone, a user that dies
mid-decode ends only its own session, and the services stop on request with every session recorded."""

from __future__ import annotations

import io
import shutil
import threading

import pytest

from parties.launcher import free_ports
from tests.three_roles import TinyTokenizer
from tests.tiny_model import tiny_decoder

pytestmark = pytest.mark.timeout(600)

PROMPTS = {"alice": "a private question", "bob": "another one, a little longer"}
BUDGET = 4


class UserDied(Exception):
    pass


class DiesAfterFirstToken(io.StringIO):
    """The user's output: the user process 'dies' (its thread raises) once it has printed a token."""

    def write(self, text):
        if text.strip():
            raise UserDied("killed mid-decode")
        return super().write(text)


@pytest.fixture
def keys(tmp_path):
    from parties.security import generate_keypair

    folders = {r: tmp_path / r for r in ("owner", "helper", "alice", "bob")}
    pubs = {}
    for role in ("owner", "helper"):
        pubs[role] = generate_keypair(folders[role], role)[1]
    users = tmp_path / "users"
    users.mkdir()
    for name in ("alice", "bob"):
        public = generate_keypair(folders[name], "user")[1]
        shutil.copy(public, users / f"{name}.pub")
        for peer in ("owner", "helper"):
            shutil.copy(pubs[peer], folders[name] / f"{peer}.pub")
    shutil.copy(pubs["helper"], folders["owner"] / "helper.pub")
    shutil.copy(pubs["owner"], folders["helper"] / "owner.pub")
    return folders, users


class Services:
    """An owner service and a helper service in two threads; `stop()` ends both and returns their reports."""

    def __init__(self, keys, monkeypatch, *, max_concurrent=2):
        import permllm.model.loading as loading
        from parties.cli import build_parser

        folders, users = keys
        # a fresh copy per load: the owner frees the float weights it has encoded
        fresh = lambda name, tokenizer=True, dtype=None: (tiny_decoder(seed=4), None)  # noqa: E731
        monkeypatch.setattr(loading, "load_model", fresh)
        self.front, control = (f"tcp://127.0.0.1:{p}" for p in free_ports(2))
        common = ["--timeout", "20", "--setup-timeout", "60", "--users", str(users)]
        common += ["--max-concurrent", str(max_concurrent), "--quiet", "--drain-s", "20"]
        self.args = {
            "owner": build_parser().parse_args(
                ["owner", "--listen-user", self.front, "--listen-helper", control, "--keys", str(folders["owner"])]
                + common
            ),
            "helper": build_parser().parse_args(
                ["helper", "--owner", control, "--keys", str(folders["helper"])] + common
            ),
        }
        self.stop_event = threading.Event()
        self.reports, self.errors = {}, {}
        self.threads = [threading.Thread(target=self._run, args=(r,), daemon=True) for r in ("owner", "helper")]
        for t in self.threads:
            t.start()

    def _run(self, role):
        from parties.cli import PEERS, _authorised, _curve
        from parties.helper_service import serve_helper
        from parties.owner_service import serve_owner

        args = self.args[role]
        curve = _curve(args, role, PEERS[role])
        try:
            authorised = _authorised(args)
            if role == "owner":
                curve.allow("user", authorised)
                self.reports[role] = serve_owner(args, curve, lambda *a: None, stop=self.stop_event)
            else:
                args.timeout = max(args.timeout, args.setup_timeout)
                self.reports[role] = serve_helper(args, curve, authorised, lambda *a: None, stop=self.stop_event)
        except BaseException as exc:  # returned to the test
            self.errors[role] = exc
        finally:
            curve.close()

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(120)
        assert not any(t.is_alive() for t in self.threads), "a service did not stop"
        assert not self.errors, self.errors
        return self.reports


def run_user(keys, front: str, name: str, out=None, cache_dir=None) -> dict:
    """One user session by `name`'s key, as `permllm user` runs it. Returns the user's report."""
    from parties.cli import PEERS, _ask_for_session, _curve, build_parser
    from parties.owner_service import open_channel
    from parties.roles import UserRequest
    from parties.roles import run_user as run_user_role

    folders, _ = keys
    (listen,) = (f"tcp://127.0.0.1:{p}" for p in free_ports(1))
    args = build_parser().parse_args(
        ["user", "--owner", front, "--listen-helper", listen, "--keys", str(folders[name])]
        + ["--timeout", "20", "--setup-timeout", "60", "--quiet"]
    )
    curve = _curve(args, "user", PEERS["user"])
    opened = []
    try:
        raw_helper, helper = open_channel(listen, "helper", True, args, curve.socket_options("helper", True))
        opened.append(helper)
        owner_addr = _ask_for_session(args, raw_helper.endpoint, curve)
        owner = open_channel(owner_addr, "owner", False, args, curve.socket_options("owner", False))[1]
        opened.append(owner)
        request = UserRequest("smollm2", PROMPTS[name], BUDGET)
        return run_user_role(
            {"owner": owner, "helper": helper},
            request,
            TinyTokenizer(),
            progress=False,
            log=lambda *a: None,
            out=out or io.StringIO(),
            setup_timeout=60,
            cache_dir=cache_dir,
        )
    finally:
        for channel in opened:
            channel.close()
        curve.close()


def concurrently(*calls):
    results, errors = {}, {}

    def target(i, call):
        try:
            results[i] = call()
        except BaseException as exc:  # returned to the test
            errors[i] = exc

    threads = [threading.Thread(target=target, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    return results, errors


def test_two_users_at_once_get_their_tokens_and_a_dead_user_ends_only_its_session(keys, monkeypatch):
    services = Services(keys, monkeypatch)
    try:
        alone = {name: run_user(keys, services.front, name)["token_ids"] for name in ("alice", "bob")}
        assert all(len(tokens) >= 1 for tokens in alone.values())

        results, errors = concurrently(
            lambda: run_user(keys, services.front, "alice"), lambda: run_user(keys, services.front, "bob")
        )
        assert not errors, errors
        assert results[0]["token_ids"] == alone["alice"] and results[1]["token_ids"] == alone["bob"]

        # alice dies after her first token; bob's concurrent session is undisturbed
        results, errors = concurrently(
            lambda: run_user(keys, services.front, "alice", out=DiesAfterFirstToken()),
            lambda: run_user(keys, services.front, "bob"),
        )
        assert isinstance(errors.get(0), UserDied) and 1 not in errors, errors
        assert results[1]["token_ids"] == alone["bob"]

        # and the service goes on serving
        assert run_user(keys, services.front, "alice")["token_ids"] == alone["alice"]
    finally:
        reports = services.stop()
    owner_sessions = reports["owner"]["sessions"]
    assert len(owner_sessions) == 7
    failed = [s for s in owner_sessions if "error" in s]
    assert len(failed) == 1, failed  # alice's killed session, and only it
    keys_seen = {s["user_key"] for s in owner_sessions if "error" not in s}
    assert len(keys_seen) == 2  # charged to the two authenticated keys
    assert len(reports["helper"]["sessions"]) == 7


def test_an_unauthorised_key_gets_no_session(keys, monkeypatch, tmp_path):
    from parties.security import generate_keypair
    from permllm.errors import AuthenticationRefused

    folders, _ = keys
    mallory = tmp_path / "mallory"
    generate_keypair(mallory, "user")
    for peer in ("owner", "helper"):
        shutil.copy(folders["alice"] / f"{peer}.pub", mallory / f"{peer}.pub")
    folders["mallory"] = mallory
    PROMPTS["mallory"] = "let me in"
    services = Services(keys, monkeypatch)
    try:
        with pytest.raises(AuthenticationRefused, match="not among the owner's authorised users"):
            run_user(keys, services.front, "mallory")
    finally:
        reports = services.stop()
    assert reports["owner"]["sessions"] == []


def test_a_user_with_a_current_cache_gets_no_masked_weights(keys, monkeypatch, tmp_path):
    """Preparation once: the second session of a user key sends 0 W - U bytes and answers the same; a
    damaged cache entry is fetched again; another user key gets its own mask (its own W - U)."""
    cache = tmp_path / "cache"
    services = Services(keys, monkeypatch)
    try:
        first = run_user(keys, services.front, "alice", cache_dir=cache)
        second = run_user(keys, services.front, "alice", cache_dir=cache)
        assert first["prepare_bytes"] > 0 and second["prepare_bytes"] == 0
        assert second["token_ids"] == first["token_ids"]
        (entry,) = cache.glob("*.bin")
        assert entry.stat().st_mode & 0o777 == 0o600 and cache.stat().st_mode & 0o777 == 0o700
        data = bytearray(entry.read_bytes())
        data[100] ^= 1
        entry.write_bytes(bytes(data))
        third = run_user(keys, services.front, "alice", cache_dir=cache)
        assert third["prepare_bytes"] == first["prepare_bytes"] and third["token_ids"] == first["token_ids"]
        # bob's mask is his own: the entry alice left (same model, same epoch) is not current for him
        bob = run_user(keys, services.front, "bob", cache_dir=cache)
        assert bob["prepare_bytes"] == first["prepare_bytes"] and bob["token_ids"] != []
    finally:
        reports = services.stop()
    assert [s["prepare_bytes"] > 0 for s in reports["owner"]["sessions"]] == [True, False, True, True]


def test_a_second_session_is_served_from_the_helpers_pool_and_answers_alike(keys, monkeypatch):
    """The helper deals alice's next session while she decodes; her second session is served from it
    (the seeds come from the helper) and gets the tokens of the first, live-dealt one."""
    services = Services(keys, monkeypatch)
    try:
        first = run_user(keys, services.front, "alice")
        second = run_user(keys, services.front, "alice")
    finally:
        reports = services.stop()
    helper = reports["helper"]["sessions"]
    assert [(s["served_from_pool"], s["pool_depth"]) for s in helper] == [(False, 1), (True, 1)]
    assert second["token_ids"] == first["token_ids"] and first["token_ids"]
    assert second["material_left"] == first["material_left"]


def test_mask_seeds_persist_and_rotate(tmp_path):
    from parties.masks import MaskSeeds

    state = tmp_path / "state"
    seeds = MaskSeeds(state)
    seed, epoch, digest = seeds.entry("alice", "w1")
    assert epoch == 0 and digest == "" and (state / "masks.json").stat().st_mode & 0o777 == 0o600
    seeds.remember_digest("alice", "w1", "d")
    assert MaskSeeds(state).entry("alice", "w1") == (seed, 0, "d")  # kept across restarts
    assert MaskSeeds(state).entry("bob", "w1")[0] != seed and MaskSeeds(state).entry("alice", "w2")[0] != seed
    rotated = MaskSeeds(state, rotate=True).entry("alice", "w1")
    assert rotated[1] == 1 and rotated[0] != seed and rotated[2] == ""
