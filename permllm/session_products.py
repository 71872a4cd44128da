"""A whole session's attention product correlations in one BFV pass (owner and user, no helper).

What protocols.beaver's appending product consumes, for one layer's scores Q K^T and weighted values
P V over a session whose KV cache grows by ``appends[t]`` rows at step t (the prefill appends the
prompt, each decode step one row), per group g of query heads sharing one KV head:

    step t: A_t (G, r_t, k_t) fresh, r_t = heads * appends[t]; L_t = appends[0] + ... + appends[t]
    scores: k_t = d,   C_t = A_t @ B[:L_t]^T   (B = the keys' mask, (G, L, d))
    values: k_t = L_t, C_t = A_t @ B'[:L_t]    (B' = the values' mask, (G, L, d))

Each party draws its own uniform shares (:func:`draw_masks`): A = A_o + A_u, B = B_o + B_u. Then
C_t = A_o,t op(B_o) + A_u,t op(B_u) (local) + A_u,t op(B_o) + A_o,t op(B_u) (cross terms). A session's
masks do not depend on the data, so all steps' cross terms are made at once, as four products per
group with the final masks (B[:L_t] is a prefix of B; the value rows of A_t are zero-padded to L)::

    T1 = [A_u,0; A_u,1; ...] (R x d)  @ B_o^T (d x L)      step t: T1[rows_t, :L_t]
    T2 = B_u (L x d)  @ [A_o,0; A_o,1; ...]^T (d x R)      step t: T2[:L_t, rows_t]^T
    T3 = [A'_u,t padded] (R x L)  @ B'_o (L x d)           step t: T3[rows_t, :]
    T4 = B'_u^T (d x L)  @ [A'_o,t padded]^T (L x R)       step t: T4[:, rows_t]^T

with R = sum_t r_t. The user's matrix is encrypted (permllm.bfv_linear: two limbs, 5 + 59 bits); the
owner's 64-bit matrix W enters as its four 16-bit limbs side by side, [W_0 | W_1 | W_2 | W_3]
(k x 4m), one bfv_linear product each, so the packing is chosen for 4m outputs and the user's R
limb rows (hundreds for a session, 3 for one decode step) fill the ciphertexts::

    user  (SessionProductClient)                       owner (SessionProductServer)
    query(masks_u)  ---- [header, 4G linear queries] -->  answer(query, masks_o)
    shares(reply)   <--- [header, 4G linear replies] ---    -> (reply, C_o per step)
      C_o,t + C_u,t == A_t op(B[:L_t])  (mod 2^64), for every step t and both products

The queries are seeded and the replies compact (bfv_linear: c1 and only the result coefficients
of c0). One round trip per layer and session (or per chunk of steps, ``SessionLayout.first``).
Security is bfv_linear's: the owner sees ciphertexts under the
user's key (RLWE); every reply is re-randomized, flooded and masked on all N coefficients, and the
owner's share of each output (the limb masks R'_j, C_o = local + sum_j 2^(16 j) R'_j) is fresh and
uniform, so the user's share of every step's C_t is uniform and independent of B_o, of A_o and of its
share at any other step, although B_o enters every step's product (tests/test_session_products.py
checks the share against an unmasked reply that would show B_o). B itself is opened once per row
online (E_Y = Y - B), as protocols.beaver requires.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from permllm.bfv_correlations import LIMB_BITS, LIMBS, _bundle, _unbundle
from permllm.bfv_linear import MAX_FEATURES, MAX_ROWS, LinearCorrelationClient, LinearCorrelationServer
from permllm.errors import ConfigError, ProtocolError
from permllm.prg import Prg, fresh_seed

__all__ = ["AttentionMasks", "PRODUCTS", "SessionLayout", "SessionProductClient", "SessionProductServer", "draw_masks"]

TERMS = 4
PRODUCTS = ("scores", "values")
_PRODUCT_TERMS = {"scores": (0, 1), "values": (2, 3)}
_LINEAR_QUERY = struct.Struct("<4sBII")  # bfv_linear's query header prefix: magic, version, T, n


@dataclass(frozen=True)
class SessionLayout:
    """groups (KV heads), heads per group, head_dim d, the rows each step appends to the cache, and
    ``first``: the material is made for steps first, first + 1, ... (0: the whole session in one pass;
    a session may also make it in chunks, e.g. one decode step at a time with first = steps - 1)."""

    groups: int
    heads: int
    head_dim: int
    appends: tuple[int, ...]
    first: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "appends", tuple(int(a) for a in self.appends))
        if min(self.groups, self.heads, self.head_dim) < 1 or not self.appends or min(self.appends) < 1:
            raise ConfigError(f"session layout needs positive sizes and appends, got {self}")
        if not 0 <= self.first < len(self.appends):
            raise ConfigError(f"first step {self.first} outside the {len(self.appends)} steps")
        if self.total_rows > MAX_ROWS or self.length > MAX_FEATURES or 4 * self.total_rows > MAX_FEATURES:
            raise ConfigError(f"session of {self.total_rows} query rows and {self.length} positions is too large")

    @property
    def steps(self) -> range:
        """The steps whose material is made."""
        return range(self.first, len(self.appends))

    @property
    def length(self) -> int:
        """L: cache rows after the last step."""
        return sum(self.appends)

    def rows(self, t: int) -> int:
        return self.heads * self.appends[t]

    def cache(self, t: int) -> int:
        """L_t: cache rows step t's product sees (its own appended rows included)."""
        return sum(self.appends[: t + 1])

    def row_slice(self, t: int) -> slice:
        """Step t's rows among the stacked rows of the steps made."""
        start = self.heads * sum(self.appends[self.first : t])
        return slice(start, start + self.rows(t))

    @property
    def total_rows(self) -> int:
        return self.heads * sum(self.appends[self.first :])


@dataclass
class AttentionMasks:
    """One party's shares of a layer's session masks: A per step for scores and values, B per product."""

    score_a: list[torch.Tensor]  # (G, r_t, d), one per step made
    value_a: list[torch.Tensor]  # (G, r_t, L_t)
    keys: torch.Tensor  # (G, L, d): the score product's B
    values: torch.Tensor  # (G, L, d): the value product's B (a product not made: [] and None)


def draw_masks(layout: SessionLayout, seed: bytes) -> AttentionMasks:
    """One party's uniform shares (int64 views of Z_2^64) of every mask of the session, from ``seed``."""
    prg = Prg(seed, "session_products/masks")
    g, d, length = layout.groups, layout.head_dim, layout.length

    def draw(*shape: int) -> torch.Tensor:
        return torch.from_numpy(prg.uint64(int(np.prod(shape))).view(np.int64).reshape(shape))

    score_a = [draw(g, layout.rows(t), d) for t in layout.steps]
    value_a = [draw(g, layout.rows(t), layout.cache(t)) for t in layout.steps]
    return AttentionMasks(score_a, value_a, draw(g, length, d), draw(g, length, d))


def _check_masks(layout: SessionLayout, masks: AttentionMasks, products: tuple[str, ...] = PRODUCTS) -> None:
    g, d, length = layout.groups, layout.head_dim, layout.length
    expected, got, whole = [], [], []
    if "scores" in products:
        expected += [(g, layout.rows(t), d) for t in layout.steps]
        got += list(masks.score_a)
        whole.append(masks.keys)
    if "values" in products:
        expected += [(g, layout.rows(t), layout.cache(t)) for t in layout.steps]
        got += list(masks.value_a)
        whole.append(masks.values)
    shapes_ok = len(got) == len(expected) and all(
        isinstance(x, torch.Tensor) and x.dtype == torch.int64 and tuple(x.shape) == s for x, s in zip(got, expected)
    )
    for b in whole:
        shapes_ok = shapes_ok and isinstance(b, torch.Tensor) and b.dtype == torch.int64
        shapes_ok = shapes_ok and tuple(b.shape) == (g, length, d)
    if not shapes_ok:
        raise ConfigError("masks do not fit the session layout (int64 tensors of the layout's shapes)")


def _terms(products) -> tuple[int, ...]:
    """The cross terms (indices into T1..T4) of the products made: scores T1, T2; values T3, T4."""
    products = tuple(products)
    if not products or any(p not in PRODUCTS for p in products) or len(set(products)) != len(products):
        raise ConfigError(f"products must be a non-empty selection of {PRODUCTS}, got {products}")
    return tuple(k for p in PRODUCTS if p in products for k in _PRODUCT_TERMS[p])


def _stack(layout: SessionLayout, per_step: list[torch.Tensor], width: int) -> torch.Tensor:
    """(G, R, width): every step's rows, zero-padded on the right to width columns."""
    out = torch.zeros((layout.groups, layout.total_rows, width), dtype=torch.int64)
    for t, a in zip(layout.steps, per_step):
        out[:, layout.row_slice(t), : a.shape[2]] = a
    return out


def _user_operands(layout: SessionLayout, m: AttentionMasks, terms=range(TERMS)) -> list[torch.Tensor | None]:
    """The user's encrypted matrices of T1..T4, each (G, rows, inner); None for a term not made."""
    make = [
        lambda: _stack(layout, m.score_a, layout.head_dim),
        lambda: m.keys,
        lambda: _stack(layout, m.value_a, layout.length),
        lambda: m.values.transpose(1, 2),
    ]
    return [make[k]() if k in terms else None for k in range(TERMS)]


def _owner_operands(layout: SessionLayout, m: AttentionMasks, terms=range(TERMS)) -> list[torch.Tensor | None]:
    """The owner's plaintext matrices of T1..T4, each (G, inner, out); None for a term not made."""
    make = [
        lambda: m.keys.transpose(1, 2),
        lambda: _stack(layout, m.score_a, layout.head_dim).transpose(1, 2),
        lambda: m.values,
        lambda: _stack(layout, m.value_a, layout.length).transpose(1, 2),
    ]
    return [make[k]() if k in terms else None for k in range(TERMS)]


def _out_features(layout: SessionLayout) -> list[int]:
    return [layout.length, layout.total_rows, layout.head_dim, layout.total_rows]


def _assemble(layout: SessionLayout, masks: AttentionMasks, cross: list[torch.Tensor | None]):
    """Per step (score C share, value C share) from the local product and the four cross-term shares
    (a product whose cross terms are None is not made: its list is empty)."""
    t1, t2, t3, t4 = cross
    scores, values = [], []
    for i, t in enumerate(layout.steps):
        rows, length = layout.row_slice(t), layout.cache(t)
        if t1 is not None:
            local = masks.score_a[i] @ masks.keys[:, :length].transpose(1, 2)
            scores.append(local + t1[:, rows, :length] + t2[:, :length, rows].transpose(1, 2))
        if t3 is not None:
            local = masks.value_a[i] @ masks.values[:, :length]
            values.append(local + t3[:, rows] + t4[:, :, rows].transpose(1, 2))
    return scores, values


def _limb_columns(w: torch.Tensor) -> torch.Tensor:
    """[W_0 | W_1 | W_2 | W_3] (k, 4m): W's 16-bit limbs side by side (signed 20-bit weights for bfv_linear)."""
    unsigned = w.contiguous().numpy().view(np.uint64)
    limbs = [(unsigned >> np.uint64(LIMB_BITS * j)) & np.uint64((1 << LIMB_BITS) - 1) for j in range(LIMBS)]
    return torch.from_numpy(np.concatenate(limbs, axis=1).astype(np.int64))


def _combine_limbs(values: torch.Tensor, m: int) -> torch.Tensor:
    """sum_j 2^(16 j) values[:, j m : (j + 1) m] (mod 2^64)."""
    total = torch.zeros((values.shape[0], m), dtype=torch.int64)
    for j in range(LIMBS):
        total += values[:, j * m : (j + 1) * m] * (1 << (LIMB_BITS * j))
    return total


class SessionProductClient:
    """User side: encrypts its session operands per group and reads its C shares of every step.

    products: which of the layer's two products to make, ("scores", "values") by default; with one
    of them only its two cross terms travel and the other's masks (AttentionMasks fields) are unused."""

    def __init__(self, linear: LinearCorrelationClient, layout: SessionLayout, *, products=PRODUCTS) -> None:
        self._linear = linear
        self.layout = layout
        self.products = tuple(products)
        self._terms = _terms(self.products)

    def query(self, masks: AttentionMasks) -> list[bytes]:
        """[header, 4G bfv_linear queries] for the user's shares (T1..T4 of group 0, then group 1, ...;
        2G, the selected product's two terms per group, when one product is made)."""
        _check_masks(self.layout, masks, self.products)
        operands, outs = _user_operands(self.layout, masks, self._terms), _out_features(self.layout)
        parts = []
        for g in range(self.layout.groups):
            for term in self._terms:
                x, m = operands[term][g].contiguous(), outs[term]
                parts.append(self._linear.encrypt_rows(x, out_features=LIMBS * m, compact_reply=True))
        return _bundle(b"PLSQ", parts)

    def shares(self, reply, masks: AttentionMasks) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The user's (score C shares, value C shares), one (G, r_t, L_t) and one (G, r_t, d) per step made
        (an empty list for a product not made)."""
        layout, terms = self.layout, self._terms
        _check_masks(layout, masks, self.products)
        parts = _unbundle(reply, b"PLSR", len(terms) * layout.groups, "session product reply")
        operands, outs = _user_operands(layout, masks, terms), _out_features(layout)
        cross = [
            None if x is None else torch.empty((layout.groups, x.shape[1], m), dtype=torch.int64)
            for x, m in zip(operands, outs)
        ]
        for k, part in enumerate(parts):
            g, term = divmod(k, len(terms))
            term = terms[term]
            rows, m = operands[term].shape[1], outs[term]
            cross[term][g] = _combine_limbs(self._linear.decrypt_shares(part, rows, LIMBS * m), m)
        return _assemble(layout, masks, cross)


class SessionProductServer:
    """Owner side: answers the session products per group with its masks' 16-bit limbs (``products``
    as for SessionProductClient)."""

    def __init__(self, linear: LinearCorrelationServer, layout: SessionLayout, *, products=PRODUCTS) -> None:
        self._linear = linear
        self.layout = layout
        self.products = tuple(products)
        self._terms = _terms(self.products)

    def answer(self, query, masks: AttentionMasks, *, seed: bytes | None = None):
        """(reply, (score C shares, value C shares)) of the owner; its output masks from ``seed`` or fresh."""
        layout, terms = self.layout, self._terms
        _check_masks(layout, masks, self.products)
        parts = _unbundle(query, b"PLSQ", len(terms) * layout.groups, "session product query")
        user_rows = [layout.total_rows, layout.length, layout.total_rows, layout.head_dim]
        operands, outs = _owner_operands(layout, masks, terms), _out_features(layout)
        prg = Prg(fresh_seed() if seed is None else seed, "session_products/output")
        cross = [
            torch.empty((layout.groups, r, m), dtype=torch.int64) if k in terms else None
            for k, (r, m) in enumerate(zip(user_rows, outs))
        ]
        replies = []
        for k, part in enumerate(parts):
            g, term = divmod(k, len(terms))
            term = terms[term]
            rows, m = user_rows[term], outs[term]
            head = bytes(part[0])[: _LINEAR_QUERY.size]
            if len(head) != _LINEAR_QUERY.size or _LINEAR_QUERY.unpack(head)[2] != rows:
                raise ProtocolError(f"session query part {k} does not have the {rows} rows of its product")
            mask = self._output_mask(prg, rows, LIMBS * m)
            reply, _ = self._linear.multiply(part, _limb_columns(operands[term][g]), mask=mask, compact=True)
            replies.append(reply)
            cross[term][g] = _combine_limbs(mask, m)
        return _bundle(b"PLSR", replies), _assemble(layout, masks, cross)

    def _output_mask(self, prg: Prg, rows: int, cols: int) -> torch.Tensor:
        """R' (rows, cols) uniform: the owner's share of one sub-product's limb outputs."""
        return torch.from_numpy(prg.uint64(rows * cols).view(np.int64).reshape(rows, cols))
