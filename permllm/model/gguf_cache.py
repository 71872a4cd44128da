"""What transformers rebuilds from a GGUF file, kept after its first use.

Reading a GGUF file is slow: the `gguf` reader walks the 49k-entry vocabulary element by element to
rebuild the tokenizer and the model config, and transformers' loading of the weights (name mapping,
dequantization) takes longer still (the README gives the times). Every party loads one of them in every
session. Each is saved once under ``$PERMLLM_CACHE_DIR`` (default ``~/.cache/permllm``) / KIND /
NAME-DIGEST and read back far faster. The digest covers the file's resolved path, size and
modification time, so a changed file gets a new entry.

Kinds: ``configs`` and ``tokenizers`` (public metadata, read by every party) and ``checkpoints`` (the
dequantized float32 weights as a plain transformers checkpoint, config.json + model.safetensors; only
a process that loads the weights writes one: the owner, on its own disk beside the GGUF file it
already holds, or a driver that plays the owner in-process). Entries are folders of mode 0700.
``PERMLLM_WEIGHT_CACHE=0`` turns the ``checkpoints`` kind off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

CACHE_ENV = "PERMLLM_CACHE_DIR"
WEIGHT_CACHE_ENV = "PERMLLM_WEIGHT_CACHE"
_OFF = ("0", "off", "no", "false")

T = TypeVar("T")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "permllm"))


def weight_cache_enabled() -> bool:
    """False when ``$PERMLLM_WEIGHT_CACHE`` is 0/off/no/false: the weights are then read from the GGUF
    file every time and never written elsewhere."""
    return os.environ.get(WEIGHT_CACHE_ENV, "").strip().lower() not in _OFF


def entry_folder(gguf: Path, kind: str) -> Path | None:
    """The cache folder of ``kind`` (e.g. "tokenizers") for a GGUF file; None when the file cannot be read."""
    try:
        stat = gguf.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / kind / f"{gguf.stem}-{key}"


def _save_pretrained(obj, folder: str) -> None:
    obj.save_pretrained(folder)


def cached(
    gguf: Path,
    kind: str,
    build: Callable[[], T],
    load: Callable[[str], T],
    save: Callable[[T, str], None] = _save_pretrained,
    *,
    enabled: bool = True,
) -> T:
    """``load(folder)`` of the cache entry when there is a whole one, else ``build()``, written into the
    cache with ``save(obj, folder)`` (default ``obj.save_pretrained``). ``enabled=False``: ``build()``,
    the cache neither read nor written.

    An entry that fails to load (cut short, edited: whatever ``load`` raises) is removed and rebuilt. An
    entry is written into a fresh folder and renamed into place, so a reader never sees a half-written
    one and of two processes writing at once one wins. A cache that cannot be written (no space, read-only
    disk) is skipped, not an error; what was half written is removed."""
    folder = entry_folder(gguf, kind) if enabled else None
    if folder is not None and folder.is_dir():
        try:
            return load(str(folder))
        except Exception:  # a damaged entry is only a cache miss
            shutil.rmtree(folder, ignore_errors=True)
    built = build()
    if folder is not None:
        _write(built, folder, save)
    return built


def _write(obj, folder: Path, save) -> None:
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))  # mode 0700
        save(obj, str(tmp))
        os.rename(tmp, folder)  # fails when another process was first: its entry stays
        tmp = None
    except Exception:  # noqa: BLE001 - a cache that cannot be written is skipped
        pass
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
