"""The table token selection of protocols/selection.py: exact token ids, exact cost, and both views.

The views (notation of the module docstring): the user holds j*, K[j*] (dealt), delta (it sends it) and
T (the owner's reply); the owner holds delta. Statistical bounds state their false-positive probability
under the hypothesis that the protocol hides what it should; every run's seeds derive from its index,
so a failure replays exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from parties.inprocess import Seeds, deal, run_pair
from permllm.errors import ConfigError
from permllm.fixed import LINEAR_BITS, decode, encode
from permllm.sampling import choose_token
from permllm.sharing import Shared
from protocols.material import CallMaterial, DealerCall
from protocols.selection import select_token
from tests.protocol_helpers import share, wire_bytes
from tests.recording import Transcript, chi_square_upper_bound, record_dealt, record_permutations

CHI2_FALSE_POSITIVE = 1e-6


def _logits(vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, vocab, generator=g, dtype=torch.float64) * 4
    return z, share(encode(z, LINEAR_BITS), LINEAR_BITS, seed=seed + 1)


def _seeds(run: int, label: str) -> Seeds:
    def derive(party):
        return hashlib.sha256(f"selection/{label}/{run}/{party}".encode()).digest()[:16]

    return Seeds(derive("owner"), derive("user"))


@dataclass
class SelectionView:
    token: int
    pi: np.ndarray  # the owner's permutation of this selection
    j: int  # the user's permuted choice
    jstar: int  # dealt to the user
    kstar: int  # dealt to the user
    delta: int  # user -> owner
    table: np.ndarray  # owner -> user
    run: object


def _select(vocab: int, seeds: Seeds, pick, seed: int = 0, patch=None) -> SelectionView:
    """One table selection over shared logits; pick maps the permuted float logits to j.
    patch(monkeypatch) may replace the material before the run (the tests of the tests)."""
    _, (lo, lu) = _logits(vocab, seed)
    chosen = []

    def choose(values):
        chosen.append(pick(values))
        return chosen[-1]

    def call(ctx, logits):
        return select_token(ctx, logits, choose if not ctx.dealing and not ctx.is_owner else None)

    transcript = Transcript()
    with pytest.MonkeyPatch.context() as mp:
        if patch is not None:
            patch(mp)
        perms = record_permutations(mp)
        dealt = record_dealt(mp)
        owner_mat, user_mat = deal(lambda ctx: call(ctx, Shared.placeholder((1, vocab), LINEAR_BITS)), seeds)
        run = run_pair(
            lambda ctx: call(ctx, lo), lambda ctx: call(ctx, lu), owner_mat, user_mat, wrap_channel=transcript.wrap
        )
    (record,) = [r for r in dealt["user"] if r.kind == "selection"]
    (delta,) = [m for m in transcript.received_by("owner") if m.tag == "sel.delta"]
    (table,) = [m for m in transcript.received_by("user") if m.tag == "sel.table"]
    return SelectionView(
        token=run.user,
        pi=perms[0].perm,
        j=chosen[0],
        jstar=int(record.tensors["jstar"][0]),
        kstar=int(record.tensors["kstar"][0]),
        delta=int(delta.words()[0]),
        table=table.words().copy(),
        run=run,
    )


def _argmax(values):
    return int(np.argmax(values))


# ------------------------------------------------------------------------------------------ correctness, cost
def test_table_selection_gives_the_argmax_id_in_four_flights_and_exact_bytes():
    vocab = 50
    z, _ = _logits(vocab, seed=12)
    view = _select(vocab, Seeds(bytes(16), bytes([1]) * 16), _argmax, seed=12)
    assert view.token == int(torch.argmax(z)) and view.run.owner is None
    assert view.token == int(view.pi[view.j])
    # flights 1-2 the permuted reveal, 3 the shift delta, 4 the masked table
    assert view.run.flights == 4
    assert view.run.bytes_user_to_owner == wire_bytes("sel.mask", (vocab, 1)) + wire_bytes("sel.delta", (1,))
    assert view.run.bytes_owner_to_user == wire_bytes("sel.perm", (vocab, 1)) + wire_bytes("sel.table", (vocab,))


def test_table_selection_deals_16_bytes_to_the_user_and_nothing_to_the_owner():
    vocab = 50
    with pytest.MonkeyPatch.context() as mp:
        dealt = record_dealt(mp)
        deal(lambda ctx: select_token(ctx, Shared.placeholder((1, vocab), LINEAR_BITS)), Seeds.fresh())
    owner_sel = [r for r in dealt["owner"] if r.kind == "selection"]
    user_sel = [r for r in dealt["user"] if r.kind == "selection"]
    assert [r.nbytes for r in owner_sel] == [0]
    assert [sorted(r.tensors) for r in user_sel] == [["jstar", "kstar"]] and user_sel[0].nbytes == 16


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8)],
)
def test_sampling_through_the_protocol_equals_the_plaintext_sampler_on_the_same_permuted_logits(kwargs):
    vocab = 40
    z, _ = _logits(vocab, seed=5)
    for run in range(6):
        seen = []

        def pick(values, run=run):
            seen.append(values.copy())
            return choose_token(values, generator=np.random.default_rng(run), **kwargs)

        view = _select(vocab, _seeds(run, "sampling"), pick, seed=5)
        # the user saw exactly the encoded logits in the owner's permuted order ...
        permuted = decode(encode(z, LINEAR_BITS), LINEAR_BITS).numpy().reshape(-1)[view.pi]
        assert np.array_equal(seen[0], permuted)
        # ... and the protocol returns the token the plaintext sampler picks there, mapped back by pi
        j = choose_token(permuted, generator=np.random.default_rng(run), **kwargs)
        assert view.token == int(view.pi[j])


def test_a_bfv_lookup_in_table_mode_and_an_unknown_mode_are_refused():
    from protocols.context import PartyContext, Role

    ctx = PartyContext(Role.USER, channel=None, material=None)
    logits = Shared.placeholder((1, 4), LINEAR_BITS)
    with pytest.raises(ConfigError, match="takes no BFV lookup"):
        select_token(ctx, logits, _argmax, lookup=object())
    with pytest.raises(ConfigError, match="needs a BFV lookup"):
        select_token(ctx, logits, _argmax, mode="bfv")
    with pytest.raises(ConfigError, match="unknown token selection 'clear'"):
        select_token(ctx, logits, _argmax, mode="clear")


# ------------------------------------------------------------------------------------------ the user's view
def _fix_material(pi: np.ndarray, k: torch.Tensor):
    """A patch making the selection use the given permutation and pad K, on both the dealer's and the
    owner's side (the same streams the real protocol reads)."""
    vocab = pi.size

    def patch(mp):
        orig_perm, orig_draw = CallMaterial.permutation, CallMaterial.draw
        orig_dealer_perm, orig_dealer_draw = DealerCall.owner_permutation, DealerCall.owner_draw

        def perm(self, name, lengths, original=orig_perm):
            return pi.copy() if list(lengths) == [vocab] else original(self, name, lengths)

        def dealer_perm(self, name, lengths, original=orig_dealer_perm):
            return pi.copy() if list(lengths) == [vocab] else original(self, name, lengths)

        def draw(self, name, shape, original=orig_draw):
            return k.clone() if name == "K" else original(self, name, shape)

        def dealer_draw(self, name, shape, original=orig_dealer_draw):
            return k.clone() if name == "K" else original(self, name, shape)

        mp.setattr(CallMaterial, "permutation", perm)
        mp.setattr(DealerCall, "owner_permutation", dealer_perm)
        mp.setattr(CallMaterial, "draw", draw)
        mp.setattr(DealerCall, "owner_draw", dealer_draw)

    return patch


def test_two_permutations_with_the_same_chosen_entry_give_the_user_the_same_view():
    """Simulation, exactly: for pi, pi' with pi[j] = pi'[j] and any pad K, the pad
    K'[i] = K[i] + pi[(i + delta) mod V] - pi'[(i + delta) mod V] gives the user bit-identical
    words (j*, K[j*], delta, T) in the real protocol. K -> K' is a bijection of uniform pads, so the
    user's view has the same distribution under pi and pi': it depends on pi[j] only."""
    vocab, j = 16, 5
    seeds = Seeds(bytes(16), bytes([7]) * 16)  # the user's seed (hence j*) is the same in both worlds
    rng = np.random.default_rng(3)
    pi = rng.permutation(vocab).astype(np.int64)
    others = [i for i in range(vocab) if i != j]
    pi_other = pi.copy()
    pi_other[others] = pi[rng.permutation(others)]
    assert pi_other[j] == pi[j] and not np.array_equal(pi, pi_other)
    k = torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, vocab, dtype=np.int64, endpoint=True))

    first = _select(vocab, seeds, lambda v: j, patch=_fix_material(pi, k))
    shift = (np.arange(vocab) + first.delta) % vocab
    k_other = k + torch.from_numpy(pi[shift] - pi_other[shift])
    second = _select(vocab, seeds, lambda v: j, patch=_fix_material(pi_other, k_other))

    assert (first.jstar, first.kstar, first.delta) == (second.jstar, second.kstar, second.delta)
    assert np.array_equal(first.table, second.table)
    assert first.token == second.token == int(pi[j])
    # the pads differ exactly where the permutations differ: the entries the user cannot unmask
    differs = np.flatnonzero((k != k_other).numpy())
    assert first.jstar not in differs and set(shift[differs]) == set(np.flatnonzero(pi != pi_other))


def _user_leakage(views, vocab: int) -> tuple[int, float]:
    """(entries other than j* the user unmasks to a token id with its pad K[j*], chi-square of
    independence between pi[(i + delta) mod V] and T[i] mod V over i != j*)."""
    unmasked, counts = 0, np.zeros((vocab, vocab))
    for v in views:
        assert v.token == int(v.pi[v.j]) == int(v.table[v.jstar] - v.kstar)
        for i in range(vocab):
            if i == v.jstar:
                continue
            guess = int(v.table[i]) - v.kstar
            unmasked += 0 <= guess < vocab
            counts[int(v.pi[(i + v.delta) % vocab]), int(v.table[i]) % vocab] += 1
    expected = np.outer(counts.sum(1), counts.sum(0)) / counts.sum()
    return unmasked, float(((counts - expected) ** 2 / expected).sum())


USER_RUNS = 300
VIEW_VOCAB = 8


def _user_views(label: str, patch=None):
    return [_select(VIEW_VOCAB, _seeds(r, label), lambda v: r % VIEW_VOCAB, patch=patch) for r in range(USER_RUNS)]


def test_the_user_unmasks_only_the_chosen_entry():
    """Over 300 seeded runs (V = 8): the one entry the user unmasks is pi[j]; no other entry minus K[j*]
    is a token id (each such event has probability V / 2^64), and T[i] mod V is independent of the
    entry of pi it hides (7 x 300 pairs, 49 degrees of freedom, bound exceeded with probability 1e-6)."""
    unmasked, chi2 = _user_leakage(_user_views("user"), VIEW_VOCAB)
    bound = chi_square_upper_bound((VIEW_VOCAB - 1) ** 2, CHI2_FALSE_POSITIVE)
    print(f"\nuser's view: {unmasked} extra entries unmasked, chi2 {chi2:.1f} (bound {bound:.1f})")
    assert unmasked == 0
    assert chi2 <= bound


def test_the_user_view_test_fails_when_the_pad_is_zero():
    """The test above has power: with K = 0 the user reads the whole of pi from T."""

    def zero_pad(mp):
        for cls, method in ((CallMaterial, "draw"), (DealerCall, "owner_draw")):
            original = getattr(cls, method)

            def draw(self, name, shape, original=original):
                return torch.zeros(tuple(shape), dtype=torch.int64) if name == "K" else original(self, name, shape)

            mp.setattr(cls, method, draw)

    unmasked, chi2 = _user_leakage(_user_views("zero-pad", patch=zero_pad), VIEW_VOCAB)
    assert unmasked == USER_RUNS * (VIEW_VOCAB - 1)
    assert chi2 > chi_square_upper_bound((VIEW_VOCAB - 1) ** 2, CHI2_FALSE_POSITIVE)


# ------------------------------------------------------------------------------------------ the owner's view
def _owner_dependence(views, vocab: int) -> tuple[float, float]:
    """(chi-square of delta against uniform, chi-square of independence of delta and j)."""
    choices = sorted({v.j for v in views})
    counts = np.zeros((len(choices), vocab))
    for v in views:
        counts[choices.index(v.j), v.delta] += 1
    totals = counts.sum(0)
    uniform = float(((totals - totals.sum() / vocab) ** 2 / (totals.sum() / vocab)).sum())
    expected = np.outer(counts.sum(1), totals) / counts.sum()
    seen = expected > 0  # a shift never observed adds no term (only when delta is far from uniform)
    return uniform, float(((counts - expected)[seen] ** 2 / expected[seen]).sum())


def _owner_views(label: str, patch=None):
    # j alternates between the first and the last permuted index
    picks = (0, VIEW_VOCAB - 1)
    return [_select(VIEW_VOCAB, _seeds(r, label), lambda v: picks[r % 2], patch=patch) for r in range(USER_RUNS)]


def test_the_owner_sees_a_uniform_shift_independent_of_the_choice():
    """delta over 300 seeded runs, j in {0, V - 1}: chi-square against uniform (7 dof) and of
    independence from j (7 dof), each bound exceeded with probability 1e-6 when delta is uniform and
    independent of j."""
    uniform, dependence = _owner_dependence(_owner_views("owner"), VIEW_VOCAB)
    bound = chi_square_upper_bound(VIEW_VOCAB - 1, CHI2_FALSE_POSITIVE)
    print(f"\nowner's view: chi2 uniform {uniform:.1f}, chi2 independence {dependence:.1f} (bound {bound:.1f})")
    assert uniform <= bound and dependence <= bound


def test_the_owner_view_test_fails_when_the_dealt_index_is_fixed():
    """The test above has power: with j* = 0 the shift is the choice itself."""
    import protocols.selection as selection

    views = _owner_views("fixed-index", patch=lambda mp: mp.setattr(selection, "uniform_index", lambda *a: 0))
    uniform, dependence = _owner_dependence(views, VIEW_VOCAB)
    bound = chi_square_upper_bound(VIEW_VOCAB - 1, CHI2_FALSE_POSITIVE)
    assert uniform > bound and dependence > bound
