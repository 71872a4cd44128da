"""The secure decoder end to end on a small random model: logits vs float64, flights, bytes, tokens."""

from __future__ import annotations

import torch

from parties.inprocess import deal, run_pair
from parties.session import private_generate_inprocess
from permllm.fixed import decode
from permllm.model.reference import DecoderReference
from protocols.basic import reveal_to
from protocols.context import Role
from protocols.model.decoder_weights import DecoderArch, helper_weights, owner_weights, user_weight
from protocols.model.secure_decoder import SecureDecoder
from tests.tiny_model import tiny_decoder


def _secure_logits(weights, prompt, continuation, seeds):
    """Prefill `prompt`, then one decode step per token of `continuation`; logits revealed to the user."""
    arch = DecoderArch.from_config(weights.config)
    positions = len(prompt) + len(continuation)
    owner_w = owner_weights(weights, seeds.owner)
    user_w = {n: user_weight(n, arch, w.local - w.mask) for n, w in owner_w.items()}
    masks = {n: w.mask for n, w in owner_w.items()}

    def session(ctx, decoder, tokens):
        out, depths = [], []
        steps = [(prompt, len(prompt))] + [([t], 1) for t in continuation]
        for ids, count in steps:
            logits = decoder.forward(ctx, ids if tokens else None, count)
            if not ctx.dealing:
                depths.append(ctx.channel.clock.depth)  # after the forward pass, before the reveal
            out.append(reveal_to(ctx, Role.USER, logits))
        return out, depths

    owner_mat, user_mat = deal(
        lambda ctx: session(ctx, SecureDecoder(arch, helper_weights(arch), positions), False), seeds, masks.__getitem__
    )
    run = run_pair(
        lambda ctx: session(ctx, SecureDecoder(arch, owner_w, positions), False),
        lambda ctx: session(ctx, SecureDecoder(arch, user_w, positions), True),
        owner_mat,
        user_mat,
    )
    assert owner_mat.remaining == 0 and user_mat.remaining == 0
    return [decode(l, 32)[0] for l in run.user[0]], run


def test_secure_logits_match_float64_reference_through_prefill_and_decode(seeds):
    weights = tiny_decoder(seed=1)
    prompt, continuation = [5, 17, 3, 42, 8], [11, 60]
    got, run = _secure_logits(weights, prompt, continuation, seeds)
    ref = DecoderReference(weights)
    want = [ref.prefill(prompt)[-1]] + [ref.decode(t) for t in continuation]
    for g, w in zip(got, want):
        # fixed-point error: weights and activations rounded at 2^-17, one-ulp truncations at 2^-16,
        # accumulated over 2 layers; 1e-3 relative to the logit scale is ~100x the observed error
        assert torch.max(torch.abs(g - w)) <= 1e-3 * (1 + torch.max(torch.abs(w)))
        assert int(torch.argmax(g)) == int(torch.argmax(w))


def test_flights_per_step_are_12_per_layer_plus_3(seeds):
    weights = tiny_decoder(seed=2, layers=3)
    _, run = _secure_logits(weights, [1, 2, 3], [4, 5], seeds)
    ends = [max(o, u) for o, u in zip(run.owner[1], run.user[1])]
    # each step starts one flight after the previous end (the test's reveal of the logits)
    prefill, *decode_steps = [ends[0]] + [b - (a + 1) for a, b in zip(ends, ends[1:])]
    layers = weights.config.num_layers
    # 17 messages per layer in sequence, but 5 of them leave the user right after its previous one
    # (its share is already known to it), so the critical path is 12 per layer; the embedding adds 1
    # and the final norm 2 (its first message shares a hop with the last SwiGLU re-share); the
    # lm_head on the dealt norm output costs nothing. The prefill costs the same, with bigger messages.
    assert decode_steps == [1 + 12 * layers + 2] * 2
    assert prefill == 1 + 12 * layers + 2


def test_private_greedy_generation_equals_plaintext_greedy(seeds):
    weights = tiny_decoder(seed=3)
    prompt = [7, 3, 19, 33]
    result = private_generate_inprocess(weights, prompt, 6, seeds=seeds)
    want = DecoderReference(weights).generate_greedy(prompt, 6, stop_at_eos=True)
    assert result.tokens == want
    # per generated token: 3 + 12 L flights in the forward pass and 3 in the selection (its first
    # message shares a hop with the final norm's re-share); stopping before the budget costs one
    # more (the user's "stop" message)
    stopped_early = 1 if len(want) < 6 else 0
    assert result.run.flights == len(want) * (3 + 12 * 2 + 3) + stopped_early
