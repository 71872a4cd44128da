"""Each party's whole view of a protocol run, and the reconstruction attacks tests/test_views.py runs on it.

A party's view of protocol call i (a `CallView`) holds, as `words`:
  own:in0, own:in1, own:out   its input and output shares
  draw:NAME                   what it drew from the seed it shares with the helper
  dealt:NAME                  what the helper dealt it
  recv:TAG                    every ring tensor it received from the other party
  and what it derives from them the way the protocol does: dU = d @ U (linear, owner), c and
  c_high = floor(c / 2^k) - 2^(62-k) (truncation), E_X and E_Y (appending product),
  scatter_e = pi^-1(e) (permuted evaluation, owner).
`perms` holds its permutations, `known` what it may learn in the clear (the user's permuted
plaintext z = pi(x) and Y = pi(y)). Weights are static pseudo-calls of kind "weight".

Attacks (each flags a finding; a test fails on any):
  closeness      a +/- combination of 1-3 words of one call matches a secret of that call (or its
                 negation) at >= max(4, n/8) of its n entries, a match being within 2^40 and within
                 1/256 of the secret's own magnitude (an exact opening, a small fixed-point error, or a
                 mask narrow next to the secret), or it correlates with the secret, |r| >= 0.9 over
                 n >= 32 entries (a narrow mask on a small secret). A uniform word matches with
                 probability <= 2^-23 per entry, so a sound view reaches 4 entries of n with probability
                 <= C(n, 4) 2^-92 per combination (< 2^-45 for n <= 4096); |r| >= 0.9 of an independent
                 word has probability < 1e-14 for n >= 32 (Fisher's z: 7.9 standard deviations).
  cross_call     the difference of the same 1-2-word combination in two calls of one kind (on the common
                 prefix) against the difference of the same secret: a stream reused across calls
                 cancels. Same criteria and bounds.
  uniformity     every received or dealt tensor, and the difference of each same-named pair across two
                 calls, has fewer than max(8, n/64) words below 2^48 in magnitude (a uniform word:
                 2^-15; 8 such words among n <= 2^15 have probability < 2^-70), and all of them
                 together pass the 64-bit balance bound |z| <= 6 (probability 1.3e-7, tests/recording.py).
  permutation    (user) the high 32 bits (+/- 1) of a word, or of a 2-word combination, reappear in
                 another word of the call at >= max(4, n/32) entries: that other word is a permuted copy,
                 giving away pi. A uniform word hits by chance with probability 3n 2^-32 per entry.
                 Across two calls: the difference of a dealt or received word equals a1[p] - a2[q] of two
                 own draws at >= max(4, n/32) entries (probability n^2 2^-64 per entry by chance).
  fixed_points   (user) the revealed z equals the unpermuted x at >= max(16, n/4) positions holding values
                 unique in x; under a uniform permutation P(>= k fixed points) <= 1/k! (16! > 2^44).
  alignment      (user) two calls of the same layout show their revealed values aligned: per channel,
                 |corr(z_1, z_2)| > 6/sqrt(n) (n >= 64); with fresh permutations the null distribution is
                 about N(0, 1/n), P = 2e-9 per pair.
Combinations made only of the party's own input shares and draws, and combinations that are constant
or equal to (minus) one of those or to a `known` tensor, are skipped: a weak mask of one's own gives
nothing about the other party, and the rest are the protocol's own identities (y_u = c2, w + c1 = z).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from permllm.kernels import gather_rows, scatter_rows
from permllm.ring import logical_rshift
from tests.recording import bit_balance_z

TOLERANCE = 1 << 40
SMALL = 1 << 48
MAX_TERMS = 3
MIN_CORRELATION_ENTRIES = 32
CORRELATION_BOUND = 0.9


class LeakFound(AssertionError):
    """A view test's attack succeeded (distinct from a failed correctness assertion)."""


@dataclass
class CallView:
    index: int
    kind: str
    key: str
    words: dict[str, torch.Tensor] = field(default_factory=dict)
    known: dict[str, torch.Tensor] = field(default_factory=dict)
    perms: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


class ViewRecorder:
    """Patches the material, the receive path and the protocol functions to fill each party's CallViews."""

    def __init__(self, monkeypatch):
        from protocols.context import PartyContext
        from protocols.material import CallMaterial

        self.calls: dict[str, dict[int, CallView]] = {"owner": {}, "user": {}}
        self.current: dict[str, CallView] = {}
        take, draw, permutation, dealt, receive = (
            PartyContext.take,
            CallMaterial.draw,
            CallMaterial.permutation,
            CallMaterial.dealt,
            PartyContext.receive,
        )
        recorder = self

        def rec_take(ctx, kind, key):
            mat = take(ctx, kind, key)
            view = CallView(mat.index, kind, key)
            recorder.calls[ctx.role.value][mat.index] = recorder.current[ctx.role.value] = view
            mat.view = view
            return mat

        def rec_draw(mat, name, shape):
            t = draw(mat, name, shape)
            mat.view.words[f"draw:{name}"] = t
            return t

        def rec_permutation(mat, name, lengths):
            p = permutation(mat, name, lengths)
            mat.view.perms[name] = np.array(p, copy=True)
            return p

        def rec_dealt(mat, name, shape=None):
            t = dealt(mat, name, shape)
            mat.view.words[f"dealt:{name}"] = t
            return t

        def rec_receive(ctx, tag, shape):
            t = receive(ctx, tag, shape)
            recorder.current[ctx.role.value].words[f"recv:{tag}"] = t
            return t

        monkeypatch.setattr(PartyContext, "take", rec_take)
        monkeypatch.setattr(CallMaterial, "draw", rec_draw)
        monkeypatch.setattr(CallMaterial, "permutation", rec_permutation)
        monkeypatch.setattr(CallMaterial, "dealt", rec_dealt)
        monkeypatch.setattr(PartyContext, "receive", rec_receive)

    def wrap(self, fn):
        """fn(ctx, ...) recording its Shared inputs, its output share, token ids and weight name."""
        from permllm.sharing import Shared
        from protocols.linear import LinearWeight

        def recorded(ctx, *args, **kwargs):
            out = fn(ctx, *args, **kwargs)
            if ctx.dealing:
                return out
            view = self.current[ctx.role.value]
            shared = [a for a in args if isinstance(a, Shared)]
            for j, a in enumerate(shared):
                view.words[f"own:in{j}"] = a.local
                view.info[f"bits{j}"] = a.bits
            for a in args:
                if isinstance(a, LinearWeight):
                    view.info["weight"] = a.name
            if fn.__name__ == "lookup" and args[0] is not None:
                view.info["tokens"] = [int(t) for t in args[0]]
            if isinstance(out, Shared):
                view.words["own:out"] = out.local
                view.info["out_bits"] = out.bits
            elif isinstance(out, tuple) and out[0] is not None:  # permuted_reveal on the user's side
                view.known["z"] = out[0]
            return out

        return recorded


# ------------------------------------------------------------------------------------ derived words
def derive(views: dict[str, dict[int, CallView]], masks: dict[str, torch.Tensor]) -> None:
    """Add the words each party derives the way the protocol does, and the user's legitimate plaintext.
    masks: the owner's weight masks U by name."""
    for role, calls in views.items():
        for view in calls.values():
            w = view.words
            if view.kind.startswith("linear:") and role == "owner":
                d = _first(w, "recv:lin.")
                if d is not None:
                    w["dU"] = d @ masks[view.kind[len("linear:") :]]
            elif view.kind == "trunc":
                k = view.info["bits0"] - view.info["out_bits"]
                offset = (1 << 62) if role == "owner" else 0
                c = w["own:in0"] + w["draw:r"] + w["recv:trunc"] + offset
                w["c"] = c
                w["c_high"] = logical_rshift(c, k) - (1 << (62 - k))
            elif view.kind.startswith("product:"):
                x, y = w["own:in0"], w["own:in1"]
                mine = torch.cat([(x - w["draw:A"]).reshape(-1), (y - w["draw:B"]).reshape(-1)])
                opened = mine + _first(w, "recv:prod.")
                w["E_X"], w["E_Y"] = opened[: x.numel()].reshape(x.shape), opened[x.numel() :].reshape(y.shape)
            elif view.kind == "reveal" or view.kind.startswith("nonlinear:"):
                if role == "owner":
                    e = _first(w, "recv:", ".reshare")
                    if e is not None:
                        w["scatter_e"] = scatter_rows(e, torch.from_numpy(view.perms["pi"]))
                else:
                    view.known["z"] = _first(w, "recv:", ".perm") + w["dealt:c1"]


def _first(words, prefix: str, suffix: str = ""):
    found = [t for name, t in words.items() if name.startswith(prefix) and name.endswith(suffix)]
    return found[0] if found else None


def secrets_of(views, party: str, masks) -> dict[int, dict[str, torch.Tensor]]:
    """The other party's secrets per call index, as `party` must not learn them: the plaintext inputs
    and output of each call, and for the owner also x_u @ U (linear), one-hot(t) and U[t] (embedding),
    z = pi(x) and Y = pi(y) (permuted evaluation: the user's plaintext)."""
    owner, user = views["owner"], views["user"]
    out: dict[int, dict[str, torch.Tensor]] = {}
    for index, o in owner.items():
        u = user[index]
        s: dict[str, torch.Tensor] = {}
        for name in ("in0", "in1", "out"):
            if f"own:{name}" in o.words and f"own:{name}" in u.words:
                s[name] = o.words[f"own:{name}"] + u.words[f"own:{name}"]
        if party == "owner":
            if o.kind.startswith("linear:") and "own:in0" in u.words:
                s["x_u@U"] = u.words["own:in0"] @ masks[o.kind[len("linear:") :]]
            if "tokens" in u.info:
                u_mask = masks[o.kind[len("linear:") :]]
                ids = torch.as_tensor(u.info["tokens"])
                s["onehot"] = torch.nn.functional.one_hot(ids, u_mask.shape[0]).to(torch.int64)
                s["U[t]"] = u_mask[ids]
            if "pi" in o.perms and "in0" in s:
                pi = torch.from_numpy(o.perms["pi"])
                n = pi.numel()
                s["z"] = gather_rows(s["in0"].reshape(n, -1).contiguous(), pi)
                if "out" in s:
                    s["Y"] = gather_rows(s["out"].reshape(n, -1).contiguous(), pi)
        out[index] = s
    return out


# ------------------------------------------------------------------------------------ attacks
def _flat(t) -> np.ndarray:
    return np.ascontiguousarray(t.numpy() if isinstance(t, torch.Tensor) else t).reshape(-1).astype(np.int64)


def _near(a: np.ndarray, b: np.ndarray, tol: int = TOLERANCE) -> np.ndarray:
    with np.errstate(over="ignore"):
        return ((a - b).view(np.uint64) + np.uint64(tol)) < np.uint64(2 * tol)


def _magnitude(a: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.where(a < 0, -a, a).view(np.uint64)


def _matches(value: np.ndarray, target: np.ndarray) -> int:
    """Entries of a nonzero target that value (or -value) matches within 2^40 and within 1/256 of the
    target's own magnitude (so a small word does not match a small target by magnitude alone)."""
    size = _magnitude(target)
    bound = np.minimum(size >> np.uint64(8), np.uint64(TOLERANCE))
    with np.errstate(over="ignore"):
        plus = _magnitude(value - target) <= bound
        minus = _magnitude(value + target) <= bound
    return int(((plus | minus) & (size > 0)).sum())


def _correlated(value: np.ndarray, target: np.ndarray) -> float:
    """|Pearson correlation| of value and target read as signed numbers; 0 below 32 entries."""
    if value.size < MIN_CORRELATION_ENTRIES:
        return 0.0
    a, b = value.astype(np.float64), target.astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return abs(float(a @ b)) / denom if denom else 0.0


def _finding(value: np.ndarray, target: np.ndarray) -> str | None:
    hits = _matches(value, target)
    if hits >= _threshold(value.size):
        return f"at {hits}/{value.size}"
    r = _correlated(value, target)
    if r >= CORRELATION_BOUND:
        return f"correlated {r:.3f} over {value.size}"
    return None


def _threshold(n: int, floor: int = 4) -> int:
    return max(floor, math.ceil(n / 8))


def _combos(words: dict[str, np.ndarray], terms: int):
    """(label, value) for every +/- combination of 1..terms equally long words (first sign +)."""
    by_size: dict[int, list[str]] = {}
    for name, v in words.items():
        by_size.setdefault(v.size, []).append(name)
    with np.errstate(over="ignore"):
        for names in by_size.values():
            for count in range(1, terms + 1):
                for chosen in itertools.combinations(names, count):
                    for signs in itertools.product((1, -1), repeat=count - 1):
                        value = words[chosen[0]].copy()
                        label = chosen[0]
                        for sign, name in zip(signs, chosen[1:]):
                            value = value + words[name] if sign > 0 else value - words[name]
                            label += f" {'+' if sign > 0 else '-'} {name}"
                        yield chosen, label, value


def _trivial(value: np.ndarray, known: list[np.ndarray]) -> bool:
    """Constant, or equal to (minus) a tensor the party holds anyway: a protocol identity, not a finding."""
    if bool((value == value[0]).all()):
        return True
    with np.errstate(over="ignore"):
        return any(k.size == value.size and (np.array_equal(k, value) or np.array_equal(-k, value)) for k in known)


def _own(name: str) -> bool:
    return name.startswith(("own:in", "draw:"))


def _holds(view: CallView) -> list[np.ndarray]:
    """What the party holds before anything arrives (its input shares and draws) and its known plaintext."""
    return [_flat(t) for n, t in view.words.items() if _own(n)] + [_flat(t) for t in view.known.values()]


def closeness(view: CallView, secrets: dict[str, torch.Tensor]) -> list[str]:
    words = {n: _flat(t) for n, t in view.words.items()}
    known = _holds(view)
    targets = {n: _flat(t) for n, t in secrets.items()}
    sizes = {t.size for t in targets.values()}
    words = {n: v for n, v in words.items() if v.size in sizes}
    found = []
    for chosen, label, value in _combos(words, MAX_TERMS):
        if all(_own(n) for n in chosen) or _trivial(value, known):
            continue
        for name, target in targets.items():
            if target.size != value.size:
                continue
            how = _finding(value, target)
            if how:
                found.append(f"call {view.index} {view.kind}: {label} ~ {name} {how}")
    return found


def cross_call(first: CallView, second: CallView, s1: dict, s2: dict) -> list[str]:
    w1 = {n: _flat(t) for n, t in first.words.items()}
    w2 = {n: _flat(t) for n, t in second.words.items()}
    k1, k2 = _holds(first), _holds(second)
    common = {n: w1[n] for n in w1 if n in w2}
    found = []
    with np.errstate(over="ignore"):
        for chosen, label, v1 in _combos(common, 2):
            if all(_own(n) for n in chosen):
                continue
            sub = {n: w2[n] for n in chosen}
            if len({v.size for v in sub.values()}) != 1:
                continue
            v2 = _combo_like(label, chosen, sub)
            if _trivial(v1, k1) or _trivial(v2, k2):
                continue
            n = min(v1.size, v2.size)
            diff = v1[:n] - v2[:n]
            if (diff == diff[0]).all():
                continue
            for name in s1.keys() & s2.keys():
                a, b = _flat(s1[name]), _flat(s2[name])
                if a.size != v1.size or b.size != v2.size:
                    continue
                target = a[:n] - b[:n]
                how = _finding(diff, target)
                if how:
                    found.append(
                        f"calls {first.index}/{second.index} {first.kind}: ({label}) difference ~ {name} difference {how}"
                    )
    return found


def _combo_like(label: str, chosen, words) -> np.ndarray:
    signs = [1] + [1 if tok == "+" else -1 for tok in label.split() if tok in "+-"]
    value = words[chosen[0]].copy()
    for sign, name in zip(signs[1:], chosen[1:]):
        value = value + words[name] if sign > 0 else value - words[name]
    return value


def _incoming(view: CallView) -> dict[str, np.ndarray]:
    return {n: _flat(t) for n, t in view.words.items() if n.startswith(("recv:", "dealt:", "masked"))}


def _small_count(words: np.ndarray) -> int:
    return int(_near(words, np.zeros_like(words), SMALL).sum())


def uniformity(calls: list[CallView]) -> list[str]:
    found, everything = [], []
    by_kind: dict[str, list[CallView]] = {}
    for view in calls:
        by_kind.setdefault(view.kind, []).append(view)
        for name, words in _incoming(view).items():
            everything.append(words)
            small = _small_count(words)
            if small >= max(8, words.size // 64):
                found.append(f"call {view.index} {view.kind}: {name} has {small}/{words.size} words below 2^48")
    with np.errstate(over="ignore"):
        for group in by_kind.values():
            for first, second in zip(group, group[1:]):
                a, b = _incoming(first), _incoming(second)
                for name in a.keys() & b.keys():
                    n = min(a[name].size, b[name].size)
                    diff = a[name][:n] - b[name][:n]
                    small = _small_count(diff)
                    if small >= max(8, n // 64):
                        found.append(
                            f"calls {first.index}/{second.index} {first.kind}: {name} difference has "
                            f"{small}/{n} words below 2^48"
                        )
    if everything:
        words = np.concatenate(everything)
        if words.size >= 1000:
            z = float(np.abs(bit_balance_z(words)).max())
            if z > 6.0:
                found.append(f"received and dealt words: bit balance |z| = {z:.1f} > 6")
    return found


def permutation_recovery(view: CallView) -> list[str]:
    words = {n: _flat(t) for n, t in view.words.items() if not n.startswith("own:out")}
    known = [_flat(t) for t in view.known.values()]
    found = []
    for chosen, label, value in _combos(words, 2):
        if _trivial(value, known):
            continue
        big = ~_near(value, np.zeros_like(value), SMALL)
        high = value >> 32
        for name, other in words.items():
            if name in chosen or other.size != value.size or _near(value, other).mean() > 0.5:
                continue
            h = other >> 32
            hits = int((np.isin(high, np.concatenate([h - 1, h, h + 1])) & big).sum())
            if hits >= _threshold(value.size):
                found.append(f"call {view.index} {view.kind}: {label} is a permuted copy of {name} ({hits} entries)")
    return found


def permutation_across_calls(first: CallView, second: CallView, max_entries: int = 512) -> list[str]:
    found = []
    a, b = _incoming(first), _incoming(second)
    draws1 = {n: _flat(t) for n, t in first.words.items() if n.startswith("draw:")}
    draws2 = {n: _flat(t) for n, t in second.words.items() if n.startswith("draw:")}
    with np.errstate(over="ignore"):
        for name in a.keys() & b.keys():
            if a[name].size != b[name].size or a[name].size > max_entries:
                continue
            diff = a[name] - b[name]
            for n1, d1 in draws1.items():
                for n2, d2 in draws2.items():
                    if d1.size != diff.size or d2.size != diff.size:
                        continue
                    pairs = (d1[:, None] - d2[None, :]).reshape(-1)
                    hits = int(np.isin(diff, pairs).sum())
                    if hits >= _threshold(diff.size):
                        found.append(
                            f"calls {first.index}/{second.index} {first.kind}: {name} difference is "
                            f"{n1}[p] - {n2}[q] at {hits} entries"
                        )
    return found


def fixed_points(view: CallView, x: torch.Tensor) -> list[str]:
    if "z" not in view.known:
        return []
    z, x = _flat(view.known["z"]), _flat(x)
    values, counts = np.unique(x, return_counts=True)
    unique = np.isin(x, values[counts == 1])
    hits = int(((z == x) & unique).sum())
    if x.size >= 16 and hits >= max(16, x.size // 4):
        return [f"call {view.index} {view.kind}: the revealed values are unpermuted at {hits}/{x.size} positions"]
    return []


def alignment(first: CallView, second: CallView) -> list[str]:
    if "z" not in first.known or "z" not in second.known or first.key != second.key:
        return []
    z1, z2 = first.known["z"].numpy(), second.known["z"].numpy()
    z1, z2 = z1.reshape(z1.shape[0], -1), z2.reshape(z2.shape[0], -1)
    n = z1.shape[0]
    if n < 64:
        return []
    found = []
    for ch in range(z1.shape[1]):
        a, b = z1[:, ch].astype(np.float64), z2[:, ch].astype(np.float64)
        a, b = a - a.mean(), b - b.mean()
        denom = math.sqrt(float(a @ a) * float(b @ b))
        r = float(a @ b) / denom if denom else 0.0
        if abs(r) > 6 / math.sqrt(n):
            found.append(f"calls {first.index}/{second.index} {first.kind}: revealed values aligned, corr {r:.2f}")
    return found


def attack_all(views, masks, static=None) -> dict[str, list[str]]:
    """Run every attack for both parties; returns {party: findings}. static: {party: [CallView]} (weights)."""
    derive(views, masks)
    findings = {}
    for party in ("owner", "user"):
        calls = [views[party][i] for i in sorted(views[party])]
        extra = (static or {}).get(party, [])
        secrets = secrets_of(views, party, masks)
        for view in extra:
            secrets[view.index] = view.info["secrets"]
        found = []
        every = calls + extra
        for view in every:
            found += closeness(view, secrets[view.index])
        groups: dict[str, list[CallView]] = {}
        for view in every:
            groups.setdefault(view.kind, []).append(view)
        for group in groups.values():
            for first, second in itertools.combinations(group[:6], 2):
                found += cross_call(first, second, secrets[first.index], secrets[second.index])
        found += uniformity(every)
        if party == "user":
            owner_calls = views["owner"]
            for view in calls:
                if "pi" in owner_calls[view.index].perms:
                    found += permutation_recovery(view)
                    found += fixed_points(view, secrets[view.index]["in0"])
            for group in groups.values():
                for first, second in itertools.combinations(group[:6], 2):
                    if "pi" in owner_calls.get(first.index, CallView(0, "", "")).perms:
                        found += permutation_across_calls(first, second)
                        found += alignment(first, second)
        findings[party] = found
    return findings


def assert_no_leak(findings: dict[str, list[str]]) -> None:
    lines = [f"{party}: {f}" for party, fs in findings.items() for f in fs]
    if lines:
        raise LeakFound(f"{len(lines)} findings:\n" + "\n".join(lines[:20]))
