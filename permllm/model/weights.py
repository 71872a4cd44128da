"""Plain-tensor containers for extracted model weights.

Every matrix is float64 and stored in "x @ W" orientation: a linear layer mapping ``in`` features to
``out`` features is a tensor of shape ``(in, out)`` (the transpose of ``nn.Linear.weight``), and is
applied to row-vector activations ``x: (n, in)`` as ``x @ W -> (n, out)``. Biases are ``(out,)``.
Nothing here has behaviour beyond small helpers; the forward passes live in ``reference.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


def _count(obj) -> int:
    """Number of scalars in all tensors held (directly or in lists) by a dataclass; shared storage counted once."""
    seen: set[int] = set()
    total = 0

    def visit(value):
        nonlocal total
        if isinstance(value, torch.Tensor):
            key = value.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += value.numel()
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif hasattr(value, "__dataclass_fields__"):
            for f in fields(value):
                visit(getattr(value, f.name))

    visit(obj)
    return total


# ----------------------------------------------------------------------------------------------
# Decoder (Llama family: RMSNorm, RoPE, GQA attention, SwiGLU MLP)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderConfig:
    hidden_size: int  # d (576 for SmolLM2-135M)
    num_layers: int  # 30
    num_heads: int  # H query heads (9)
    num_kv_heads: int  # KV heads (3); H % num_kv_heads == 0
    head_dim: int  # D (64); H * D need not equal d in general
    intermediate_size: int  # MLP width (1536)
    rms_norm_eps: float  # epsilon inside RMSNorm's sqrt
    rope_theta: float  # RoPE base (100000.0)
    vocab_size: int  # 49152
    tie_word_embeddings: bool  # lm_head == embed.T
    bos_token_id: int | None
    eos_token_id: int | None
    max_position_embeddings: int | None = None

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA); query head h reads KV head h // group_size."""
        return self.num_heads // self.num_kv_heads


@dataclass
class DecoderLayerWeights:
    attn_norm: torch.Tensor  # (d,)          RMSNorm gain before attention (input_layernorm)
    wq: torch.Tensor  # (d, H*D)      q columns grouped per head: head h = [:, h*D:(h+1)*D]
    wk: torch.Tensor  # (d, KV*D)
    wv: torch.Tensor  # (d, KV*D)
    wo: torch.Tensor  # (H*D, d)
    mlp_norm: torch.Tensor  # (d,)          RMSNorm gain before the MLP (post_attention_layernorm)
    w_gate: torch.Tensor  # (d, I)        SiLU branch
    w_up: torch.Tensor  # (d, I)        linear branch
    w_down: torch.Tensor  # (I, d)


@dataclass
class DecoderWeights:
    config: DecoderConfig
    embed: torch.Tensor  # (vocab, d) token embedding rows
    layers: list[DecoderLayerWeights]
    final_norm: torch.Tensor  # (d,)
    lm_head: torch.Tensor  # (d, vocab); a view of embed.T (shared storage) when tied

    def num_parameters(self) -> int:
        """Distinct parameters (a tied lm_head is not counted twice)."""
        return _count(self)


# ----------------------------------------------------------------------------------------------
# Encoder (BERT family, post-LayerNorm, absolute positions)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderConfig:
    hidden_size: int  # d (384 for all-MiniLM-L6-v2)
    num_layers: int  # 6
    num_heads: int  # 12 (head_dim = d / num_heads = 32)
    intermediate_size: int  # 1536
    layer_norm_eps: float  # 1e-12
    vocab_size: int  # 30522
    max_position_embeddings: int  # 512
    type_vocab_size: int  # 2
    hidden_act: str = "gelu"  # exact erf GeLU (asserted at load time)
    pad_token_id: int | None = 0
    max_seq_length: int | None = None  # sentence-transformers truncation length (256), if known
    normalize: bool = True  # sentence-transformers pipeline ends with a Normalize module

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class EncoderLayerWeights:
    wq: torch.Tensor  # (d, d)
    bq: torch.Tensor  # (d,)
    wk: torch.Tensor  # (d, d)
    bk: torch.Tensor  # (d,)
    wv: torch.Tensor  # (d, d)
    bv: torch.Tensor  # (d,)
    wo: torch.Tensor  # (d, d)   attention output dense
    bo: torch.Tensor  # (d,)
    attn_ln_weight: torch.Tensor  # (d,)     LayerNorm after attention + residual
    attn_ln_bias: torch.Tensor  # (d,)
    w_in: torch.Tensor  # (d, I)   intermediate dense (followed by GeLU)
    b_in: torch.Tensor  # (I,)
    w_out: torch.Tensor  # (I, d)   output dense
    b_out: torch.Tensor  # (d,)
    out_ln_weight: torch.Tensor  # (d,)     LayerNorm after MLP + residual
    out_ln_bias: torch.Tensor  # (d,)


@dataclass
class EncoderWeights:
    config: EncoderConfig
    word_embed: torch.Tensor  # (vocab, d)
    pos_embed: torch.Tensor  # (max_positions, d)
    type_embed: torch.Tensor  # (type_vocab, d)
    embed_ln_weight: torch.Tensor  # (d,)
    embed_ln_bias: torch.Tensor  # (d,)
    layers: list[EncoderLayerWeights]

    def num_parameters(self) -> int:
        return _count(self)
