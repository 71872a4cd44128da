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
PROTOCOL_VERSION = 2  # 2: every material stream begins with the seed it was dealt from
CHECKPOINT_PREFIX = "llama:"


def check_model_spec(spec: str) -> str:
    """A bundled model name or an existing Llama-style checkpoint path; ConfigError otherwise."""
    if spec in MODELS:
        return spec
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf" or path.is_dir() and (path / "config.json").is_file():
        return spec
    raise ConfigError(
        f"unknown model {spec!r}: give one of {', '.join(MODELS)}, a .gguf file or a folder "
        "with config.json (a Llama-style checkpoint)"
    )


def model_name(spec: str) -> str:
    """The public name of a model spec in the handshake."""
    return spec if spec in MODELS else CHECKPOINT_PREFIX + Path(spec).name


def load_tokenizer(model: str):
    """The public tokenizer of a model spec, without loading its weights (a GGUF file's comes from the
    metadata cache after its first use: `permllm.model.gguf_cache`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from permllm.model.loading import find_minilm_dir, find_smollm2_gguf, load_decoder_tokenizer

    if model == "minilm":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(find_minilm_dir()), local_files_only=True)
    return load_decoder_tokenizer(find_smollm2_gguf() if model == "smollm2" else check_model_spec(model))


def fingerprint(model: str, arch: dict) -> str:
    """Identifies the public model card (name and architecture), never the weights."""
    card = json.dumps({"model": model, "arch": arch}, sort_keys=True).encode()
    return hashlib.sha256(card).hexdigest()[:32]


def max_positions(model: str) -> int:
    """The context length from the model's public config (read without loading the weights)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from permllm.model.loading import find_minilm_dir, find_smollm2_gguf, load_decoder_config

    if model == "minilm":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(find_minilm_dir()), local_files_only=True)
    else:
        config = load_decoder_config(find_smollm2_gguf() if model == "smollm2" else check_model_spec(model))
    return int(config.max_position_embeddings)
