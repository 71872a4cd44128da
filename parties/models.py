"""The models a session can run, as the roles see them: the owner loads weights, the user only a
tokenizer (the tokenizer and chat template are public; the weights never reach the user).

A model is named by a spec: a bundled model (`smollm2`, `minilm`) or the path of any Llama-style
checkpoint on disk, a `.gguf` file or a folder with `config.json` and the tokenizer files. A path's
public name in the handshake is `llama:` plus its file or folder name, so the owner and the user may
keep the checkpoint at different paths; the helper needs only the name."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from permllm.errors import ConfigError

MODELS = ("smollm2", "minilm")
PROTOCOL_VERSION = 1
CHECKPOINT_PREFIX = "llama:"


def check_model_spec(spec: str) -> str:
    """A bundled model name or an existing Llama-style checkpoint path; ConfigError otherwise."""
    if spec in MODELS:
        return spec
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf" or path.is_dir() and (path / "config.json").is_file():
        return spec
    raise ConfigError(f"unknown model {spec!r}: give one of {', '.join(MODELS)}, a .gguf file or a folder "
                      "with config.json (a Llama-style checkpoint)")


def model_name(spec: str) -> str:
    """The public name of a model spec in the handshake."""
    return spec if spec in MODELS else CHECKPOINT_PREFIX + Path(spec).name


def _checkpoint(spec: str) -> tuple[str, dict]:
    """(folder, from_pretrained options) of a checkpoint path."""
    path = Path(check_model_spec(spec))
    if path.is_file():
        return str(path.parent), {"gguf_file": path.name, "local_files_only": True}
    return str(path), {"local_files_only": True}


def load_tokenizer(model: str):
    """The public tokenizer of a model spec, without loading its weights. A tokenizer read from a GGUF
    file (which transformers rebuilds from the file's vocabulary, ~10-20 s here) is saved once in the
    tokenizer cache and read from there (~1 s) afterwards."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from permllm.model.loading import SMOLLM2_GGUF, find_minilm_dir, find_smollm2_gguf

    if model == "minilm":
        return AutoTokenizer.from_pretrained(str(find_minilm_dir()), local_files_only=True)
    if model == "smollm2":
        folder, options = str(find_smollm2_gguf().parent), {"gguf_file": SMOLLM2_GGUF, "local_files_only": True}
    else:
        folder, options = _checkpoint(model)
    if "gguf_file" not in options:
        return AutoTokenizer.from_pretrained(folder, **options)
    gguf = Path(folder) / options["gguf_file"]
    cached = _tokenizer_cache(gguf)
    if cached is not None and (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        except (OSError, ValueError):  # a damaged cache is rebuilt from the GGUF file
            import shutil

            shutil.rmtree(cached, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    if cached is not None:
        _save_to_cache(tokenizer, cached)
    return tokenizer


TOKENIZER_CACHE_ENV = "PERMLLM_CACHE_DIR"


def _tokenizer_cache(gguf: Path) -> Path | None:
    """The cache folder of a GGUF file's tokenizer: $PERMLLM_CACHE_DIR (default ~/.cache/permllm) /
    tokenizers / NAME-DIGEST, the digest over the file's path, size and modification time; None when no
    cache folder can be named."""
    root = os.environ.get(TOKENIZER_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "permllm")
    try:
        stat = gguf.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(root) / "tokenizers" / f"{gguf.stem}-{key}"


def _save_to_cache(tokenizer, folder: Path) -> None:
    """Save into a fresh folder, then rename it into place: readers never see a half-written cache, and
    of two processes saving at once one wins. A cache that cannot be written is skipped."""
    import shutil
    import tempfile

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process was first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass


def fingerprint(model: str, arch: dict) -> str:
    """Identifies the public model card (name and architecture), never the weights."""
    card = json.dumps({"model": model, "arch": arch}, sort_keys=True).encode()
    return hashlib.sha256(card).hexdigest()[:32]


def max_positions(model: str) -> int:
    """The context length from the model's public config (read without loading the weights)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    from permllm.model.loading import SMOLLM2_GGUF, find_minilm_dir, find_smollm2_gguf

    if model == "smollm2":
        config = AutoConfig.from_pretrained(str(find_smollm2_gguf().parent), gguf_file=SMOLLM2_GGUF, local_files_only=True)
    elif model == "minilm":
        config = AutoConfig.from_pretrained(str(find_minilm_dir()), local_files_only=True)
    else:
        folder, options = _checkpoint(model)
        config = AutoConfig.from_pretrained(folder, **options)
    return int(config.max_position_embeddings)
