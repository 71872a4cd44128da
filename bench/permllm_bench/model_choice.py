"""The model a bench run measures (`permllm bench --model`): the bundled SmolLM2-135M-Instruct or a
Llama-style checkpoint on disk (e.g. one of `permllm make-checkpoint`), its label and its shape, read from
its public config without loading any weight."""

from __future__ import annotations

from pathlib import Path

from permllm.errors import ConfigError
from permllm_bench.checkpoints import synthetic_entry
from permllm_bench.config import MODEL, MODEL_LABEL
from protocols.model.decoder_weights import DecoderArch

# flights of a decode step outside the layers when no breakdown was measured (cost_model.complete_summary)
OUTSIDE_FLIGHTS_DEFAULT = 6


def check_bench_model(spec: str) -> str:
    """`--model`: "smollm2" or an existing Llama-style checkpoint (a .gguf file or a folder with
    config.json); ConfigError naming --model otherwise. The encoder (minilm) has no decode to measure."""
    from parties.models import check_model_spec

    if spec is None or not str(spec).strip():
        raise ConfigError("--model: give smollm2 or the path of a Llama-style checkpoint")
    if spec == "minilm":
        raise ConfigError("--model: minilm is an encoder; the bench measures token generation of a decoder")
    try:
        return check_model_spec(str(spec))
    except ConfigError as exc:
        raise ConfigError(f"--model: {exc}") from None


def decoder_source(spec: str):
    """What permllm.model.loading loads for `spec`: the bundled GGUF file for "smollm2", else the path."""
    if spec == MODEL:
        from permllm.model.loading import find_smollm2_gguf

        return find_smollm2_gguf()
    return spec


def parameter_count(cfg) -> int:
    """Parameters of a DecoderConfig, a tied head counted once."""
    h, q = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    kv, inter = cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * inter + 2 * h
    embed = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_layers * per_layer + embed + h


def shape_of(arch) -> dict:
    """The bench summary's "model" entry of a DecoderArch (`DecoderArch.from_config` of a checkpoint)."""
    return {
        "hidden": arch.hidden,
        "layers": arch.layers,
        "heads": arch.heads,
        "kv_heads": arch.kv_heads,
        "head_dim": arch.head_dim,
        "intermediate": arch.intermediate,
        "vocab": arch.vocab,
        "outside_flights_default": OUTSIDE_FLIGHTS_DEFAULT,
    }


def describe_model(spec: str) -> dict:
    """{"spec", "label", "parameters", "shape", "synthetic"} of a bench model, from its config only.

    The label: SmolLM2-135M-Instruct for the bundled model; "<shape label> shape, random weights (seed S)"
    for a `permllm make-checkpoint` folder; else the file or folder name; each with its parameter count."""
    from permllm.model.hf_mapping import decoder_config_from_hf
    from permllm.model.loading import load_decoder_config

    hf_config = load_decoder_config(decoder_source(spec))
    cfg = decoder_config_from_hf(hf_config)
    params = parameter_count(cfg)
    synthetic = synthetic_entry(hf_config)
    if spec == MODEL:
        label = MODEL_LABEL
    elif synthetic:
        label = f"{synthetic.get('label', synthetic.get('shape'))} shape, random weights (seed {synthetic.get('seed')})"
    else:
        label = Path(spec).name
    return {
        "spec": spec,
        "label": f"{label}, {params / 1e6:.0f}M parameters",
        "parameters": params,
        "shape": shape_of(DecoderArch.from_config(cfg)),
        "synthetic": synthetic,
    }
