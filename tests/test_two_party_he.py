"""protocols.two_party.he_runs: owner-user BFV correlations over a channel, exact mod 2^64, with their cost.

Every case is seeded (torch generators; the owner's output masks from a fixed seed where the result
is compared), so bfv_linear's low-limb wrap (probability <= 31 * 2^19 * n / 2^59 per output and limb)
is checked once and never flaky. Costs: 2 flights per run; the owner's compact replies have exact,
predictable sizes (11 bytes per residue pair of c1 and of each result coefficient); the user's seeded
queries are compressed by SEAL, so their bytes are asserted as the framing around the recorded parts,
with the ciphertext count predicted and each one at most half a full ciphertext.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parties.inprocess import run_pair
from permllm.bfv_correlations import LIMBS
from permllm.bfv_linear import MAX_ROWS
from permllm.bfv_packing import choose_packing
from permllm.errors import ConfigError, ProtocolError
from permllm.seal_io import COEFF_BITS, POLY_DEGREE, max_ciphertext_bytes
from permllm.session_products import SessionLayout, SessionProductClient
from protocols.two_party import he_runs
from protocols.two_party.he_runs import (
    HeSession,
    LinearRequest,
    linear_correlations,
    product_correlations,
    weight_limbs,
)
from protocols.two_party.he_wire import message_overhead, pack_message, unpack_message
from tests.recording import Transcript, bit_balance_z

SEED = bytes(range(16))
CHANNEL_HEADER = 28 + 8  # permllm.transport frame header: fixed part and one shape dimension (+ the tag)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ring(g, *shape) -> torch.Tensor:
    return torch.randint(-(2**63), 2**63 - 1, shape, dtype=torch.int64, generator=g)


def _linear_run(weights, inputs, *, seed=SEED, calls=1, transcript=None):
    """Both roles run linear_correlations `calls` times on one session; (run, owner outs, user outs)."""
    shapes = [(v.shape[0], v.shape[1], w.shape[1]) for v, w in zip(inputs, weights)]

    def owner(ctx):
        session = HeSession(ctx)
        reqs = [LinearRequest(*s, w=w) for s, w in zip(shapes, weights)]
        return [linear_correlations(session, reqs, seed=seed) for _ in range(calls)]

    def user(ctx):
        session = HeSession(ctx)
        reqs = [LinearRequest(*s, v=v) for s, v in zip(shapes, inputs)]
        return [linear_correlations(session, reqs) for _ in range(calls)]

    wrap = transcript.wrap if transcript is not None else None
    return run_pair(owner, user, None, None, wrap_channel=wrap, timeout=300)


def _reply_bytes(rows: int, n: int, m_query: int, m_reply: int) -> tuple[int, int]:
    """(parts, bytes) of one compact bfv_linear reply: header 19 bytes, 11 (N + results) per ciphertext."""
    packing = choose_packing(2 * rows, n, m_query, compact=True)
    tw, mw = packing.rows_per_block, packing.outputs_per_block(m_reply)
    total, parts = 19, 1
    for br in range(packing.query_blocks(2 * rows, n)[0]):
        for bj in range(packing.output_blocks(m_reply)):
            results = min(tw, 2 * rows - br * tw) * min(mw, m_reply - bj * mw)
            total, parts = total + 11 * (POLY_DEGREE + results), parts + 1
    return parts, total


def _query_cts(rows: int, n: int, m: int) -> int:
    row_blocks, input_blocks = choose_packing(2 * rows, n, m, compact=True).query_blocks(2 * rows, n)
    return row_blocks * input_blocks


def test_several_weights_in_one_round_trip_exact_with_limbs_where_needed():
    g = _gen(1)
    weights = [
        torch.randint(-(2**19), 2**19, (8, 5), dtype=torch.int64, generator=g),  # fits: one limb
        torch.randint(-(2**31), 2**31 - 1, (6, 4), dtype=torch.int32, generator=g),  # two limbs
        _ring(g, 6, 3),  # any 64-bit weight: four limbs
    ]
    inputs = [_ring(g, 3, 8), _ring(g, 2, 6), _ring(g, 5, 6)]
    transcript = Transcript()
    run = _linear_run(weights, inputs, calls=2, transcript=transcript)
    for call in range(2):
        for R, U, v, w in zip(run.owner[call], run.user[call], inputs, weights):
            assert torch.equal(R + U, v @ w.to(torch.int64))
    assert [len(weight_limbs(w)) for w in weights] == [1, 2, 4]
    # cost: one round trip per call; the context travels with the first query only
    assert run.flights == 4
    queries = transcript.received_by("owner")
    replies = transcript.received_by("user")
    assert [m.tag for m in queries] == ["he.linear.q"] * 2 and [m.tag for m in replies] == ["he.linear.r"] * 2
    first_flags, first = unpack_message(queries[0].payload, b"PTLQ", 4, 100, "query")
    later_flags, later = unpack_message(queries[1].payload, b"PTLQ", 3, 100, "query")
    assert (first_flags, later_flags) == (1, 0) and first[1:] != later
    for sub, v, w in zip(later, inputs, weights):
        assert len(sub) == 1 + _query_cts(v.shape[0], v.shape[1], w.shape[1])
        assert all(len(ct) <= max_ciphertext_bytes(len(COEFF_BITS) - 1) // 2 + 1024 for ct in sub[1:])
    assert run.bytes_user_to_owner == sum(
        CHANNEL_HEADER + len(m.tag) + message_overhead([len(s) for s in subs]) + sum(len(p) for s in subs for p in s)
        for m, subs in ((queries[0], first), (queries[1], later))
    )
    reply_parts = [(1, len(weights))]  # the limb counts, one byte per weight
    for v, w, k in zip(inputs, weights, (1, 2, 4)):
        reply_parts.append(_reply_bytes(v.shape[0], v.shape[1], w.shape[1], k * w.shape[1]))
    one_reply = CHANNEL_HEADER + len("he.linear.r") + message_overhead([p for p, _ in reply_parts])
    one_reply += sum(b for _, b in reply_parts)
    assert run.bytes_owner_to_user == 2 * one_reply


def test_more_rows_than_one_query_chunk_and_chunked_inputs_and_columns(monkeypatch):
    g = _gen(2)
    rows = MAX_ROWS + 3  # two query chunks: 2 x 4096 limb rows fill one ciphertext's 8192 coefficients
    v, w = _ring(g, rows, 2), torch.randint(-(2**19), 2**19, (2, 2), dtype=torch.int64, generator=g)
    run = _linear_run([w], [v])
    assert torch.equal(run.owner[0][0] + run.user[0][0], v @ w)
    assert run.flights == 2
    # inputs and columns cut into pieces (limits lowered to keep the shapes small): shares add up
    monkeypatch.setattr(he_runs, "MAX_FEATURES", 4)
    monkeypatch.setattr(he_runs, "COLUMNS_PER_PIECE", 3)
    v, w = _ring(g, 3, 10), _ring(g, 10, 7)
    run = _linear_run([w], [v])
    assert torch.equal(run.owner[0][0] + run.user[0][0], v @ w)


def test_weight_limbs_reproduce_every_weight():
    edges = [0, 1, -1, 2**19 - 1, -(2**19), 2**19, 2**39 - 1, -(2**39), 2**39, 2**59 - 1, -(2**59), 2**59]
    edges += [2**63 - 1, -(2**63), 12345678901234567]
    for value in edges:
        w = torch.tensor([[value]], dtype=torch.int64)
        limbs = weight_limbs(w)
        assert all(-(2**19) <= int(x) < 2**19 for x in limbs)
        total = sum(int(x) << (20 * j) for j, x in enumerate(limbs))
        assert (total - value) % 2**64 == 0
        if -(2**19) <= value < 2**19:
            assert len(limbs) == 1
    assert len(weight_limbs(torch.tensor([[2**39 - 1]]))) == 3  # its balanced digits need a third limb


def _products_run(transpose: bool, appends, groups=2, heads=2, d=4, seed=SEED, transcript=None):
    g = _gen(3 + int(transpose))
    parts = {"o": ([], []), "u": ([], [])}
    length = 0
    for m in appends:
        length += m
        for a, b in parts.values():
            a.append(_ring(g, groups, heads * m, d if transpose else length))
            b.append(_ring(g, groups, m, d))

    def role(name):
        a, b = parts[name]
        return lambda ctx: product_correlations(HeSession(ctx), transpose, a, b, seed=seed if name == "o" else None)

    wrap = transcript.wrap if transcript is not None else None
    run = run_pair(role("o"), role("u"), None, None, wrap_channel=wrap, timeout=300)
    whole = torch.cat(parts["o"][1], 1) + torch.cat(parts["u"][1], 1)
    length = 0
    assert len(run.owner) == len(run.user) == len(appends)
    for t, m in enumerate(appends):
        length += m
        a = parts["o"][0][t] + parts["u"][0][t]
        b = whole[:, :length]
        assert torch.equal(run.owner[t] + run.user[t], a @ (b.transpose(1, 2) if transpose else b))
    return run


@pytest.mark.parametrize("transpose", [True, False], ids=["scores", "values"])
def test_session_products_prefill_then_two_decode_steps(transpose):
    transcript = Transcript()
    run = _products_run(transpose, (3, 1, 1), transcript=transcript)
    assert run.flights == 2
    (query,) = transcript.received_by("owner")
    (reply,) = transcript.received_by("user")
    _, subs = unpack_message(query.payload, b"PTPQ", 2, 10_000, "query")
    layout = SessionLayout(2, 2, 4, (3, 1, 1))
    R, L, d = layout.total_rows, layout.length, layout.head_dim
    terms = [(R, d, L), (L, d, R)] if transpose else [(R, L, d), (d, L, R)]  # user rows, inner, outputs
    sizes = [_reply_bytes(r, k, LIMBS * m, LIMBS * m) for r, k, m in terms] * layout.groups
    assert len(subs[1]) == 1 + layout.groups * sum(1 + _query_cts(r, k, LIMBS * m) for r, k, m in terms)
    reply_parts = 1 + sum(p for p, _ in sizes)
    bundle = 9 + 4 * len(sizes)
    expect = CHANNEL_HEADER + len("he.products.r") + message_overhead([reply_parts]) + bundle + sum(b for _, b in sizes)
    assert run.bytes_owner_to_user == expect == CHANNEL_HEADER + len(reply.tag) + len(reply.payload)
    assert run.bytes_user_to_owner == CHANNEL_HEADER + len(query.tag) + len(query.payload)
    assert message_overhead([1, len(subs[1])]) + sum(len(p) for s in subs for p in s) == len(query.payload)


@pytest.mark.parametrize("transpose", [True, False], ids=["scores", "values"])
def test_encoder_product_is_one_call_over_the_whole_operand(transpose):
    run = _products_run(transpose, (4,), groups=1, heads=3, d=2)
    assert run.flights == 2


def test_product_shapes_the_layout_cannot_take_are_config_errors():
    g = _gen(5)
    with pytest.raises(ConfigError, match="A rows"):  # mx_t must be heads * m_new_t for every call
        he_runs._product_layout(True, [_ring(g, 1, 4, 2), _ring(g, 1, 3, 2)], [_ring(g, 1, 2, 2), _ring(g, 1, 1, 2)])
    with pytest.raises(ConfigError, match="inner"):
        he_runs._product_layout(False, [_ring(g, 1, 2, 3)], [_ring(g, 1, 2, 2)])
    with pytest.raises(ConfigError, match="products"):
        SessionProductClient(None, SessionLayout(1, 1, 2, (1,)), products=("keys",))


def _fake_user(payload: bytes, tag: str = "he.linear.q"):
    def user(ctx):
        ctx.channel.send(tag, payload)

    return user


def _owner_linear(w):
    return lambda ctx: linear_correlations(HeSession(ctx), [LinearRequest(1, w.shape[0], w.shape[1], w=w)], seed=SEED)


def _real_query(v, m) -> list[list[bytes]]:
    """The sub-messages a real user sends first: its context, then one bfv_linear query."""
    captured = {}

    class _Stop(Exception):
        pass

    class _Channel:
        def send(self, tag, payload):
            captured["data"] = payload
            raise _Stop

    class _Ctx:
        is_owner, channel = False, _Channel()

    with pytest.raises(_Stop):
        linear_correlations(HeSession(_Ctx()), [LinearRequest(v.shape[0], v.shape[1], m, v=v)])
    return unpack_message(captured["data"], b"PTLQ", 2, 100, "query")[1]


def test_bad_bytes_from_the_user_are_protocol_errors():
    g = _gen(6)
    v, w = _ring(g, 1, 4), torch.randint(-5, 5, (4, 2), dtype=torch.int64, generator=g)
    context, query = _real_query(v, 2)
    other = _real_query(_ring(g, 2, 4), 2)[1]  # a query for two rows where the request has one
    bad = [
        b"junk",
        b"\x00" * 10_000_000,  # more bytes than the shapes allow: refused before it is read
        pack_message(b"PTLQ", [query], flags=0),  # no context on the first query
        pack_message(b"PTLQ", [context, query, query], flags=1),
        pack_message(b"PTLX", [context, query], flags=1),
        pack_message(b"PTLQ", [context, query], flags=1)[:-5],
        pack_message(b"PTLQ", [[b"not a context"], query], flags=1),
        pack_message(b"PTLQ", [context, [query[0], query[1][:-20]] + query[2:]], flags=1),
        pack_message(b"PTLQ", [context, other], flags=1),
    ]
    for payload in bad:
        with pytest.raises(ProtocolError):
            run_pair(_owner_linear(w), _fake_user(payload), None, None, timeout=60)
    with pytest.raises(ProtocolError):  # raw tensors where bytes are expected
        run_pair(_owner_linear(w), lambda ctx: ctx.channel.send("he.linear.q", np.zeros(3)), None, None, timeout=60)


def test_bad_bytes_from_the_owner_are_protocol_errors():
    g = _gen(7)
    v = _ring(g, 1, 4)

    def user(ctx):
        return linear_correlations(HeSession(ctx), [LinearRequest(1, 4, 2, v=v)])

    def owner_sending(make):
        def owner(ctx):
            query = ctx.channel.recv_bytes("he.linear.q")
            ctx.channel.send("he.linear.r", make(query))

        return owner

    def good_reply(limbs: bytes, cut: int = 0):
        def make(query):
            _, (context, part) = unpack_message(query, b"PTLQ", 2, 100, "query")
            server = he_runs.LinearCorrelationServer(context[0])
            reply, _ = server.multiply(part, torch.ones((4, 2), dtype=torch.int64), compact=True)
            if cut:
                reply = reply[:-1] + [reply[-1][:-cut]]
            return pack_message(b"PTLR", [[limbs], reply])

        return make

    for make in [lambda q: b"junk", lambda q: b"\x01" * 50_000_000, good_reply(b"\x00"), good_reply(b"\x05")]:
        with pytest.raises(ProtocolError):
            run_pair(owner_sending(make), user, None, None, timeout=60)
    with pytest.raises(ProtocolError):
        run_pair(owner_sending(good_reply(b"\x01", cut=11)), user, None, None, timeout=60)
    with pytest.raises(ProtocolError):  # two limbs named, one limb's columns sent: the reply header does not fit
        run_pair(owner_sending(good_reply(b"\x02")), user, None, None, timeout=60)
    run = run_pair(owner_sending(good_reply(b"\x01")), user, None, None, timeout=60)  # the control: accepted
    assert run.user[0].shape == (1, 2)


def test_bad_local_arguments_are_config_errors():
    class _Ctx:
        is_owner, channel = True, None

    w = torch.zeros((4, 2), dtype=torch.float32)
    for reqs in [[], [LinearRequest(1, 4, 2, w=w)], [LinearRequest(1, 4, 3, w=w.to(torch.int64))], [object()]]:
        with pytest.raises(ConfigError):
            linear_correlations(HeSession(_Ctx()), reqs)
    with pytest.raises(ConfigError):
        _ = HeSession(_Ctx()).client  # the owner holds no secret key


def test_user_view_is_uniform_and_fresh():
    """The user's share U = V @ W - R looks uniform and is not V @ W; two runs on the same V, W give
    unrelated U (the owner's R is fresh each time)."""
    g = _gen(8)
    v = _ring(g, 4, 16)
    w = torch.randint(-3, 4, (16, 64), dtype=torch.int64, generator=g)  # small weights: V @ W itself is structured
    first = _linear_run([w], [v], seed=None).user[0][0]
    second = _linear_run([w], [v], seed=None).user[0][0]
    product = v @ w
    for u in (first, second):
        assert not torch.any(u == product)
        assert np.abs(bit_balance_z(u.numpy().reshape(-1))).max() < 6  # 256 words; |z| >= 6 has p < 2^-26
    assert not torch.any(first == second)
    diff = (first - second).numpy().reshape(-1)
    assert np.abs(bit_balance_z(diff)).max() < 6
