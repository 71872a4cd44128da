"""Preparation once: the owner's long-lived weight-mask seeds and the user's cache of W - U.

Owner: the mask U of a session's weights comes from a seed per (user key, weights digest, epoch), made
by the cryptographic PRG the first time that user runs a session on those weights and kept in
`STATE/masks.json` (mode 0600, replaced atomically) with the digest of the W - U it gives; without a
state folder the seeds live as long as the process. `--rotate-masks` starts a new epoch: every seed is
forgotten, so every user fetches W - U again. Everything else of a session (dealer seeds, material,
permutations) stays fresh per session.

User: `MaskedCache` keeps W - U on disk (folder 0700, files 0600), one entry per (protocol version,
model fingerprint, weights digest, epoch): a raw int64 file of the weights in order and a JSON file with
their names, shapes and the digest (`masked_digest`). An entry whose bytes do not give its digest is
removed and fetched again.

Session messages (after the welcome, which names the epoch):
  user -> owner   "cache" {"digest": the digest of the user's entry for that key, or ""}
  owner -> user   "prepare" {"send": false} when it equals the owner's digest (0 preparation bytes),
                  else {"send": true}, every W - U, then "prepare-end" {"digest": D}, which the user checks
                  before it stores the entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np

from parties.security import write_atomically
from permllm.errors import ConfigError
from permllm.prg import fresh_seed

STATE_VERSION = 1


def masked_digest(items) -> str:
    """BLAKE2b-256 (hex) of (name, array) pairs in order: each name, shape and the int64 bytes."""
    digest = hashlib.blake2b(digest_size=32)
    for name, array in items:
        a = np.ascontiguousarray(np.asarray(array, dtype=np.int64))
        digest.update(f"{name}\t{a.shape}\n".encode())
        digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()


def _write_private(path: Path, data) -> None:
    write_atomically(path, data, 0o600)


def _private_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    return folder


class MaskSeeds:
    """The owner's mask seeds. folder: its state folder (None: in memory only); rotate: start a new epoch."""

    def __init__(self, folder: str | os.PathLike | None = None, *, rotate: bool = False):
        self.path = None if folder is None else _private_folder(Path(folder)) / "masks.json"
        self._lock = threading.Lock()
        self.epoch, self._seeds = 0, {}
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") != STATE_VERSION or type(data.get("epoch")) is not int:
                    raise ValueError("unknown layout")
                self.epoch, self._seeds = data["epoch"], dict(data["seeds"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"the mask state {self.path} is unreadable ({exc}); remove it to start afresh"
                ) from None
        if rotate:
            self.epoch, self._seeds = self.epoch + 1, {}
        self._store()

    def entry(self, user_key: str, weights_digest: str) -> tuple[bytes, int, str]:
        """(seed, epoch, digest of its W - U or "") for this user key and weights; a new seed the first time."""
        with self._lock:
            entry = self._seeds.setdefault(f"{user_key}|{weights_digest}", {"seed": fresh_seed().hex(), "digest": ""})
            self._store()
            return bytes.fromhex(entry["seed"]), self.epoch, entry["digest"]

    def remember_digest(self, user_key: str, weights_digest: str, digest: str) -> None:
        with self._lock:
            self._seeds[f"{user_key}|{weights_digest}"]["digest"] = digest
            self._store()

    def _store(self) -> None:
        if self.path is not None:
            data = {"version": STATE_VERSION, "epoch": self.epoch, "seeds": self._seeds}
            _write_private(self.path, json.dumps(data, indent=1, sort_keys=True).encode())


class MaskedCache:
    """The user's W - U entries in `folder`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = _private_folder(Path(folder))

    def _paths(self, key: tuple) -> tuple[Path, Path]:
        name = hashlib.sha256("|".join(map(str, key)).encode()).hexdigest()[:32]
        return self.folder / f"{name}.bin", self.folder / f"{name}.json"

    def load(self, key: tuple, shapes: dict) -> tuple[str, dict] | None:
        """(digest, name -> int64 array) of the entry for `key` when it is whole and matches `shapes`
        (name -> (d_in, d_out, ...)); None otherwise (a damaged entry is removed)."""
        data_path, meta_path = self._paths(key)
        if not (data_path.exists() and meta_path.exists()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            want = [(name, (d_in, d_out)) for name, (d_in, d_out, *_) in shapes.items()]
            if meta.get("key") != list(map(str, key)) or [tuple(s) for s in meta["shapes"]] != [s for _, s in want]:
                raise ValueError("another layout")
            flat = np.fromfile(data_path, dtype=np.int64)
            arrays, at = {}, 0
            for name, (d_in, d_out) in want:
                arrays[name] = flat[at : at + d_in * d_out].reshape(d_in, d_out)
                at += d_in * d_out
            if at != flat.size or masked_digest(arrays.items()) != meta["digest"]:
                raise ValueError("damaged")
        except (OSError, ValueError, KeyError, TypeError):
            data_path.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            return None
        return meta["digest"], arrays

    def store(self, key: tuple, arrays: dict, digest: str) -> None:
        data_path, meta_path = self._paths(key)
        meta_path.unlink(missing_ok=True)  # never a description of bytes that are not there yet
        _write_private(
            data_path, (memoryview(np.ascontiguousarray(a, dtype=np.int64)).cast("B") for a in arrays.values())
        )
        meta = {"key": list(map(str, key)), "shapes": [list(a.shape) for a in arrays.values()], "digest": digest}
        _write_private(meta_path, json.dumps(meta).encode())
