"""Permutation correlations from oblivious transfer: an oblivious switching network (no helper party).

Same contract as permllm.bfv_correlations' PermutationClient / PermutationServer::

    in:  user a (n, c) int64;  owner pi (a permutation of range(n), gather: pi(t) = t[pi])
    out: owner b (n, c) uniform;  user pi(a) - b   (mod 2^64)

for any permutation (segment permutations included), several of them (pi and pi^-1 of a step, every
permutation of a layer) in one batch. Mohassel and Sadeghian's oblivious switching network (2013) on
the Waksman-style network of permllm.switching, with one OT per switch (permllm.ot, IKNP over AES):

- every wire w has a user mask r_w and an owner value z_w with z_w + r_w = the value v_w on w; on the
  input wires the user draws r = rho uniform and sends z = a - rho;
- a switch with inputs (w0, w1), outputs (o0, o1) and the owner's bit e computes
  v_o0 = v_w0 + e D, v_o1 = v_w1 - e D with D = v_w1 - v_w0 = (z_w1 - z_w0) + delta,
  delta = r_w1 - r_w0: one OT with choice e for the product e delta. The user holds both pads
  (p0, p1) of c ring elements, the owner p_e; the user sends y = delta + p0 - p1, so the owner's
  X_e = p0 (e = 0) or y + p1 (e = 1) is e delta + p0. The owner adds x = e (z_w1 - z_w0) + X_e to
  z_w0 and subtracts it from z_w1; the user sets r_o0 = r_w0 - p0, r_o1 = r_w1 + p0;
- at the outputs the owner holds b = z_out = pi(a) - r_out and the user r_out = pi(a) - b.

What each side sees: the user only U of the extension (pseudo-random without the owner's base keys),
so nothing of pi; the owner a - rho (uniform), its pads and y, each y masked by the pad it does not
hold (p1 when e = 0, p0 when e = 1), so nothing of a. Every switch is a bijection of its two owner
values plus a pad, so b is uniform because a - rho is (a switch alone keeps the sum of its two
values: without the masked input, b would sum to zero).

Messages and flights (S(n) switches, m = sum of S(n_i) over the batch)::

    once:  user -> owner base request (7 + 128 x 384 bytes); owner -> user base reply (7 + 384 bytes),
           which travels with the first query
    batch: owner -> user query [header (13 + 8 k bytes), U (128 ceil(m / 8) bytes)]
           user -> owner reply [header (13 bytes), a - rho (sum 8 c_i n_i bytes), y (sum 8 c_i S(n_i))]

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
    return _HEAD.size + sum(8 * c * (n + switch_count(n)) for n, c in shapes)


def _check_shapes(shapes) -> None:
    if not 1 <= len(shapes) <= MAX_PERMUTATIONS:
        raise ConfigError(f"a batch holds 1 to {MAX_PERMUTATIONS} permutations, got {len(shapes)}")
    for n, c in shapes:
        if not (1 <= n <= MAX_SIZE and 1 <= c <= MAX_CHANNELS):
            raise ConfigError(f"a permutation of {n} rows x {c} channels is outside 1..{MAX_SIZE} x 1..{MAX_CHANNELS}")
    if sum(switch_count(n) for n, _ in shapes) > MAX_OTS:
        raise ConfigError(f"the batch needs more than {MAX_OTS} switches")


def _head(msg, magic: bytes, what: str, parts: int = 2) -> tuple[int, int, bytes]:
    """(batch, count, rest of the header) of a message of ``parts`` byte strings."""
    if not isinstance(msg, (list, tuple)) or len(msg) != parts:
        raise ProtocolError(f"{what} must be a list of {parts} byte strings")
    if not all(isinstance(p, (bytes, bytearray, memoryview)) for p in msg):
        raise ProtocolError(f"{what} must be a list of {parts} byte strings")
    head = bytes(msg[0])
    if len(head) < _HEAD.size:
        raise ProtocolError(f"{what} header has {len(head)} bytes, shorter than {_HEAD.size}")
    tag, version, batch, count = _HEAD.unpack(head[: _HEAD.size])
    if tag != magic or version != _VERSION:
        raise ProtocolError(f"{what} header has magic {tag!r} version {version}, expected {magic!r} v{_VERSION}")
    return batch, count, head[_HEAD.size :]


def _blocks(c: int) -> int:
    """Hash blocks of one pad of c ring elements."""
    return (c + 1) // 2


def _pads(rows: np.ndarray, c: int, batch: int, block: int) -> np.ndarray:
    """(S, c) uint64 ring pads from OT rows (S, 16)."""
    words = tccr(rows, _blocks(c), batch, block).view("<u8").reshape(rows.shape[0], 2 * _blocks(c))
    return np.ascontiguousarray(words[:, :c]).astype(np.uint64, copy=False)


class ShuffleClient:
    """User side: answers the owner's queries with its inputs a, reads pi(a) - b."""

    def __init__(self, *, seed: bytes | None = None) -> None:
        seed = fresh_seed() if seed is None else seed
        self._base = BaseReceiver(Prg(seed, "ot_shuffle/user/base"))
        self._masks = Prg(seed, "ot_shuffle/user/inputs")
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
        masked, messages, shares, first, block = [], [], [], 0, 0
        for a in inputs:
            (n, c), net = a.shape, network(a.shape[0])
            mine = rows[first : first + net.switches]
            pad0, pad1 = self._pad_pair(mine, c, batch, block)
            rho = self._input_mask(n, c)
            masked.append((a.numpy().view(np.uint64) - rho).tobytes())
            out, y = sender_pass(net.in0, net.in1, net.out0, net.out1, net.outputs, rho, net.wires, pad0, pad1)
            messages.append(y.tobytes())
            shares.append(torch.from_numpy(out.view(np.int64)))
            first, block = first + net.switches, block + net.switches * _blocks(c)
        self._batch += 1
        return [_HEAD.pack(b"PLSR", _VERSION, batch, len(inputs)), b"".join(masked), b"".join(messages)], shares

    def _input_mask(self, n: int, c: int) -> np.ndarray:
        """rho (n, c) uniform: the user's masks on the input wires."""
        return self._masks.uint64(n * c).reshape(n, c)

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
            first, block = first + net.switches, block + net.switches * _blocks(c)
        self._pending[batch] = [shapes, nets, bits, pads]
        self._batch += 1
        head = _HEAD.pack(b"PLSQ", _VERSION, batch, len(shapes)) + np.array(shapes, dtype="<u4").tobytes()
        return [head, matrix]

    def finish(self, reply) -> list[torch.Tensor]:
        """The owner's b_i (n_i, c_i) torch.int64, uniform, for the query the reply answers."""
        batch, count, rest = _head(reply, b"PLSR", "shuffle reply", parts=3)
        if rest:
            raise ProtocolError(f"shuffle reply header has {len(rest)} bytes after its {_HEAD.size}")
        if batch not in self._pending:
            raise ProtocolError(f"shuffle reply for batch {batch}, which no query is waiting for")
        shapes, nets, bits, pads = self._pending[batch]
        sizes = (8 * sum(n * c for n, c in shapes), 8 * sum(c * net.switches for (_, c), net in zip(shapes, nets)))
        if count != len(shapes) or (len(reply[1]), len(reply[2])) != sizes:
            got = (len(reply[1]), len(reply[2]))
            raise ProtocolError(f"shuffle reply has {count} permutations of {got} bytes, expected {sizes}")
        del self._pending[batch]
        z_all = np.frombuffer(bytes(reply[1]), dtype="<u8").astype(np.uint64, copy=False)
        y_all = np.frombuffer(bytes(reply[2]), dtype="<u8").astype(np.uint64, copy=False)
        out, first_z, first_y = [], 0, 0
        for (n, c), net, e, pad in zip(shapes, nets, bits, pads):
            z_in = z_all[first_z : first_z + n * c].reshape(n, c)
            y = y_all[first_y : first_y + c * net.switches].reshape(net.switches, c)
            z = chooser_pass(net.in0, net.in1, net.out0, net.out1, net.outputs, z_in, net.wires, e, pad, y)
            out.append(torch.from_numpy(z.view(np.int64)))
            first_z, first_y = first_z + n * c, first_y + c * net.switches
        return out
