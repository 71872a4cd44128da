"""The models a session can run, as the roles see them: the owner loads weights, the user only a
tokenizer (the tokenizer and chat template are public; the weights never reach the user)."""

from __future__ import annotations

import hashlib
import json
import os

from permllm.errors import ConfigError

MODELS = ("smollm2", "minilm")
PROTOCOL_VERSION = 1


def load_tokenizer(model: str):
    """The public tokenizer of a bundled model, without loading its weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from permllm.model.loading import SMOLLM2_GGUF, find_minilm_dir, find_smollm2_gguf

    if model == "smollm2":
        path = find_smollm2_gguf()
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=SMOLLM2_GGUF, local_files_only=True)
    if model == "minilm":
        return AutoTokenizer.from_pretrained(str(find_minilm_dir()), local_files_only=True)
    raise ConfigError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")


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
        raise ConfigError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    return int(config.max_position_embeddings)
