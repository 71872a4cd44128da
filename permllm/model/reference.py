"""Float64 plaintext reference forward passes, computed directly from the extracted weights.

This is the ground truth the secure engine is compared against, stage by stage, so every block is a
small standalone function on plain float64 tensors (row-vector activations, ``x @ W`` weights):

Decoder (Llama family): ``rms_norm``, ``rope_cos_sin`` / ``rotate_half`` / ``apply_rope`` (HF
"rotate_half" convention), ``causal_attention`` (GQA), ``swiglu_mlp``, ``decoder_layer``; the stateful
``DecoderReference`` adds a KV cache, ``prefill``, ``decode`` and ``generate_greedy``.

Encoder (BERT family, post-LayerNorm): ``layer_norm``, ``gelu`` (exact erf), ``encoder_embeddings``,
``encoder_attention``, ``encoder_layer``, ``encoder_forward``, ``mean_pool``, ``encoder_embed``.

Stage tracing: ``DecoderReference.prefill/decode(..., trace=dict)`` and ``encoder_forward(..., trace=dict)``
fill the dict with the intermediate tensors under the names listed in ``DECODER_TRACE_KEYS`` /
``ENCODER_TRACE_KEYS`` (per layer, prefixed ``"layer{i}."``).

The blocks live in ``decoder_reference`` and ``encoder_reference``; this module gathers their names.
"""

from __future__ import annotations

from permllm.model.decoder_reference import (
    DECODER_TRACE_KEYS,
    DecoderReference,
    apply_rope,
    causal_attention,
    decoder_layer,
    rms_norm,
    rope_cos_sin,
    rotate_half,
    silu,
    softmax,
    swiglu_mlp,
)
from permllm.model.encoder_reference import (
    ENCODER_TRACE_KEYS,
    encoder_attention,
    encoder_embed,
    encoder_embeddings,
    encoder_forward,
    encoder_layer,
    gelu,
    l2_normalize,
    layer_norm,
    mean_pool,
)

__all__ = [
    "DECODER_TRACE_KEYS",
    "ENCODER_TRACE_KEYS",
    "DecoderReference",
    "apply_rope",
    "causal_attention",
    "decoder_layer",
    "encoder_attention",
    "encoder_embed",
    "encoder_embeddings",
    "encoder_forward",
    "encoder_layer",
    "gelu",
    "l2_normalize",
    "layer_norm",
    "mean_pool",
    "rms_norm",
    "rope_cos_sin",
    "rotate_half",
    "silu",
    "softmax",
    "swiglu_mlp",
]
