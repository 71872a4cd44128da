"""The secure BERT-style encoder end to end: embeddings vs float64, flights, bytes, material; MiniLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parties.inprocess import deal, run_pair
from parties.session import private_embed_inprocess
from permllm.model.reference import encoder_embed
from permllm.transport.frames import header_length
from protocols.model.encoder_weights import (
    EncoderArch,
    helper_weights,
    masked_weight,
    owner_weights,
    user_weight,
    weight_mask,
)
from protocols.model.secure_encoder import SecureEncoder
from tests.tiny_encoder import tiny_encoder


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _secure_embedding(weights, ids, seeds):
    """One sentence through deal + run_pair, checking that the dry run dealt exactly what was taken."""
    arch = EncoderArch.from_config(weights.config)
    n = len(ids)
    owner_w = owner_weights(weights)
    user_w = {name: user_weight(name, arch, masked_weight(w, seeds.owner)) for name, w in owner_w.items()}
    masks = {name: weight_mask(seeds.owner, name, w.d_in, w.d_out) for name, w in owner_w.items()}
    owner_mat, user_mat = deal(
        lambda ctx: SecureEncoder(arch, helper_weights(arch), n).embed(ctx, None, n), seeds, masks.__getitem__
    )
    dealt = owner_mat.remaining
    run = run_pair(
        lambda ctx: SecureEncoder(arch, owner_w, n).embed(ctx, None, n),
        lambda ctx: SecureEncoder(arch, user_w, n).embed(ctx, ids, n),
        owner_mat,
        user_mat,
    )
    assert owner_mat.remaining == 0 and user_mat.remaining == 0
    assert run.owner is None
    return run.user, run, dealt


def _payload_elements(arch: EncoderArch, n: int) -> int:
    """Ring elements sent for one sentence of n tokens (see the secure_encoder docstring):
    one-hot n*vocab; embedding LN 3nd; per layer: trunc Q,K,V 2*3nd (exchange), scores 2*2nd (Q and
    K opened both ways), softmax 3Hn^2, weights@V 2(Hn^2 + nd), trunc 2nd, out-proj mask nd,
    LN 3nd, GeLU 3nI, LN 3nd = 21nd + 5Hn^2 + 3nI; reveal of the pooled sum d."""
    d, heads, inter = arch.hidden, arch.heads, arch.intermediate
    per_layer = 21 * n * d + 5 * heads * n * n + 3 * n * inter
    return n * arch.vocab + 3 * n * d + arch.layers * per_layer + d


def _header_bytes(arch: EncoderArch) -> int:
    """Frame headers of one sentence: every message's (tag, ndim), in order."""

    def permuted(tag):
        return [(f"{tag}.mask", 2), (f"{tag}.perm", 2), (f"{tag}.reshare", 2)]

    messages = [("lin.embed", 2)] + permuted("emb.n")
    for i in range(arch.layers):
        messages += [("trunc", 2)] * 2 + [(f"prod.L{i}.k", 1)] * 2 + permuted(f"L{i}.sm")
        messages += [(f"prod.L{i}.v", 1)] * 2 + [("trunc", 2)] * 2 + [(f"lin.L{i}.o", 2)]
        messages += permuted(f"L{i}.n1") + permuted(f"L{i}.act") + permuted(f"L{i}.n2")
    messages.append(("embedding", 2))
    assert len(messages) == 5 + 21 * arch.layers
    return sum(header_length(len(tag), ndim) for tag, ndim in messages)


def test_tiny_secure_embedding_matches_float64_reference(seeds):
    weights = tiny_encoder(seed=1)
    ids = [2, 17, 5, 33, 8, 41, 49, 3]
    got, run, dealt = _secure_embedding(weights, ids, seeds)
    want = encoder_embed(weights, ids).numpy()
    assert got.shape == (weights.config.hidden_size,)
    # fixed-point error: LN outputs and softmax/GeLU outputs re-shared at 2^-17 (half an ulp at 16 bits),
    # weights rounded at 2^-17, Q/K/V and the attention output truncated to 1 ulp at 2^-16, over 2
    # layers, then pooled and normalised: observed ~2e-5 on a unit vector, so 1e-3 is ~50x margin
    assert np.max(np.abs(got - want)) <= 1e-3
    assert _cosine(got, want) >= 0.99999
    assert abs(np.linalg.norm(got) - 1.0) <= 1e-12
    arch = EncoderArch.from_config(weights.config)
    # calls: lookup, embedding LN, per layer (qkv, trunc, scores, softmax, weights@V, trunc, o, LN,
    # ffn_in, GeLU, ffn_out, LN) = 12, pool
    assert dealt == 3 + 12 * arch.layers


def test_tiny_flights_and_bytes_of_one_embedding(seeds):
    weights = tiny_encoder(seed=2)
    arch = EncoderArch.from_config(weights.config)
    ids = [4, 9, 16, 25, 36, 49, 1]
    n = len(ids)
    _, run, _ = _secure_embedding(weights, ids, seeds)
    # 17 messages per layer in sequence, but 5 (the user's mask message of the softmax, the output
    # projection, both LNs and the GeLU) leave the user right after its previous message (its share
    # is already known to it), so the critical path is 12 per layer; outside the layers: the one-hot
    # message 1, the embedding LN 2 (its mask shares the one-hot's hop), pooling 0 (a linear on the
    # last LN's dealt output, rows summed locally) and the reveal to the user 1
    assert run.flights == 4 + 12 * arch.layers == 28
    # messages: one-hot 1, embedding LN 3, 21 per layer (exchanges count both directions), reveal 1
    assert run.messages == 5 + 21 * arch.layers
    # every message is one frame: 8 bytes per ring element plus its header (28 + 8*ndim + tag bytes)
    payload = 8 * _payload_elements(arch, n)
    assert payload == 8 * (7 * 50 + 3 * 7 * 32 + 2 * (21 * 7 * 32 + 5 * 4 * 49 + 3 * 7 * 48) + 32) == 115504
    assert run.bytes_total == payload + _header_bytes(arch)
    # owner -> user: the permuted values (1 per LN/softmax/GeLU), the owner's half of each exchange
    # and the reveal; the one-hot lookup makes the user's direction the larger one
    assert run.bytes_owner_to_user < run.bytes_user_to_owner


def test_tiny_batch_session_and_unnormalized_mean_pool(seeds):
    weights = tiny_encoder(seed=3)
    arch = EncoderArch.from_config(weights.config)
    sentences = [[2, 11, 7, 3], [2, 30, 31, 32, 33, 34, 35, 36, 37, 3], [5]]
    result = private_embed_inprocess(weights, sentences, seeds=seeds, normalize=False)
    assert result.embedding.shape == (3, arch.hidden)
    for got, ids in zip(result.embedding, sentences):
        want = encoder_embed(weights, ids, normalize=False).numpy()
        # unnormalised mean of the last LN outputs (|values| ~ 1): the same fixed-point error budget
        assert np.max(np.abs(got - want)) <= 1e-3 * (1 + np.max(np.abs(want)))
        assert _cosine(got, want) >= 0.99999
    # sentences run back to back: each costs the same flights, whatever its length
    assert result.run.flights == 3 * (4 + 12 * arch.layers)
    assert result.dealt_calls == 3 * (3 + 12 * arch.layers)
    # same seeds: the first sentence of the session takes the same material as a session of its own,
    # so its (exact ring) result is identical; only the user's final division and normalisation differ
    single = private_embed_inprocess(weights, sentences[0], seeds=seeds)
    first = result.embedding[0]
    np.testing.assert_allclose(single.embedding, first / np.linalg.norm(first), rtol=0, atol=1e-15)
    assert single.run.flights == 4 + 12 * arch.layers


def test_tiny_owner_weights_hide_norm_parameters_and_fold_them_exactly(seeds):
    """The user's W~ is masked and carries no bias; the owner's folded layers reproduce the LN."""
    weights = tiny_encoder(seed=4)
    arch = EncoderArch.from_config(weights.config)
    owner_w = owner_weights(weights)
    for name, w in owner_w.items():
        user = user_weight(name, arch, masked_weight(w, seeds.owner))
        assert user.bias is None
    assert tuple(owner_w["embed"].bias.shape) == (arch.max_positions, arch.hidden)
    # [diag(g) | diag(g) W] x^ + [b | b W + b'] = [LN(y), LN(y) W + b'] on the float weights
    from permllm.model.reference import layer_norm
    from protocols.model.encoder_weights import folded_float_weights

    layer = weights.layers[0]
    y = torch.randn(5, arch.hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_hat = layer_norm(
        y,
        torch.ones(arch.hidden, dtype=torch.float64),
        torch.zeros(arch.hidden, dtype=torch.float64),
        arch.layer_norm_eps,
    )
    w_cat, b_cat = folded_float_weights(weights)["L0.ffn_in"]
    ln = layer_norm(y, layer.attn_ln_weight, layer.attn_ln_bias, arch.layer_norm_eps)
    torch.testing.assert_close(x_hat @ w_cat + b_cat, torch.cat([ln, ln @ layer.w_in + layer.b_in], dim=1))


def test_prepared_length_is_enforced(tiny_encoder_weights):
    arch = EncoderArch.from_config(tiny_encoder_weights.config)
    with pytest.raises(ValueError):
        SecureEncoder(arch, helper_weights(arch), arch.max_positions + 1)
    encoder = SecureEncoder(arch, helper_weights(arch), 4)
    with pytest.raises(ValueError):
        encoder.embed(None, None, 5)


# ------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    from permllm.model.loading import load_encoder

    return load_encoder(minilm_dir)


def _minilm_token_ids(tokenizer, sentences):
    # sentence-transformers tokenises with special tokens ([CLS] ... [SEP]) and truncates at 256
    return [list(tokenizer(s, truncation=True)["input_ids"]) for s in sentences]


def _check_minilm(minilm, sentences, seeds):
    weights, tokenizer = minilm
    arch = EncoderArch.from_config(weights.config)
    ids = _minilm_token_ids(tokenizer, sentences)
    assert all(s[0] == tokenizer.cls_token_id and s[-1] == tokenizer.sep_token_id for s in ids)
    result = private_embed_inprocess(weights, ids, seeds=seeds)
    for got, sentence_ids in zip(result.embedding, ids):
        want = encoder_embed(weights, sentence_ids).numpy()
        # the requirement is 0.999; observed >= 0.99999986 (max abs error <= 1.1e-4)
        assert _cosine(got, want) >= 0.999
        assert np.max(np.abs(got - want)) <= 1e-3
    assert result.run.flights == len(ids) * (4 + 12 * arch.layers)
    payload = sum(8 * _payload_elements(arch, len(s)) for s in ids)
    assert result.run.bytes_total == payload + len(ids) * _header_bytes(arch)


def test_minilm_secure_embeddings_match_plaintext_ci(minilm, seeds):
    from permllm.model.prompts import MINILM_SENTENCES

    # short, medium, the longest (code, 37 tokens) and the shortest
    _check_minilm(minilm, [MINILM_SENTENCES[i] for i in (0, 2, 7, 9)], seeds)


@pytest.mark.slow
def test_minilm_secure_embeddings_match_plaintext_all(minilm, seeds):
    from permllm.model.prompts import MINILM_SENTENCES

    _check_minilm(minilm, MINILM_SENTENCES, seeds)
