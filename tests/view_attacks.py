"""Reconstruction attacks on each party's whole view (tests/view_recording.py), run by tests/test_views.py.

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
                 prefix; received words of two layers' same step count as the same word) against the
                 difference of the same secret: a stream reused across calls cancels. Same criteria
                 and bounds.
  uniformity     every received or dealt tensor, and the difference of each same-named pair across two
                 calls, has fewer than max(8, n/64) words below 2^48 in magnitude (a uniform word:
                 2^-15; 8 such words among n <= 2^15 have probability < 2^-70), and all of them
                 together pass the 64-bit balance bound |z| <= 6 (probability 1.3e-7, tests/recording.py).
  permutation    (user) the high 32 bits (+/- 1) of a word, or of a 2-word combination, reappear in
                 another word of the call at >= max(4, n/8) entries: that other word is a permuted copy,
                 giving away pi. A uniform word hits by chance with probability 3n 2^-32 per entry.
                 Across two calls: the difference of a dealt or received word equals a1[p] - a2[q] of two
                 own draws at >= max(4, n/8) entries (probability n^2 2^-64 per entry by chance).
  fixed_points   (user) the revealed z equals the unpermuted x at >= max(16, n/4) positions holding values
                 unique in x; under a uniform permutation P(>= k fixed points) <= 1/k! (16! > 2^44).
  reused_perm    (user) the revealed values of two calls (z, or a folded norm's z.src) come from the
                 same positions of their plaintexts at >= max(16, n/4) of the entries whose values are
                 unique: one permutation placed both. Two independent uniform permutations agree like
                 the fixed points of one: P(>= k) <= 1/k!.
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
import re

import numpy as np
import torch

from tests.recording import bit_balance_z
from tests.view_recording import CallView, LeakFound, derive, secrets_of

__all__ = ["LeakFound", "attack_all", "assert_no_leak", "closeness", "cross_call", "uniformity"]

TOLERANCE = 1 << 40
SMALL = 1 << 48
MAX_TERMS = 3
MIN_CORRELATION_ENTRIES = 32
CORRELATION_BOUND = 0.9


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


def _generic(name: str) -> str:
    """A received word's name without its layer ("recv:L1.n2.mask" -> "recv:n2.mask"), so the same
    step of two layers is compared across calls."""
    return re.sub(r"^recv:L\d+\.", "recv:", name)


def cross_call(first: CallView, second: CallView, s1: dict, s2: dict) -> list[str]:
    w1 = {_generic(n): _flat(t) for n, t in first.words.items()}
    w2 = {_generic(n): _flat(t) for n, t in second.words.items()}
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
                        f"calls {first.index}/{second.index} {first.kind}: ({label}) difference ~ "
                        f"{name} difference {how}"
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


def fixed_points(view: CallView, x: torch.Tensor, name: str = "z") -> list[str]:
    if name not in view.known:
        return []
    z, x = _flat(view.known[name]), _flat(x)
    values, counts = np.unique(x, return_counts=True)
    unique = np.isin(x, values[counts == 1])
    hits = int(((z == x) & unique).sum())
    if x.size >= 16 and hits >= max(16, x.size // 4):
        return [f"call {view.index} {view.kind}: the revealed values are unpermuted at {hits}/{x.size} positions"]
    return []


def _placement(z: np.ndarray, x: np.ndarray) -> np.ndarray:
    """For each revealed entry, the position of its value in x where that value is unique there; -1 else."""
    values, first, counts = np.unique(x, return_index=True, return_counts=True)
    where = np.searchsorted(values, z)
    where = np.minimum(where, values.size - 1)
    ok = (values[where] == z) & (counts[where] == 1)
    return np.where(ok, first[where], -1)


def reused_permutation(first: CallView, second: CallView, x1, x2, name: str = "z") -> list[str]:
    """(user) the revealed values of two calls placed by the same permutation: where z_1[i] and z_2[i]
    are unique values of the plaintexts x_1 and x_2, both come from the same position at
    >= max(16, n/4) entries. Two independent uniform permutations agree like the fixed points of a
    uniform permutation: P(>= k) <= 1/k! (16! > 2^44)."""
    if name not in first.known or name not in second.known:
        return []
    z1, z2, x1, x2 = (_flat(t) for t in (first.known[name], second.known[name], x1, x2))
    if not z1.size == z2.size == x1.size == x2.size or z1.size < 16:
        return []
    p1, p2 = _placement(z1, x1), _placement(z2, x2)
    hits = int(((p1 == p2) & (p1 >= 0)).sum())
    if hits >= max(16, z1.size // 4):
        return [
            f"calls {first.index}/{second.index} {first.kind}: {name} of both placed by one permutation "
            f"at {hits}/{z1.size} entries"
        ]
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
                if "pi.src" in owner_calls[view.index].perms:
                    found += fixed_points(view, secrets[view.index]["in1"], "z.src")
            for group in groups.values():
                for first, second in itertools.combinations(group[:6], 2):
                    perms = owner_calls.get(first.index, CallView(0, "", "")).perms
                    s1, s2 = secrets[first.index], secrets[second.index]
                    if "pi" in perms:
                        found += permutation_across_calls(first, second)
                        found += alignment(first, second)
                        found += reused_permutation(first, second, s1["in0"], s2["in0"])
                    if "pi.src" in perms:
                        found += reused_permutation(first, second, s1["in1"], s2["in1"], "z.src")
        findings[party] = found
    return findings


def assert_no_leak(findings: dict[str, list[str]]) -> None:
    lines = [f"{party}: {f}" for party, fs in findings.items() for f in fs]
    if lines:
        raise LeakFound(f"{len(lines)} findings:\n" + "\n".join(lines[:20]))
