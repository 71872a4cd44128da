"""The two-party runs the material provider uses, over the owner-user channel: oblivious transfer
(`ot_runs`: permutations, truncation OTs, token-choice tables) and BFV (`he_runs`: linear layers and
attention products). One object per party and session; the base OTs and the BFV keys are set up on
first use and kept for the session."""

from __future__ import annotations

import torch

from permllm.prg import Prg
from protocols.two_party import he_runs, ot_runs


class TwoPartyRunners:
    """ctx: this party's PartyContext; seed: its own session seed (the OT randomness is drawn from the
    stream "two-party/ot" of it, apart from the material's streams)."""

    def __init__(self, ctx, seed: bytes):
        self._ot = ot_runs.OtSession(ctx, Prg(seed, "two-party/ot").bytes(16))
        self._he = he_runs.HeSession(ctx)

    def permutations(self, perms, inputs, shapes):
        return ot_runs.permutation_correlations(self._ot, perms, inputs, shapes)

    def random_ots(self, chooser, choices, count: int):
        """In batches of at most ot_runs.MAX_OTS; the pads concatenated in order."""
        parts = []
        for first in range(0, count, ot_runs.MAX_OTS):
            n = min(ot_runs.MAX_OTS, count - first)
            parts.append(
                ot_runs.random_ots(self._ot, chooser, None if choices is None else choices[first : first + n], n)
            )
        if not parts:
            return ot_runs.random_ots(self._ot, chooser, choices, 0)
        if choices is None:
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return torch.cat(parts)

    def tables(self, vocab: int, jstars, steps: int):
        return ot_runs.table_correlations(self._ot, vocab, jstars, steps)

    def linear(self, jobs):
        requests = [he_runs.LinearRequest(j.rows, j.d_in, j.d_out, v=j.v, w=j.w) for j in jobs]
        return he_runs.linear_correlations(self._he, requests)

    def products(self, transpose: bool, a_parts, b_parts):
        return he_runs.product_correlations(self._he, transpose, a_parts, b_parts)
