"""Each party's whole view of a protocol run, as tests/view_attacks.py attacks it.

A party's view of protocol call i (a `CallView`) holds, as `words`:
  own:in0, own:in1, own:out   its input and output shares
  draw:NAME                   what it drew from the seed it shares with the helper
  dealt:NAME                  what the helper dealt it
  recv:TAG                    every ring tensor it received from the other party
  and what it derives from them the way the protocol does: dU = d @ U (linear, owner), c and
  c = c_F + x_S + 2^62 and c_high = floor(c / 2^k) - 2^(62-k) (truncation, the party without the
  mask r), E_X and E_Y (appending product),
  scatter_e = pi^-1(e) (permuted evaluation, owner).
`perms` holds its permutations, `known` what it may learn in the clear (the user's permuted
plaintext z = pi(x), and z.src = pi'(source) where a folded norm reveals its source row too). A reply
read late (`receive_later`, the folded final norm) is recorded in the call that scheduled it.
Weights are static pseudo-calls of kind "weight" (tests/test_views.py).
`ViewRecorder` fills the views by patching (with pytest's monkeypatch) the material, the receive path
and, through `wrap`, the protocol functions; `derive` adds the derived words; `secrets_of` gives what
a party must not learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from permllm.kernels import gather_rows, scatter_rows
from permllm.ring import logical_rshift, top_bit


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
        take, draw, permutation, dealt, receive, receive_later = (
            PartyContext.take,
            CallMaterial.draw,
            CallMaterial.permutation,
            CallMaterial.dealt,
            PartyContext.receive,
            PartyContext.receive_later,
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
            if hasattr(mat, "view"):  # not a draw made ahead of the online phase (precompute_user_terms)
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

        def rec_receive_later(ctx, tag, shape, then):
            view = recorder.current[ctx.role.value]  # the call that reads it late (permuted_reveal_later)

            def recorded_then(t):
                view.words[f"recv:{tag}"] = t
                then(t)

            receive_later(ctx, tag, shape, recorded_then)

        monkeypatch.setattr(PartyContext, "take", rec_take)
        monkeypatch.setattr(PartyContext, "receive_later", rec_receive_later)
        monkeypatch.setattr(CallMaterial, "draw", rec_draw)
        monkeypatch.setattr(CallMaterial, "permutation", rec_permutation)
        monkeypatch.setattr(CallMaterial, "dealt", rec_dealt)
        monkeypatch.setattr(PartyContext, "receive", rec_receive)

    def wrap(self, fn):
        """fn(ctx, ...) recording its Shared inputs, its output share, token ids and weight name."""
        from permllm.sharing import Shared
        from protocols.beaver import GrowingOperand
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
                if isinstance(a, GrowingOperand):
                    view.info["transpose"] = a.transpose
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
    masks: the owner's weight masks U by name; None in the two-party mode, which has none."""
    for role, calls in views.items():
        for view in calls.values():
            w = view.words
            if view.kind.startswith("linear:") and role == "owner":
                d = _first(w, "recv:lin.")
                if d is not None and masks is not None:
                    w["dU"] = d @ masks[view.kind[len("linear:") :]]
            elif view.kind == "trunc" and "draw:r" not in w:  # the holder F derives nothing beyond z_F
                k = view.info["bits0"] - view.info["out_bits"]
                c = w["own:in0"] + w["recv:trunc"] + (1 << 62)
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
                else:  # pi(x) = w + c1, and for a folded norm also pi'(source) = w' + c1.src (by shape)
                    for suffix in ("", ".src"):
                        c1 = w.get(f"dealt:c1{suffix}")
                        if c1 is not None:
                            perm = _first_shaped(w, "recv:", ".perm", c1.shape)
                            view.known[f"z{suffix}"] = perm + c1


def _first(words, prefix: str, suffix: str = ""):
    found = [t for name, t in words.items() if name.startswith(prefix) and name.endswith(suffix)]
    return found[0] if found else None


def _first_shaped(words, prefix: str, suffix: str, shape):
    found = [t for n, t in words.items() if n.startswith(prefix) and n.endswith(suffix) and t.shape == shape]
    return found[0]


def secrets_of(views, party: str, masks) -> dict[int, dict[str, torch.Tensor]]:
    """The other party's secrets per call index, as `party` must not learn them: the plaintext inputs
    and output of each call, for the owner also x_u @ U (linear), one-hot(t) and U[t] (embedding),
    z = pi(x) and Y = pi(y) (permuted evaluation: the user's plaintext), and for the user A @ op(B)
    (appending product: the product of the whole Beaver masks, whose rows over a session span B's row
    space, and with it the cache Y = E_Y + B), and for the holder F of a truncation (the party that drew
    r) the wrap bit e = 1 - c_63 of c = x + 2^62 + r, which only the other party may learn."""
    owner, user = views["owner"], views["user"]
    out: dict[int, dict[str, torch.Tensor]] = {}
    beaver_b: dict[str, torch.Tensor] = {}  # per growing operand: the whole mask B so far
    for index, o in sorted(owner.items()):
        u = user[index]
        s: dict[str, torch.Tensor] = {}
        for name in ("in0", "in1", "out"):
            if f"own:{name}" in o.words and f"own:{name}" in u.words:
                s[name] = o.words[f"own:{name}"] + u.words[f"own:{name}"]
        mine = o if party == "owner" else u
        if o.kind == "trunc" and "draw:r" in mine.words and "in0" in s:
            s["e"] = 1 - top_bit(s["in0"] + (1 << 62) + mine.words["draw:r"])
        if o.kind.startswith("product:") and "draw:A" in o.words:
            b_new = o.words["draw:B"] + u.words["draw:B"]
            b = beaver_b[o.kind] = b_new if o.kind not in beaver_b else torch.cat([beaver_b[o.kind], b_new], dim=1)
            if party == "user" and "transpose" in u.info:
                a = o.words["draw:A"] + u.words["draw:A"]
                s["A@op(B)"] = a @ (b.transpose(-1, -2) if u.info["transpose"] else b)
        if party == "owner":
            if masks is not None and o.kind.startswith("linear:") and "own:in0" in u.words:
                s["x_u@U"] = u.words["own:in0"] @ masks[o.kind[len("linear:") :]]
            if "tokens" in u.info:
                ids = torch.as_tensor(u.info["tokens"])
                vocab = _first(o.words, "recv:lin.").shape[-1]  # the owner's masked one-hot: (count, vocab)
                s["onehot"] = torch.nn.functional.one_hot(ids, vocab).to(torch.int64)
                if masks is not None:
                    s["U[t]"] = masks[o.kind[len("linear:") :]][ids]
            if "pi" in o.perms and "in0" in s:
                pi = torch.from_numpy(o.perms["pi"])
                n = pi.numel()
                s["z"] = gather_rows(s["in0"].reshape(n, -1).contiguous(), pi)
                if "out" in s:
                    s["Y"] = gather_rows(s["out"].reshape(n, -1).contiguous(), pi)
            if "pi.src" in o.perms and "in1" in s:  # a folded norm's source row (permuted_apply_scaled)
                pi = torch.from_numpy(o.perms["pi.src"])
                s["z.src"] = gather_rows(s["in1"].reshape(pi.numel(), -1).contiguous(), pi)
        out[index] = s
    return out
