"""Map transformers configs and state dicts onto permllm's plain weight dataclasses.

Every tensor is checked by name and shape and copied to float64 in (in, out) layout; a missing,
mis-shaped or unused tensor, or an unsupported architecture variant, is a ConfigError naming it.
Nothing here reads a file except the small sentence-transformers JSON files of an encoder folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from permllm.errors import ConfigError
from permllm.model.weights import (
    DecoderConfig,
    DecoderLayerWeights,
    DecoderWeights,
    EncoderConfig,
    EncoderLayerWeights,
    EncoderWeights,
)


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


def _take(
    sd: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...], *, transpose: bool, dtype=torch.float64
) -> torch.Tensor:
    """Fetch ``name`` (HF layout ``shape``) as a fresh float64 tensor, transposed to (in, out) for linears.

    ``dtype=torch.float32`` (a lean load for a caller that drops the HF model at once): the checkpoint's
    own float32 tensor, not copied, and a transposed view for linears."""
    if name not in sd:
        raise ConfigError(f"checkpoint is missing tensor {name!r} (expected shape {tuple(shape)})")
    t = sd[name]
    if tuple(t.shape) != tuple(shape):
        raise ConfigError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype != torch.float64:
        t = t.detach().to(device="cpu", dtype=dtype)
        return t.T if transpose else t
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


def read_optional_json(path: Path):
    """The parsed JSON file, or None if it is missing or not JSON (optional sentence-transformers files)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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


def decoder_weights_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: DecoderConfig, *, dtype=torch.float64
) -> DecoderWeights:
    """Validate names/shapes of a Llama-style HF state dict and return float64 (in, out) weights
    (``dtype=torch.float32``: the state dict's own float32 tensors and views, see `_take`).

    Accepts keys with or without the ``model.`` prefix of ``*ForCausalLM``. Raises ConfigError naming the
    first missing or mis-shaped tensor, or listing unused tensors (e.g. biases).
    """
    sd = _strip_prefix(state_dict, ("model.",), "embed_tokens.weight")
    c = config
    d, q, kv, inter, vocab = c.hidden_size, c.q_dim, c.kv_dim, c.intermediate_size, c.vocab_size
    used: set[str] = set()

    def take(name, shape, transpose=False):
        used.add(name)
        return _take(sd, name, shape, transpose=transpose, dtype=dtype)

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
        lm_head = _take(head_sd, "lm_head.weight", (vocab, d), transpose=True, dtype=dtype)
    # the original (prefixed) lm_head key is not in sd after stripping; nothing else may be left over
    _check_no_extras(sd, used, ignore_suffixes=("rotary_emb.inv_freq",))
    return DecoderWeights(config=c, embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)


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
        st = read_optional_json(d / "sentence_bert_config.json") or {}
        max_seq_length = st.get("max_seq_length")
        modules = read_optional_json(d / "modules.json")
        if modules is not None:
            types = [m.get("type", "") for m in modules]
            normalize = any(t.endswith("Normalize") for t in types)
            for m in modules:
                if m.get("type", "").endswith("Pooling"):
                    pool = read_optional_json(d / m.get("path", "") / "config.json") or {}
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
