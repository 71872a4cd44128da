"""Permutation correlations from oblivious transfer: an oblivious switching network (no helper party).

Same contract as permllm.bfv_correlations' PermutationClient / PermutationServer::

    in:  user a (n, c) int64;  owner pi (a permutation of range(n), gather: pi(t) = t[pi])
    out: owner b (n, c) uniform;  user pi(a) - b   (mod 2^64)

for any permutation (segment permutations included), several of them (pi and pi^-1 of a step, every
permutation of a layer) in one batch. Mohassel and Sadeghian's oblivious switching network (2013) on
the Waksman-style network of permllm.switching, with one OT per switch (permllm.ot, IKNP over AES):

- every wire w has a user mask r_w and an owner value z_w with z_w + r_w = the value on w; on the
  input wires r = a and z = 0 (a itself is the mask: nothing is sent for the inputs);
- a switch with inputs (w0, w1), outputs (o0, o1) and the owner's bit e is one OT with choice e; the
  user holds both pads (p0, p1), each 2 x c ring elements, the owner p_e. The user sets
  r_o0 = r_w0 - p0[0], r_o1 = r_w1 - p0[1], so m0 = (r_w0 - r_o0, r_w1 - r_o1) is p0 itself, and
  sends y = m1 - p1 with m1 = (r_w1 - r_o0, r_w0 - r_o1). The owner takes m_e (p0, or y + p1) and
  sets z_o0 = z_{w_e} + m_e[0], z_o1 = z_{w_{1-e}} + m_e[1];
- at the outputs the owner holds b = z_out = pi(a) - r_out and the user r_out = pi(a) - b.

What each side sees: the user only U of the extension (pseudo-random without the owner's base keys),
so nothing of pi; the owner its pads and y, each y masked by the pad it does not hold (p1 when e = 0;
p0 inside m1 when e = 1), so nothing of a, and b is uniform.

Messages and flights (S(n) switches, m = sum of S(n_i) over the batch)::

    once:  user -> owner base request (7 + 128 x 384 bytes); owner -> user base reply (7 + 384 bytes),
           which travels with the first query
    batch: owner -> user query [header (13 + 8 k bytes), U (128 ceil(m / 8) bytes)]
           user -> owner reply [header (13 bytes), y (sum 16 c_i S(n_i) bytes)]

one round trip per batch. Every size is checked against the shapes before anything is decoded.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from permllm.errors import ConfigError, ProtocolError
from permllm.ot import MAX_OTS, BaseReceiver, BaseSender, ExtensionChooser, ExtensionSender, matrix_bytes, tccr
from permllm.prg import Prg, fresh_seed
from permllm.switching import MAX_SIZE, chooser_pass, network, route, sender_pass, switch_count

__all__ = ["MAX_CHANNELS", "MAX_PERMUTATIONS", "ShuffleClient", "ShuffleServer", "query_bytes", "reply_bytes"]

MAX_PERMUTATIONS = 4096
"""Most permutations in one batch."""

MAX_CHANNELS = 4096
"""Most channels c of one permutation's input."""

MAX_PENDING = 64
_HEAD = struct.Struct("<4sBII")  # magic, version, batch, count; a query then has count x (n, c) uint32
_VERSION = 1


def query_bytes(shapes) -> int:
    """Bytes of a query for permutations of these (n, c)."""
    return _HEAD.size + 8 * len(shapes) + matrix_bytes(sum(switch_count(n) for n, _ in shapes))


def reply_bytes(shapes) -> int:
    """Bytes of a reply for permutations of these (n, c)."""
    return _HEAD.size + sum(16 * c * switch_count(n) for n, c in shapes)


def _check_shapes(shapes) -> None:
    if not 1 <= len(shapes) <= MAX_PERMUTATIONS:
        raise ConfigError(f"a batch holds 1 to {MAX_PERMUTATIONS} permutations, got {len(shapes)}")
    for n, c in shapes:
        if not (1 <= n <= MAX_SIZE and 1 <= c <= MAX_CHANNELS):
            raise ConfigError(f"a permutation of {n} rows x {c} channels is outside 1..{MAX_SIZE} x 1..{MAX_CHANNELS}")
    if sum(switch_count(n) for n, _ in shapes) > MAX_OTS:
        raise ConfigError(f"the batch needs more than {MAX_OTS} switches")


def _head(msg, magic: bytes, what: str) -> tuple[int, int, bytes]:
    """(batch, count, rest of the header) of a two-part message."""
    if not isinstance(msg, (list, tuple)) or len(msg) != 2:
        raise ProtocolError(f"{what} must be a list of two byte strings")
    if not all(isinstance(p, (bytes, bytearray, memoryview)) for p in msg):
        raise ProtocolError(f"{what} must be a list of two byte strings")
    head = bytes(msg[0])
    if len(head) < _HEAD.size:
        raise ProtocolError(f"{what} header has {len(head)} bytes, shorter than {_HEAD.size}")
    tag, version, batch, count = _HEAD.unpack(head[: _HEAD.size])
    if tag != magic or version != _VERSION:
        raise ProtocolError(f"{what} header has magic {tag!r} version {version}, expected {magic!r} v{_VERSION}")
    return batch, count, head[_HEAD.size :]


def _pads(rows: np.ndarray, c: int, batch: int, block: int) -> np.ndarray:
    """(S, 2, c) uint64 ring pads from OT rows (S, 16)."""
    return tccr(rows, c, batch, block).view("<u8").reshape(rows.shape[0], 2, c).astype(np.uint64, copy=False)


class ShuffleClient:
    """User side: answers the owner's queries with its inputs a, reads pi(a) - b."""

    def __init__(self, *, seed: bytes | None = None) -> None:
        self._base = BaseReceiver(Prg(fresh_seed() if seed is None else seed, "ot_shuffle/user/base"))
        self._ext: ExtensionSender | None = None
        self._batch = 0

    def base_request(self) -> bytes:
        """user -> owner, once per session: the base OT request."""
        return self._base.request()

    def base_accept(self, reply) -> None:
        """The owner's base reply (it travels with the owner's first query)."""
        self._ext = ExtensionSender(self._base.choices, self._base.keys(reply))

    def answer(self, query, inputs) -> tuple[list[bytes], list[torch.Tensor]]:
        """(reply, shares): for the k inputs a_i (n_i, c_i) of the query's k permutations, the reply
        for the owner and the user's shares pi_i(a_i) - b_i (torch.int64)."""
        if self._ext is None:
            raise ConfigError("base_accept must run before the first answer")
        inputs = [_check_input(a, i) for i, a in enumerate(inputs)]
        shapes = [tuple(a.shape) for a in inputs]
        _check_shapes(shapes)
        batch, count, rest = _head(query, b"PLSQ", "shuffle query")
        if batch != self._batch:
            raise ProtocolError(f"shuffle query is for batch {batch}, expected {self._batch}")
        if count != len(shapes) or len(rest) != 8 * count:
            raise ProtocolError(f"shuffle query carries {count} permutations, the user has {len(shapes)} inputs")
        theirs = [tuple(v) for v in np.frombuffer(rest, dtype="<u4").reshape(count, 2).tolist()]
        if theirs != shapes:
            raise ProtocolError(f"shuffle query shapes {theirs} differ from the inputs {shapes}")
        m = sum(switch_count(n) for n, _ in shapes)
        rows = self._ext.extend(query[1], m, batch)
        messages, shares, first, block = [], [], 0, 0
        for a in inputs:
            c, net = a.shape[1], network(a.shape[0])
            mine = rows[first : first + net.switches]
            pad0, pad1 = self._pad_pair(mine, c, batch, block)
            values = np.ascontiguousarray(a.numpy()).view(np.uint64)
            out, y = sender_pass(net.in0, net.in1, net.out0, net.out1, net.outputs, values, net.wires, pad0, pad1)
            messages.append(y.tobytes())
            shares.append(torch.from_numpy(out.view(np.int64)))
            first, block = first + net.switches, block + net.switches * c
        self._batch += 1
        return [_HEAD.pack(b"PLSR", _VERSION, batch, len(inputs)), b"".join(messages)], shares

    def _pad_pair(self, rows: np.ndarray, c: int, batch: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Both pads of each switch's OT: p0 from q_l, p1 from q_l ^ s."""
        return _pads(rows, c, batch, block), _pads(rows ^ self._ext.secret, c, batch, block)


def _check_input(a, i: int) -> torch.Tensor:
    if not isinstance(a, torch.Tensor) or a.dtype != torch.int64 or a.dim() != 2:
        raise ConfigError(f"input {i} must be a 2-D torch.int64 tensor")
    return a.contiguous()


class ShuffleServer:
    """Owner side: queries with its permutations, gets the uniform b of each from the user's reply."""

    def __init__(self, *, seed: bytes | None = None) -> None:
        self._base = BaseSender(Prg(fresh_seed() if seed is None else seed, "ot_shuffle/owner/base"))
        self._ext: ExtensionChooser | None = None
        self._batch = 0
        self._pending: dict[int, list] = {}

    def base_reply(self, request) -> bytes:
        """owner -> user, once per session: the reply to the user's base request."""
        reply, keys0, keys1 = self._base.reply(request)
        self._ext = ExtensionChooser(keys0, keys1)
        return reply

    def query(self, perms, channels) -> list[bytes]:
        """owner -> user: the query for permutations ``perms`` of inputs with ``channels`` columns each."""
        if self._ext is None:
            raise ConfigError("base_reply must run before the first query")
        perms = [np.asarray(p, dtype=np.int64).reshape(-1) for p in perms]
        channels = [int(c) for c in channels]
        if len(channels) != len(perms):
            raise ConfigError(f"{len(perms)} permutations but {len(channels)} channel counts")
        shapes = [(p.shape[0], c) for p, c in zip(perms, channels)]
        _check_shapes(shapes)
        if len(self._pending) >= MAX_PENDING:
            raise ConfigError(f"{MAX_PENDING} queries are waiting for replies")
        nets = [network(n) for n, _ in shapes]
        bits = [route(net, p) for net, p in zip(nets, perms)]
        batch = self._batch
        matrix, rows = self._ext.extend(np.concatenate(bits), batch)
        pads, first, block = [], 0, 0
        for net, (_, c) in zip(nets, shapes):
            pads.append(_pads(rows[first : first + net.switches], c, batch, block))
            first, block = first + net.switches, block + net.switches * c
        self._pending[batch] = [shapes, nets, bits, pads]
        self._batch += 1
        head = _HEAD.pack(b"PLSQ", _VERSION, batch, len(shapes)) + np.array(shapes, dtype="<u4").tobytes()
        return [head, matrix]

    def finish(self, reply) -> list[torch.Tensor]:
        """The owner's b_i (n_i, c_i) torch.int64, uniform, for the query the reply answers."""
        batch, count, rest = _head(reply, b"PLSR", "shuffle reply")
        if batch not in self._pending or rest:
            raise ProtocolError(f"shuffle reply for batch {batch}, which no query is waiting for")
        shapes, nets, bits, pads = self._pending[batch]
        expected = reply_bytes(shapes) - _HEAD.size
        if count != len(shapes) or len(reply[1]) != expected:
            raise ProtocolError(f"shuffle reply has {count} parts of {len(reply[1])} bytes, expected {expected}")
        del self._pending[batch]
        y_all = np.frombuffer(bytes(reply[1]), dtype="<u8").astype(np.uint64, copy=False)
        out, first = [], 0
        for (n, c), net, e, pad in zip(shapes, nets, bits, pads):
            y = y_all[first : first + 2 * c * net.switches].reshape(net.switches, 2, c)
            z = chooser_pass(net.in0, net.in1, net.out0, net.out1, net.outputs, n, net.wires, e, pad, y)
            out.append(torch.from_numpy(z.view(np.int64)))
            first += 2 * c * net.switches
        return out
