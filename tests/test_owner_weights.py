"""The owner's weights held lean: packed int32 where they fit, folded and encoded by row blocks, the
float model freed as it goes, U never held whole (W - U drawn by row blocks), a float32 load giving
the same encoded weights and the same digest as the float64 one. All exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import protocols.model.decoder_weights as dw
from parties.pinning import weights_digest
from permllm.fixed import encode
from permllm.model.weights import DecoderLayerWeights, DecoderWeights
from tests.tiny_model import tiny_decoder

SEED = bytes(range(16))


def _cast(weights: DecoderWeights, dtype) -> DecoderWeights:
    """A copy of `weights` with every tensor in `dtype` (the tied head stays a view of the embedding)."""
    layers = [
        DecoderLayerWeights(**{f.name: getattr(layer, f.name).to(dtype) for f in dataclasses.fields(layer)})
        for layer in weights.layers
    ]
    embed = weights.embed.to(dtype)
    return DecoderWeights(weights.config, embed, layers, weights.final_norm.to(dtype), embed.T)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 40 entries: every weight of the tiny model spans several, with an uneven last one."""
    monkeypatch.setattr(dw, "MASK_CHUNK_ELEMENTS", 40)


def test_owner_weights_are_the_packed_encoding_of_the_folded_weights(small_blocks):
    weights = tiny_decoder(seed=3)
    shapes = dw.linear_shapes(dw.DecoderArch.from_config(weights.config))
    owner = dw.owner_weights(weights)
    for name, w in dw.folded_float_weights(weights).items():
        want = encode(w, shapes[name][2])
        assert torch.equal(owner[name].local.to(torch.int64), want), name
        fits = int(want.abs().max()) < 2**31
        assert owner[name].local.dtype == (torch.int32 if fits else torch.int64), name
    assert owner["L0.qkv"].local.dtype == torch.int32 and owner["lm_head"].local.dtype == torch.int32


def test_a_weight_that_does_not_fit_in_32_bits_stays_int64(small_blocks):
    rows = torch.zeros((7, 9), dtype=torch.float64)
    rows[5, 3] = 0.75  # 0.75 * 2^32 >= 2^31, in a later block than the first
    out = dw.encode_packed(lambda i, j: rows[i:j], 7, 9, 32)
    assert out.dtype == torch.int64 and torch.equal(out, encode(rows, 32))
    assert dw.encode_packed(lambda i, j: rows[i:j], 7, 9, 16).dtype == torch.int32


def test_release_frees_the_floats_and_changes_nothing(small_blocks):
    kept = dw.owner_weights(tiny_decoder(seed=4))
    weights = tiny_decoder(seed=4)
    released = dw.owner_weights(weights, release=True)
    assert weights.embed is None and weights.lm_head is None and all(layer is None for layer in weights.layers)
    assert kept.keys() == released.keys()
    assert all(torch.equal(kept[n].local, released[n].local) for n in kept)


def test_masked_weight_is_w_minus_the_whole_mask(small_blocks):
    owner = dw.owner_weights(tiny_decoder(seed=5))
    for name, w in owner.items():
        want = w.local.to(torch.int64) - dw.weight_mask(SEED, name, w.d_in, w.d_out)
        assert torch.equal(dw.masked_weight(w, SEED), want), name


def test_a_float32_load_gives_the_same_weights_and_digest_as_float64():
    """The owner loads the checkpoint's float32 tensors; widening them to float64 is exact, so the
    encoded weights and the weights digest are those of the float64 load."""
    base = tiny_decoder(seed=6)
    as32 = _cast(base, torch.float32)
    as64 = _cast(as32, torch.float64)
    assert weights_digest(as32) == weights_digest(as64)
    lean, full = dw.owner_weights(as32), dw.owner_weights(as64)
    assert all(torch.equal(lean[n].local, full[n].local) for n in full)


def test_a_weight_with_the_wrong_row_count_is_refused():
    weights = tiny_decoder(seed=7)
    weights.layers[1].wo = torch.cat([weights.layers[1].wo, weights.layers[1].wo[:1]])
    with pytest.raises(ValueError, match="L1.o"):
        dw.owner_weights(weights)
