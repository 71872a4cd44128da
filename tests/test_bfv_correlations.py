"""permllm.bfv_correlations: permutation and Beaver product correlations from BFV, owner and user only.

Exact over Z_2^64 (the helper's formulas: protocols.permute c1 = pi(a) - b, protocols.beaver C = A @ B).
bfv_linear's low-limb wrap (probability |P| / 2^59 per output, P the low-limb product) is below 2^-40
per output here: a permutation's P is one 5-bit limb, a product's P at most 31 * 2^16 * 24 < 2^26.
Every case is seeded; the owner masks come from fixed seeds, so each case is deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from permllm.bfv_correlations import (
    LIMBS,
    PermutationClient,
    PermutationServer,
    ProductClient,
    ProductServer,
    permutation_groups,
)
from permllm.bfv_linear import LinearCorrelationClient, LinearCorrelationServer
from permllm.bfv_packing import choose_packing
from permllm.errors import ConfigError, ProtocolError
from permllm.kernels import gather_rows, invert_permutation
from permllm.prg import Prg
from permllm.seal_io import COEFF_BITS, REPLY_PRIMES, max_ciphertext_bytes

SEED = bytes(range(16))
QUERY_CT = max_ciphertext_bytes(len(COEFF_BITS) - 1)  # a fresh ciphertext at the data level, bytes
REPLY_CT = max_ciphertext_bytes(REPLY_PRIMES)  # a reply switched down to two primes


@pytest.fixture(scope="module")
def linear():
    client = LinearCorrelationClient()
    return client, LinearCorrelationServer(client.public_context())


@pytest.fixture(scope="module")
def permutation(linear):
    return PermutationClient(linear[0]), PermutationServer(linear[1])


@pytest.fixture(scope="module")
def product(linear):
    return ProductClient(linear[0]), ProductServer(linear[1])


def _uniform(seed: int, *shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, shape, dtype=torch.int64, generator=g)


def _ciphertexts(msg) -> int:
    """Ciphertext parts of a bundled message (one bfv_linear header per sub-message is not one)."""
    count = int(np.frombuffer(bytes(msg[0])[9:], dtype="<u4").size)
    return len(msg) - 1 - count


def _linear_ciphertexts(rows: int, n: int, m: int) -> tuple[int, int]:
    packing = choose_packing(2 * rows, n, m)
    row_blocks, input_blocks = packing.query_blocks(2 * rows, n)
    return row_blocks * input_blocks, row_blocks * packing.output_blocks(m)


def _payload(msg) -> int:
    """Bytes of a bundled message's ciphertexts (bundle and bfv_linear headers excluded)."""
    return sum(len(p) for p in msg[1:] if not bytes(p[:4]).startswith(b"PLB"))


LAYOUTS = {
    "norm": ([64], 1),  # one segment: the whole vector shuffled
    "swiglu": ([48], 2),  # (gate, up) pairs moved together
    "decode-softmax": ([7] * 9, 1),  # 9 heads, one row each, equal lengths: rows move too
    "prefill-softmax": ([1, 2, 3, 4] * 3, 1),  # causal rows: groups of equal length
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_permutation_correlation_is_the_helpers_c1(permutation, name):
    client, server = permutation
    lengths, c = LAYOUTS[name]
    n = sum(lengths)
    a = _uniform(n + c, n, c)
    pi = Prg(SEED, f"test/{name}").segment_permutation(lengths)
    query = client.query(a, lengths)
    reply, b = server.answer(query, pi, lengths, c, seed=SEED)
    share = client.shares(reply, (n, c), lengths)
    assert torch.equal(share + b, gather_rows(a, pi))
    # cost: one round trip; per group the ciphertexts bfv_linear's packing gives a c x |g| @ |g| x |g|
    ups, downs = zip(*(_linear_ciphertexts(c, len(g), len(g)) for g in permutation_groups(lengths)))
    assert (_ciphertexts(query), _ciphertexts(reply)) == (sum(ups), sum(downs))
    assert _payload(query) <= sum(ups) * QUERY_CT and _payload(reply) <= sum(downs) * REPLY_CT


def test_the_inverse_permutation_in_the_same_round_trip(permutation):
    """c2 = pi^-1(a2) - b2 with c_out channels: the owner answers with pi^-1 (same groups)."""
    client, server = permutation
    lengths = [5] * 4
    a2 = _uniform(3, 20, 3)
    pi = Prg(SEED, "test/inverse").segment_permutation(lengths)
    inverse = invert_permutation(pi)
    reply, b2 = server.answer(client.query(a2, lengths), inverse, lengths, 3, seed=SEED)
    share = client.shares(reply, (20, 3), lengths)
    assert torch.equal(gather_rows(share + b2, pi), a2)


class _UnmaskedServer(PermutationServer):
    def _owner_mask(self, n, channels, seed):
        return torch.zeros((n, channels), dtype=torch.int64)


def _matched(a: torch.Tensor, share: torch.Tensor) -> np.ndarray:
    """The user's attack: for each output position, the index of a's entry equal to its share."""
    where = {int(v): i for i, v in enumerate(a[:, 0].tolist())}
    return np.array([where.get(int(v), -1) for v in share[:, 0].tolist()])


def test_the_user_cannot_read_pi_unless_the_mask_is_broken(linear):
    """The user's whole view is its share pi(a) - b (and a): with b uniform it is independent of pi.
    Breaking b (zero) lets the same attack read pi exactly, so the check has power."""
    client = PermutationClient(linear[0])
    lengths = [256]
    a = _uniform(11, 256, 1)
    pi = Prg(SEED, "test/attack").segment_permutation(lengths)
    for server, expect_hits in ((PermutationServer(linear[1]), 0), (_UnmaskedServer(linear[1]), 256)):
        reply, _ = server.answer(client.query(a, lengths), pi, lengths, 1, seed=SEED)
        guess = _matched(a, client.shares(reply, (256, 1), lengths))
        assert int((guess == pi).sum()) == expect_hits


def test_a_permutation_leaving_its_group_is_refused(permutation):
    client, server = permutation
    lengths = [2, 3]
    query = client.query(_uniform(1, 5, 1), lengths)
    with pytest.raises(ConfigError, match="group"):
        server.answer(query, np.array([2, 1, 0, 3, 4]), lengths, 1)
    with pytest.raises(ConfigError, match="permutation"):
        server.answer(query, np.array([0, 0, 2, 3, 4]), lengths, 1)


def test_a_reply_that_does_not_fit_is_a_protocol_error(permutation):
    client, server = permutation
    lengths = [3, 3, 4]
    query = client.query(_uniform(2, 10, 1), lengths)
    reply, _ = server.answer(query, np.arange(10), lengths, 1, seed=SEED)
    with pytest.raises(ProtocolError, match="sub-messages"):
        client.shares(reply, (10, 1), [10])
    with pytest.raises(ProtocolError, match="part counts"):
        client.shares(reply[:-1], (10, 1), lengths)
    with pytest.raises(ProtocolError, match="magic"):
        server.answer(reply, np.arange(10), lengths, 1)
    with pytest.raises(ProtocolError, match="header"):
        client.shares([b"PL"], (10, 1), lengths)


def test_product_correlation_is_exact_for_64_bit_operands(product):
    client, server = product
    x, y = _uniform(5, 3, 2, 8), _uniform(6, 3, 8, 5)
    query = client.query(x, 5)
    reply, owner = server.answer(query, y, 2, seed=SEED)
    assert torch.equal(client.shares(reply, 3, 2, 5) + owner, x @ y)
    # cost: one query ciphertext for all groups and limbs, one reply ciphertext per limb
    assert _ciphertexts(query) == 1 and _ciphertexts(reply) == LIMBS


def test_a_two_party_beaver_triple(product):
    """C = A @ B from A = A_o + A_u, B = B_o + B_u: local products plus two product correlations,
    A_u @ B_o and (A_o @ B_u)^T = B_u^T @ A_o^T; both queries leave in one flight."""
    client, server = product
    a_o, a_u, b_o, b_u = _uniform(7, 3, 1, 4), _uniform(8, 3, 1, 4), _uniform(9, 3, 4, 6), _uniform(10, 3, 4, 6)
    q1, q2 = client.query(a_u, 6), client.query(b_u.transpose(1, 2).contiguous(), 1)
    r1, s1 = server.answer(q1, b_o, 1, seed=SEED)
    r2, s2 = server.answer(q2, a_o.transpose(1, 2).contiguous(), 6, seed=bytes(16))
    c_owner = a_o @ b_o + s1 + s2.transpose(1, 2)
    c_user = a_u @ b_u + client.shares(r1, 3, 1, 6) + client.shares(r2, 3, 6, 1).transpose(1, 2)
    assert torch.equal(c_owner + c_user, (a_o + a_u) @ (b_o + b_u))
