"""Mutation check for the view tests: break one mask stream at a time, everywhere, and require a leak.

A mutation patches `permllm.prg.Prg` for one stream name, for every holder of the seed (owner, user,
helper's dry run), so the protocols stay correct while the mask gets weak:
  zero     the stream is all zeros (for the permutation stream pi: the identity)
  narrow   the stream is cut to its low 32 bits (& 0xFFFFFFFF); skipped for pi (not a ring word)
  reuse    the call index is dropped from the stream's label ("{index}/{name}" -> "reused/{name}";
           for the weight masks "weight/{name}" -> "weight/reused"), so every call draws the same words
Stream names: linear v, s; truncation r (the holder's mask) and k0, k1 (the other party's random-OT
keys; the holder's dealt krho is made from them, so it is broken with them); permutation a, a2, b,
b2, pi, and a folded norm's reveal of its source row a.src, b.src, pi.src; Beaver A, B, C; weight
mask U; the user's input mask "input" (drawn from a fresh seed per call, so "reuse" does not apply to it).

For each (stream, mutation) `check` runs the correctness tests that use the stream (exact ring results
against plaintext, costs) and requires them to pass, then runs the view test named in CATCHERS and
requires it to raise `LeakFound`. `UNCAUGHT` lists the mutations no view test catches, each with the
reason. Run everything from the repository root with

    python -m tests.mutations            (prints one line per mutation; exit status 1 on a miss)
"""

from __future__ import annotations

import inspect
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch

from permllm.prg import Prg
from tests.protocol_helpers import SEEDS

# K: the token selection's one-time pad (its index j* is covered by tests/test_selection.py's power check)
CALL_STREAMS = ("v", "s", "r", "k0", "k1", "a", "a2", "b", "b2", "A", "B", "C", "K")
MUTATIONS = ("zero", "narrow", "reuse")
# the folded norm's reveal of its source row (permute.permuted_apply_scaled), and its permutation pi.src
FOLDED_STREAMS = ("a.src", "b.src")

# which view test (in tests/test_views.py) catches each mutation
FOLDED_CATCHER = "test_decoder_session_views_on_the_folded_decode_path"
CATCHERS = {
    ("v", "zero"): "test_linear_views",
    ("v", "narrow"): "test_embedding_lookup_views",
    ("v", "reuse"): "test_linear_views",
    ("s", "zero"): "test_linear_views",
    ("s", "narrow"): "test_linear_views",
    ("s", "reuse"): "test_embedding_lookup_views",
    ("U", "zero"): "test_decoder_session_views",
    ("U", "narrow"): "test_decoder_session_views",
    ("U", "reuse"): "test_decoder_session_views",
    ("r", "zero"): "test_trunc_views",
    ("r", "narrow"): "test_trunc_views",
    ("r", "reuse"): "test_trunc_views",
    ("k0", "zero"): "test_trunc_views",
    ("k0", "narrow"): "test_trunc_views",
    ("k0", "reuse"): "test_trunc_views",
    ("k1", "zero"): "test_trunc_views",
    ("k1", "narrow"): "test_trunc_views",
    ("k1", "reuse"): "test_trunc_views",
    ("a", "zero"): "test_permuted_nonlinear_views",
    ("a", "narrow"): "test_permuted_nonlinear_views",
    ("a", "reuse"): "test_permuted_nonlinear_views",
    ("a2", "zero"): "test_permuted_nonlinear_views",
    ("a2", "narrow"): "test_permuted_nonlinear_views",
    ("a2", "reuse"): "test_permuted_nonlinear_views",
    ("b", "zero"): "test_permuted_nonlinear_views",
    ("b", "narrow"): "test_permuted_nonlinear_views",
    ("b", "reuse"): "test_permuted_nonlinear_views",
    ("b2", "zero"): "test_permuted_nonlinear_views",
    ("b2", "narrow"): "test_permuted_nonlinear_views",
    ("b2", "reuse"): "test_permuted_nonlinear_views",
    ("pi", "zero"): "test_permuted_nonlinear_views",
    ("pi", "reuse"): "test_permuted_nonlinear_views",
    ("A", "zero"): "test_appending_product_views",
    ("A", "narrow"): "test_appending_product_views",
    ("A", "reuse"): "test_appending_product_views",
    ("B", "zero"): "test_appending_product_views",
    ("B", "narrow"): "test_appending_product_views",
    ("B", "reuse"): "test_appending_product_views",
    ("C", "zero"): "test_appending_product_views",
    ("C", "narrow"): "test_appending_product_views",
    ("C", "reuse"): "test_appending_product_views",
    ("K", "zero"): "test_token_selection_views",
    ("K", "narrow"): "test_token_selection_views",
    ("K", "reuse"): "test_token_selection_views",
    ("input", "zero"): "test_input_sharing_views",
    ("input", "narrow"): "test_input_sharing_views",
    **{(name, kind): FOLDED_CATCHER for name in FOLDED_STREAMS for kind in MUTATIONS},
    ("pi.src", "zero"): FOLDED_CATCHER,
    ("pi.src", "reuse"): FOLDED_CATCHER,
}

# mutations no view test catches, and why (none at present)
UNCAUGHT: dict[tuple[str, str], str] = {}

# correctness tests (tests/test_protocols.py, tests/test_secure_decoder.py) that exercise each stream
_LINEAR = ["test_linear_is_bit_exact_and_costs_one_activation_sized_flight", "test_linear_on_dealt_input_sends_nothing"]
_PERMUTE = [
    "test_swiglu_permutes_gate_and_up_jointly",
    "test_table_selection_gives_the_argmax_id_in_four_flights_and_exact_bytes",
]
CORRECTNESS = {
    "v": _LINEAR + ["test_lookup_gives_the_rows_of_the_user_tokens_exactly"],
    "s": _LINEAR + ["test_lookup_gives_the_rows_of_the_user_tokens_exactly"],
    "U": ["test_secure_logits_match_float64_reference_through_prefill_and_decode"],
    "r": ["test_trunc_is_exact_to_one_unit_and_never_fails"],
    "k0": ["test_trunc_is_exact_to_one_unit_and_never_fails"],
    "k1": ["test_trunc_is_exact_to_one_unit_and_never_fails"],
    "a": _PERMUTE,
    "a2": _PERMUTE,
    "b": _PERMUTE,
    "b2": _PERMUTE,
    "pi": _PERMUTE,
    "A": ["test_appending_product_is_bit_exact_as_the_operand_grows"],
    "B": ["test_appending_product_is_bit_exact_as_the_operand_grows"],
    "C": ["test_appending_product_is_bit_exact_as_the_operand_grows"],
    "K": ["test_table_selection_gives_the_argmax_id_in_four_flights_and_exact_bytes"],
    "input": ["test_share_and_reveal"],
    **{name: ["test_secure_logits_match_float64_reference_through_prefill_and_decode"] for name in ("a.src", "b.src")},
    "pi.src": ["test_secure_logits_match_float64_reference_through_prefill_and_decode"],
}


def all_mutations() -> list[tuple[str, str]]:
    """Every (stream, mutation) pair that applies."""
    pairs = [(name, kind) for name in CALL_STREAMS + ("U",) for kind in MUTATIONS]
    pairs += [("pi", "zero"), ("pi", "reuse"), ("input", "zero"), ("input", "narrow")]
    pairs += [(name, kind) for name in FOLDED_STREAMS for kind in MUTATIONS]
    pairs += [("pi.src", "zero"), ("pi.src", "reuse")]
    return pairs


def _stream(domain: bytes) -> str | None:
    """The stream name of a Prg domain: "{index}/{name}", "reused/{name}", "weight/{w}" (U), "input"."""
    label = domain.decode("utf-8", "replace")
    if label == "input":
        return "input"
    scope, _, name = label.partition("/")
    if scope == "weight":
        return "U"
    if scope.isdigit() or scope == "reused":
        return name
    return None


@contextmanager
def mutated(name: str, kind: str):
    """Within the block, stream `name` is broken by `kind` for every Prg holder."""
    if (name, kind) not in all_mutations():
        raise ValueError(f"no mutation {kind!r} for stream {name!r}")
    original_init, original_int64, original_perm = Prg.__init__, Prg.int64, Prg.segment_permutation

    def init(self, seed, domain):
        original_init(self, seed, domain)
        if kind == "reuse" and _stream(self.domain) == name:
            original_init(self, seed, "weight/reused" if name == "U" else f"reused/{name}")

    def int64(self, shape):
        t = original_int64(self, shape)
        if _stream(self.domain) != name:
            return t
        return torch.zeros_like(t) if kind == "zero" else (t & 0xFFFFFFFF if kind == "narrow" else t)

    def segment_permutation(self, lengths):
        if kind == "zero" and _stream(self.domain) == name:
            return np.arange(int(np.sum(np.asarray(lengths, dtype=np.int64))), dtype=np.int64)
        return original_perm(self, lengths)

    Prg.__init__, Prg.int64, Prg.segment_permutation = init, int64, segment_permutation
    try:
        yield
    finally:
        Prg.__init__, Prg.int64, Prg.segment_permutation = original_init, original_int64, original_perm


def _correctness_functions(name: str):
    from tests import test_protocols, test_secure_decoder, test_selection

    functions = []
    for test in CORRECTNESS[name]:
        modules = (test_protocols, test_selection, test_secure_decoder)
        fn = next(getattr(m, test) for m in modules if hasattr(m, test))
        if test == "test_trunc_is_exact_to_one_unit_and_never_fails":
            from protocols.context import Role

            functions.append((test, lambda fn=fn: (fn(16, Role.USER), fn(16, Role.OWNER))))
        elif test == "test_appending_product_is_bit_exact_as_the_operand_grows":
            functions.append((test, lambda fn=fn: (fn(True, "helper"), fn(False, "helper"))))
        else:
            params = inspect.signature(fn).parameters
            kwargs = {}
            if "seeds" in params:  # the conftest fixture of the same name
                kwargs["seeds"] = SEEDS
            if "provider" in params:  # the mutations break the helper's streams
                kwargs["provider"] = "helper"
            functions.append((test, lambda fn=fn, kwargs=kwargs: fn(**kwargs)))
    return functions


def check(name: str, kind: str) -> str:
    """Run the correctness tests and the catching view test under the mutation; returns the view test
    that found the leak. Raises AssertionError if correctness broke or no leak was found."""
    from tests import test_views
    from tests.view_recording import LeakFound

    with mutated(name, kind):
        for test, fn in _correctness_functions(name):
            try:
                fn()
            except AssertionError as exc:
                raise AssertionError(f"{name}/{kind}: correctness test {test} failed: {exc}") from exc
        catcher = CATCHERS.get((name, kind))
        if catcher is None:
            raise AssertionError(f"{name}/{kind}: no view test is named to catch it")
        try:
            getattr(test_views, catcher)()
        except LeakFound:
            return catcher
    raise AssertionError(f"{name}/{kind}: {catcher} found no leak")


def main() -> int:
    missed = 0
    for name, kind in all_mutations():
        start = time.perf_counter()
        if (name, kind) in UNCAUGHT:
            print(f"{name:>6} {kind:<7} not caught (allowed): {UNCAUGHT[(name, kind)]}")
            continue
        try:
            caught = check(name, kind)
            print(f"{name:>6} {kind:<7} caught by {caught} ({time.perf_counter() - start:.1f} s)")
        except AssertionError as exc:
            missed += 1
            print(f"{name:>6} {kind:<7} MISSED: {str(exc).splitlines()[0]}")
    print(f"{len(all_mutations()) - missed - len(UNCAUGHT)} caught, {len(UNCAUGHT)} allowed, {missed} missed")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
