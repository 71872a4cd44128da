"""`permllm make-checkpoint`: Llama checkpoints with the real shapes of bigger models and seeded random
weights, to measure the engine's cost at scale without downloading anything.

    permllm make-checkpoint --shape smollm2-360m --seed 0 --out /tmp/smollm2-360m-random
    permllm bench --model /tmp/smollm2-360m-random --quick

A checkpoint is a folder transformers (and so `parties.models` / `permllm.model.loading`) loads as any
Llama-style checkpoint: config.json (transformers' LlamaConfig of the shape, plus a `synthetic` entry
naming the shape and the seed), generation_config.json, the bundled SmolLM2 tokenizer and chat template
(the shapes share its 49152-token vocabulary), and the weights in safetensors shards, one per decoder
layer plus one for the embedding and the final norm (model.safetensors.index.json maps the tensors).

The weights: every linear and the (tied) embedding are normal draws with standard deviation 0.02 (the
LlamaConfig initializer range), every RMSNorm gain is 1; stored in bfloat16 (or --dtype). Drawn one tensor
at a time from one torch generator seeded with --seed, in a fixed order, and written one shard at a time,
so building the 1.7B shape holds one layer (about 130 MB) besides the interpreter. The same shape and seed
give the same tensors. Random weights make the model's answers meaningless, not its cost: every protocol
runs on the same shapes and the same number of values as with trained weights.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from permllm.errors import ConfigError

INIT_STD = 0.02
DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Shape:
    """A Llama shape with SmolLM2's vocabulary (head_dim = hidden / heads, tied embeddings): `name` is the
    --shape value, `label` the model it copies."""

    name: str
    label: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    rope_theta: float
    vocab: int = 49152
    max_positions: int = 8192
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameters(self) -> int:
        """Parameters with the tied head counted once."""
        kv = self.kv_heads * self.head_dim
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate
        return self.layers * (per_layer + 2 * self.hidden) + self.vocab * self.hidden + self.hidden


# SmolLM2's published configurations (HuggingFaceTB/SmolLM2-{135M,360M,1.7B}-Instruct config.json)
SHAPES = {
    s.name: s
    for s in (
        Shape("smollm2-135m", "SmolLM2-135M", 576, 30, 9, 3, 1536, 100000.0),
        Shape("smollm2-360m", "SmolLM2-360M", 960, 32, 15, 5, 2560, 100000.0),
        Shape("smollm2-1.7b", "SmolLM2-1.7B", 2048, 24, 32, 32, 8192, 130000.0),
    )
}


def llama_config(shape: Shape, *, seed: int, bos: int = 1, eos: int = 2, pad: int | None = 2):
    """transformers' LlamaConfig of `shape`, with the `synthetic` entry the bench's label comes from."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=shape.rms_norm_eps,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=True,
        initializer_range=INIT_STD,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        synthetic={"shape": shape.name, "label": shape.label, "seed": seed, "init_std": INIT_STD},
    )


def _shards(shape: Shape):
    """[(file stem, [(tensor name, shape tuple or None for a gain of ones)])]: the embedding and final norm,
    then one shard per layer."""
    h, inter, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    q = shape.heads * shape.head_dim
    out = [("embed", [("model.embed_tokens.weight", (shape.vocab, h)), ("model.norm.weight", None)])]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out.append(
            (
                f"layer{i}",
                [
                    (p + "input_layernorm.weight", None),
                    (p + "self_attn.q_proj.weight", (q, h)),
                    (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)),
                    (p + "self_attn.o_proj.weight", (h, q)),
                    (p + "post_attention_layernorm.weight", None),
                    (p + "mlp.gate_proj.weight", (inter, h)),
                    (p + "mlp.up_proj.weight", (inter, h)),
                    (p + "mlp.down_proj.weight", (h, inter)),
                ],
            )
        )
    return out


def bundled_tokenizer():
    """The bundled SmolLM2 tokenizer and chat template (no weights read)."""
    from permllm.model.loading import find_smollm2_gguf, load_decoder_tokenizer

    return load_decoder_tokenizer(find_smollm2_gguf())


def build_checkpoint(shape, seed: int, out, *, dtype: str = "bfloat16", tokenizer=None, force=False) -> dict:
    """Write the checkpoint of `shape` (a SHAPES name, or a Shape) with weights drawn from `seed` into the
    folder `out`; returns {"shape", "parameters", "bytes", "seconds", "out"}. `tokenizer`: the one to save
    (default the bundled SmolLM2 tokenizer; its vocabulary must match the shape's). ConfigError for an
    unknown shape or dtype, a negative seed, or a non-empty `out` without force."""
    if not isinstance(shape, Shape):
        if shape not in SHAPES:
            raise ConfigError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
        shape = SHAPES[shape]
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"the seed must be a non-negative integer, got {seed!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{str(out)!r} is not empty (pass --force to overwrite)")
    start = time.perf_counter()
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    tok = bundled_tokenizer() if tokenizer is None else tokenizer
    if len(tok) != shape.vocab:
        raise ConfigError(f"the tokenizer has {len(tok)} tokens, the shape {shape.vocab}")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    out.mkdir(parents=True, exist_ok=True)
    config = llama_config(shape, seed=seed, bos=bos, eos=eos, pad=pad)
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad).save_pretrained(out)
    tok.save_pretrained(out)

    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    shards = _shards(shape)
    weight_map, total = {}, 0
    for index, (_, tensors) in enumerate(shards, start=1):
        fname = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        block = {}
        for name, dims in tensors:
            if dims is None:
                block[name] = torch.ones(shape.hidden, dtype=torch_dtype)
            else:
                block[name] = (torch.randn(dims, generator=gen, dtype=torch.float32) * INIT_STD).to(torch_dtype)
            total += block[name].numel() * block[name].element_size()
            weight_map[name] = fname
        save_file(block, str(out / fname), metadata={"format": "pt"})
        del block
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
    return {
        "shape": shape.name,
        "parameters": shape.parameters(),
        "bytes": total,
        "seconds": time.perf_counter() - start,
        "out": str(out),
    }


def synthetic_entry(config) -> dict | None:
    """The `synthetic` entry of a checkpoint's transformers config (None for a real checkpoint)."""
    entry = getattr(config, "synthetic", None)
    return entry if isinstance(entry, dict) else None


class MakeCheckpointCommand:
    """The `permllm make-checkpoint` subcommand as `parties.cli` discovers it."""

    name = "make-checkpoint"
    help = "write a Llama checkpoint of a bigger model's shape with seeded random weights"
    description = (
        "Writes a checkpoint folder with a SmolLM2 shape, the bundled tokenizer and seeded random weights "
        "(std 0.02, norm gains 1) for `permllm bench --model DIR`. Nothing is downloaded."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--shape", required=True, choices=sorted(SHAPES), help="the model shape")
        parser.add_argument("--seed", type=int, default=0, help="seed of the weights (default 0)")
        parser.add_argument("--out", required=True, metavar="DIR", help="the checkpoint folder to write")
        parser.add_argument(
            "--dtype", default="bfloat16", choices=DTYPES, help="storage type of the weights (default bfloat16)"
        )
        parser.add_argument("--force", action="store_true", help="write into a non-empty folder")

    def run(self, args) -> int:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        done = build_checkpoint(args.shape, args.seed, args.out, dtype=args.dtype, force=args.force)
        shape = SHAPES[done["shape"]]
        print(
            f"wrote {done['out']}: {shape.label} shape ({done['parameters'] / 1e6:.0f}M parameters, "
            f"{shape.layers} layers, hidden {shape.hidden}), seed {args.seed}, {done['bytes'] / 1e9:.2f} GB "
            f"of {args.dtype} weights in {done['seconds']:.0f} s"
        )
        return 0


COMMAND = MakeCheckpointCommand()


def main(argv=None) -> int:
    """`python -m permllm_bench.checkpoints ...`: the same command without the `permllm` front end."""
    from permllm_bench.standalone import run_standalone

    return run_standalone(COMMAND, "permllm make-checkpoint", argv)


if __name__ == "__main__":
    raise SystemExit(main())
