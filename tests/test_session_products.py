"""permllm.session_products: a session's appending-product correlations in one round trip, exact mod 2^64.

Reference: protocols.beaver's helper formula C_t = A_t @ op(B[:L_t]) with A = A_o + A_u, B = B_o + B_u,
computed with torch int64 (wrapping) matmuls. bfv_linear's low-limb wrap (probability |P| / 2^59 per
output, here |P| <= 31 * 2^16 * 12 < 2^24) is below 2^-35 per output. Every case is seeded.
"""

from __future__ import annotations

import pytest
import torch

from permllm.bfv_correlations import LIMBS
from permllm.bfv_linear import LinearCorrelationClient, LinearCorrelationServer
from permllm.bfv_packing import choose_packing
from permllm.errors import ConfigError, ProtocolError
from permllm.seal_io import COEFF_BITS, REPLY_PRIMES, max_ciphertext_bytes
from permllm.session_products import (
    SessionLayout,
    SessionProductClient,
    SessionProductServer,
    draw_masks,
)

# a prefill of 3 positions, then 2 decode steps; 2 KV groups of 2 query heads, head_dim 4
LAYOUT = SessionLayout(groups=2, heads=2, head_dim=4, appends=(3, 1, 1))
OWNER_SEED, USER_SEED, OUT_SEED = bytes(16), bytes(range(16)), bytes(range(1, 17))


@pytest.fixture(scope="module")
def linear():
    client = LinearCorrelationClient()
    return client, LinearCorrelationServer(client.public_context())


@pytest.fixture(scope="module")
def run(linear):
    client = SessionProductClient(linear[0], LAYOUT)
    server = SessionProductServer(linear[1], LAYOUT)
    masks_o, masks_u = draw_masks(LAYOUT, OWNER_SEED), draw_masks(LAYOUT, USER_SEED)
    query = client.query(masks_u)
    reply, owner = server.answer(query, masks_o, seed=OUT_SEED)
    return query, reply, owner, client.shares(reply, masks_u), masks_o, masks_u


def _check_exact(layout, owner, user, mo, mu):
    (score_o, value_o), (score_u, value_u) = owner, user
    keys, values = mo.keys + mu.keys, mo.values + mu.values
    assert len(score_o) == len(value_u) == len(layout.steps)
    for i, t in enumerate(layout.steps):
        length = layout.cache(t)
        a = mo.score_a[i] + mu.score_a[i]
        assert torch.equal(score_o[i] + score_u[i], a @ keys[:, :length].transpose(1, 2))
        a = mo.value_a[i] + mu.value_a[i]
        assert torch.equal(value_o[i] + value_u[i], a @ values[:, :length])
        assert score_o[i].shape == (layout.groups, layout.rows(t), length)
        assert value_o[i].shape == (layout.groups, layout.rows(t), layout.head_dim)


def test_every_steps_triples_are_exact(run):
    _, _, owner, user, mo, mu = run
    _check_exact(LAYOUT, owner, user, mo, mu)


def test_material_in_chunks_the_later_steps_alone(linear):
    """first = 1: only the decode steps' material (the cache masks B still cover the prefill rows)."""
    layout = SessionLayout(groups=2, heads=2, head_dim=4, appends=(3, 1, 1), first=1)
    masks_o, masks_u = draw_masks(layout, OWNER_SEED), draw_masks(layout, USER_SEED)
    client = SessionProductClient(linear[0], layout)
    reply, owner = SessionProductServer(linear[1], layout).answer(client.query(masks_u), masks_o, seed=OUT_SEED)
    _check_exact(layout, owner, client.shares(reply, masks_u), masks_o, masks_u)
    with pytest.raises(ConfigError, match="first"):
        SessionLayout(groups=2, heads=2, head_dim=4, appends=(3, 1), first=2)


def _ciphertexts(rows: int, n: int, m: int) -> tuple[int, int]:
    packing = choose_packing(2 * rows, n, m, compact=True)
    row_blocks, input_blocks = packing.query_blocks(2 * rows, n)
    return row_blocks * input_blocks, row_blocks * packing.output_blocks(m)


def test_cost_is_one_round_trip_of_the_predicted_ciphertexts(run):
    query, reply, *_ = run
    R, L, d = LAYOUT.total_rows, LAYOUT.length, LAYOUT.head_dim
    terms = [(R, d, L), (L, d, R), (R, L, d), (d, L, R)]  # user rows, inner, owner outputs
    ups, downs = zip(*(_ciphertexts(r, k, LIMBS * m) for r, k, m in terms))
    groups = LAYOUT.groups
    # bundle header, then per sub-product one bfv_linear header and its ciphertexts
    assert len(query) == 1 + groups * (len(terms) + sum(ups))
    assert len(reply) == 1 + groups * (len(terms) + sum(downs))
    query_ct, reply_ct = max_ciphertext_bytes(len(COEFF_BITS) - 1), max_ciphertext_bytes(REPLY_PRIMES)
    payload = [sum(len(p) for p in msg[1:] if not bytes(p[:3]) == b"PLB") for msg in (query, reply)]
    # a query ciphertext is seeded (c1 from a seed): at most half a full one, plus the seed
    assert payload[0] <= groups * sum(ups) * (query_ct // 2 + 1024)
    assert payload[1] <= groups * sum(downs) * reply_ct


def test_user_shares_are_masked_fresh_at_every_step(linear):
    """The owner's B_o enters every step. With the user's A_u rows all equal unit vectors e_0, an
    unmasked reply would hand the user B_o's column 0 (the check has power); the real reply gives it
    shares with no entry equal to B_o's, and two steps with the same A_u row get different shares."""
    layout = SessionLayout(groups=1, heads=1, head_dim=3, appends=(2, 1, 1))
    client = SessionProductClient(linear[0], layout)
    masks_o, masks_u = draw_masks(layout, OWNER_SEED), draw_masks(layout, USER_SEED)
    for a in masks_u.score_a:
        a.zero_()
        a[..., 0] = 1
    masks_u.keys.zero_()
    for server, expect in ((SessionProductServer(linear[1], layout), False), (_Unmasked(linear[1], layout), True)):
        reply, _ = server.answer(client.query(masks_u), masks_o, seed=OUT_SEED)
        scores, _ = client.shares(reply, masks_u)
        local = [a @ masks_u.keys[:, : layout.cache(t)].transpose(1, 2) for t, a in enumerate(masks_u.score_a)]
        seen = [s - x for s, x in zip(scores, local)]  # the cross term A_u B_o^T's user share
        column = masks_o.keys[0, :, 0]
        hits = sum(int((v[0, 0] == column[: v.shape[2]]).sum()) for v in seen)
        assert (hits == sum(v.shape[2] for v in seen)) is expect
        assert torch.equal(seen[1][0, 0], seen[2][0, 0, :3]) is expect


class _Unmasked(SessionProductServer):
    def _output_mask(self, prg, rows, cols):
        return torch.zeros((rows, cols), dtype=torch.int64)


def test_bad_peer_bytes_are_protocol_errors(linear, run):
    query, reply, _, _, masks_o, masks_u = run
    client = SessionProductClient(linear[0], LAYOUT)
    server = SessionProductServer(linear[1], LAYOUT)
    with pytest.raises(ProtocolError):
        client.shares(reply[:-1], masks_u)
    with pytest.raises(ProtocolError, match="magic"):
        client.shares(query, masks_u)
    with pytest.raises(ProtocolError):
        server.answer(reply, masks_o)
    with pytest.raises(ProtocolError):
        client.shares([reply[0]] + [b"PLBR" + bytes(20)] + list(reply[2:]), masks_u)
    # a compact reply ciphertext (c1, then c0's result coefficients): wrong size, or a residue >= its prime
    with pytest.raises(ProtocolError, match="compact"):
        client.shares(list(reply[:2]) + [reply[2][:-1]] + list(reply[3:]), masks_u)
    with pytest.raises(ProtocolError, match="prime"):
        client.shares(list(reply[:2]) + [b"\xff" * len(reply[2])] + list(reply[3:]), masks_u)
    # a query for another session's rows: refused before anything is multiplied
    other = SessionLayout(groups=2, heads=2, head_dim=4, appends=(3, 1, 2))
    other_query = SessionProductClient(linear[0], other).query(draw_masks(other, USER_SEED))
    with pytest.raises(ProtocolError, match="rows"):
        server.answer(other_query, masks_o)


def test_bad_layouts_and_masks_are_config_errors(linear):
    with pytest.raises(ConfigError):
        SessionLayout(groups=1, heads=1, head_dim=4, appends=())
    with pytest.raises(ConfigError):
        SessionLayout(groups=1, heads=0, head_dim=4, appends=(1,))
    masks = draw_masks(LAYOUT, OWNER_SEED)
    masks.score_a = masks.score_a[:-1]
    with pytest.raises(ConfigError, match="layout"):
        SessionProductServer(linear[1], LAYOUT).answer([b""], masks)
