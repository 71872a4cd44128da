"""Tests for permllm.he: private token-id recovery (BFV one-hot query, owner-side dot product).

Size bounds asserted here (vocab 49152, N = 4096, 24 chunks of 2048 slots):
- one query chunk <= 100 000 bytes (measured ~88.5 KB; uncompressed bound 131 072 + framing),
  so a query < 2 400 000 bytes (measured ~2.12 MB);
- reply <= 100 000 bytes (measured ~88.5 KB);
- public context < 8 000 000 bytes (measured ~6.2 MB, dominated by Galois keys).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import tenseal as ts

from permllm.errors import ConfigError, PermLLMError, ProtocolError
from permllm.he import (
    MAX_VOCAB_SIZE,
    IndexLookupClient,
    IndexLookupServer,
    _is_prime,
    batching_prime,
)

VOCAB = 49152
SLOTS = 2048
CHUNKS = VOCAB // SLOTS
QUERY_CHUNK_BOUND = 100_000
QUERY_BOUND = 2_400_000
REPLY_BOUND = 100_000
CONTEXT_BOUND = 8_000_000
QUICK_S = 1.0  # malformed input must be refused within this (it is ~ms in practice)


@pytest.fixture(scope="module")
def client() -> IndexLookupClient:
    return IndexLookupClient(VOCAB)


@pytest.fixture(scope="module")
def server(client) -> IndexLookupServer:
    return IndexLookupServer(client.public_context())


@pytest.fixture(scope="module")
def table() -> np.ndarray:
    return np.random.default_rng(20240528).permutation(VOCAB).astype(np.int64)


@pytest.fixture(scope="module")
def query0(client) -> list[bytes]:
    return client.query(0)


def roundtrip(client, server, table, j) -> int:
    return client.decode(server.answer(client.query(j), table))


# ----------------------------------------------------------------------------- parameters


def test_parameters(client):
    assert client.poly_modulus_degree == 4096
    assert client.chunk_slots == SLOTS
    assert client.n_chunks == CHUNKS
    assert client.plain_modulus == 65537


@pytest.mark.parametrize("n, at_least", [(4096, 49152), (8192, 49152), (4096, 10), (4096, 152064), (8192, 1 << 18)])
def test_batching_prime(n, at_least):
    t = batching_prime(n, at_least)
    assert t >= at_least and t % (2 * n) == 1 and _is_prime(t)
    # smallest such prime
    assert not any(_is_prime(c) and c >= at_least for c in range(t - 2 * n, at_least - 1, -2 * n))


def test_is_prime_matches_trial_division():
    for n in range(-3, 3000):
        expected = n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))
        assert _is_prime(n) == expected, n


# ----------------------------------------------------------------------------- correctness


def test_recovery_edges_and_chunk_boundaries(client, server, table):
    js = {0, 1, VOCAB - 1, VOCAB - 2}
    for c in range(1, CHUNKS):
        js |= {c * SLOTS - 1, c * SLOTS}
    js |= {int(np.argmax(table)), int(np.argmin(table))}  # entries 49151 (> t/2 when signed) and 0
    for j in sorted(js):
        assert roundtrip(client, server, table, j) == table[j], j


def test_recovery_random_indices(client, server, table):
    rng = np.random.default_rng(7)
    for j in rng.integers(0, VOCAB, size=8):
        assert roundtrip(client, server, table, int(j)) == table[j]


def test_fresh_permutation_each_token(client, server):
    rng = np.random.default_rng(11)
    for _ in range(3):
        perm = rng.permutation(VOCAB)
        j = int(rng.integers(VOCAB))
        assert roundtrip(client, server, perm, j) == perm[j]


def test_reply_decrypts_to_exactly_table_entry(client, server, query0):
    """Raw decryption: one slot, equal to table[0]; also table values up to t - 1 come back exactly."""
    t = client.plain_modulus
    for first in (12345, t - 1, 0, 1):
        tab = np.arange(VOCAB, dtype=np.int64)
        tab[0] = first
        reply = server.answer(query0, tab)
        vec = ts.bfv_vector_from(client._ctx, reply)
        assert vec.size() == 1 and len(vec.ciphertext()) == 1
        assert vec.decrypt()[0] % t == first


def test_decode_rejects_entry_outside_vocab(client, server, query0):
    tab = np.arange(VOCAB, dtype=np.int64)
    tab[0] = VOCAB  # < t, so the owner accepts it, but it is no token id
    with pytest.raises(ProtocolError, match="outside"):
        client.decode(server.answer(query0, tab))


def test_non_permutation_table(client, server):
    tab = np.random.default_rng(3).integers(0, VOCAB, size=VOCAB)
    for j in (5, 30000):
        assert roundtrip(client, server, tab, j) == tab[j]


@pytest.mark.parametrize("vocab", [1, 5, 2049])
def test_small_and_partial_chunk_vocab(vocab):
    cl = IndexLookupClient(vocab)
    sv = IndexLookupServer(cl.public_context())
    tab = np.random.default_rng(vocab).permutation(vocab)
    assert cl.n_chunks == -(-vocab // SLOTS)
    for j in {0, vocab - 1, vocab // 2}:
        assert cl.decode(sv.answer(cl.query(j), tab)) == tab[j]


def test_poly_modulus_degree_8192(table):
    cl = IndexLookupClient(VOCAB, poly_modulus_degree=8192)
    sv = IndexLookupServer(cl.public_context())
    assert cl.n_chunks == 12 and cl.chunk_slots == 4096
    for j in (0, 4095, 4096, VOCAB - 1):
        assert cl.decode(sv.answer(cl.query(j), table)) == table[j]


# ----------------------------------------------------------------------------- privacy properties


def test_owner_never_holds_secret_key(client, server):
    assert not server.context.is_private()
    assert not server.context.has_secret_key()
    assert not ts.context_from(client.public_context()).is_private()
    assert client._ctx.is_private()  # the user keeps it


def test_owner_refuses_private_context(client):
    with pytest.raises(ProtocolError, match="secret key"):
        IndexLookupServer(client._ctx.serialize(save_secret_key=True))


def test_queries_and_replies_are_randomized(client, server, table):
    a, b = client.query(42), client.query(42)
    assert all(x != y for x, y in zip(a, b))  # fresh encryption randomness
    assert server.answer(a, table) != server.answer(a, table)  # owner re-randomizes (flood)


def test_flood_factors_within_budget(server, client):
    for _ in range(20):
        factors = server._flood_factors(client.n_chunks)
        assert all(0 < f < client.plain_modulus // 4 for f in factors)
        r_bits = math.log2(math.prod(factors))
        assert 30 <= r_bits <= 36  # calibrated: leaves >= 12 bits of budget at N=4096, vocab 49152


# ----------------------------------------------------------------------------- sizes


def test_sizes(client, server, table):
    pub = client.public_context()
    assert len(pub) < CONTEXT_BOUND
    for j in (0, VOCAB - 1):
        q = client.query(j)
        assert len(q) == CHUNKS
        assert all(len(c) <= QUERY_CHUNK_BOUND for c in q)
        assert sum(map(len, q)) < QUERY_BOUND
        reply = server.answer(q, table)
        assert len(reply) <= REPLY_BOUND
        assert len(reply) <= client.max_reply_bytes


# ----------------------------------------------------------------------------- malformed wire data


def assert_quick_protocol_error(fn, match=None):
    t0 = time.perf_counter()
    with pytest.raises(ProtocolError, match=match) as info:
        fn()
    assert time.perf_counter() - t0 < QUICK_S
    assert info.value.__cause__ is None  # no chained native traceback
    return info


@pytest.mark.parametrize("count", [0, 1, CHUNKS - 1, CHUNKS + 1])
def test_wrong_chunk_count(server, query0, table, count):
    query = (query0 * 2)[:count]
    assert_quick_protocol_error(lambda: server.answer(query, table), match="chunks")


def test_garbage_chunk(server, query0, table):
    rng = np.random.default_rng(0)
    for garbage in (b"garbage", rng.bytes(50_000), b"\x00" * 1000, query0[3][: len(query0[3]) // 2]):
        q = list(query0)
        q[3] = garbage
        assert_quick_protocol_error(lambda: server.answer(q, table), match="chunk 3")


def test_empty_and_oversized_chunk(server, query0, table):
    for bad in (b"", b"\x01" * (server.max_chunk_bytes + 1)):
        q = list(query0)
        q[0] = bad
        assert_quick_protocol_error(lambda: server.answer(q, table), match="bytes")


def test_query_wrong_types(server, query0, table):
    assert_quick_protocol_error(lambda: server.answer(b"".join(query0), table), match="list")
    q = list(query0)
    q[1] = "not bytes"
    assert_quick_protocol_error(lambda: server.answer(q, table), match="chunk 1")


def test_chunk_wrong_vector_size(client, server, query0, table):
    q = list(query0)
    q[2] = ts.bfv_vector(client._ctx, [1, 2, 3]).serialize()
    assert_quick_protocol_error(lambda: server.answer(q, table), match="chunk 2")


def test_chunk_from_other_parameters(server, query0, table):
    other = IndexLookupClient(VOCAB, poly_modulus_degree=8192)
    q = list(query0)
    q[0] = other.query(0)[0]  # 8192-degree ciphertext (~430 KB): over the size cap
    assert_quick_protocol_error(lambda: server.answer(q, table))
    small = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=4096, plain_modulus=40961)
    q[0] = ts.bfv_vector(small, [0] * SLOTS).serialize()  # same size, other plain modulus
    assert_quick_protocol_error(lambda: server.answer(q, table), match="chunk 0")


def test_three_component_chunk_rejected(client, server, query0, table):
    a = ts.bfv_vector(client._ctx, [1] * SLOTS)
    client._ctx.auto_relin = False
    try:
        sq = (a * a).serialize()
    finally:
        client._ctx.auto_relin = True
    q = list(query0)
    q[4] = sq
    assert_quick_protocol_error(lambda: server.answer(q, table), match="chunk 4")


def test_malformed_public_context():
    rng = np.random.default_rng(1)
    for bad in (b"", b"garbage", rng.bytes(10_000), b"\x00" * 5000):
        assert_quick_protocol_error(lambda: IndexLookupServer(bad))
    assert_quick_protocol_error(lambda: IndexLookupServer("text"), match="bytes")  # type: ignore[arg-type]


def test_oversized_public_context(client):
    pub = client.public_context()
    assert_quick_protocol_error(lambda: IndexLookupServer(pub, max_context_bytes=len(pub) - 1), match="bytes")


def test_public_context_missing_keys_or_wrong_scheme():
    ctx = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=4096, plain_modulus=65537)
    no_galois = ctx.serialize(save_secret_key=False, save_galois_keys=False)
    assert_quick_protocol_error(lambda: IndexLookupServer(no_galois), match="Galois")
    ckks = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=4096, coeff_mod_bit_sizes=[40, 20, 40])
    assert_quick_protocol_error(lambda: IndexLookupServer(ckks.serialize(save_secret_key=False)), match="BFV")
    tiny = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=2048, plain_modulus=65537, coeff_mod_bit_sizes=[27, 27])
    tiny_pub = tiny.serialize(save_secret_key=False)
    assert_quick_protocol_error(lambda: IndexLookupServer(tiny_pub), match="2048")


def test_malformed_reply(client, query0):
    rng = np.random.default_rng(2)
    for bad in (b"", b"garbage", rng.bytes(20_000), b"\x00" * (client.max_reply_bytes + 1)):
        assert_quick_protocol_error(lambda: client.decode(bad))
    # a well-formed ciphertext of the wrong shape (a query chunk: 2048 slots)
    assert_quick_protocol_error(lambda: client.decode(query0[0]), match="size 1")
    assert_quick_protocol_error(lambda: client.decode("text"), match="bytes")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- local argument errors


@pytest.mark.parametrize("j", [-1, VOCAB, 1.0, True, "3", None])
def test_query_bad_index(client, j):
    with pytest.raises(ConfigError, match="j must"):
        client.query(j)


def test_query_accepts_numpy_int(client, server, table):
    assert client.decode(server.answer(client.query(np.int64(77)), table)) == table[77]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(vocab_size=MAX_VOCAB_SIZE + 1), "vocab_size"),
        (dict(vocab_size=10.0), "vocab_size"),
        (dict(vocab_size=10, poly_modulus_degree=2048), "poly_modulus_degree"),
        (dict(vocab_size=10, poly_modulus_degree=16384), "poly_modulus_degree"),
    ],
)
def test_client_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        IndexLookupClient(**kwargs)


def test_bad_table(server, query0, client):
    t = client.plain_modulus
    good = np.arange(VOCAB, dtype=np.int64)
    bad_tables = [
        good.astype(np.float64),
        good.reshape(2, -1),
        np.array([], dtype=np.int64),
        np.where(good == 5, -1, good),
        np.where(good == 5, t, good),
        list(good),
    ]
    for bad in bad_tables:
        with pytest.raises(ConfigError, match="table"):
            server.answer(query0, bad)  # type: ignore[arg-type]


def test_all_errors_are_permllm_errors():
    assert issubclass(ProtocolError, PermLLMError) and issubclass(ConfigError, PermLLMError)
