"""Owner-user runs of the BFV correlations (permllm.bfv_linear, permllm.session_products), no helper.

Both roles call each function with their own arguments (None for what the role lacks) and their
`HeSession`; every run is one round trip, 2 flights: the user sends its encrypted queries (with the
public context on its first run), the owner answers with masked, flooded, compact replies. Each
message is one raw-bytes frame (protocols.two_party.he_wire), read with a size bound computed from
the public shapes before anything is decoded; ProtocolError on anything else.

linear_correlations, per request (V the user's T x n, W the owner's n x m)::

    owner: R (T, m) uniform          user: V @ W - R   (mod 2^64)

W enters bfv_linear as signed 20-bit limbs, W = sum_j 2^(20 j) W_j (mod 2^64), side by side as the
columns [W_0 | ... | W_{k-1}] of one product: k = 1 for a weight that fits 20 signed bits, up to 4
for any 64-bit weight; the owner picks k per weight and names it in its reply (what the user learns:
the bracket of W's bit range, which the public fixed-point format fixes anyway). The owner's share
is R = sum_j 2^(20 j) R'_j over fresh uniform limb masks R'_j (uniform because R'_0 is). T is cut into
chunks of bfv_linear.MAX_ROWS rows, n into chunks of MAX_FEATURES inputs (shares add up over them),
m into pieces of he_wire.COLUMNS_PER_PIECE columns (k m fits bfv_linear's output limit); one query
per row and input chunk serves all its column pieces. Exact but for bfv_linear's documented low-limb
wrap (an output share off by +-2^59 with probability at most 31 * 2^19 * n / 2^59 per limb product).

product_correlations: protocols.beaver's appending product over a whole session, one layer's scores
(transpose) or values, made through permllm.session_products with that product's two cross terms.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from permllm.bfv_correlations import LIMBS as PRODUCT_LIMBS
from permllm.bfv_linear import MAX_FEATURES, MAX_ROWS, WEIGHT_BITS, LinearCorrelationClient, LinearCorrelationServer
from permllm.errors import ConfigError, ProtocolError
from permllm.prg import Prg, fresh_seed
from permllm.session_products import AttentionMasks, SessionLayout, SessionProductClient, SessionProductServer
from protocols.two_party.he_wire import (
    COLUMNS_PER_PIECE,
    CONTEXT_MAX_BYTES,
    MAX_LIMBS,
    bundle_overhead,
    message_overhead,
    pack_message,
    query_bound,
    reply_bound,
    unpack_message,
)

__all__ = ["HeSession", "LinearRequest", "linear_correlations", "product_correlations", "weight_limbs"]

_LINEAR_QUERY = struct.Struct("<4sBII")  # bfv_linear's query header prefix: magic, version, T, n
_HALF = 1 << (WEIGHT_BITS - 1)


class HeSession:
    """One party's HE state for a session: the user makes the BFV keys (secret key stays with it) and
    sends the public context once (lazily, with its first query); the owner keeps the server."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self._client: LinearCorrelationClient | None = None
        self._server: LinearCorrelationServer | None = None
        self._context_sent = False

    @property
    def client(self) -> LinearCorrelationClient:
        """The user's BFV keys (made at first use)."""
        if self.ctx.is_owner:
            raise ConfigError("the owner holds no BFV secret key")
        if self._client is None:
            self._client = LinearCorrelationClient()
        return self._client

    def user_round(self, tag: str, magics: tuple[bytes, bytes], subs, reply_subs: int, max_parts: int, max_bytes: int):
        """Send the query sub-messages (the context first, once), then read the owner's reply's
        ``reply_subs`` sub-messages (at most max_parts parts, max_bytes bytes of parts)."""
        magic, reply_magic = magics
        flags = 0
        if not self._context_sent:
            subs, flags = [[self.client.public_context()]] + subs, 1
        self.ctx.channel.send(tag + ".q", pack_message(magic, subs, flags))
        self._context_sent = True
        bound = max_bytes + message_overhead([max_parts]) + 4 * reply_subs
        data = self.ctx.channel.recv_bytes(tag + ".r", max_len=bound)
        return unpack_message(data, reply_magic, reply_subs, max_parts, f"{tag} reply")[1]

    def owner_receive(self, tag: str, magic: bytes, subs: int, max_parts: int, max_bytes: int) -> list[list[bytes]]:
        """The user's query sub-messages (its context read, and the server made, on the first run)."""
        first = self._server is None
        bound = max_bytes + message_overhead([max_parts + first]) + 4 * subs + (CONTEXT_MAX_BYTES + 4 if first else 0)
        data = self.ctx.channel.recv_bytes(tag + ".q", max_len=bound)
        flags, got = unpack_message(data, magic, subs + first, max_parts + first, f"{tag} query")
        if flags != int(first):
            raise ProtocolError(f"{tag} query: context flag {flags}, expected {int(first)}")
        if first:
            if len(got[0]) != 1:
                raise ProtocolError(f"{tag} query: the public context must be one part")
            self._server = LinearCorrelationServer(got[0][0])
            got = got[1:]
        return got

    def owner_reply(self, tag: str, magic: bytes, subs: list[list[bytes]]) -> None:
        self.ctx.channel.send(tag + ".r", pack_message(magic, subs))

    @property
    def server(self) -> LinearCorrelationServer:
        assert self._server is not None
        return self._server


@dataclass(frozen=True)
class LinearRequest:
    """One weight's correlation: T rows, n = d_in, m = d_out; v the user's (T, n) int64 (None at the
    owner), w the owner's (n, m) int32/int64 (None at the user)."""

    rows: int
    d_in: int
    d_out: int
    v: torch.Tensor | None = None
    w: torch.Tensor | None = None


@dataclass(frozen=True)
class _Query:
    request: int
    rows: slice
    inputs: slice
    out_features: int
    columns: tuple[slice, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.stop - self.rows.start, self.inputs.stop - self.inputs.start


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, total)) for s in range(0, total, size)]


def _plan(requests) -> list[_Query]:
    out = []
    for i, r in enumerate(requests):
        columns = tuple(_chunks(r.d_out, COLUMNS_PER_PIECE))
        for rows in _chunks(r.rows, MAX_ROWS):
            for inputs in _chunks(r.d_in, MAX_FEATURES):
                out.append(_Query(i, rows, inputs, min(r.d_out, COLUMNS_PER_PIECE), columns))
    return out


def _check_requests(requests, owner: bool) -> list[LinearRequest]:
    requests = list(requests)
    if not requests or not all(isinstance(r, LinearRequest) for r in requests):
        raise ConfigError("requests must be a non-empty list of LinearRequest")
    for r in requests:
        if min(r.rows, r.d_in, r.d_out) < 1:
            raise ConfigError(f"request shapes must be positive, got {(r.rows, r.d_in, r.d_out)}")
        x, shape = (r.w, (r.d_in, r.d_out)) if owner else (r.v, (r.rows, r.d_in))
        dtypes = (torch.int32, torch.int64) if owner else (torch.int64,)
        if not isinstance(x, torch.Tensor) or x.dtype not in dtypes or tuple(x.shape) != shape:
            what = "w (int32 or int64)" if owner else "v (int64)"
            raise ConfigError(f"request {what} must be a tensor of shape {shape}")
    return requests


def weight_limbs(w: torch.Tensor) -> list[torch.Tensor]:
    """W's signed limbs W_j in [-2^19, 2^19), as few as reproduce W exactly (at most 4: mod 2^64)."""
    w = w.to(torch.int64)
    for k in range(1, MAX_LIMBS + 1):
        limbs, rest = [], w
        for _ in range(k):
            digit = ((rest + _HALF) & (2 * _HALF - 1)) - _HALF
            limbs.append(digit)
            rest = (rest - digit) >> WEIGHT_BITS
        if k == MAX_LIMBS or not bool(rest.any()):
            return limbs
    raise AssertionError("unreachable")


def _combine(values: torch.Tensor, width: int, limbs: int, bits: int = WEIGHT_BITS) -> torch.Tensor:
    """sum_j 2^(bits j) values[:, j width : (j + 1) width] (mod 2^64)."""
    total = values[:, :width].clone()
    for j in range(1, limbs):
        total += values[:, j * width : (j + 1) * width] * (1 << (bits * j))
    return total


def _linear_bounds(requests, queries: list[_Query]) -> tuple[int, int, int, int]:
    """(query parts, query bytes, reply parts, reply bytes) at most."""
    qp = qb = rp = rb = 0
    for q in queries:
        (rows, n), m = q.shape, q.out_features
        parts, size = query_bound(rows, n, m)
        qp, qb = qp + parts, qb + size
        for c in q.columns:
            parts, size = reply_bound(rows, n, m, MAX_LIMBS * (c.stop - c.start))
            rp, rb = rp + parts, rb + size
    return qp, qb, rp + 1, rb + len(requests)


def linear_correlations(session: HeSession, requests, *, seed: bytes | None = None, tag: str = "he.linear"):
    """Shares of V @ W for several weights in one round trip (2 flights). Returns a list, one per
    request: owner R (T, m) uniform (its limb masks from ``seed``, else fresh); user V @ W - R."""
    owner = session.ctx.is_owner
    requests = _check_requests(requests, owner)
    queries = _plan(requests)
    qp, qb, rp, rb = _linear_bounds(requests, queries)
    out = [torch.zeros((r.rows, r.d_out), dtype=torch.int64) for r in requests]
    if not owner:
        client = session.client
        subs = []
        for q in queries:
            v = requests[q.request].v[q.rows, q.inputs].contiguous()
            subs.append(client.encrypt_rows(v, out_features=q.out_features, compact_reply=True))
        got = session.user_round(tag, (b"PTLQ", b"PTLR"), subs, 1 + sum(len(q.columns) for q in queries), rp, rb)
        limbs = got[0][0] if len(got[0]) == 1 else b""
        if len(limbs) != len(requests) or not all(1 <= k <= MAX_LIMBS for k in limbs):
            raise ProtocolError(f"{tag} reply: limb counts {list(limbs)} for {len(requests)} weights")
        replies = iter(got[1:])
        for q in queries:
            k, rows = limbs[q.request], q.shape[0]
            for c in q.columns:
                width = c.stop - c.start
                share = client.decrypt_shares(next(replies), rows, k * width)
                out[q.request][q.rows, c] += _combine(share, width, k)
        return out
    got = session.owner_receive(tag, b"PTLQ", len(queries), qp, qb)
    limbs = [weight_limbs(r.w) for r in requests]
    prg = Prg(fresh_seed() if seed is None else seed, "two_party/linear")
    replies = []
    for q, part in zip(queries, got):
        rows = q.shape[0]
        head = part[0][: _LINEAR_QUERY.size]
        if len(head) != _LINEAR_QUERY.size or _LINEAR_QUERY.unpack(head)[2:] != q.shape:
            raise ProtocolError(f"{tag} query part does not have the shape {q.shape} of its request")
        k = len(limbs[q.request])
        for c in q.columns:
            width = c.stop - c.start
            weight = torch.cat([limb[q.inputs, c] for limb in limbs[q.request]], dim=1)
            mask = torch.from_numpy(prg.uint64(rows * k * width).view(np.int64).reshape(rows, k * width))
            reply, _ = session.server.multiply(part, weight, mask=mask, compact=True)
            replies.append(reply)
            out[q.request][q.rows, c] += _combine(mask, width, k)
    session.owner_reply(tag, b"PTLR", [[bytes(len(x) for x in limbs)]] + replies)
    return out


def _product_layout(transpose: bool, a_parts, b_parts) -> SessionLayout:
    if not a_parts or len(a_parts) != len(b_parts):
        raise ConfigError("a_parts and b_parts must be equally long, non-empty lists (one entry per call)")
    tensors = list(a_parts) + list(b_parts)
    if not all(isinstance(x, torch.Tensor) and x.dtype == torch.int64 and x.dim() == 3 for x in tensors):
        raise ConfigError("every A_t and B_new_t must be a 3-D torch.int64 tensor (G, rows, columns)")
    groups, d = b_parts[0].shape[0], b_parts[0].shape[2]
    appends = [b.shape[1] for b in b_parts]
    heads = a_parts[0].shape[1] // max(appends[0], 1)
    length = 0
    for t, (a, b) in enumerate(zip(a_parts, b_parts)):
        length += b.shape[1]
        # session_products' layout stacks heads * m_new_t query rows per step
        if a.shape[0] != groups or b.shape[0] != groups or b.shape[2] != d or a.shape[1] != heads * b.shape[1]:
            raise ConfigError(
                f"call {t}: A {tuple(a.shape)}, B_new {tuple(b.shape)} need A rows = {heads} x B_new rows"
            )
        if a.shape[2] != (d if transpose else length):
            raise ConfigError(f"call {t}: A has inner size {a.shape[2]}, expected {d if transpose else length}")
    return SessionLayout(groups, heads, d, tuple(appends))


def _product_bounds(layout: SessionLayout, transpose: bool) -> tuple[int, int, int, int]:
    R, L, d = layout.total_rows, layout.length, layout.head_dim
    terms = [(R, d, L), (L, d, R)] if transpose else [(R, L, d), (d, L, R)]  # user rows, inner, outputs
    qp = qb = rp = rb = 0
    for rows, inner, m in terms:
        parts, size = query_bound(rows, inner, PRODUCT_LIMBS * m)
        qp, qb = qp + parts, qb + size
        parts, size = reply_bound(rows, inner, PRODUCT_LIMBS * m, PRODUCT_LIMBS * m)
        rp, rb = rp + parts, rb + size
    g = layout.groups
    subs = len(terms) * g
    return 1 + g * qp, g * qb + bundle_overhead(subs), 1 + g * rp, g * rb + bundle_overhead(subs)


def product_correlations(
    session: HeSession, transpose: bool, a_parts, b_parts, *, seed: bytes | None = None, tag: str = "he.products"
) -> list[torch.Tensor]:
    """One layer's appending Beaver material for a whole session, one round trip (2 flights).

    Call t: this party's A_t (G, mx_t, k_t) and B_new_t (G, m_new_t, d); B = B_new_0 | B_new_1 | ...
    along rows; returns this party's C_t with C_o,t + C_u,t == A_t @ op(B[:L_t]) (mod 2^64), op the
    transpose (scores, k_t = d) or identity (values, k_t = L_t). session_products' layout needs
    mx_t = heads * m_new_t with one heads for all calls (ConfigError otherwise). The encoder's
    non-growing product is one call whose B_new is the whole operand. ``seed``: the owner's output
    masks (fresh when None)."""
    layout = _product_layout(transpose, list(a_parts), list(b_parts))
    whole = torch.cat(list(b_parts), dim=1)
    product = "scores" if transpose else "values"
    if transpose:
        masks = AttentionMasks(list(a_parts), [], whole, None)
    else:
        masks = AttentionMasks([], list(a_parts), None, whole)
    qp, qb, rp, rb = _product_bounds(layout, transpose)
    if session.ctx.is_owner:
        (query,) = session.owner_receive(tag, b"PTPQ", 1, qp, qb)
        server = SessionProductServer(session.server, layout, products=(product,))
        reply, (scores, values) = server.answer(query, masks, seed=seed)
        session.owner_reply(tag, b"PTPR", [reply])
    else:
        client = SessionProductClient(session.client, layout, products=(product,))
        (reply,) = session.user_round(tag, (b"PTPQ", b"PTPR"), [client.query(masks)], 1, rp, rb)
        scores, values = client.shares(reply, masks)
    return scores if transpose else values
