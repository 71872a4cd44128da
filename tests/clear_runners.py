"""A test double of the two-party runs: the same outputs, made by sending the secrets in the clear.

It checks the provider's bookkeeping (which tensor lands in which record) apart from the oblivious
transfer and BFV runs, which have their own tests. Never a production path: it shows each party the
other's secrets. Randomness from a seeded generator."""

from __future__ import annotations

import numpy as np
import torch

from permllm.kernels import gather_rows
from protocols.context import Role

_RING = np.iinfo(np.int64)


class ClearRunners:
    def __init__(self, ctx, seed: int = 0):
        self.ctx = ctx
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def _uniform(self, shape) -> torch.Tensor:
        return torch.from_numpy(
            self.rng.integers(_RING.min, _RING.max, size=tuple(shape), dtype=np.int64, endpoint=True)
        )

    def _send(self, values) -> None:
        self.calls += 1
        for k, v in enumerate(values):
            self.ctx.channel.send(f"clear.{self.calls}.{k}", torch.as_tensor(v).contiguous().numpy())

    def _recv(self, shapes, dtype=np.int64) -> list[torch.Tensor]:
        self.calls += 1
        return [
            torch.from_numpy(self.ctx.channel.recv(f"clear.{self.calls}.{k}", dtype=dtype, shape=tuple(s)).copy())
            for k, s in enumerate(shapes)
        ]

    def _owner_answers(self, owner_fn, user_values, query_shapes, answer_shapes):
        """The user sends its values; the owner computes (its outputs, the user's outputs) and sends the latter."""
        if self.ctx.is_owner:
            seen = self._recv(query_shapes)
            mine, theirs = owner_fn(seen)
            self._send(theirs)
            return mine
        self._send(user_values)
        return self._recv(answer_shapes)

    def permutations(self, perms, inputs, shapes):
        def owner(a):
            b = [self._uniform(s) for s in shapes]
            return b, [gather_rows(x, p) - bb for x, p, bb in zip(a, perms, b)]

        return self._owner_answers(owner, inputs, shapes, shapes)

    def linear(self, jobs):
        shapes = [(j.rows, j.d_in) for j in jobs]
        outs = [(j.rows, j.d_out) for j in jobs]

        def owner(vs):
            r = [self._uniform(s) for s in outs]
            return r, [v @ j.w.to(torch.int64) - rr for v, j, rr in zip(vs, jobs, r)]

        return self._owner_answers(owner, [j.v for j in jobs], shapes, outs)

    def products(self, transpose, a_parts, b_parts):
        shapes = [tuple(a.shape) for a in a_parts] + [tuple(b.shape) for b in b_parts]
        t = len(a_parts)
        b_rows = np.cumsum([b.shape[1] for b in b_parts])
        outs = []
        for a, rows in zip(a_parts, b_rows):
            outs.append((a.shape[0], a.shape[1], int(rows) if transpose else b_parts[0].shape[2]))

        def owner(theirs):
            a = [x + y for x, y in zip(a_parts, theirs[:t])]
            b = torch.cat([x + y for x, y in zip(b_parts, theirs[t:])], dim=1)
            mine, user = [], []
            for at, rows, shape in zip(a, b_rows, outs):
                bt = b[:, : int(rows)]
                c = at @ (bt.transpose(-1, -2) if transpose else bt)
                co = self._uniform(shape)
                mine.append(co)
                user.append(c - co)
            return mine, user

        return self._owner_answers(owner, list(a_parts) + list(b_parts), shapes, outs)

    def random_ots(self, chooser, choices, count):
        if self.ctx.role is chooser:
            self._send([torch.from_numpy(choices.astype(np.int64))])
            return self._recv([(count,)])[0]
        c = self._recv([(count,)])[0]
        k0, k1 = self._uniform((count,)), self._uniform((count,))
        self._send([torch.where(c == 1, k1, k0)])
        return k0, k1

    def tables(self, vocab, jstars, steps):
        def owner(seen):
            ks = [self._uniform((vocab,)) for _ in range(steps)]
            j = seen[0]
            return ks, [torch.stack([k[int(jj)] for k, jj in zip(ks, j)])]

        out = self._owner_answers(owner, [torch.tensor(jstars or [], dtype=torch.int64)], [(steps,)], [(steps,)])
        return out if self.ctx.is_owner else [x.reshape(1) for x in out[0]]


__all__ = ["ClearRunners", "Role"]
