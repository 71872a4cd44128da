"""CURVE keys for the ZeroMQ channels: encryption and mutual authentication of every socket.

`permllm keygen --role ROLE --out DIR` writes ROLE.key (secret, mode 0600) and ROLE.pub (mode 0644).
Custody: each machine generates its own role's pair and only public keys are exchanged; a role refuses a
keys folder holding another role's secret key (whoever holds two roles' secrets can break
non-collusion) and a secret key that group or others may read. Binding sockets are CURVE
servers and only accept the peer key configured for them (checked by a ZAP handler: an unknown key
is refused and logged); connecting sockets are CURVE clients that know the server's public key.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import sys
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from permllm.errors import ConfigError

ROLES = ("owner", "user", "helper")
INSECURE_WARNING = (
    "WARNING: --insecure: the channels are NOT encrypted or authenticated. Anyone on the network path can "
    "read and alter every share. Use this only for local experiments."
)


def generate_keypair(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write NAME.key (z85 secret key, mode 0600) and NAME.pub (z85 public key, mode 0644) into out_dir.
    Each file is written to a fresh O_EXCL temporary file with its final mode, fsynced and renamed over
    the old one, so a secret key is never readable by others, not even when it replaces an older file."""
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ConfigError(f"key name must be letters, digits, '-' or '_', got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    secret_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    write_atomically(secret_path, secret + b"\n", 0o600)
    write_atomically(public_path, public + b"\n", 0o644)
    return secret_path, public_path


def write_atomically(path: Path, data, mode: int) -> None:
    """Write `data` (bytes, or an iterable of buffers written in order) to `path` with exactly `mode`:
    a fresh temporary file (O_EXCL), fsynced, then renamed over `path`; removed again on failure."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may only have narrowed it; 0644 for a public key is deliberate
        with os.fdopen(fd, "wb") as f:
            for chunk in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_secret_key_custody(keys_dir: str | os.PathLike, role: str, roles=ROLES) -> Path:
    """ROLE.key in keys_dir, after checking the custody rules: no other role's secret key in the folder
    and no group or other access to this one. ConfigError naming the file and the fix otherwise."""
    folder = Path(keys_dir)
    for other in roles:
        foreign = folder / f"{other}.key"
        if other != role and foreign.exists():
            raise ConfigError(
                f"{foreign} is the {other}'s secret key, but this folder is the {role}'s: each role must hold "
                f"only its own secret key (whoever holds two roles' secrets can break non-collusion). Move "
                f"{foreign.name} to the {other}'s machine and keep only {role}.key and the peers' .pub files here"
            )
    secret = folder / f"{role}.key"
    try:
        mode = stat.S_IMODE(secret.stat().st_mode)
    except OSError as exc:
        raise ConfigError(
            f"cannot read the secret key {secret}: {exc.strerror} (make it with `permllm keygen --role {role} "
            f"--out {folder}`)"
        ) from None
    if mode & 0o077:
        raise ConfigError(
            f"the secret key {secret} is readable by group or others (mode {mode:04o}); run `chmod 600 {secret}`"
        )
    return secret


def _read_key(path: str | os.PathLike, what: str) -> bytes:
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None
    if len(key) != 40:
        raise ConfigError(f"{path} is not a z85 CURVE key (40 characters expected, found {len(key)})")
    try:
        zmq.utils.z85.decode(key)
    except (ValueError, KeyError):
        raise ConfigError(f"{path} is not a valid z85 CURVE key") from None
    return key


def load_secret_key(path) -> tuple[bytes, bytes]:
    """(public, secret) from a secret key file written by keygen."""
    secret = _read_key(path, "secret key")
    return zmq.curve_public(secret), secret


def load_public_key(path) -> bytes:
    return _read_key(path, "public key")


class _PeerKeys:
    """ZAP callback: each server socket (its ZAP domain is the peer's name, or a service's per-session
    name) accepts one key, or any key of a set that a callable returns at each handshake (a folder of
    authorised users, read again for every connection)."""

    def __init__(self, allowed: dict, log):
        self.allowed = allowed
        self.log = log

    def callback(self, domain, key) -> bool:
        expected = self.allowed.get(domain)
        if callable(expected):
            ok = key in expected()
        else:
            ok = expected is not None and key == expected
        if not ok:
            self.log(f"refused a connection on the {domain or '?'} socket: unknown CURVE key {key.decode()}")
        return ok


class Curve:
    """One process's CURVE identity, the peers' public keys and the ZAP handler for its servers."""

    def __init__(self, secret_key_path, peer_public_keys: dict[str, str | os.PathLike], log=None):
        self.public, self.secret = load_secret_key(secret_key_path)
        self.peers = {peer: load_public_key(path) for peer, path in peer_public_keys.items()}
        self.context = zmq.Context()
        self._auth = ThreadAuthenticator(self.context)
        self._auth.start()
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.peers_by_domain: dict = dict(self.peers)
        self._provider = _PeerKeys(self.peers_by_domain, log)
        for peer in self.peers:  # one ZAP domain per server socket, named after its peer
            self._auth.configure_curve_callback(peer, credentials_provider=self._provider)

    def socket_options(self, peer: str, binding: bool) -> dict:
        """Options for ZmqChannel.bind/connect towards `peer`."""
        if peer not in self.peers:
            raise ConfigError(f"no public key given for the {peer}")
        if binding:
            # sockets take their ZAP domain from the context's default at creation: the next
            # socket (this channel's) authenticates against this peer's key only
            return self.server_options(peer)
        return self.client_options(self.peers[peer])

    def allow(self, domain: str, keys) -> None:
        """Server sockets made after `bind_domain(domain)` accept `keys`: one z85 key (bytes) or a
        callable returning the set of accepted z85 keys (called at every handshake)."""
        self.peers_by_domain[domain] = keys
        self._auth.configure_curve_callback(domain, credentials_provider=self._provider)

    def forget(self, domain: str) -> None:
        """Stop accepting anything on `domain` (a session that has ended)."""
        self.peers_by_domain.pop(domain, None)

    def server_options(self, domain: str) -> dict:
        """Options for a CURVE-server ZmqChannel (or socket) authenticated in ZAP domain `domain`.
        Call from the one thread that creates this context's server sockets."""
        self.context.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        return {"context": self.context, "curve_server": True, "curve_secret_key": self.secret}

    def client_options(self, server_key: bytes) -> dict:
        """Options for a CURVE-client ZmqChannel towards a server whose z85 public key is `server_key`."""
        return {
            "context": self.context,
            "curve_server_key": server_key,
            "curve_public_key": self.public,
            "curve_secret_key": self.secret,
        }

    def close(self, term_timeout_s: float = 15.0) -> None:
        """Stop the ZAP handler and terminate the context, waiting at most `term_timeout_s` (a service's
        sessions still running get ETERM and close their sockets)."""
        import threading

        if getattr(self, "_closed", False):
            return
        self._closed = True
        self._auth.stop()
        done = threading.Event()

        def term():
            self.context.term()
            done.set()

        threading.Thread(target=term, name="zmq-term", daemon=True).start()
        done.wait(term_timeout_s)


def authorised_keys(users_dir: str | os.PathLike | None, single: str | os.PathLike | None = None) -> set[bytes]:
    """The z85 public keys a service accepts from users: every *.pub file of `users_dir` (read now, so a
    key added to or removed from the folder counts from the next connection on), plus the `single` key
    file when it exists (a keys folder's user.pub: one authorised user, the shorthand). Unreadable or
    malformed files are skipped (a service must not stop over one bad file) but named on stderr."""
    keys = set()
    paths = sorted(Path(users_dir).glob("*.pub")) if users_dir is not None else []
    if single is not None and Path(single).exists():
        paths.append(Path(single))
    for path in paths:
        try:
            keys.add(load_public_key(path))
        except ConfigError as exc:
            print(f"skipping an authorised-user key: {exc}", file=sys.stderr, flush=True)
    return keys
