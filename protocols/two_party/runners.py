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
        """A growing operand's calls through session_products when every call's A has heads x B_new rows
        (the model's attention); any other shapes as per-call cross terms (`_call_products`)."""
        heads = a_parts[0].shape[1] // max(1, b_parts[0].shape[1])
        if all(a.shape[1] == heads * b.shape[1] for a, b in zip(a_parts, b_parts)):
            return he_runs.product_correlations(self._he, transpose, a_parts, b_parts)
        return self._call_products(transpose, a_parts, b_parts)

    def _call_products(self, transpose: bool, a_parts, b_parts):
        """C_t = A_t op(B[:L_t]) per call and group from two linear correlations each, all in one run:
        A_u op(B_o) (the owner's op(B_o) as the weight) and (A_o op(B_u))^T = op(B_u)^T A_o^T (the owner's
        A_o^T as the weight); C_o = A_o op(B_o) + R1 + R2^T, C_u = A_u op(B_u) + (X1 - R1) + (X2 - R2)^T."""
        owner = self._he.ctx.is_owner
        b_full = torch.cat(b_parts, dim=1)
        requests, locals_ = [], []
        rows = 0
        for a, b in zip(a_parts, b_parts):
            rows += b.shape[1]
            op_b = b_full[:, :rows].transpose(-1, -2) if transpose else b_full[:, :rows]
            locals_.append(a @ op_b)
            for g in range(a.shape[0]):
                mx, k = a.shape[1], a.shape[2]
                out = op_b.shape[2]
                if owner:
                    requests.append(he_runs.LinearRequest(mx, k, out, w=op_b[g].contiguous()))
                    requests.append(he_runs.LinearRequest(out, k, mx, w=a[g].transpose(0, 1).contiguous()))
                else:
                    requests.append(he_runs.LinearRequest(mx, k, out, v=a[g].contiguous()))
                    requests.append(he_runs.LinearRequest(out, k, mx, v=op_b[g].transpose(0, 1).contiguous()))
        shares = iter(he_runs.linear_correlations(self._he, requests))
        out = []
        for local in locals_:
            groups = [next(shares) + next(shares).transpose(0, 1) for _ in range(local.shape[0])]
            out.append(local + torch.stack(groups))
        return out
