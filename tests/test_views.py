"""Reconstruction attacks on each party's whole view: a mask that is weak, missing or reused must fail here.

The transcript tests (tests/test_transcripts.py) check the words a party receives; a share plus a weak
mask still looks uniform there. These tests collect everything a party holds across several calls (its
shares, its seeded draws and permutations, the dealt material, every received word, and what it derives
from them the way the protocol does; see tests/view_attacks.py) and try to reconstruct the other party's
secrets: the owner's weights W and permutations pi, the user's inputs, tokens and every plaintext value
the two compute on. Each attack and the chance that a sound view trips it are listed in
tests/view_attacks.py: at most 2^-45 per combination for the closeness and index-reuse attacks, 2^-70
for the small-word count, 1.3e-7 for the bit balance, 1/16! for fixed points, 2e-9 per pair for the
alignment of revealed values. All randomness is seeded, so each test is deterministic.

Every run also checks what the protocol must still do (exact ring results against plaintext) and its
cost (flights, bytes) with the figures of tests/test_protocols.py; tests/test_mutations.py runs these
tests with each mask stream broken and requires a leak to be found.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parties.inprocess import Seeds, deal, run_pair
from parties.session import private_generate_inprocess
from permllm.fixed import ACT_BITS, LINEAR_BITS, WEIGHT_BITS, decode, encode
from permllm.sharing import Shared
from protocols.basic import share_input
from protocols.beaver import GrowingOperand, product
from protocols.context import Role
from protocols.functions import rms_normalize
from protocols.linear import LinearWeight, linear, lookup
from protocols.permute import permuted_apply, permuted_reveal
from protocols.selection import select_token
from protocols.trunc import trunc
from tests.protocol_helpers import SEEDS, random_ring, share, wire_bytes
from tests.view_attacks import assert_no_leak, attack_all, closeness, cross_call, uniformity
from tests.view_recording import CallView, LeakFound, ViewRecorder


def _session(owner_fn, user_fn, dry_fn, weight_mask=None, patch=()):
    """Deal for a multi-call session, run it with the views recorded; returns (PairRun, views).
    patch: (module attribute, function) pairs to replace by their recorded versions during the run."""
    owner_mat, user_mat = deal(dry_fn, SEEDS, weight_mask)
    with pytest.MonkeyPatch.context() as mp:
        recorder = ViewRecorder(mp)
        for target, fn in patch:
            mp.setattr(target, recorder.wrap(fn))
        run = run_pair(lambda ctx: owner_fn(ctx, recorder), lambda ctx: user_fn(ctx, recorder), owner_mat, user_mat)
    assert owner_mat.remaining == 0 and user_mat.remaining == 0
    return run, recorder.calls


def _weight_views(user_weights: dict, owner_weights: dict) -> dict:
    """The user's masked weights W~ as static pseudo-calls, with W as their secret."""
    views = []
    for k, name in enumerate(sorted(user_weights)):
        view = CallView(-1 - k, "weight", name, words={"masked:W~": user_weights[name].local})
        view.info["secrets"] = {"W": owner_weights[name].local}
        views.append(view)
    return {"user": views}


# ------------------------------------------------------------------------------------------ linear
def _linear_weights(names, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    owner, user, helper, masks = {}, {}, {}, {}
    for k, name in enumerate(names):
        w = encode(torch.randn(d_in, d_out, generator=g, dtype=torch.float64), WEIGHT_BITS)
        u = random_ring((d_in, d_out), seed + 1 + k)
        owner[name] = LinearWeight(name, WEIGHT_BITS, d_in, d_out, local=w)  # the owner holds no U
        user[name] = LinearWeight(name, WEIGHT_BITS, d_in, d_out, local=w - u)
        helper[name] = LinearWeight(name, WEIGHT_BITS, d_in, d_out)
        masks[name] = u
    return owner, user, helper, masks


def test_linear_views():
    """Five linear calls on (8, 16) inputs: three on masked inputs (two with the same weight), two on
    dealt inputs. Owner attacks: x_o + d = x - v, d @ U + M = x_u @ U - s, each call and across calls;
    user attacks: W~ = W - U, and W~_1 - W~_2 against W_1 - W_2."""
    m, d_in, d_out = 8, 16, 24
    owner_w, user_w, helper_w, masks = _linear_weights(["w1", "w2"], d_in, d_out, seed=40)
    g = torch.Generator().manual_seed(41)
    plan = [("w1", False), ("w1", False), ("w2", False), ("w1", True), ("w1", True)]
    xs = [encode(torch.randn(m, d_in, generator=g, dtype=torch.float64), ACT_BITS) for _ in plan]
    shares = [
        share(x, ACT_BITS, seed=42 + i, dealt_user_share=dealt) for i, (x, (_, dealt)) in enumerate(zip(xs, plan))
    ]

    def party(weights, which):
        def run(ctx, recorder):
            return [recorder.wrap(linear)(ctx, s[which], weights[name]) for s, (name, _) in zip(shares, plan)]

        return run

    def dry(ctx):
        for (_, xu), (name, dealt) in zip(shares, plan):
            user_share = xu.local if dealt else None
            linear(ctx, Shared.placeholder((m, d_in), ACT_BITS, user_share=user_share), helper_w[name])

    run, views = _session(party(owner_w, 0), party(user_w, 1), dry, masks.__getitem__)
    for x, (name, _), yo, yu in zip(xs, plan, run.owner, run.user):
        assert torch.equal(yo.local + yu.local, x @ owner_w[name].local)  # exact mod 2^64
    # the user never waits for the owner, so all its messages share one flight (1 per call in isolation)
    assert run.flights == 1
    masked = [name for name, dealt in plan if not dealt]
    assert run.bytes_user_to_owner == sum(wire_bytes(f"lin.{n}", (m, d_in)) for n in masked)
    assert run.bytes_owner_to_user == 0
    assert_no_leak(attack_all(views, masks, _weight_views(user_w, owner_w)))


def test_embedding_lookup_views():
    """A prefill lookup of 4 tokens and two single-token lookups (the decode steps). The owner attacks
    d against one-hot(t) and d @ U + M against U[t] (which names t), and their differences across calls
    (U[t1] - U[t2] gives the token pair); the user attacks W~ against W and its shares v @ W~ + s."""
    vocab, d_out = 40, 16
    owner_w, user_w, helper_w, masks = _linear_weights(["E"], vocab, d_out, seed=50)
    steps = [[3, 0, 10, 3], [7], [3]]

    def party(weights, with_tokens):
        def run(ctx, recorder):
            return [recorder.wrap(lookup)(ctx, t if with_tokens else None, len(t), weights["E"]) for t in steps]

        return run

    def dry(ctx):
        for t in steps:
            lookup(ctx, None, len(t), helper_w["E"])

    run, views = _session(party(owner_w, False), party(user_w, True), dry, masks.__getitem__)
    for t, yo, yu in zip(steps, run.owner, run.user):
        assert torch.equal(yo.local + yu.local, owner_w["E"].local[t])
    assert run.flights == 1
    assert run.bytes_user_to_owner == sum(wire_bytes("lin.E", (len(t), vocab)) for t in steps)
    assert run.bytes_owner_to_user == 0
    assert_no_leak(attack_all(views, masks, _weight_views(user_w, owner_w)))


# ------------------------------------------------------------------------------------------ truncation
def test_trunc_views():
    """Four truncations by 16 bits of 512 values at scale 48, per holder F. The other party S attacks
    c - 2^62 = x + r (c = c_F + x_S + 2^62), and differences across calls catch a reused r. F attacks
    d - krho = -k0 - e (rho = 1) and d + krho = k1 - e (rho = 0) against the wrap bit e = 1 - c_63;
    its dealt krho must look uniform, alone and across calls (a weak or reused k0 or k1 shows in it).
    Both holders in turn."""
    for holder in (Role.USER, Role.OWNER):
        _trunc_views(holder)


def _trunc_views(holder):
    n, k, bits = 512, 16, 48
    xs = [random_ring((n,), seed=60 + i) >> 3 for i in range(4)]
    shares = [share(x, bits, seed=70 + i) for i, x in enumerate(xs)]

    def party(which):
        return lambda ctx, recorder: [recorder.wrap(trunc)(ctx, s[which], k, holder=holder) for s in shares]

    def dry(ctx):
        for _ in shares:
            trunc(ctx, Shared.placeholder((n,), bits), k, holder=holder)

    run, views = _session(party(0), party(1), dry)
    for x, yo, yu in zip(xs, run.owner, run.user):
        err = yo.local + yu.local - torch.div(x, 2**k, rounding_mode="floor")
        assert set(err.unique().tolist()) <= {0, 1}
    # c_F out, d back per call; each call's c_F waits for the previous call's d
    assert run.flights == 2 * len(xs)
    assert run.bytes_owner_to_user == run.bytes_user_to_owner == len(xs) * wire_bytes("trunc", (n,))
    f, s = ("owner", "user") if holder is Role.OWNER else ("user", "owner")
    assert all(
        sorted(w for w in v.words if not w.startswith("own:")) == ["dealt:krho", "draw:r", "recv:trunc"]
        for v in views[f].values()
    )
    assert all("draw:k0" in v.words and "draw:k1" in v.words for v in views[s].values())
    assert_no_leak(attack_all(views, {}))


# ------------------------------------------------------------------------------------------ permutation
def test_permuted_nonlinear_views():
    """Three RMSNorms of 4 rows of 16: the second input is the first plus small noise (as the residual
    stream between two norms). Owner attacks: x_o + d = x - a, pi^-1(e) = y - pi^-1(a2), e = pi(y) - a2,
    and their differences across calls. User attacks: c1 = pi(a) - b and c2 = pi^-1(a2) - b2 as permuted
    copies of its own draws (within a call and across two), the revealed values left in place (fixed
    points) and the revealed values of two calls aligned (a reused pi)."""
    lengths = [16] * 4
    n = sum(lengths)
    fn = rms_normalize(1e-5)
    g = torch.Generator().manual_seed(80)
    base = torch.randn(n, 1, generator=g, dtype=torch.float64) * 4
    values = [base, base + 0.05 * torch.randn(n, 1, generator=g, dtype=torch.float64)]
    values.append(torch.randn(n, 1, generator=g, dtype=torch.float64) * 4)
    shares = [share(encode(v, LINEAR_BITS), LINEAR_BITS, seed=81 + i) for i, v in enumerate(values)]

    def party(which):
        return lambda ctx, recorder: [recorder.wrap(permuted_apply)(ctx, s[which], fn, lengths) for s in shares]

    def dry(ctx):
        for _ in shares:
            permuted_apply(ctx, Shared.placeholder((n, 1), LINEAR_BITS), fn, lengths)

    run, views = _session(party(0), party(1), dry)
    for v, yo, yu in zip(values, run.owner, run.user):
        got = decode(yo.local + yu.local, ACT_BITS).numpy()[:, 0]
        rows = v.numpy()[:, 0].reshape(len(lengths), -1)
        want = (rows / np.sqrt((rows * rows).mean(axis=1, keepdims=True) + 1e-5)).reshape(-1)
        assert np.max(np.abs(got - want)) <= 2.0**-17 + 1e-12  # output rounding only
    # 3 flights per call; each call's first message leaves the user right after the previous re-share
    assert run.flights == 1 + 2 * len(shares)
    per_call_up = wire_bytes("nl.mask", (n, 1)) + wire_bytes("nl.reshare", (n, 1))
    assert run.bytes_user_to_owner == len(shares) * per_call_up
    assert run.bytes_owner_to_user == len(shares) * wire_bytes("nl.perm", (n, 1))
    assert_no_leak(attack_all(views, {}))


def test_token_selection_views():
    """Three token selections over 96 logits (the second close to the first, as consecutive steps).
    The owner attacks x_o + d against the logits; the user attacks c1 against its draw a, the revealed
    logits in place and aligned across calls, and its table T = pi(shifted) + K, of which it can
    unmask only T[j*] (with the dealt K[j*]): every other word must look uniform, alone and across
    calls. (The power check for a fixed j*, where the owner's shift would be j itself, is in
    tests/test_selection.py.)"""
    vocab = 96
    g = torch.Generator().manual_seed(90)
    base = torch.randn(1, vocab, generator=g, dtype=torch.float64) * 4
    logits = [base, base + 0.05 * torch.randn(1, vocab, generator=g, dtype=torch.float64)]
    logits.append(torch.randn(1, vocab, generator=g, dtype=torch.float64) * 4)
    shares = [share(encode(z, LINEAR_BITS), LINEAR_BITS, seed=91 + i) for i, z in enumerate(logits)]

    def owner(ctx, recorder):
        return [select_token(ctx, s[0], None) for s in shares]

    def user(ctx, recorder):
        return [select_token(ctx, s[1], lambda v: int(np.argmax(v))) for s in shares]

    def dry(ctx):
        for _ in shares:
            select_token(ctx, Shared.placeholder((1, vocab), LINEAR_BITS))

    run, views = _session(owner, user, dry, patch=[("protocols.selection.permuted_reveal", permuted_reveal)])
    assert run.user == [int(torch.argmax(z)) for z in logits] and run.owner == [None] * len(logits)
    assert run.flights == 4 * len(logits)  # each selection waits for the previous answer
    up = wire_bytes("sel.mask", (vocab, 1)) + wire_bytes("sel.delta", (1,))
    down = wire_bytes("sel.perm", (vocab, 1)) + wire_bytes("sel.table", (vocab,))
    assert (run.bytes_user_to_owner, run.bytes_owner_to_user) == (len(logits) * up, len(logits) * down)
    assert_no_leak(attack_all(views, {}))


# ------------------------------------------------------------------------------------------ Beaver
def test_appending_product_views():
    """Three score products Q K^T with 2 groups, 4 query rows and 4 appended key rows of 8 per call.
    Both parties attack E_X = X - A and E_Y = Y - B against X and Y, within a call and across calls; the
    user also attacks its dealt C_u = A op(B) - C_o against A op(B), the product of the whole masks
    (argued, not tested: over a session its rows span B's row space, and with it the keys E_Y + B)."""
    groups, mx, m_new, d = 2, 4, 4, 8
    xs = [random_ring((groups, mx, d), 100 + i) >> 24 for i in range(3)]
    ys = [random_ring((groups, m_new, d), 110 + i) >> 24 for i in range(3)]
    owner_in, user_in = [], []
    for i, (x, y) in enumerate(zip(xs, ys)):
        (xo, xu), (yo, yu) = share(x, 16, 120 + i), share(y, 16, 130 + i)
        owner_in.append((xo, yo))
        user_in.append((xu, yu))

    def party(inputs):
        def run(ctx, recorder):
            cache = GrowingOperand("k", transpose=True)
            return [recorder.wrap(product)(ctx, x, y, cache) for x, y in inputs]

        return run

    def dry(ctx):
        cache = GrowingOperand("k", transpose=True)
        for x, y in zip(xs, ys):
            product(ctx, Shared.placeholder(x.shape, 16), Shared.placeholder(y.shape, 16), cache)

    run, views = _session(party(owner_in), party(user_in), dry)
    keys = None
    for x, y, zo, zu in zip(xs, ys, run.owner, run.user):
        keys = y if keys is None else torch.cat([keys, y], dim=1)
        assert torch.equal(zo.local + zu.local, x @ keys.transpose(-1, -2))
    assert run.flights == len(xs)  # one simultaneous exchange per call
    per_direction = sum(wire_bytes("prod.k", (x.numel() + y.numel(),)) for x, y in zip(xs, ys))
    assert run.bytes_owner_to_user == run.bytes_user_to_owner == per_direction
    assert_no_leak(attack_all(views, {}))


# ------------------------------------------------------------------------------------------ input
def test_input_sharing_views():
    """Three inputs of 256 values shared by the user: the owner's share is x - mask, attacked against x
    (each call and across calls). The mask is drawn from a fresh seed per call, so no stream is reused."""
    n = 256
    xs = [random_ring((n,), 140 + i) >> 30 for i in range(3)]

    def session(ctx, values):
        return [share_input(ctx, Role.USER, v, (n,), 0) for v in values]

    owner_mat, user_mat = deal(lambda ctx: None, SEEDS)
    run = run_pair(lambda ctx: session(ctx, [None] * len(xs)), lambda ctx: session(ctx, xs), owner_mat, user_mat)
    for x, xo, xu in zip(xs, run.owner, run.user):
        assert torch.equal(xo.local + xu.local, x)
    assert run.flights == 1
    assert run.bytes_user_to_owner == len(xs) * wire_bytes("input", (n,)) and run.bytes_owner_to_user == 0
    views = [CallView(i, "input", "", words={"recv:input": s.local}) for i, s in enumerate(run.owner)]
    found = uniformity(views)
    for view, x in zip(views, xs):
        found += closeness(view, {"x": x})
    for (a, x), (b, y) in zip(zip(views, xs), zip(views[1:], xs[1:])):
        found += cross_call(a, b, {"x": x}, {"x": y})
    assert_no_leak({"owner": found})


# ------------------------------------------------------------------------------------------ decoder
DECODER_SEEDS = Seeds(owner=bytes(range(100, 116)), user=bytes(range(200, 216)))
FOLDED_STEP = 4
"""Flights of a folded decode step outside its layers (embedding, final norm folded into the selection)."""


def _decoder_session_views(fold_norms: bool, mode: str = "helper", runners=None):
    """The tiny decoder (2 layers): a prefill of 4 tokens and 2 generated tokens with token selection,
    every protocol call recorded. Returns (the generation, the reference tokens, views, masks, static)."""
    from permllm.model.reference import DecoderReference
    from protocols.model import secure_decoder
    from protocols.model.decoder_weights import masked_weight, owner_weights, weight_mask
    from tests.tiny_model import tiny_decoder

    weights = tiny_decoder(seed=5)
    prompt, budget = [7, 3, 19, 33], 2
    names = ["linear", "lookup", "trunc", "product", "permuted_apply"]
    if fold_norms:
        names += ["permuted_apply_scaled", "permuted_reveal_later"]
    with pytest.MonkeyPatch.context() as mp:
        recorder = ViewRecorder(mp)
        for name in names:
            mp.setattr(secure_decoder, name, recorder.wrap(getattr(secure_decoder, name)))
        mp.setattr("protocols.selection.permuted_reveal", recorder.wrap(permuted_reveal))
        if not fold_norms:
            unfused = secure_decoder.SecureDecoder.__init__
            mp.setattr(
                secure_decoder.SecureDecoder, "__init__", lambda self, *a, **k: unfused(self, *a, **k, fold_norms=False)
            )
        result = private_generate_inprocess(
            weights, prompt, budget, seeds=DECODER_SEEDS, timeout=300, mode=mode, runners=runners
        )
    want = DecoderReference(weights).generate_greedy(prompt, budget, stop_at_eos=True)
    owner_w = owner_weights(weights)
    masks = {name: weight_mask(DECODER_SEEDS.owner, name, w.d_in, w.d_out) for name, w in owner_w.items()}
    user_w = {
        name: LinearWeight(name, w.bits, w.d_in, w.d_out, local=masked_weight(w, DECODER_SEEDS.owner))
        for name, w in owner_w.items()
    }
    return result, want, weights.config.num_layers, recorder.calls, masks, _weight_views(user_w, owner_w)


def test_decoder_session_views():
    """A whole session of the tiny decoder on the unfused program (`fold_norms=False`): every call of
    every layer is attacked as in the tests above, plus the masked weights W~ of every layer (alone
    and in same-shaped pairs, e.g. L0.qkv against L1.qkv)."""
    result, want, layers, views, masks, static = _decoder_session_views(fold_norms=False)
    assert result.tokens == want
    stopped_early = 1 if len(want) < 2 else 0
    assert result.run.flights == len(want) * (6 + 12 * layers) + stopped_early  # unfused: 12 per layer + 6
    assert_no_leak(attack_all(views, masks, static))


def test_decoder_session_views_on_the_folded_decode_path():
    """The same session on the program production runs: each decode step folds the second norm into
    the SwiGLU step (`permuted_apply_scaled`: the user also sees pi'(h), z.src) and the final norm into
    the token choice (`permuted_reveal_later`, read at the selection's receive). The folded calls are
    attacked like the others, including fixed points and alignment of pi'(h)."""
    result, want, layers, views, masks, static = _decoder_session_views(fold_norms=True)
    assert result.tokens == want
    decode_steps = len(want) - 1
    stopped_early = 1 if len(want) < 2 else 0
    assert result.run.flights == (6 + 12 * layers) + decode_steps * (FOLDED_STEP + 10 * layers) + stopped_early
    findings = attack_all(views, masks, static)  # derives each view's revealed plaintext first
    folded = [v for v in views["user"].values() if "*invrms" in v.kind]
    late = [v for v in views["user"].values() if v.kind == "reveal" and "recv:fnorm.perm" in v.words]
    assert len(folded) == decode_steps * layers and len(late) == decode_steps
    assert all({"z", "z.src"} <= set(v.known) for v in folded) and all("z" in v.known for v in late)
    assert_no_leak(findings)


def test_decoder_session_views_with_two_party_material():
    """The folded session again with no helper: owner and user made the material (protocols.two_party),
    so the user holds no W~ and the owner's b, C, K, the truncation pads and M = R come from the two-party
    runs. Every call's view (online words, seeded draws, the material each party holds) is attacked as
    above; the runs' own transcripts are attacked in tests/test_two_party_ot.py and test_two_party_he.py."""
    result, want, layers, views, _, _ = _decoder_session_views(fold_norms=True, mode="two-party")
    assert result.tokens == want
    decode_steps = len(want) - 1
    stopped_early = 1 if len(want) < 2 else 0
    assert result.run.flights == (6 + 12 * layers) + decode_steps * (FOLDED_STEP + 10 * layers) + stopped_early
    assert_no_leak(attack_all(views, None, {}))  # no weight masks U in this mode


def test_the_two_party_view_test_finds_a_permutation_correlation_without_its_pad():
    """Power: with the owner's b left out of the permutation correlations (the user gets pi(a) itself),
    the same attacks read pi from the user's c1 and c2 against its own draws a, a2."""
    from tests.clear_runners import ClearRunners

    class Unpadded(ClearRunners):
        def _uniform(self, shape):
            return torch.zeros(tuple(shape), dtype=torch.int64) if self._zero else super()._uniform(shape)

        def permutations(self, perms, inputs, shapes):
            self._zero = True
            try:
                return super().permutations(perms, inputs, shapes)
            finally:
                self._zero = False

        _zero = False

    _, _, _, views, _, _ = _decoder_session_views(fold_norms=True, mode="two-party", runners=lambda ctx: Unpadded(ctx))
    findings = attack_all(views, None, {})
    assert findings["user"], "a permutation correlation without its pad went unnoticed"
    with pytest.raises(LeakFound):
        assert_no_leak(findings)
