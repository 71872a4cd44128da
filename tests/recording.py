"""Test helpers that record what each party actually receives, and the statistics the transcript tests use.

`Transcript.wrap(channel)` returns a `RecordingChannel`: a Channel that delegates to the wrapped one
(like `netsim.NetSim`, through the `_send` / `_receive` hooks) and keeps a copy of every frame it
receives, with the receiving party, the sender, the tag, the dtype, the shape and the payload bytes.
It can be passed as `wrap_channel` to `parties.inprocess.run_pair` /
`parties.session.private_generate_inprocess`, or wrapped around the channels of the three roles of `parties.roles`.

`record_permutations` and `record_dealt` patch (with pytest's monkeypatch) the places where the
owner draws its permutations and where the in-process dealer hands out material, so tests can see
them without touching the code under test.

Statistics (all on int64 ring words, i.e. elements of Z_2^64):
  * `bit_balance_z(words)`: for each of the 64 bit positions, (ones - N/2) / (sqrt(N)/2), the
    standard score of the count of ones under the uniform hypothesis (Binomial(N, 1/2)).
  * `byte_chi_square(words)`: Pearson's chi-square statistic of the 256 byte-value counts of the
    little-endian words against the uniform distribution (255 degrees of freedom).
  * `pearson(a, b)`: the sample correlation of two equally long vectors.
  * `normal_two_sided_p(z)`, `chi_square_upper_bound(dof, p)`: the false-positive probability of a
    |z| bound, and the chi-square value exceeded with probability p (Wilson-Hilferty approximation:
    390.5 for 255 dof at p = 1e-7, against 390.2 exact; stdlib only).
  * `find_subsequences(words, needles)`: which needles occur contiguously in the words (one pass).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from permllm.transport.channel import Channel, Received
from permllm.transport.wrapper import WrappingChannel

_OTHER = {"owner": "user", "user": "owner"}


@dataclass(frozen=True)
class Message:
    """One frame as its receiver got it."""

    receiver: str
    sender: str
    tag: str
    dtype: np.dtype
    shape: tuple
    payload: bytes

    @property
    def is_ring(self) -> bool:
        """An int64 tensor (a ring payload or an int64 control value)."""
        return self.dtype == np.dtype("<i8")

    @property
    def is_bytes(self) -> bool:
        return self.dtype == np.dtype("u1")

    def array(self) -> np.ndarray:
        return np.frombuffer(self.payload, dtype=self.dtype).reshape(self.shape)

    def words(self) -> np.ndarray:
        """The payload as a flat int64 array (ring payloads only)."""
        assert self.is_ring, f"{self.tag} is {self.dtype}, not a ring payload"
        return np.frombuffer(self.payload, dtype=np.int64)


class Transcript:
    """Every frame every recorded party received, in arrival order (thread-safe)."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._lock = threading.Lock()

    def add(self, message: Message) -> None:
        with self._lock:
            self.messages.append(message)

    def wrap(self, channel: Channel, receiver: str | None = None) -> RecordingChannel:
        """Wrap one party's channel; receiver defaults to the other end of an owner/user pair."""
        return RecordingChannel(channel, self, receiver or _OTHER[channel.peer])

    def received_by(self, receiver: str, sender: str | None = None) -> list[Message]:
        return [m for m in self.messages if m.receiver == receiver and (sender is None or m.sender == sender)]

    def ring_words(self, messages) -> np.ndarray:
        """All int64 words of the given messages, concatenated."""
        chunks = [m.words() for m in messages]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


class RecordingChannel(WrappingChannel):
    """A Channel that passes everything to `inner` and records each received frame."""

    def __init__(self, inner: Channel, transcript: Transcript, receiver: str) -> None:
        super().__init__(inner)
        self._transcript = transcript
        self._receiver = receiver

    def _receive(self, tag: str, timeout: float | None) -> Received:
        message = self._inner._receive(tag, timeout)
        header = message.header
        self._transcript.add(
            Message(
                self._receiver,
                self.peer,
                header.tag,
                np.dtype(header.dtype),
                tuple(header.shape),
                bytes(message.payload),
            )
        )
        return message


@dataclass(frozen=True)
class PermutationDraw:
    """One permutation the owner drew from its material: call index, stream name, layout, value."""

    index: int
    name: str
    lengths: tuple
    perm: np.ndarray


def record_permutations(monkeypatch) -> list[PermutationDraw]:
    """Record every `CallMaterial.permutation` (the owner's online permutations) while patched."""
    from protocols.material import CallMaterial

    draws: list[PermutationDraw] = []
    lock = threading.Lock()
    original = CallMaterial.permutation

    def recording(self, name, lengths):
        perm = original(self, name, lengths)
        with lock:
            draws.append(PermutationDraw(self.index, name, tuple(int(v) for v in lengths), np.array(perm, copy=True)))
        return perm

    monkeypatch.setattr(CallMaterial, "permutation", recording)
    return draws


def record_dealt(monkeypatch) -> dict[str, list]:
    """Record the material records the in-process dealer hands each party ({'owner': [...], 'user': [...]})."""
    from protocols.material import Dealer

    dealt: dict[str, list] = {"owner": [], "user": []}
    original = Dealer.take_records

    def recording(self):
        owner, user = original(self)
        dealt["owner"].extend(owner)
        dealt["user"].extend(user)
        return owner, user

    monkeypatch.setattr(Dealer, "take_records", recording)
    return dealt


# ---------------------------------------------------------------------------------- statistics
def bit_balance_z(words: np.ndarray) -> np.ndarray:
    """Standard scores of the number of ones at each of the 64 bit positions (uniform: ~N(0, 1)).

    Counted from the byte-value histogram of each of the 8 byte positions (fast on millions of words)."""
    n = words.size
    columns = np.ascontiguousarray(words).view(np.uint8).reshape(n, 8)
    values = np.arange(256)
    ones = np.empty(64)
    for byte in range(8):  # little-endian: byte k holds bits 8k .. 8k+7
        hist = np.bincount(columns[:, byte], minlength=256)
        for bit in range(8):
            ones[8 * byte + bit] = hist[(values >> bit) & 1 == 1].sum()
    return (ones - n / 2) / (math.sqrt(n) / 2)


def byte_chi_square(words: np.ndarray) -> float:
    """Pearson chi-square of the byte-value histogram of the words against uniform (255 dof)."""
    counts = np.bincount(np.ascontiguousarray(words).view(np.uint8), minlength=256).astype(np.float64)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean()
    b = b - b.mean()
    return float((a @ b) / math.sqrt((a @ a) * (b @ b)))


def normal_two_sided_p(z: float) -> float:
    """P(|Z| > z) for a standard normal Z."""
    return 2 * (1 - NormalDist().cdf(z))


def chi_square_upper_bound(dof: int, p: float) -> float:
    """The value a chi-square variable with `dof` degrees of freedom exceeds with probability p."""
    z = NormalDist().inv_cdf(1 - p)
    h = 2 / (9 * dof)
    return dof * (1 - h + z * math.sqrt(h)) ** 3


def find_subsequences(haystack: np.ndarray, needles) -> list[int]:
    """Indices (into `needles`) of the needles that occur contiguously in `haystack`; one pass over it."""
    by_first: dict[int, list[int]] = {}
    needles = [np.asarray(n, dtype=np.int64).reshape(-1) for n in needles]
    for i, n in enumerate(needles):
        if n.size:
            by_first.setdefault(int(n[0]), []).append(i)
    found = set()
    if not by_first or haystack.size == 0:
        return []
    for start in np.flatnonzero(np.isin(haystack, np.fromiter(by_first, dtype=np.int64))):
        for i in by_first[int(haystack[start])]:
            n = needles[i]
            if i not in found and np.array_equal(haystack[start : start + n.size], n):
                found.add(i)
    return sorted(found)


def one_hot_rows(array: np.ndarray) -> np.ndarray:
    """Indices of the rows (last axis) of an int64 array that are one-hot vectors."""
    rows = array.reshape(-1, array.shape[-1])
    binary = ((rows == 0) | (rows == 1)).all(axis=1)
    return np.flatnonzero(binary & (rows.sum(axis=1) == 1))
