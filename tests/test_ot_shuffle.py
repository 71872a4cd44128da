"""permllm.ot, permllm.switching, permllm.ot_shuffle: the permutation correlation from OT, no helper.

Exact over Z_2^64 (the helper's protocols.permute c1 = pi(a) - b). Every case is seeded (party seeds,
inputs, permutations), so each is deterministic. The view tests run an attack that reads the
secret exactly once one mask is removed, and show that it reads nothing with the masks in place.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from permllm.errors import ConfigError, ProtocolError
from permllm.kernels import gather_rows, invert_permutation
from permllm.ot import (
    BASE_OTS,
    ELEMENT_BYTES,
    BaseReceiver,
    BaseSender,
    ExtensionChooser,
    ExtensionSender,
    P,
    matrix_bytes,
    tccr,
)
from permllm.ot_shuffle import ShuffleClient, ShuffleServer, query_bytes, reply_bytes
from permllm.prg import Prg
from permllm.switching import apply, network, route, switch_count

USER_SEED, OWNER_SEED = bytes(range(16)), bytes(range(16, 32))
HEAD = 13  # a query's or a reply's fixed header: magic, version, batch, count


def _uniform(seed: int, *shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, shape, dtype=torch.int64, generator=g)


def _session(client_cls=ShuffleClient):
    """(client, server) after the base OTs; asserts their two messages' sizes."""
    client, server = client_cls(seed=USER_SEED), ShuffleServer(seed=OWNER_SEED)
    request = client.base_request()  # flight 1: user -> owner
    reply = server.base_reply(request)  # flight 2: owner -> user (beside the first query)
    assert (len(request), len(reply)) == (7 + BASE_OTS * ELEMENT_BYTES, 7 + ELEMENT_BYTES)
    client.base_accept(reply)
    return client, server


@pytest.fixture(scope="module")
def session():
    return _session()


def _run(client, server, perms, inputs):
    """One batch: owner -> user query, user -> owner reply (two flights); returns (query, reply, shares, b)."""
    query = server.query(perms, [a.shape[1] for a in inputs])
    reply, shares = client.answer(query, inputs)
    return query, reply, shares, server.finish(reply)


# -- the switching network -------------------------------------------------------------------------


def test_switch_counts_are_waksmans():
    assert [switch_count(n) for n in range(1, 9)] == [0, 1, 3, 5, 8, 11, 14, 17]
    for k in range(1, 12):  # k log2 k - k + 1 for a power of two
        assert switch_count(2**k) == k * 2**k - 2**k + 1
    assert (switch_count(576), switch_count(1536)) == (4737, 14849)


def test_every_permutation_of_small_n_is_routed():
    for n in range(1, 7):
        net = network(n)
        values = np.arange(n, dtype=np.uint64)[:, None]
        for perm in itertools.permutations(range(n)):
            assert apply(net, route(net, np.array(perm)), values)[:, 0].tolist() == list(perm)


@pytest.mark.parametrize("n", [9, 16, 33, 64, 100, 576, 1536])
def test_random_permutations_are_routed(n):
    net = network(n)
    values = Prg(USER_SEED, f"values/{n}").uint64(2 * n).reshape(n, 2)
    for i in range(4):
        perm = Prg(OWNER_SEED, f"perm/{n}/{i}").permutation(n)
        assert np.array_equal(apply(net, route(net, perm), values), values[perm])


# -- base OTs and the extension --------------------------------------------------------------------


def _pi_bits(bits: int) -> int:
    """floor(2^bits pi) by Machin's formula pi = 16 atan(1/5) - 4 atan(1/239), with guard bits."""
    guard = bits + 64

    def atan_inv(x: int) -> int:
        total, term, k = 0, (1 << guard) // x, 0
        while term:
            total += term // (2 * k + 1) if k % 2 == 0 else -(term // (2 * k + 1))
            term //= x * x
            k += 1
        return total

    return (16 * atan_inv(5) - 4 * atan_inv(239)) >> 64


def _probably_prime(n: int) -> bool:
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for base in (2, 3, 5, 7, 11, 13):
        x = pow(base, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def test_the_group_is_rfc_3526_group_15():
    assert P == 2**3072 - 2**3008 - 1 + 2**64 * (_pi_bits(2942) + 1690314)
    assert _probably_prime(P) and _probably_prime((P - 1) // 2)
    assert pow(2, (P - 1) // 2, P) == 1  # g = 2 generates the subgroup of order (p - 1) / 2


def test_base_ots_and_the_extension_give_the_chosen_pad():
    receiver, sender = BaseReceiver(Prg(USER_SEED, "base")), BaseSender(Prg(OWNER_SEED, "base"))
    reply, keys0, keys1 = sender.reply(receiver.request())
    keys = receiver.keys(reply)
    assert keys == [k1 if s else k0 for k0, k1, s in zip(keys0, keys1, receiver.choices)]
    assert all(k0 != k1 for k0, k1 in zip(keys0, keys1))
    m = 1001
    choices = np.unpackbits(np.frombuffer(Prg(OWNER_SEED, "choices").bytes(126), dtype=np.uint8))[:m]
    chooser, ext = ExtensionChooser(keys0, keys1), ExtensionSender(receiver.choices, keys)
    for batch in (0, 1):
        matrix, t = chooser.extend(choices, batch)
        assert len(matrix) == matrix_bytes(m) == 128 * 126
        q = ext.extend(matrix, m, batch)
        mine, zero, one = tccr(t, 3, batch, 7), tccr(q, 3, batch, 7), tccr(q ^ ext.secret, 3, batch, 7)
        assert np.array_equal(mine, np.where(choices[:, None] == 1, one, zero))
        assert not (zero == one).all(axis=1).any()  # the pad not chosen differs in every OT
    with pytest.raises(ProtocolError, match="matrix has"):
        ext.extend(matrix[:-1], m, 0)
    with pytest.raises(ProtocolError, match="group element"):
        receiver.keys(reply[:7] + (P - 1).to_bytes(ELEMENT_BYTES, "big"))
    with pytest.raises(ProtocolError, match="bytes, expected"):
        sender.reply(receiver.request()[:-1])


# -- the shuffle -----------------------------------------------------------------------------------


SHAPES = [(1, 1), (2, 1), (3, 2), (17, 1), (64, 3), (1536, 2)]


def test_the_shuffle_is_exact_and_costs_one_round_trip(session):
    client, server = session
    perms = [Prg(OWNER_SEED, f"exact/{n}").permutation(n) for n, _ in SHAPES]
    perms.append(Prg(OWNER_SEED, "segments").segment_permutation([7] * 9))
    perms.append(Prg(OWNER_SEED, "causal").segment_permutation([1, 2, 3, 4] * 3))
    inputs = [_uniform(i, *s) for i, s in enumerate(SHAPES + [(63, 1), (30, 2)])]
    query, reply, shares, b = _run(client, server, perms, inputs)
    for a, pi, share, mask in zip(inputs, perms, shares, b):
        assert torch.equal(share + mask, gather_rows(a, pi))
    shapes = [tuple(a.shape) for a in inputs]
    m = sum(switch_count(n) for n, _ in shapes)
    assert [len(p) for p in query] == [HEAD + 8 * len(shapes), 128 * math.ceil(m / 8)]
    assert [len(p) for p in reply] == [
        HEAD,
        sum(8 * c * n for n, c in shapes),
        sum(8 * c * switch_count(n) for n, c in shapes),
    ]
    assert (sum(map(len, query)), sum(map(len, reply))) == (query_bytes(shapes), reply_bytes(shapes))


def test_pi_and_its_inverse_in_one_batch(session):
    """c1 = pi(a) - b and c2 = pi^-1(a2) - b2 of one step travel in one query and one reply."""
    client, server = session
    lengths = [5] * 4
    pi = Prg(OWNER_SEED, "inverse").segment_permutation(lengths)
    a, a2 = _uniform(1, 20, 2), _uniform(2, 20, 3)
    _, _, (c1, c2), (b, b2) = _run(client, server, [pi, invert_permutation(pi)], [a, a2])
    assert torch.equal(c1 + b, gather_rows(a, pi))
    assert torch.equal(gather_rows(c2 + b2, pi), a2)


def test_a_batch_without_switches(session):
    """n = 1 everywhere: no OT, an empty U; the reply carries the masked inputs only."""
    client, server = session
    inputs = [_uniform(4, 1, 3), _uniform(5, 1, 1)]
    query, reply, shares, b = _run(client, server, [[0], [0]], inputs)
    assert [len(p) for p in query] == [HEAD + 16, 0] and [len(p) for p in reply] == [HEAD, 32, 0]
    assert all(torch.equal(share + mask, a) for a, share, mask in zip(inputs, shares, b))


def test_the_same_contract_as_the_bfv_correlation(session):
    from permllm.bfv_correlations import PermutationClient, PermutationServer
    from permllm.bfv_linear import LinearCorrelationClient, LinearCorrelationServer

    client, server = session
    linear = LinearCorrelationClient()
    bfv_client, bfv_server = (
        PermutationClient(linear),
        PermutationServer(LinearCorrelationServer(linear.public_context())),
    )
    lengths, c = [7] * 9, 1
    a = _uniform(5, 63, c)
    pi = Prg(OWNER_SEED, "contract").segment_permutation(lengths)
    bfv_reply, bfv_b = bfv_server.answer(bfv_client.query(a, lengths), pi, lengths, c, seed=OWNER_SEED)
    bfv_share = bfv_client.shares(bfv_reply, (63, c), lengths)
    _, _, (share,), (b,) = _run(client, server, [pi], [a])
    assert torch.equal(share + b, bfv_share + bfv_b)
    assert torch.equal(share + b, gather_rows(a, pi))


# -- the views -------------------------------------------------------------------------------------


class _NoSecondPad(ShuffleClient):
    """A user that forgets the pad p1 over y (y = delta + p0)."""

    def _pad_pair(self, rows, c, batch, block):
        pad0, pad1 = super()._pad_pair(rows, c, batch, block)
        return pad0, np.zeros_like(pad1)


class _NoFirstPad(ShuffleClient):
    """A user that forgets the pad p0 (y = delta - p1, and its wire masks are never refreshed)."""

    def _pad_pair(self, rows, c, batch, block):
        pad0, pad1 = super()._pad_pair(rows, c, batch, block)
        return np.zeros_like(pad0), pad1


class _NoInputMask(ShuffleClient):
    """A user that sends its input unmasked (rho = 0)."""

    def _input_mask(self, n, c):
        return np.zeros((n, c), dtype=np.uint64)


def _owner_hits(server, client, n: int, seed: int) -> int:
    """The owner's attack on a: how many values it can compute from its view (a - rho, y, y -/+ its
    pads, on the first switches also z_w1 - z_w0 + (y -/+ pads), its outputs b) equal an entry of a or
    a difference of two entries."""
    a = _uniform(seed, n, 1)
    pi = Prg(OWNER_SEED, f"owner-view/{seed}").permutation(n)
    query = server.query([pi], [1])
    pads = server._pending[max(server._pending)][3][0][:, 0]
    reply, _ = client.answer(query, [a])
    (b,) = server.finish(reply)
    z_in, y = np.frombuffer(reply[1], dtype="<u8"), np.frombuffer(reply[2], dtype="<u8")
    net = network(n)
    first = (net.in0 < n) & (net.in1 < n)
    zd = z_in[net.in1[first]] - z_in[net.in0[first]]
    minus, plus = y - pads, y + pads
    seen = [z_in, y, minus, plus, zd + minus[first], zd + plus[first], b.numpy().view(np.uint64)[:, 0]]
    av = a.numpy().view(np.uint64)[:, 0]
    targets = set(av.tolist()) | set((av[:, None] - av[None, :])[~np.eye(n, dtype=bool)].tolist())
    return sum(int(v) in targets for v in np.concatenate(seen).tolist())


@pytest.mark.parametrize("broken", [_NoSecondPad, _NoFirstPad, _NoInputMask])
def test_the_owner_learns_nothing_of_a_unless_a_mask_is_broken(session, broken):
    client, server = session
    assert _owner_hits(server, client, 64, 1) == 0
    bad_client, bad_server = _session(broken)
    assert _owner_hits(bad_server, bad_client, 64, 1) >= 8  # 15 to 64 hits with these seeds


def test_a_reaches_the_owner_only_through_a_minus_rho():
    """Same seeds, two inputs: y is byte-identical, the masked inputs differ by a1 - a2 exactly, so the
    owner's view of a is a one-time pad (rho uniform from the user's Prg)."""
    pi = Prg(OWNER_SEED, "pad").permutation(40)
    a1, a2 = _uniform(6, 40, 2), _uniform(7, 40, 2)
    replies = []
    for a in (a1, a2):
        client, server = _session()
        query = server.query([pi], [2])
        replies.append(client.answer(query, [a])[0])
    assert replies[0][2] == replies[1][2]
    masked = [torch.from_numpy(np.frombuffer(r[1], dtype="<i8").reshape(40, 2).copy()) for r in replies]
    assert torch.equal(masked[0] - masked[1], a1 - a2)


class _Unhidden(ExtensionChooser):
    """An owner whose u_i is not hidden by G(K_i^1) (it uses G(K_i^0), so u_i = r)."""

    def _second(self, i, batch, nbytes):
        return np.frombuffer(Prg(self._keys0[i], f"ot/iknp/{batch}/{i}").bytes(nbytes), dtype=np.uint8)


def _user_agreement(client, server, n: int) -> float:
    """The user's attack on pi: read the switch bits as the first column of U; the fraction right."""
    pi = Prg(OWNER_SEED, "user-view").permutation(n)
    query = server.query([pi], [1])
    client.answer(query, [_uniform(3, n, 1)])
    bits = route(network(n), pi)
    guess = np.unpackbits(np.frombuffer(query[1], dtype=np.uint8)[: math.ceil(bits.size / 8)], bitorder="little")
    return float((guess[: bits.size] == bits).mean())


def test_the_user_learns_nothing_of_pi_unless_the_mask_is_broken(session):
    client, server = session
    assert 0.45 < _user_agreement(client, server, 576) < 0.55  # 4737 bits: 0.5 +- 0.05 is 6.9 sigma
    bad_client, bad_server = _session()
    bad_server._ext = _Unhidden(bad_server._ext._keys0, bad_server._ext._keys1)
    assert _user_agreement(bad_client, bad_server, 576) == 1.0


# -- bad input -------------------------------------------------------------------------------------


def test_bad_peer_bytes_are_protocol_errors():
    client, server = _session()
    a = [_uniform(1, 10, 1)]
    query = server.query([np.arange(10)], [1])
    with pytest.raises(ProtocolError, match="shapes"):
        client.answer(query, [_uniform(1, 10, 2)])
    with pytest.raises(ProtocolError, match="matrix has"):
        client.answer([query[0], query[1][:-1]], a)
    with pytest.raises(ProtocolError, match="magic"):
        client.answer([b"XXXX" + query[0][4:], query[1]], a)
    with pytest.raises(ProtocolError, match="2 byte strings"):
        client.answer(query[:1], a)
    reply, _ = client.answer(query, a)
    with pytest.raises(ProtocolError, match="batch 0"):
        client.answer(query, a)  # a replayed query
    with pytest.raises(ProtocolError, match="expected"):
        server.finish([reply[0], reply[1], reply[2][:-8]])
    with pytest.raises(ProtocolError, match="3 byte strings"):
        server.finish(reply[:2])
    with pytest.raises(ProtocolError, match="after its 13"):
        server.finish([reply[0] + b"x", reply[1], reply[2]])
    server.finish(reply)
    with pytest.raises(ProtocolError, match="no query is waiting"):
        server.finish(reply)


def test_bad_calls_are_config_errors():
    client, server = ShuffleClient(seed=USER_SEED), ShuffleServer(seed=OWNER_SEED)
    with pytest.raises(ConfigError, match="base_reply"):
        server.query([np.arange(3)], [1])
    with pytest.raises(ConfigError, match="base_accept"):
        client.answer([b"", b""], [_uniform(1, 3, 1)])
    client.base_accept(server.base_reply(client.base_request()))
    with pytest.raises(ConfigError, match="permutation"):
        server.query([np.array([0, 0, 2])], [1])
    with pytest.raises(ConfigError, match="channel counts"):
        server.query([np.arange(3)], [1, 1])
    with pytest.raises(ConfigError, match="channels is outside"):
        server.query([np.arange(3)], [0])
    with pytest.raises(ConfigError, match="torch.int64"):
        client.answer([b"", b""], [np.zeros((3, 1))])
