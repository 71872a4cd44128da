"""permllm.bfv_linear: shares of V @ W over Z_2^64 from BFV, exactness and the reply's security points.

Exact comparisons and the low-limb wrap: a share is wrong only when P + R' wraps mod 2^59 (P the
low-limb product, R' the low mask), probability <= 31 * 2^19 * n / 2^59 per output. Seeded cases
derive R' from the owner seed, so they are deterministic (checked once, never flaky); unseeded cases
use small shapes (at most 64 outputs, n <= 8: total wrap probability below 2^-23).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from permllm.bfv_linear import LinearCorrelationClient, LinearCorrelationServer
from permllm.bfv_packing import Packing
from permllm.errors import ConfigError, ProtocolError
from permllm.seal_io import POLY_DEGREE

T_MOD = 1 << 59


@pytest.fixture(scope="module")
def pair():
    client = LinearCorrelationClient()
    return client, LinearCorrelationServer(client.public_context())


def _data(seed: int, T: int, n: int, m: int, v_bits: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if v_bits == 64:
        V = torch.randint(-(2**63), 2**63 - 1, (T, n), dtype=torch.int64, generator=g)
    else:
        V = torch.randint(0, 2**v_bits, (T, n), dtype=torch.int64, generator=g)
    W = torch.randint(-(2**19), 2**19, (n, m), dtype=torch.int64, generator=g)
    return V, W


def _run(pair, V, W, **kwargs):
    client, server = pair
    T, m = V.shape[0], W.shape[1]
    query = client.encrypt_rows(V, out_features=m)
    reply, R = server.multiply(query, W, **kwargs)
    return query, reply, R, client.decrypt_shares(reply, T, m)


@pytest.mark.parametrize(
    "T,n,m",
    [(1, 7, 5), (3, 64, 100), (2, 130, 9), (1, 576, 1536), (4, 576, 576)],
    ids=["tiny", "odd-T", "ragged", "smollm2-up-T1", "smollm2-q-T4"],
)
def test_shares_add_up_to_the_ring_product(pair, T, n, m):
    V, W = _data(10 + T + n + m, T, n, m)
    _, _, R, U = _run(pair, V, W, seed=bytes(range(16)))
    assert U.dtype == torch.int64 and U.shape == (T, m) and R.shape == (T, m)
    assert torch.equal(U + R, V @ W)  # torch int64 arithmetic wraps mod 2^64


def test_extreme_inputs_and_zero_weights(pair):
    V = torch.tensor([[-1, 2**63 - 1, -(2**63), 31, 32]], dtype=torch.int64)
    W = torch.tensor([[2**19 - 1, -(2**19), 0], [-(2**19), -(2**19), 0], [2**19 - 1, 1, 0]] * 2, dtype=torch.int64)[:5]
    _, _, R, U = _run(pair, V, W, seed=bytes(16))
    assert torch.equal(U + R, V @ W)
    _, _, R0, U0 = _run(pair, V, torch.zeros(5, 3, dtype=torch.int64), seed=bytes(16))
    assert torch.equal(U0 + R0, torch.zeros(1, 3, dtype=torch.int64))


def test_owner_mask_given_seeded_or_fresh(pair):
    V, W = _data(1, 2, 8, 4)
    mask = torch.randint(-(2**63), 2**63 - 1, (2, 4), dtype=torch.int64, generator=torch.Generator().manual_seed(2))
    _, _, R, U = _run(pair, V, W, mask=mask)
    assert torch.equal(R, mask) and torch.equal(U, V @ W - mask)
    _, _, R1, U1 = _run(pair, V, W, seed=b"s" * 16)
    _, _, R2, U2 = _run(pair, V, W, seed=b"s" * 16)
    assert torch.equal(R1, R2) and torch.equal(U1, U2)
    _, _, R3, U3 = _run(pair, V, W)
    _, _, R4, _ = _run(pair, V, W)
    assert not torch.equal(R3, R4) and torch.equal(U3 + R3, V @ W)
    with pytest.raises(ConfigError):
        _run(pair, V, W, seed=bytes(16), mask=mask)


def test_reply_is_rerandomized(pair):
    client, server = pair
    V, W = _data(3, 1, 16, 8)
    query = client.encrypt_rows(V, out_features=8)
    reply1, R1 = server.multiply(query, W, seed=bytes(16))
    reply2, R2 = server.multiply(query, W, seed=bytes(16))
    assert torch.equal(R1, R2) and reply1[0] == reply2[0]
    assert all(a != b for a, b in zip(reply1[1:], reply2[1:]))
    assert torch.equal(client.decrypt_shares(reply1, 1, 8), client.decrypt_shares(reply2, 1, 8))


def _negacyclic_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    full = np.convolve(a.astype(object), b.astype(object))
    out = full[:POLY_DEGREE].copy()
    out[: full.size - POLY_DEGREE] -= full[POLY_DEGREE:]
    return np.array([int(x) % T_MOD for x in out], dtype=np.uint64)


def test_every_non_result_coefficient_is_masked(pair):
    client, server = pair
    T, n, m = 1, 8, 4
    V, W = _data(4, T, n, m, v_bits=12)  # small limbs: the unmasked partial products are small numbers
    query = client.encrypt_rows(V, out_features=m)
    reply, _ = server.multiply(query, W, seed=bytes(16))
    _, _, _, _, tw, nw, mw = struct.unpack("<4sBIIHHH", reply[0])
    packing = Packing(int(tw), int(nw))
    assert len(reply) == 2 and packing.outputs_per_block(m) == mw  # one ciphertext holds every result
    unsigned = V.numpy().view(np.uint64)
    limbs = np.concatenate([unsigned >> np.uint64(5), unsigned & np.uint64(31)])
    plain_product = _negacyclic_product(
        packing.query_coefficients(limbs).astype(np.int64),
        packing.weight_coefficients(W.numpy().view(np.uint64) & np.uint64(T_MOD - 1), m).view(np.int64) << 5 >> 5,
    )
    decrypted = client.decrypt_coefficients(reply[1])
    result = np.zeros(POLY_DEGREE, dtype=bool)
    result[packing.result_positions(2 * T, m, m).reshape(-1)] = True
    leaky = (~result) & (plain_product != 0)
    assert leaky.sum() >= 2 * T * n  # the unmasked reply would show partial dot products with W here
    assert not np.any(decrypted[~result] == plain_product[~result])
    near_zero = np.minimum(decrypted, np.uint64(T_MOD) - decrypted) < np.uint64(1 << 40)
    assert near_zero[~result].sum() <= 2  # uniform mod 2^59: expected 2^-18 per coefficient
    assert np.isclose(decrypted[~result].astype(np.float64).mean() / T_MOD, 0.5, atol=0.02)


def _flooded_budgets(pair, W_list, flood_bits=None):
    client, server = pair
    V, _ = _data(5, 2, 64, 32)
    query = client.encrypt_rows(V, out_features=32)
    if flood_bits is not None:
        server = LinearCorrelationServer(client.public_context())
        server.flood_bits = flood_bits
    budgets = []
    for W in W_list:
        _, cts, _ = server._evaluate(query, W, seed=bytes(16))
        budgets.append([client.noise_budget(ct) for ct in cts])
    fresh = client.noise_budget(query[1])
    return fresh, budgets


def test_flood_hides_the_weight_dependent_noise(pair):
    small = torch.randint(-2, 3, (64, 32), dtype=torch.int64, generator=torch.Generator().manual_seed(6))
    large = _data(7, 1, 64, 32)[1]
    fresh, (b_small, b_large) = _flooded_budgets(pair, [small, large])
    log_q_over_t = 170 - 59
    assert fresh > 90  # the measurement itself: a fresh query has ~2^3 noise
    for budget in b_small + b_large:
        assert 5 <= budget <= log_q_over_t - 80  # noise >= 2^80, still decryptable
    assert max(b_small + b_large) - min(b_small + b_large) <= 1
    _, (w_small, w_large) = _flooded_budgets(pair, [small, large], flood_bits=8)
    assert min(w_small) - max(w_large) >= 8  # with a tiny flood the noise would reveal |W|


def test_malformed_peer_bytes_raise_protocol_error(pair):
    client, server = pair
    ctx = client.public_context()
    for bad in [b"", b"junk", ctx[:-1], ctx + b"x", ctx[:20] + bytes(40) + ctx[60:], "text"]:
        with pytest.raises(ProtocolError):
            LinearCorrelationServer(bad)
    V, W = _data(8, 1, 8, 4)
    query = client.encrypt_rows(V, out_features=4)
    bad_queries = [
        [],
        query[:-1],
        query + [query[-1]],
        [query[0]] + [b"x" * 100] * (len(query) - 1),
        [query[0][:-1]] + query[1:],
        [query[0]] + [query[1][:-10]] + query[2:],
        [query[0]] + ["str"] * (len(query) - 1),
        "not a list",
    ]
    for bad in bad_queries:
        with pytest.raises(ProtocolError):
            server.multiply(bad, W)
    with pytest.raises(ProtocolError):
        server.multiply(query, torch.zeros(9, 4, dtype=torch.int64))  # n mismatch
    reply, _ = server.multiply(query, W, seed=bytes(16))
    with pytest.raises(ProtocolError):
        client.decrypt_shares(reply, 2, 4)
    with pytest.raises(ProtocolError):
        client.decrypt_shares(reply[:-1], 1, 4)
    with pytest.raises(ProtocolError):
        client.decrypt_shares([reply[0], reply[1][::-1]], 1, 4)
    with pytest.raises(ProtocolError):
        client.decrypt_shares([reply[0], query[1]], 1, 4)  # a ciphertext at the wrong level


def test_bad_local_arguments_raise_config_error(pair):
    client, server = pair
    with pytest.raises(ConfigError):
        client.encrypt_rows(torch.zeros(2, 3, dtype=torch.int32))
    query = client.encrypt_rows(torch.zeros(1, 4, dtype=torch.int64))
    with pytest.raises(ConfigError):
        server.multiply(query, torch.full((4, 2), 2**19, dtype=torch.int64))
    with pytest.raises(ConfigError):
        server.multiply(query, torch.zeros(4, 2, dtype=torch.int64), mask=torch.zeros(2, 2, dtype=torch.int64))


@pytest.mark.parametrize("T,n,m", [(3, 64, 100), (2, 130, 9)], ids=["odd-T", "ragged"])
def test_compact_replies_decrypt_to_the_same_shares_in_fewer_bytes(pair, T, n, m):
    """compact=True: c1 and the result coefficients of c0 only (7 + 4 bytes per residue pair)."""
    client, server = pair
    V, W = _data(40 + T + n, T, n, m)
    query = client.encrypt_rows(V, out_features=m)
    full, R = server.multiply(query, W, seed=bytes(16))
    compact, R2 = server.multiply(query, W, seed=bytes(16), compact=True)
    assert torch.equal(R, R2) and len(full) == len(compact)
    shares = client.decrypt_shares(compact, T, m)
    assert torch.equal(shares + R, V @ W)
    tw, nw, mw = struct.unpack("<4sBIIHHH", compact[0])[4:]
    results = Packing(tw, nw).result_positions(min(tw, 2 * T), min(mw, m), m).size
    assert len(compact[1]) == 11 * (POLY_DEGREE + results) < len(full[1])
    with pytest.raises(ProtocolError, match="compact"):
        client.decrypt_shares(compact[:1] + [compact[1][:-11]] + compact[2:], T, m)
