"""What transformers rebuilds from a GGUF file's metadata, kept after its first use.

Reading a GGUF file's metadata is slow here (the `gguf` reader walks the 49k-entry vocabulary element
by element): the tokenizer takes 10-20 s to rebuild and the model config ~10 s, and every party loads
one or the other in every session. Each is saved once with ``save_pretrained`` under
``$PERMLLM_CACHE_DIR`` (default ``~/.cache/permllm``) / KIND / NAME-DIGEST and read back in about a
second. The digest covers the file's resolved path, size and modification time, so a changed file gets
a new entry. Only public metadata is cached, never weights.
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

T = TypeVar("T")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "permllm"))


def entry_folder(gguf: Path, kind: str) -> Path | None:
    """The cache folder of ``kind`` (e.g. "tokenizers") for a GGUF file; None when the file cannot be read."""
    try:
        stat = gguf.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / kind / f"{gguf.stem}-{key}"


def cached(gguf: Path, kind: str, build: Callable[[], T], load: Callable[[str], T]) -> T:
    """``load(folder)`` of the cache entry when there is a whole one, else ``build()``, saved into the cache.

    An entry that fails to load (cut short, edited) is removed and rebuilt. An entry is written into a
    fresh folder and renamed into place, so a reader never sees a half-written one and of two processes
    writing at once one wins. A cache that cannot be written is skipped, not an error."""
    folder = entry_folder(gguf, kind)
    if folder is not None and folder.is_dir():
        try:
            return load(str(folder))
        except (OSError, ValueError):
            shutil.rmtree(folder, ignore_errors=True)
    built = build()
    if folder is not None:
        _save(built, folder)
    return built


def _save(obj, folder: Path) -> None:
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
        obj.save_pretrained(str(tmp))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process was first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass
