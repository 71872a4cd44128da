"""Every protocol with both roles in one process over the in-memory channel: exact results, costs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from parties.inprocess import deal, deal_records, run_pair
from permllm.errors import FixedPointOverflow, MaterialExhausted, MaterialMismatch
from permllm.fixed import ACT_BITS, LINEAR_BITS, WEIGHT_BITS, decode, encode
from permllm.sharing import Shared
from protocols.basic import reveal_to, reveal_to_both, share_input
from protocols.beaver import GrowingOperand, product
from protocols.context import Role
from protocols.functions import GELU, SILU, SOFTMAX, SWIGLU, inverse_rms, layer_normalize, rms_normalize
from protocols.linear import LinearWeight, linear, precompute_user_terms
from protocols.material import QueuedMaterial
from protocols.permute import (
    check_headroom,
    permuted_apply,
    permuted_apply_scaled,
    permuted_reveal,
    permuted_reveal_later,
)
from protocols.trunc import trunc
from tests.protocol_helpers import (
    PROVIDERS,
    SEEDS,
    TWO_PARTY,
    random_ring,
    run_call,
    share,
    two_party_material,
    wire_bytes,
)


@pytest.fixture(params=PROVIDERS)
def provider(request):
    """Who makes the material: the helper, or owner and user alone (the online run must not differ)."""
    return request.param


def _linear_setup(m=3, d_in=5, d_out=4, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = encode(torch.randn(d_in, d_out, generator=g, dtype=torch.float64), WEIGHT_BITS)
    u = random_ring((d_in, d_out), seed + 1)
    b = torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None
    # the owner holds its packed int32 W and no mask: the protocol never needs U online
    owner_w = LinearWeight("w", WEIGHT_BITS, d_in, d_out, local=w.to(torch.int32), bias=b)
    user_w = LinearWeight("w", WEIGHT_BITS, d_in, d_out, local=w - u)
    helper_w = LinearWeight("w", WEIGHT_BITS, d_in, d_out)
    x = encode(torch.randn(m, d_in, generator=g, dtype=torch.float64), ACT_BITS)
    return x, w, b, owner_w, user_w, helper_w, (lambda name: u)


def test_linear_is_bit_exact_and_costs_one_activation_sized_flight(provider):
    m, d_in, d_out = 3, 5, 4
    x, w, b, owner_w, user_w, helper_w, mask = _linear_setup(m, d_in, d_out)
    xo, xu = share(x, ACT_BITS, seed=7)
    weights = {Role.OWNER: owner_w, Role.USER: user_w}

    run = run_call(
        lambda ctx, inp: linear(ctx, inp, helper_w if ctx.dealing else weights[ctx.role]),
        xo,
        xu,
        Shared.placeholder((m, d_in), ACT_BITS),
        weight_mask=mask,
        provider=provider,
        owner_weights={"w": owner_w},
    )
    y = run.owner.local + run.user.local
    assert torch.equal(y, x @ w + encode(b, ACT_BITS + WEIGHT_BITS))  # exact mod 2^64
    assert run.owner.bits == ACT_BITS + WEIGHT_BITS
    assert run.flights == 1
    assert run.bytes_user_to_owner == wire_bytes("lin.w", (m, d_in))
    assert run.bytes_owner_to_user == 0


def test_user_terms_precomputed_from_the_material_give_the_same_shares(seeds):
    """The masked-input linear: the user's share v @ W~ + s depends on its material only;
    `precompute_user_terms` computes it before the online phase and the results are identical."""
    m, d_in, d_out = 3, 5, 4
    x, w, b, owner_w, user_w, helper_w, mask = _linear_setup(m, d_in, d_out)
    xo, xu = share(x, ACT_BITS, seed=7)
    weights = {Role.OWNER: owner_w, Role.USER: user_w}
    runs = []
    for ahead in (False, True):
        owner_mat, user_mat = deal(
            lambda ctx: linear(ctx, Shared.placeholder((m, d_in), ACT_BITS), helper_w), seeds, mask
        )
        if ahead:
            assert precompute_user_terms(user_mat, {"w": user_w}) == 1
            assert precompute_user_terms(owner_mat, {}) == 0
        runs.append(
            run_pair(
                lambda ctx: linear(ctx, xo, weights[ctx.role]),
                lambda ctx: linear(ctx, xu, weights[ctx.role]),
                owner_mat,
                user_mat,
            )
        )
    assert torch.equal(runs[0].user.local, runs[1].user.local)
    assert torch.equal(runs[0].owner.local, runs[1].owner.local)
    assert torch.equal(runs[1].owner.local + runs[1].user.local, x @ w + encode(b, ACT_BITS + WEIGHT_BITS))


def test_dealt_input_terms_precomputed_after_a_nonlinear_step_give_the_same_shares(seeds):
    """A permuted SiLU, then a linear on its dealt output: `precompute_user_terms` computes the user's
    x_u @ W~ + s from the SiLU's dealt c2 before the online phase; shares, flights and bytes are
    those computed online."""
    m, d_in, d_out = 2, 6, 3
    _, w, b, owner_w, user_w, helper_w, mask = _linear_setup(m, d_in, d_out)
    z = encode(torch.linspace(-3.0, 3.0, m * d_in, dtype=torch.float64).reshape(m * d_in, 1), LINEAR_BITS)
    zo, zu = share(z, LINEAR_BITS, seed=9)
    weights = {Role.OWNER: owner_w, Role.USER: user_w}

    def program(ctx, inp, weight):
        act = permuted_apply(ctx, inp, SILU, [m * d_in])
        return act, linear(ctx, act.reshape(m, d_in), weight)

    runs = []
    for ahead in (False, True):
        owner_mat, user_mat = deal(
            lambda ctx: program(ctx, Shared.placeholder((m * d_in, 1), LINEAR_BITS), helper_w), seeds, mask
        )
        if ahead:
            assert precompute_user_terms(user_mat, {"w": user_w}) == 1
        runs.append(
            run_pair(
                lambda ctx: program(ctx, zo, weights[ctx.role]),
                lambda ctx: program(ctx, zu, weights[ctx.role]),
                owner_mat,
                user_mat,
            )
        )
    for role in ("owner", "user"):
        assert torch.equal(getattr(runs[0], role)[1].local, getattr(runs[1], role)[1].local)
    act = runs[1].owner[0].local + runs[1].user[0].local
    y = runs[1].owner[1].local + runs[1].user[1].local
    assert torch.equal(y, act.reshape(m, d_in) @ w + encode(b, ACT_BITS + WEIGHT_BITS))
    assert (
        (runs[0].flights, runs[0].bytes_user_to_owner, runs[0].bytes_owner_to_user)
        == (
            runs[1].flights,
            runs[1].bytes_user_to_owner,
            runs[1].bytes_owner_to_user,
        )
        == (
            3,
            wire_bytes("nl.mask", (m * d_in, 1)) + wire_bytes("nl.reshare", (m * d_in, 1)),
            wire_bytes("nl.perm", (m * d_in, 1)),
        )
    )


def test_linear_on_dealt_input_sends_nothing():
    m, d_in, d_out = 2, 6, 3
    x, w, _, owner_w, user_w, helper_w, mask = _linear_setup(m, d_in, d_out, bias=False)
    xo, xu = share(x, ACT_BITS, seed=8, dealt_user_share=True)
    weights = {Role.OWNER: owner_w, Role.USER: user_w}
    dry = Shared.placeholder((m, d_in), ACT_BITS, user_share=xu.local)

    run = run_call(
        lambda ctx, inp: linear(ctx, inp, helper_w if ctx.dealing else weights[ctx.role]), xo, xu, dry, weight_mask=mask
    )
    assert torch.equal(run.owner.local + run.user.local, x @ w)
    assert run.flights == 0 and run.bytes_total == 0


@pytest.mark.parametrize("holder", [Role.USER, Role.OWNER])
@pytest.mark.parametrize("k", [1, 16, 32, 45])
def test_trunc_is_exact_to_one_unit_and_never_fails(k, holder):
    n = 20000
    x = random_ring((n,), seed=k) >> 2  # |x| < 2^61: the whole admissible range, both signs
    x[:6] = torch.tensor([0, -1, 1, 2**61 - 1, -(2**61), 2**k])
    xo, xu = share(x, 48, seed=100 + k)
    records = deal_records(lambda ctx: trunc(ctx, Shared.placeholder((n,), 48), k, holder=holder), SEEDS)
    material = QueuedMaterial(SEEDS.owner, records[0]), QueuedMaterial(SEEDS.user, records[1])
    run = run_pair(*(lambda ctx, s=s: trunc(ctx, s, k, holder=holder) for s in (xo, xu)), *material)
    assert material[0].remaining == material[1].remaining == 0
    y = run.owner.local + run.user.local
    err = y - torch.div(x, 2**k, rounding_mode="floor")
    assert set(err.unique().tolist()) <= {0, 1}  # exactly floor(x / 2^k) or one above it
    assert run.owner.bits == run.user.bits == 48 - k
    # c_F one way, d the other: 2 flights alone (1 when c_F rides the holder's previous hop, below)
    assert run.flights == 2
    assert run.bytes_owner_to_user == run.bytes_user_to_owner == wire_bytes("trunc", (n,))
    # the helper deals n words, the holder's krho (the old protocol dealt 2n: the user's alpha and rho);
    # the other party's k0, k1 and the holder's r are seeded
    (f_record,), (s_record,) = records if holder is Role.OWNER else records[::-1]
    assert sorted(f_record.tensors) == ["krho"] and f_record.nbytes == 8 * n
    assert s_record.nbytes == 0


@pytest.mark.parametrize("first", [Role.USER, Role.OWNER])
@pytest.mark.parametrize("holder", [Role.USER, Role.OWNER])
def test_trunc_adds_one_flight_when_the_holder_share_is_ready_a_hop_first(holder, first):
    """`first` sends a message and the other party's share waits for it (as the owner's QKV share
    waits for the user's norm re-share in the decoder). With first = holder, c_F leaves on that hop
    and the truncation costs one flight more than the message alone, as a simultaneous exchange
    would; with the other holder it costs two: the choice of holder at each call site matters."""
    n, k = 64, 16
    x = random_ring((n,), seed=3) >> 4
    xo, xu = share(x, 48, seed=4)

    def call(ctx, inp):
        if not ctx.dealing:
            sends = ctx.owner_sends if first is Role.OWNER else ctx.user_sends
            inp = Shared.of(inp.local + sends("pre", lambda: torch.zeros(n, dtype=torch.int64), (n,)), inp.bits)
        return trunc(ctx, inp, k, holder=holder)

    run = run_call(call, xo, xu, Shared.placeholder((n,), 48))
    err = run.owner.local + run.user.local - torch.div(x, 2**k, rounding_mode="floor")
    assert set(err.unique().tolist()) <= {0, 1}
    assert run.flights == (2 if first is holder else 3)


def test_trunc_rejects_impossible_shifts():
    with pytest.raises(ValueError, match="drop 20 bits"):
        trunc(None, Shared.placeholder((2,), 16), 20, holder=Role.USER)
    with pytest.raises(ValueError, match="in \\(0, 62\\)"):
        trunc(None, Shared.placeholder((2,), 70), 62, holder=Role.OWNER)


def test_trunc_material_names_its_holder():
    """Material dealt for one holder is refused by a call with the other (not silently misread)."""
    n = 4
    xo, xu = share(random_ring((n,), 5) >> 20, 32, 6)
    owner_mat, user_mat = deal(lambda ctx: trunc(ctx, Shared.placeholder((n,), 32), 8, holder=Role.USER), SEEDS)
    with pytest.raises(MaterialMismatch, match="asked for trunc"):
        run_pair(
            lambda ctx: trunc(ctx, xo, 8, holder=Role.OWNER),
            lambda ctx: trunc(ctx, xu, 8, holder=Role.OWNER),
            owner_mat,
            user_mat,
            timeout=10,
        )


def _float_reference(fn_name, z, lengths):
    out, start = [], 0
    for n in lengths:
        seg = z[start : start + n]
        if fn_name == "rms":
            out.append(seg / np.sqrt(np.mean(seg * seg) + 1e-5))
        elif fn_name == "ln":
            out.append((seg - seg.mean()) / np.sqrt(seg.var() + 1e-12))
        elif fn_name == "softmax":
            e = np.exp(seg - seg.max())
            out.append(e / e.sum())
        start += n
    return np.concatenate(out)


NONLINEAR_CASES = [
    ("rms", rms_normalize(1e-5), [8, 8, 8]),
    ("ln", layer_normalize(1e-12), [6, 6]),
    ("softmax", SOFTMAX, [1, 2, 3, 4, 4, 4]),
    ("silu", SILU, [30]),
    ("gelu", GELU, [30]),
]


@pytest.mark.parametrize("name,fn,lengths", NONLINEAR_CASES, ids=[c[0] for c in NONLINEAR_CASES])
def test_permuted_nonlinear_matches_float64(name, fn, lengths, provider):
    n = sum(lengths)
    g = torch.Generator().manual_seed(3)
    values = torch.randn(n, 1, generator=g, dtype=torch.float64) * 4
    x = encode(values, LINEAR_BITS)
    xo, xu = share(x, LINEAR_BITS, seed=11)
    run = run_call(
        lambda ctx, inp: permuted_apply(ctx, inp, fn, lengths),
        xo,
        xu,
        Shared.placeholder((n, 1), LINEAR_BITS),
        provider=provider,
    )
    got = decode(run.owner.local + run.user.local, ACT_BITS).numpy()[:, 0]
    z = values.numpy()[:, 0]
    if name in ("rms", "ln", "softmax"):
        want = _float_reference(name, z, lengths)
    elif name == "silu":
        want = z / (1 + np.exp(-z))
    else:
        want = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in z])
    # bound: input encoding 2^-33 is negligible; output rounding at ACT_BITS is at most 2^-17
    assert np.max(np.abs(got - want)) <= 2.0**-17 + 1e-12
    assert run.user.dealt and run.owner.dealt
    assert run.flights == 3
    assert run.bytes_user_to_owner == wire_bytes("nl.mask", (n, 1)) + wire_bytes("nl.reshare", (n, 1))
    assert run.bytes_owner_to_user == wire_bytes("nl.perm", (n, 1))


def test_swiglu_permutes_gate_and_up_jointly(provider):
    n = 40
    g = torch.Generator().manual_seed(4)
    values = torch.randn(n, 2, generator=g, dtype=torch.float64) * 3
    xo, xu = share(encode(values, LINEAR_BITS), LINEAR_BITS, seed=12)
    run = run_call(
        lambda ctx, inp: permuted_apply(ctx, inp, SWIGLU, [n]),
        xo,
        xu,
        Shared.placeholder((n, 2), LINEAR_BITS),
        provider=provider,
    )
    got = decode(run.owner.local + run.user.local, ACT_BITS).numpy()[:, 0]
    gate, up = values.numpy()[:, 0], values.numpy()[:, 1]
    want = gate / (1 + np.exp(-gate)) * up
    assert np.max(np.abs(got - want)) <= 2.0**-17 + 1e-12  # output rounding only
    assert run.flights == 3
    assert run.bytes_owner_to_user == wire_bytes("nl.perm", (n, 2))
    assert run.bytes_user_to_owner == wire_bytes("nl.mask", (n, 2)) + wire_bytes("nl.reshare", (n, 1))


def test_scaled_swiglu_takes_the_rms_from_a_second_permuted_tensor_in_the_same_flights(provider):
    n, hidden = 40, 24
    g = torch.Generator().manual_seed(5)
    h = torch.randn(hidden, 1, generator=g, dtype=torch.float64) * 7
    pairs = torch.randn(n, 2, generator=g, dtype=torch.float64) * 30  # unnormalised: h @ W, scale 48
    bits = LINEAR_BITS + WEIGHT_BITS
    po, pu = share(encode(pairs, bits), bits, seed=13)
    ho, hu = share(encode(h, LINEAR_BITS), LINEAR_BITS, seed=14)
    rms = inverse_rms(1e-5)

    def call(ctx, inputs):
        x, source = inputs
        return permuted_apply_scaled(ctx, x, SWIGLU, [n], source, rms, tag="act", source_tag="n2")

    dry = (Shared.placeholder((n, 2), bits), Shared.placeholder((hidden, 1), LINEAR_BITS))
    run = run_call(call, (po, ho), (pu, hu), dry, provider=provider)
    got = decode(run.owner.local + run.user.local, ACT_BITS).numpy()[:, 0]
    s = 1 / np.sqrt(np.mean(h.numpy() ** 2) + 1e-5)
    gate, up = pairs.numpy()[:, 0] * s, pairs.numpy()[:, 1] * s
    assert np.max(np.abs(got - gate / (1 + np.exp(-gate)) * up)) <= 2.0**-17 + 1e-9  # output rounding only
    assert run.user.dealt and run.owner.dealt
    assert run.flights == 3  # both masks in one hop, both permuted shares in the next, then the re-share
    assert run.bytes_user_to_owner == (
        wire_bytes("n2.mask", (hidden, 1)) + wire_bytes("act.mask", (n, 2)) + wire_bytes("act.reshare", (n, 1))
    )
    assert run.bytes_owner_to_user == wire_bytes("n2.perm", (hidden, 1)) + wire_bytes("act.perm", (n, 2))


def test_a_later_reveal_shares_its_hops_with_the_next_one(provider):
    g = torch.Generator().manual_seed(6)
    first = encode(torch.randn(16, 1, generator=g, dtype=torch.float64), LINEAR_BITS)
    second = encode(torch.randn(30, 1, generator=g, dtype=torch.float64), LINEAR_BITS)
    fo, fu = share(first, LINEAR_BITS, seed=15)
    so, su = share(second, LINEAR_BITS, seed=16)
    seen = []

    def call(ctx, inputs):
        a, b = inputs
        permuted_reveal_later(ctx, a, [16], seen.append, tag="first")
        out = permuted_reveal(ctx, b, [30], tag="second")
        return None if out is None else (len(seen), out[0])

    dry = (Shared.placeholder((16, 1), LINEAR_BITS), Shared.placeholder((30, 1), LINEAR_BITS))
    run = run_call(call, (fo, so), (fu, su), dry, provider=provider)
    assert run.flights == 2  # not 4: the second mask leaves with the first
    count, revealed_second = run.user
    assert count == 1  # the later reply was read, in order, before the second one
    assert sorted(seen[0].reshape(-1).tolist()) == sorted(first.reshape(-1).tolist())
    assert sorted(revealed_second.reshape(-1).tolist()) == sorted(second.reshape(-1).tolist())


def test_opened_values_past_the_headroom_are_refused():
    limit = 2**62
    check_headroom(torch.tensor([limit - 1, -(limit - 1)], dtype=torch.int64), "ok")
    for bad in (limit, -limit, -(2**63)):
        with pytest.raises(FixedPointOverflow, match="2\\^62"):
            check_headroom(torch.tensor([0, bad], dtype=torch.int64), "x")


@pytest.mark.parametrize("transpose", [True, False], ids=["scores", "weighted_values"])
def test_appending_product_is_bit_exact_as_the_operand_grows(transpose, provider):
    groups, d = 2, 4
    steps = [(3, 3), (1, 1), (2, 1)]  # (rows appended, rows of X)
    rng = iter(range(1000, 2000))
    inputs = []
    rows = 0
    for m_new, mx in steps:
        rows += m_new
        k = d if transpose else rows
        inputs.append((random_ring((groups, mx, k), next(rng)) >> 40, random_ring((groups, m_new, d), next(rng)) >> 40))

    def session(ctx, shares):
        cache = GrowingOperand("k", transpose)
        return [product(ctx, x, y, cache) for x, y in shares]

    owner_in, user_in, dry_in = [], [], []
    for x, y in inputs:
        xo, xu = share(x, 16, next(rng))
        yo, yu = share(y, 16, next(rng))
        owner_in.append((xo, yo))
        user_in.append((xu, yu))
        dry_in.append((Shared.placeholder(x.shape, 16), Shared.placeholder(y.shape, 16)))
    run = run_call(session, owner_in, user_in, dry_in, provider=provider)

    y_full = None
    for (x, y), zo, zu in zip(inputs, run.owner, run.user):
        y_full = y if y_full is None else torch.cat([y_full, y], dim=1)
        want = x @ (y_full.transpose(-1, -2) if transpose else y_full)
        assert torch.equal(zo.local + zu.local, want)
        assert zo.bits == 32
    assert run.flights == len(steps)  # one simultaneous exchange per call
    per_direction = sum(wire_bytes("prod.k", (x.numel() + y.numel(),)) for x, y in inputs)
    assert run.bytes_owner_to_user == run.bytes_user_to_owner == per_direction


def test_share_and_reveal(seeds):
    x = random_ring((5,), 21)

    def session(ctx, value):
        s = share_input(ctx, Role.USER, value, (5,), 0)
        return reveal_to(ctx, Role.OWNER, s), reveal_to_both(ctx, s)

    owner_mat, user_mat = deal(lambda ctx: None, seeds)
    run = run_pair(lambda ctx: session(ctx, None), lambda ctx: session(ctx, x), owner_mat, user_mat)
    assert torch.equal(run.owner[0], x) and run.user[0] is None
    assert torch.equal(run.owner[1], x) and torch.equal(run.user[1], x)
    # the user's input, its reveal and its half of the opening leave back to back (one flight);
    # the owner's half of the opening follows what it received: 2 flights on the critical path
    assert run.flights == 2
    assert run.bytes_user_to_owner == wire_bytes("input", (5,)) + wire_bytes("reveal", (5,)) + wire_bytes("open", (5,))
    assert run.bytes_owner_to_user == wire_bytes("open", (5,))


def test_running_out_of_material_is_a_clear_error(seeds):
    n = 4
    xo, xu = share(random_ring((n,), 5) >> 20, 32, 6)
    owner_mat, user_mat = deal(lambda ctx: trunc(ctx, Shared.placeholder((n,), 32), 8, holder=Role.USER), seeds)

    def twice(ctx, inp):
        trunc(ctx, inp, 8, holder=Role.USER)
        return trunc(ctx, inp, 8, holder=Role.USER)

    with pytest.raises(MaterialExhausted, match="used up after 1 protocol calls"):
        run_pair(lambda ctx: twice(ctx, xo), lambda ctx: twice(ctx, xu), owner_mat, user_mat, timeout=10)


def test_mismatched_material_is_a_clear_error(seeds):
    n = 4
    xo, xu = share(random_ring((n,), 5) >> 20, 32, 6)
    owner_mat, user_mat = deal(lambda ctx: trunc(ctx, Shared.placeholder((n,), 32), 8, holder=Role.USER), seeds)
    with pytest.raises(MaterialMismatch, match="asked for trunc"):
        run_pair(
            lambda ctx: trunc(ctx, xo, 9, holder=Role.USER),
            lambda ctx: trunc(ctx, xu, 9, holder=Role.USER),
            owner_mat,
            user_mat,
            timeout=10,
        )


def test_lookup_gives_the_rows_of_the_user_tokens_exactly(seeds, provider):
    from protocols.linear import lookup

    vocab, d_out = 11, 4
    g = torch.Generator().manual_seed(9)
    w = encode(torch.randn(vocab, d_out, generator=g, dtype=torch.float64), 32)
    u = random_ring((vocab, d_out), 10)
    weights = {
        Role.OWNER: LinearWeight("E", 32, vocab, d_out, local=w),
        Role.USER: LinearWeight("E", 32, vocab, d_out, local=w - u),
    }
    helper_w = LinearWeight("E", 32, vocab, d_out)
    tokens = [3, 0, 10, 3]
    if provider == TWO_PARTY:
        owner_mat, user_mat, _ = two_party_material(
            lambda ctx: lookup(ctx, None, 4, helper_w), seeds, owner_weights={"E": weights[Role.OWNER]}
        )
    else:
        owner_mat, user_mat = deal(lambda ctx: lookup(ctx, None, 4, helper_w), seeds, lambda name: u)
    run = run_pair(
        lambda ctx: lookup(ctx, None, 4, weights[ctx.role]),
        lambda ctx: lookup(ctx, tokens, 4, weights[ctx.role]),
        owner_mat,
        user_mat,
    )
    assert torch.equal(run.owner.local + run.user.local, w[tokens])
    assert run.flights == 1
    assert run.bytes_user_to_owner == wire_bytes("lin.E", (4, vocab)) and run.bytes_owner_to_user == 0


def test_bfv_token_selection_recovers_the_chosen_id_under_the_permutation():
    """select_token(mode="bfv") on shared logits (the path kept for a helper-free mode; the table mode
    is tested in tests/test_selection.py): the user gets the true argmax id, the owner nothing. 4 flights:
    the permuted reveal (user -> owner, owner -> user), the BFV query, the BFV reply. Ring messages are
    exact; a BFV ciphertext's serialized size varies slightly (TenSEAL compresses it), so those carry
    the bounds of tests/test_he.py (one query chunk and one reply at most 100 000 bytes each)."""
    from permllm.he import IndexLookupClient, IndexLookupServer
    from permllm.transport.frames import header_length
    from protocols.selection import select_token

    vocab = 50
    g = torch.Generator().manual_seed(12)
    z = torch.randn(1, vocab, generator=g, dtype=torch.float64) * 4
    lo, lu = share(encode(z, LINEAR_BITS), LINEAR_BITS, seed=13)
    client = IndexLookupClient(vocab)
    server = IndexLookupServer(client.public_context())

    def call(ctx, logits):
        if ctx.dealing:
            return select_token(ctx, logits, mode="bfv")
        user = ctx.role is Role.USER
        choose = (lambda v: int(np.argmax(v))) if user else None
        return select_token(ctx, logits, choose, client if user else server, mode="bfv")

    run = run_call(call, lo, lu, Shared.placeholder((1, vocab), LINEAR_BITS))
    assert run.user == int(torch.argmax(z)) and run.owner is None
    assert run.flights == 4
    ring_up = wire_bytes("sel.mask", (vocab, 1)) + wire_bytes("sel.n", (1,))
    query = run.bytes_user_to_owner - ring_up - header_length(len("sel.q0"), 1)
    assert 10_000 < query <= 100_000, query
    reply = run.bytes_owner_to_user - wire_bytes("sel.perm", (vocab, 1)) - header_length(len("sel.r"), 1)
    assert 10_000 < reply <= 100_000, reply
