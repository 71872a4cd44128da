"""Correlated randomness: what the offline helper deals and how each party consumes it.

Every protocol call takes the next `CallMaterial` from its party's provider, naming its kind and a
key (the shapes it needs). Both parties and the helper count calls the same way, so call i of the
owner, of the user and of the helper's dry run are the same protocol step. Material comes in two
forms:
  * seeded: drawn from a 128-bit seed the party shares with the helper, stream `"{index}/{name}"`.
    Nothing is sent for it.
  * dealt: tensors that mix both parties' randomness (e.g. v·U for the owner), sent by the helper
    before the online phase and queued here.

`MaterialSource` is the provider interface. `QueuedMaterial` serves material the helper dealt
ahead of time; a helper-free provider (correlations made with homomorphic encryption) implements the
same `next()`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from permllm.errors import MaterialExhausted, MaterialMismatch, ProtocolError
from permllm.prg import Prg, PrgKey


@dataclass
class MaterialRecord:
    """What one party receives for one protocol call: kind, key and the dealt tensors."""

    index: int
    kind: str
    key: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _seeded_draw(key: PrgKey, index: int, name: str, shape) -> torch.Tensor:
    """The uniform ring tensor `name` of call `index` from a party's seed (its `PrgKey`, set up once per
    party and session): the party and the helper draw it alike."""
    return Prg(key, f"{index}/{name}").int64(tuple(shape))


def _seeded_permutation(key: PrgKey, index: int, name: str, lengths) -> np.ndarray:
    """The segment permutation `name` of call `index` from a party's seed (see Prg.segment_permutation)."""
    return Prg(key, f"{index}/{name}").segment_permutation(list(lengths))


def _key_of(seed: bytes | PrgKey) -> PrgKey:
    return seed if isinstance(seed, PrgKey) else PrgKey(seed)


class CallMaterial:
    """One party's material for one call: seeded draws plus the dealt tensors.

    seed: the party's seed, or its `PrgKey` (a queue passes one key to all its calls)."""

    def __init__(self, seed: bytes | PrgKey, record: MaterialRecord, kept: dict | None = None):
        self.index = record.index
        self.kind, self.key = record.kind, record.key
        self._seed = _key_of(seed)
        self._record = record
        self._kept = {} if kept is None else kept

    def keep(self, name: str, tensor: torch.Tensor) -> None:
        """Keep a tensor this party computed ahead from this call's material (never sent)."""
        self._kept[name] = tensor

    def local(self, name: str) -> torch.Tensor | None:
        """A tensor kept with `keep` (by this party, ahead of the call), or None."""
        return self._kept.get(name)

    def draw(self, name: str, shape) -> torch.Tensor:
        """Uniform ring tensor from the stream this party shares with the helper."""
        return _seeded_draw(self._seed, self.index, name, shape)

    def permutation(self, name: str, lengths) -> np.ndarray:
        """Row-and-entry permutation over segments of the given lengths (see Prg.segment_permutation)."""
        return _seeded_permutation(self._seed, self.index, name, lengths)

    def part(self, name: str, shape) -> torch.Tensor:
        """This party's half of a shared correlation: the dealt tensor if the helper sent one for
        this party, otherwise the seeded draw (the helper deals one half and seeds the other)."""
        if name in self._record.tensors:
            return self.dealt(name, shape)
        return self.draw(name, shape)

    def peek(self, name: str) -> torch.Tensor | None:
        """The tensor the helper dealt under `name` for this call, or None; for work ahead of the
        online phase (`protocols.linear.user_term_inputs`), which reads it without using it."""
        return self._record.tensors.get(name)

    def dealt(self, name: str, shape=None) -> torch.Tensor:
        """A tensor the helper dealt for this call; checks its shape."""
        try:
            t = self._record.tensors[name]
        except KeyError:
            raise MaterialMismatch(
                f"call {self.index} ({self._record.kind}) has no dealt tensor {name!r}; "
                f"it has {sorted(self._record.tensors)}"
            ) from None
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise MaterialMismatch(
                f"call {self.index} ({self._record.kind}): dealt {name!r} has shape {tuple(t.shape)}, "
                f"expected {tuple(shape)}"
            )
        return t


class MaterialSource(Protocol):
    """Provider interface: the material for the next protocol call of this party."""

    def next(self, kind: str, key: str) -> CallMaterial: ...


class QueuedMaterial:
    """Material dealt ahead of time, consumed strictly in call order.

    seed: the 128-bit seed this party shares with the helper.
    records: the dealt records, in call order (more can be appended with `extend`).
    max_records: most records this queue ever accepts (the session's bound on protocol calls;
        None = no bound); `extend` past it raises ProtocolError and keeps none of the extra records.
    """

    def __init__(self, seed: bytes, records=(), *, max_records: int | None = None):
        self._seed = _key_of(seed)
        self._queue: deque[MaterialRecord] = deque()
        self._kept: dict[int, dict] = {}
        self.calls_taken = 0
        self.max_records = max_records
        self._accepted = 0
        self.extend(records)

    def extend(self, records) -> None:
        records = list(records)
        if self.max_records is not None and self._accepted + len(records) > self.max_records:
            raise ProtocolError(
                f"the helper dealt more than the {self.max_records} material records this session allows"
            )
        self._queue.extend(records)
        self._accepted += len(records)

    @property
    def remaining(self) -> int:
        return len(self._queue)

    def pending(self):
        """The queued calls' material, in call order, without taking them: a party computes what
        depends on its material only (`CallMaterial.keep`) before the online phase."""
        for record in list(self._queue):
            yield CallMaterial(self._seed, record, self._kept.setdefault(record.index, {}))

    def next(self, kind: str, key: str) -> CallMaterial:
        if not self._queue:
            raise MaterialExhausted(
                f"offline material is used up after {self.calls_taken} protocol calls (next: {kind} {key}); "
                "the session was prepared for a shorter prompt or fewer tokens"
            )
        record = self._queue.popleft()
        if record.kind != kind or record.key != key:
            raise MaterialMismatch(
                f"protocol call {record.index} asked for {kind} [{key}] but the helper dealt "
                f"{record.kind} [{record.key}]"
            )
        self.calls_taken += 1
        return CallMaterial(self._seed, record, self._kept.pop(record.index, None))


class DealerCall:
    """The helper's side of one call: the same seeded streams as the parties, plus dealing."""

    def __init__(
        self,
        index: int,
        owner_seed: bytes | PrgKey,
        user_seed: bytes | PrgKey,
        owner: MaterialRecord,
        user: MaterialRecord,
    ):
        self.index = index
        self._owner_seed = _key_of(owner_seed)
        self._user_seed = _key_of(user_seed)
        self._owner = owner
        self._user = user

    def owner_draw(self, name: str, shape) -> torch.Tensor:
        return _seeded_draw(self._owner_seed, self.index, name, shape)

    def user_draw(self, name: str, shape) -> torch.Tensor:
        return _seeded_draw(self._user_seed, self.index, name, shape)

    def owner_permutation(self, name: str, lengths) -> np.ndarray:
        return _seeded_permutation(self._owner_seed, self.index, name, lengths)

    def to_owner(self, name: str, tensor: torch.Tensor) -> None:
        self._owner.tensors[name] = tensor.contiguous()

    def to_user(self, name: str, tensor: torch.Tensor) -> None:
        self._user.tensors[name] = tensor.contiguous()


class Dealer:
    """Deals material for a sequence of calls.

    Records accumulate per party until taken, or, with a sink, are handed to
    sink(owner_record, user_record) as soon as the next call starts (and on `flush`), so the helper
    can stream material out while it deals."""

    def __init__(self, owner_seed: bytes, user_seed: bytes, sink=None):
        self.owner_seed = owner_seed
        self.user_seed = user_seed
        self._owner_key, self._user_key = PrgKey(owner_seed), PrgKey(user_seed)
        self.calls = 0
        self.owner_records: list[MaterialRecord] = []
        self.user_records: list[MaterialRecord] = []
        self._sink = sink

    def flush(self) -> None:
        """Hand every finished record to the sink (no-op without one)."""
        if self._sink is None:
            return
        for owner, user in zip(self.owner_records, self.user_records):
            self._sink(owner, user)
        self.owner_records, self.user_records = [], []

    def call(self, kind: str, key: str) -> DealerCall:
        self.flush()
        index = self.calls
        self.calls += 1
        owner = MaterialRecord(index, kind, key)
        user = MaterialRecord(index, kind, key)
        self.owner_records.append(owner)
        self.user_records.append(user)
        return DealerCall(index, self._owner_key, self._user_key, owner, user)

    def take_records(self) -> tuple[list[MaterialRecord], list[MaterialRecord]]:
        """The records dealt so far for (owner, user); the dealer forgets them."""
        owner, user = self.owner_records, self.user_records
        self.owner_records, self.user_records = [], []
        return owner, user
