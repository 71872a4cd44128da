"""Whole sessions with no helper: owner and user make the material, then run the unchanged online phase."""

from __future__ import annotations

import numpy as np

from parties.inprocess import Seeds
from parties.session import embed, generate, prepare_model
from permllm.model.reference import DecoderReference, encoder_embed
from tests.tiny_encoder import tiny_encoder
from tests.tiny_model import tiny_decoder

SEEDS = Seeds(owner=bytes(range(16)), user=bytes(range(16, 32)))


def test_two_party_greedy_generation_equals_plaintext_and_costs_the_helper_modes_online_traffic():
    weights = tiny_decoder(seed=3)
    prompt = [7, 3, 19, 33]
    prepared = prepare_model(weights, SEEDS.owner)
    helper = generate(prepared, prompt, 4, seeds=SEEDS)
    two_party = generate(prepared, prompt, 4, seeds=SEEDS, mode="two-party")
    want = DecoderReference(weights).generate_greedy(prompt, 4, stop_at_eos=True)
    assert two_party.tokens == helper.tokens == want
    # the online phase is the same protocol on other material: the same flights and the same bytes
    assert two_party.run.flights == helper.run.flights
    assert two_party.run.bytes_owner_to_user == helper.run.bytes_owner_to_user
    assert two_party.run.bytes_user_to_owner == helper.run.bytes_user_to_owner
    assert two_party.session.material_left == 0
    offline = two_party.session.offline
    assert offline is not None and offline.bytes_total > 0
    assert helper.session.offline is None


def test_two_party_embedding_matches_the_reference():
    weights = tiny_encoder(seed=1)
    ids = [2, 17, 5, 33, 8, 41, 49, 3]
    prepared = prepare_model(weights, SEEDS.owner)
    got = embed(prepared, ids, seeds=SEEDS, mode="two-party")
    want = encoder_embed(weights, ids).numpy()
    # the bound of tests/test_secure_encoder.py: fixed-point rounding over 2 layers, ~50x the observed error
    assert np.max(np.abs(got.embedding - want)) <= 1e-3
    helper = embed(prepared, ids, seeds=SEEDS)
    assert got.run.flights == helper.run.flights and got.run.bytes_total == helper.run.bytes_total
