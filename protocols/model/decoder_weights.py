"""Llama-style decoder weights as each party holds them for the secure protocols.

The owner folds what must stay hidden from the user into the linear layers (the RMSNorm gains
multiply the rows of the next layer's weight; the attention's 1/sqrt(head_dim) scales W_q), encodes
every weight in fixed point, and masks it: W~ = W - U with U from the seed it shares with the helper.
The user receives W~ once (preparation); the helper regenerates U; only the owner holds W, as int32
where it fits (`packed`), and never the whole U (`masked_blocks` draws it by row blocks).

Linear layers, by name (x @ W orientation, W of shape (d_in, d_out)):
    L{i}.qkv      hidden -> heads*hd + 2*kv_heads*hd   diag(g_attn) [W_q / sqrt(hd) | W_k | W_v]
    L{i}.o        heads*hd -> hidden
    L{i}.gate_up  hidden -> 2*intermediate              diag(g_mlp) [gate_0, up_0, gate_1, up_1, ...]
    L{i}.down     intermediate -> hidden
    embed         vocab -> hidden   (one-hot input at scale 0, so encoded at LINEAR_BITS)
    lm_head       hidden -> vocab   diag(g_final) W_head
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from permllm.fixed import LINEAR_BITS, WEIGHT_BITS, encode
from permllm.memory import page_out
from permllm.prg import Prg
from protocols.linear import LinearWeight


@dataclass(frozen=True)
class DecoderArch:
    """The public architecture both parties and the helper agree on (sent in the handshake)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    rope_theta: float

    @staticmethod
    def from_config(config) -> DecoderArch:
        return DecoderArch(
            hidden=int(config.hidden_size),
            layers=int(config.num_layers),
            heads=int(config.num_heads),
            kv_heads=int(config.num_kv_heads),
            head_dim=int(config.head_dim),
            intermediate=int(config.intermediate_size),
            vocab=int(config.vocab_size),
            rms_eps=float(config.rms_norm_eps),
            rope_theta=float(config.rope_theta),
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def linear_shapes(arch: DecoderArch) -> dict[str, tuple[int, int, int]]:
    """name -> (d_in, d_out, bits) for every linear layer of the secure decoder."""
    qkv_out = (arch.heads + 2 * arch.kv_heads) * arch.head_dim
    shapes = {"embed": (arch.vocab, arch.hidden, LINEAR_BITS), "lm_head": (arch.hidden, arch.vocab, WEIGHT_BITS)}
    for i in range(arch.layers):
        shapes[f"L{i}.qkv"] = (arch.hidden, qkv_out, WEIGHT_BITS)
        shapes[f"L{i}.o"] = (arch.heads * arch.head_dim, arch.hidden, WEIGHT_BITS)
        shapes[f"L{i}.gate_up"] = (arch.hidden, 2 * arch.intermediate, WEIGHT_BITS)
        shapes[f"L{i}.down"] = (arch.intermediate, arch.hidden, WEIGHT_BITS)
    return shapes


def weight_mask(seed: bytes, name: str, d_in: int, d_out: int) -> torch.Tensor:
    """The mask U of a linear weight, from the seed the owner shares with the helper."""
    return Prg(seed, f"weight/{name}").int64((d_in, d_out))


INT32_LIMIT = 2**31
"""An encoded weight is held as int32 when every entry has magnitude below this."""


def packed(encoded: torch.Tensor) -> torch.Tensor:
    """An encoded weight as the owner holds it: int32 where every entry fits (half the memory; the
    ring products widen it exactly, `permllm.ring_matmul`), otherwise the int64 itself. Contiguous:
    a transposed view (the tied lm_head) makes the products ~9x slower.

    SmolLM2-135M at WEIGHT_BITS = 16: every layer's weight and the lm_head fit in 20 bits; the
    embedding at LINEAR_BITS = 32 needs 34 (|w| <= 1.97) and stays int64."""
    if encoded.numel() and int(encoded.abs().max()) < INT32_LIMIT:
        return encoded.to(torch.int32).contiguous()
    return encoded.contiguous()


MASK_CHUNK_ELEMENTS = 1 << 20
"""Entries per block when encoding a weight or drawing its mask U (8 MB of int64)."""


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


def folded_rows(weights):
    """The owner's folded weights, lazily: yields (name, rows) in `linear_shapes` order, rows(i, j) the
    float64 rows i:j of W with the norm gains and the attention scale folded in. Every fold scales the
    rows of W by the gain of its input feature and concatenates columns, so row blocks are exact slices
    of the whole folded W (float32 sources are widened first: the same float64 values either way)."""
    arch = DecoderArch.from_config(weights.config)
    scale = 1.0 / math.sqrt(arch.head_dim)
    yield "embed", lambda i, j: _f64(weights.embed[i:j])
    yield "lm_head", lambda i, j: _f64(weights.final_norm[i:j])[:, None] * _f64(weights.lm_head[i:j])
    for i, layer in enumerate(weights.layers):

        def qkv(a, b, layer=layer):
            rows = torch.cat([_f64(layer.wq[a:b]) * scale, _f64(layer.wk[a:b]), _f64(layer.wv[a:b])], dim=1)
            return _f64(layer.attn_norm[a:b])[:, None] * rows

        def gate_up(a, b, layer=layer):
            pairs = torch.stack([_f64(layer.w_gate[a:b]), _f64(layer.w_up[a:b])], dim=2).reshape(b - a, -1)
            return _f64(layer.mlp_norm[a:b])[:, None] * pairs

        yield f"L{i}.qkv", qkv
        yield f"L{i}.o", lambda a, b, layer=layer: _f64(layer.wo[a:b])
        yield f"L{i}.gate_up", gate_up
        yield f"L{i}.down", lambda a, b, layer=layer: _f64(layer.w_down[a:b])


def folded_float_weights(weights) -> dict[str, torch.Tensor]:
    """The owner's float64 weights with norm gains and the attention scale folded in (name -> W)."""
    shapes = linear_shapes(DecoderArch.from_config(weights.config))
    return {name: rows(0, shapes[name][0]) for name, rows in folded_rows(weights)}


def encode_packed(rows, d_in: int, d_out: int, bits: int) -> torch.Tensor:
    """encode(W, bits), `packed`, from W's float64 row blocks rows(i, j): a block at a time, so no float
    copy of the whole W is ever made. The same tensor as packed(encode(rows(0, d_in), bits))."""
    step = max(1, MASK_CHUNK_ELEMENTS // max(d_out, 1))
    out = torch.empty((d_in, d_out), dtype=torch.int32)
    for i in range(0, d_in, step):
        j = min(d_in, i + step)
        block = encode(rows(i, j), bits)
        if tuple(block.shape) != (j - i, d_out):
            raise ValueError(f"folded rows {i}:{j} have shape {tuple(block.shape)}, expected {(j - i, d_out)}")
        if out.dtype == torch.int32 and block.numel() and int(block.abs().max()) >= INT32_LIMIT:
            out = out.to(torch.int64)  # once: this weight does not fit in 32 bits
        out[i:j] = block
    return out


def owner_weights(weights, progress=None, *, release: bool = False) -> dict[str, LinearWeight]:
    """The owner's LinearWeights (local = W encoded and `packed`; no mask: the owner never needs U
    online, `masked_weight` derives W - U for the preparation). Folds and encodes one weight at a
    time, by row blocks. `progress(n)` is called per weight.

    release=True frees the float weights as they are used (sets the fields of `weights` to None: the
    caller must not use them afterwards): the owner then never holds a float copy of the whole model
    next to the encoded one."""
    arch = DecoderArch.from_config(weights.config)
    shapes = linear_shapes(arch)
    out = {}
    for name, rows in folded_rows(weights):
        d_in, d_out, bits = shapes[name]
        if d_in and rows(d_in, d_in + 1).shape[0] != 0:
            raise ValueError(f"{name}: weight has more than the expected {d_in} rows")
        out[name] = LinearWeight(name, bits, d_in, d_out, local=encode_packed(rows, d_in, d_out, bits))
        if release:
            _release(weights, name)
        if progress:
            progress(1)
    return out


def _release(weights, name: str) -> None:
    """Drop the float tensors no later weight needs (after `name` was encoded), and page them out
    (`permllm.memory.page_out`): a memory-mapped checkpoint's pages would otherwise stay resident
    until the last of its tensors is dropped."""
    if name == "lm_head":
        done = [weights.embed, weights.lm_head, weights.final_norm]
        weights.embed = weights.lm_head = weights.final_norm = None
    elif name.endswith(".down"):
        i = int(name[1 : name.index(".")])
        done = [t for t in vars(weights.layers[i]).values() if isinstance(t, torch.Tensor)]
        weights.layers[i] = None
    else:
        return
    for tensor in done:
        page_out(tensor)


def masked_blocks(weight: LinearWeight, seed: bytes):
    """W - U (int64) for the owner's `weight` by row blocks: yields (i, j, rows i:j of W - U), each of
    at most MASK_CHUNK_ELEMENTS entries (8 MB), U drawn from `seed` in the stream of `weight_mask`.
    The owner never holds the whole U nor the whole W - U. Each block is a fresh tensor."""
    d_in, d_out = weight.d_in, weight.d_out
    prg = Prg(seed, f"weight/{weight.name}")
    step = max(1, MASK_CHUNK_ELEMENTS // max(d_out, 1))
    for i in range(0, d_in, step):
        j = min(d_in, i + step)
        yield i, j, weight.local[i:j].to(torch.int64) - prg.int64((j - i, d_out))


def masked_weight(weight: LinearWeight, seed: bytes) -> torch.Tensor:
    """The whole W - U (int64) for the owner's `weight` (`masked_blocks` put together)."""
    out = torch.empty((weight.d_in, weight.d_out), dtype=torch.int64)
    for i, j, block in masked_blocks(weight, seed):
        out[i:j] = block
    return out


def mask_product(seed: bytes, name: str, d_in: int, d_out: int, v: torch.Tensor) -> torch.Tensor:
    """v @ U (int64, mod 2^64) for the mask U = `weight_mask(seed, name, d_in, d_out)`, with U drawn a
    row block at a time: the helper never holds the whole U. The same tensor as ring_matmul(v, U) (a
    sum of block products is exact in the ring)."""
    from permllm.ring_matmul import ring_matmul

    if v.dim() != 2 or v.shape[1] != d_in:
        raise ValueError(f"{name}: mask product input has shape {tuple(v.shape)}, expected (m, {d_in})")
    prg = Prg(seed, f"weight/{name}")
    v = v.contiguous()
    out = torch.zeros((v.shape[0], d_out), dtype=torch.int64)
    step = max(1, MASK_CHUNK_ELEMENTS // max(d_out, 1))
    for i in range(0, d_in, step):
        j = min(d_in, i + step)
        out += ring_matmul(v[:, i:j].contiguous(), prg.int64((j - i, d_out)))
    return out


def received_weight(name: str, shapes: dict, masked: torch.Tensor) -> LinearWeight:
    """A LinearWeight holding the masked W~ received for `name`, checked against `shapes` (`linear_shapes`)."""
    d_in, d_out, bits = shapes[name]
    if tuple(masked.shape) != (d_in, d_out):
        raise ValueError(f"{name}: received masked weight of shape {tuple(masked.shape)}, expected {(d_in, d_out)}")
    return LinearWeight(name, bits, d_in, d_out, local=masked.contiguous())


def shape_only_weights(shapes: dict) -> dict[str, LinearWeight]:
    """Shape-only LinearWeights for the helper's dry run (it gets U through weight_mask)."""
    return {name: LinearWeight(name, bits, d_in, d_out) for name, (d_in, d_out, bits) in shapes.items()}


def user_weight(name: str, arch: DecoderArch, masked: torch.Tensor) -> LinearWeight:
    """The user's LinearWeight from the masked W~ it received."""
    return received_weight(name, linear_shapes(arch), masked)


def helper_weights(arch: DecoderArch) -> dict[str, LinearWeight]:
    """Shape-only LinearWeights for the helper's dry run (it gets U through weight_mask)."""
    return shape_only_weights(linear_shapes(arch))
