"""Oblivious-transfer runners of the helper-free two-party mode: both roles call each function.

Every runner takes an `OtSession` (one party's OT state: its `PartyContext`, lazily set-up base OTs
per direction, a batch counter) and that party's own inputs (None for what the role lacks).

Directions: the extension's *chooser* is the owner (direction 0) or the user (direction 1). The base
OTs of a direction run the first time it is used (the extension's sender sends the base request,
7 + 128 x 384 bytes; the chooser's base reply, 7 + 384 bytes, travels with its first matrix U).
Batch numbers are 2 x counter + direction, so every IKNP stream and every hash tweak is fresh.

Messages and flights (m OTs in a batch; each message is raw bytes under its tag)::

    random_ots:        [sender -> chooser base request], chooser -> sender U (128 ceil(m / 8) bytes)
                       one flight (two the first time in a direction): random OTs need no reply
    table_correlations: random_ots with the user as chooser, m = steps x ceil(log2 vocab); no more
    permutation_correlations: [user -> owner base request], owner -> user query(s), user -> owner
                       reply(s) (permllm.ot_shuffle), chunks pipelined: two flights (three the first time)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from permllm.errors import ConfigError
from permllm.ot import (
    BASE_OTS,
    ELEMENT_BYTES,
    MAX_OTS,
    BaseReceiver,
    BaseSender,
    ExtensionChooser,
    ExtensionSender,
    matrix_bytes,
    tccr,
)
from permllm.ot_shuffle import ShuffleClient, ShuffleServer, query_bytes, reply_bytes
from permllm.prg import Prg
from protocols.context import Role

__all__ = ["CHUNK_BYTES", "OtSession", "permutation_correlations", "random_ots", "table_correlations"]

CHUNK_BYTES = 64 << 20
"""Largest query + reply of one permutation chunk (bytes)."""

_REQUEST_BYTES = 7 + BASE_OTS * ELEMENT_BYTES
_REPLY_BYTES = 7 + ELEMENT_BYTES


class OtSession:
    """One party's OT state for a session: base OTs set up lazily, once per direction (owner as the
    extension's chooser, and user as the chooser), batch counters so every IKNP batch/tweak is fresh.

    seed: this party's private 16-byte seed (permllm.prg); every stream is derived from it by label.
    """

    def __init__(self, ctx, seed: bytes) -> None:
        if not isinstance(seed, bytes) or len(seed) != 16:
            raise ConfigError("an OtSession seed is 16 bytes")
        self.ctx = ctx
        self.role = Role(ctx.role)
        self._seed = seed
        self._ext: dict[int, ExtensionChooser | ExtensionSender] = {}
        self._counter = [0, 0]
        self._shuffle: ShuffleClient | ShuffleServer | None = None

    def _direction(self, chooser) -> int:
        return 0 if Role(chooser) is Role.OWNER else 1

    def next_batch(self, direction: int) -> int:
        batch = 2 * self._counter[direction] + direction
        self._counter[direction] += 1
        return batch

    def extension(self, direction: int, *, with_reply: list | None = None):
        """This party's extension object of `direction`, running the base OTs the first time.
        The chooser's base reply is appended to `with_reply` (sent before its first U)."""
        if direction in self._ext:
            return self._ext[direction]
        chooser = (Role.OWNER, Role.USER)[direction]
        ch, tag = self.ctx.channel, f"ot.base.{direction}"
        prg = Prg(self._seed, f"two_party/ot/base/{direction}")
        if self.role is chooser:
            request = ch.recv_bytes(tag + ".req", max_len=_REQUEST_BYTES)
            reply, keys0, keys1 = BaseSender(prg).reply(request)
            self._ext[direction] = ExtensionChooser(keys0, keys1)
            ch.send(tag + ".rep", reply)
        else:
            receiver = BaseReceiver(prg)
            ch.send(tag + ".req", receiver.request())
            reply = ch.recv_bytes(tag + ".rep", max_len=_REPLY_BYTES)
            self._ext[direction] = ExtensionSender(receiver.choices, receiver.keys(reply))
        return self._ext[direction]


def _random_rows(session: OtSession, chooser, choices, count: int):
    """m random OTs of 16-byte pads: chooser (m, 16) uint8; sender (pad0, pad1) (m, 16) each."""
    count = int(count)
    if not 0 <= count <= MAX_OTS:
        raise ConfigError(f"{count} random OTs in one batch, at most {MAX_OTS}")
    direction = session._direction(chooser)
    ext = session.extension(direction)
    batch = session.next_batch(direction)
    tag = f"ot.u.{batch}"
    if session.role is Role(chooser):
        choices = np.asarray(choices, dtype=np.uint8).reshape(-1)
        if choices.shape[0] != count or (choices > 1).any():
            raise ConfigError(f"the chooser passes {count} choice bits of 0/1")
        matrix, t = ext.extend(choices, batch)
        session.ctx.channel.send(tag, matrix)
        return tccr(t, 1, batch, 0)
    if choices is not None:
        raise ConfigError("the sender of random OTs passes no choices")
    matrix = session.ctx.channel.recv_bytes(tag, max_len=matrix_bytes(count))
    q = ext.extend(matrix, count, batch)
    return tccr(q, 1, batch, 0), tccr(q ^ ext.secret, 1, batch, 0)


def _words(pads: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pads[:, :8]).view("<i8").reshape(-1).astype(np.int64))


def random_ots(session: OtSession, chooser: Role, choices: np.ndarray | None, count: int):
    """count random OTs with ring-word pads. chooser passes choices (uint8 0/1, length count).
    Returns on the sender's side (k0, k1), on the chooser's side k_choice: torch.int64 tensors
    (count,), k0 / k1 uniform in Z_2^64 (the first 8 bytes of H(row) of the IKNP rows).
    Flights: chooser -> sender U, one flight (plus sender -> chooser base request the first time)."""
    out = _random_rows(session, chooser, choices, count)
    if isinstance(out, tuple):
        return _words(out[0]), _words(out[1])
    return _words(out)


def _bits(vocab: int) -> int:
    return max(1, math.ceil(math.log2(vocab)))


def _prf(key: bytes, index: np.ndarray, position: int) -> np.ndarray:
    """F(key, i) = first 8 bytes of AES_key(i || position), uint64, for every i in `index`."""
    blocks = np.empty((index.shape[0], 2), dtype="<u8")
    blocks[:, 0], blocks[:, 1] = index, position
    aes = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    out = np.frombuffer(aes.update(blocks.tobytes()), dtype="<u8").reshape(-1, 2)
    return out[:, 0].astype(np.uint64)


def table_correlations(session: OtSession, vocab: int, jstars: list[int] | None, steps: int):
    """Per step, owner K (vocab,) int64 uniform-looking; user K[j*] for its own j* (jstars, one per step).

    b = ceil(log2 vocab) random OTs per step, user as chooser, choices = the bits of j*;
    K[i] = sum_b F(k_{b, bit_b(i)}, i) mod 2^64, F = AES keyed by the 16-byte pad on (i, b), so each
    K[i], i != j*, holds a term under a key the user lacks, at an input of its own.
    Returns owner: list of K tensors; user: list of (1,) int64 tensors. One flight (owner <- user
    base request and owner -> user base reply the first time user-chooser OTs run)."""
    vocab, steps = int(vocab), int(steps)
    if vocab < 2 or steps < 0:
        raise ConfigError(f"table correlations for vocab {vocab} x {steps} steps")
    b = _bits(vocab)
    if session.role is Role.USER:
        if jstars is None or len(jstars) != steps or not all(0 <= int(j) < vocab for j in jstars):
            raise ConfigError(f"the user passes {steps} indices j* below {vocab}")
        js = np.array([int(j) for j in jstars], dtype=np.int64)
        choices = ((js[:, None] >> np.arange(b)) & 1).astype(np.uint8).reshape(-1)
        pads = _random_rows(session, Role.USER, choices, steps * b).reshape(steps, b, 16)
        out = []
        for s, j in enumerate(js):
            total = np.zeros(1, dtype=np.uint64)
            for k in range(b):
                total += _prf(pads[s, k].tobytes(), np.array([j], dtype=np.uint64), k)
            out.append(torch.from_numpy(total.view(np.int64)))
        return out
    if jstars is not None:
        raise ConfigError("the owner passes no indices j*")
    pad0, pad1 = _random_rows(session, Role.USER, None, steps * b)
    pad0, pad1 = pad0.reshape(steps, b, 16), pad1.reshape(steps, b, 16)
    index = np.arange(vocab, dtype=np.uint64)
    groups = [(index[((index >> np.uint64(k)) & np.uint64(1)) == v], v) for k in range(b) for v in (0, 1)]
    out = []
    for s in range(steps):
        table = np.zeros(vocab, dtype=np.uint64)
        for g, (idx, v) in enumerate(groups):
            k = g // 2
            table[idx.astype(np.int64)] += _prf((pad1 if v else pad0)[s, k].tobytes(), idx, k)
        out.append(torch.from_numpy(table.view(np.int64)))
    return out


def _chunks(shapes) -> list[list[int]]:
    """Indices of the shapes grouped so each chunk's query + reply stays under CHUNK_BYTES."""
    chunks, current = [], []
    for i, shape in enumerate(shapes):
        trial = [shapes[j] for j in current] + [shape]
        if current and (query_bytes(trial) + reply_bytes(trial) > CHUNK_BYTES or len(trial) > 4096):
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    return chunks


def permutation_correlations(session: OtSession, perms, inputs, shapes):
    """shapes: list of (n_i, c_i), known to both. Owner passes perms (gather: pi(t) = t[pi]), user
    inputs a_i (n_i, c_i) int64. Returns owner: list of b_i uniform; user: list of pi_i(a_i) - b_i.

    permllm.ot_shuffle with the session's owner-chooser base OTs; chunks of at most CHUNK_BYTES
    pipelined: owner -> user all queries, user -> owner all replies (two flights)."""
    shapes = [(int(n), int(c)) for n, c in shapes]
    ch, owner = session.ctx.channel, session.role is Role.OWNER
    if owner and (perms is None or len(perms) != len(shapes)):
        raise ConfigError(f"the owner passes {len(shapes)} permutations")
    if not owner and (inputs is None or [tuple(a.shape) for a in inputs] != shapes):
        raise ConfigError(f"the user passes inputs of shapes {shapes}")
    ext = session.extension(0)
    if session._shuffle is None:
        seed = Prg(session._seed, "two_party/ot/shuffle").bytes(16)
        session._shuffle = ShuffleServer(seed=seed) if owner else ShuffleClient(seed=seed)
        session._shuffle._ext = ext
    shuffle, chunks = session._shuffle, _chunks(shapes)
    batches = [session.next_batch(0) for _ in chunks]
    results: list = [None] * len(shapes)
    if owner:
        for chunk, batch in zip(chunks, batches):
            shuffle._batch = batch
            head, matrix = shuffle.query([perms[i] for i in chunk], [shapes[i][1] for i in chunk])
            ch.send(f"ot.sq.{batch}", head)
            ch.send(f"ot.su.{batch}", matrix)
        for chunk, batch in zip(chunks, batches):
            part = [shapes[i] for i in chunk]
            reply = [ch.recv_bytes(f"ot.sr{k}.{batch}", max_len=reply_bytes(part)) for k in range(3)]
            for i, b in zip(chunk, shuffle.finish(reply)):
                results[i] = b
        return results
    for chunk, batch in zip(chunks, batches):
        part = [shapes[i] for i in chunk]
        query = [ch.recv_bytes(f"ot.sq.{batch}", max_len=query_bytes(part)), None]
        query[1] = ch.recv_bytes(f"ot.su.{batch}", max_len=query_bytes(part))
        shuffle._batch = batch
        reply, shares = shuffle.answer(query, [inputs[i] for i in chunk])
        for k, part_bytes in enumerate(reply):
            ch.send(f"ot.sr{k}.{batch}", part_bytes)
        for i, share in zip(chunk, shares):
            results[i] = share
    return results
