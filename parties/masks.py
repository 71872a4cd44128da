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
removed and fetched again. The user never holds all of W - U: it writes each block to the entry's
file as it arrives (to an unnamed private temporary file when it keeps no cache), checks the digest
while reading it, and later reads it back one weight, by row blocks, at a time (`MaskedFile`) to
precompute its linear shares (`protocols.linear.precompute_weight_terms`); online it holds no W - U.

Session messages (after the welcome, which names the epoch):
  user -> owner   "cache" {"digest": the digest of the user's entry for that key, or ""}
  owner -> user   "prepare" {"send": false} when it equals the owner's digest (0 preparation bytes),
                  else {"send": true}, every W - U as row blocks (`w.NAME`, int64 (rows, d_out), at most
                  8 MB each, in order), then "prepare-end" {"digest": D}, which the user checks before
                  it keeps the entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from parties.security import write_atomically
from permllm.errors import ConfigError
from permllm.prg import fresh_seed

STATE_VERSION = 1


class MaskedDigest:
    """The incremental `masked_digest`: `begin(name, shape)` for each weight, then its int64 bytes
    in order with `update` (whole or by row blocks: the same digest)."""

    def __init__(self):
        self._hash = hashlib.blake2b(digest_size=32)

    def begin(self, name: str, shape) -> None:
        self._hash.update(f"{name}\t{tuple(int(d) for d in shape)}\n".encode())

    def update(self, block) -> None:
        self._hash.update(memoryview(np.ascontiguousarray(np.asarray(block, dtype=np.int64))).cast("B"))

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def masked_digest(items) -> str:
    """BLAKE2b-256 (hex) of (name, array) pairs in order: each name, shape and the int64 bytes."""
    digest = MaskedDigest()
    for name, array in items:
        a = np.asarray(array, dtype=np.int64)
        digest.begin(name, a.shape)
        digest.update(a)
    return digest.hexdigest()


READ_BLOCK_ELEMENTS = 1 << 21
"""Entries per row block when W - U is read back from its file (16 MB of int64)."""


class MaskedFile:
    """W - U of every weight as one raw int64 file, weights in `shapes` order (name -> (d_in, d_out, ...)),
    read back by row blocks. file: an open binary file (kept open; `close` closes it)."""

    def __init__(self, file, shapes: dict):
        self.file = file
        self.layout, at = {}, 0
        for name, (d_in, d_out, *_) in shapes.items():
            self.layout[name] = (at, d_in, d_out)
            at += d_in * d_out * 8
        self.nbytes = at

    def blocks(self, name: str, elements: int = READ_BLOCK_ELEMENTS):
        """(i, j, rows i:j of W - U as an int64 tensor) for weight `name`, about `elements` entries each."""
        import torch

        offset, d_in, d_out = self.layout[name]
        step = max(1, elements // max(d_out, 1))
        for i in range(0, d_in, step):
            j = min(d_in, i + step)
            block = np.empty((j - i, d_out), dtype=np.int64)
            _read_exactly(self.file, block, offset + i * d_out * 8)
            yield i, j, torch.from_numpy(block)

    def whole(self, name: str):
        """The whole W - U of `name` (int64 tensor)."""
        import torch

        _, d_in, d_out = self.layout[name]
        out = torch.empty((d_in, d_out), dtype=torch.int64)
        for i, j, block in self.blocks(name):
            out[i:j] = block
        return out

    def digest(self) -> str:
        """`masked_digest` of the file's bytes, read by blocks (OSError when the file is short)."""
        digest = MaskedDigest()
        for name, (_, d_in, d_out) in self.layout.items():
            digest.begin(name, (d_in, d_out))
            for _, _, block in self.blocks(name):
                digest.update(block.numpy())
        return digest.hexdigest()

    def close(self) -> None:
        self.file.close()


def _read_exactly(file, array: np.ndarray, offset: int) -> None:
    view, done = memoryview(array).cast("B"), 0
    while done < view.nbytes:
        n = os.preadv(file.fileno(), [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"{file.name}: ends before byte {offset + view.nbytes}")
        done += n


def private_scratch_file():
    """An unnamed temporary file only this process can open (removed when closed): where a user
    without a cache keeps the W - U it receives until it has precomputed its shares."""
    return tempfile.TemporaryFile(prefix="permllm-masked-")


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

    def open(self, key: tuple, shapes: dict) -> tuple[str, MaskedFile] | None:
        """(digest, the entry's `MaskedFile`) for `key` when the entry is whole, matches `shapes`
        (name -> (d_in, d_out, ...)) and its bytes give its digest (checked reading a block at a time);
        None otherwise (a damaged entry is removed)."""
        data_path, meta_path = self._paths(key)
        if not (data_path.exists() and meta_path.exists()):
            return None
        entry = None
        try:
            meta = json.loads(meta_path.read_text())
            want = [[d_in, d_out] for d_in, d_out, *_ in shapes.values()]
            if meta.get("key") != list(map(str, key)) or meta["shapes"] != want:
                raise ValueError("another layout")
            entry = MaskedFile(open(data_path, "rb"), shapes)
            if os.fstat(entry.file.fileno()).st_size != entry.nbytes or entry.digest() != meta["digest"]:
                raise ValueError("damaged")
        except (OSError, ValueError, KeyError, TypeError):
            if entry is not None:
                entry.close()
            data_path.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            return None
        return meta["digest"], entry

    def load(self, key: tuple, shapes: dict) -> tuple[str, dict] | None:
        """(digest, name -> int64 array) of the entry for `key`, read whole (see `open`)."""
        opened = self.open(key, shapes)
        if opened is None:
            return None
        digest, entry = opened
        try:
            return digest, {name: entry.whole(name).numpy() for name in shapes}
        finally:
            entry.close()

    def store(self, key: tuple, arrays: dict, digest: str) -> None:
        self.store_stream(key, [[a.shape, a] for a in arrays.values()], lambda: digest)

    def store_stream(self, key: tuple, weights, digest) -> None:
        """Write an entry from `weights`: [shape, an array or an iterable of its row blocks] pairs in
        order (consumed as written: a block need not exist before the last one is written). digest():
        the entry's digest, asked once every block is on disk (it may raise: the entry is then removed)."""
        data_path, meta_path = self._paths(key)
        meta_path.unlink(missing_ok=True)  # never a description of bytes that are not there yet
        shapes = []

        def chunks():
            for shape, blocks in weights:
                shapes.append([int(d) for d in shape])
                for block in [blocks] if isinstance(blocks, np.ndarray) else blocks:
                    block = np.ascontiguousarray(block, dtype=np.int64)
                    if block.size:
                        yield memoryview(block).cast("B")

        _write_private(data_path, chunks())
        try:
            meta = {"key": list(map(str, key)), "shapes": shapes, "digest": digest()}
        except BaseException:
            data_path.unlink(missing_ok=True)
            raise
        _write_private(meta_path, json.dumps(meta).encode())

    def data_file(self, key: tuple, shapes: dict) -> MaskedFile:
        """The entry's data file for reading back (after `store_stream`)."""
        return MaskedFile(open(self._paths(key)[0], "rb"), shapes)
