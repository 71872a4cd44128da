"""What a protocol function runs against: one party's online context, or the helper's dry run.

Every protocol in this package is one function that the owner and the user both call with their own
`PartyContext` and their own share. The few places where the roles differ go through the messaging
helpers here (`user_sends`, `owner_sends`, `exchange`) and `owner_term`, which keeps a public term
on the owner's share only. The offline helper calls the same functions with a `DealerContext`:
instead of computing on shares it deals the material each call will take.

A protocol names each correlation it needs as a request object (`linear.LinearMask`,
`permute.PermutationMask`, `beaver.ProductMask`, `selection.TableMask`, `trunc.TruncationMask`) and
hands it to `ctx.deal(call, request)`: the helper's `DealerContext` deals it from both seeds
(`request.deal`), the two-party planner (`protocols.two_party.plan`) records it, and the owner and user
then make it together (`protocols.two_party.provider`).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import numpy as np
import torch

from permllm.errors import ConfigError
from protocols.material import CallMaterial, Dealer, DealerCall, MaterialSource


class Role(str, Enum):
    OWNER = "owner"
    USER = "user"


class PartyContext:
    """One online party: its role, the channel to the other party and its material provider.

    channel: a `permllm.transport` Channel to the other online party.
    material: a `MaterialSource` (correlated randomness from the helper or a helper-free provider).
    """

    dealing = False

    def __init__(self, role: Role, channel, material: MaterialSource):
        self.role = Role(role)
        self.channel = channel
        self.material = material
        self._later: list[tuple[str, tuple, Callable[[torch.Tensor], None]]] = []

    @property
    def is_owner(self) -> bool:
        return self.role is Role.OWNER

    def take(self, kind: str, key: str) -> CallMaterial:
        return self.material.next(kind, key)

    def user_sends(self, tag: str, make: Callable[[], torch.Tensor], shape) -> torch.Tensor:
        """The user computes and sends a ring tensor to the owner; both get it back (one flight)."""
        if self.is_owner:
            return self.receive(tag, shape)
        value = make()
        self.send(tag, value)
        return value

    def owner_sends(self, tag: str, make: Callable[[], torch.Tensor], shape) -> torch.Tensor:
        """The owner computes and sends a ring tensor to the user; both get it back (one flight)."""
        if not self.is_owner:
            return self.receive(tag, shape)
        value = make()
        self.send(tag, value)
        return value

    def send(self, tag: str, value: torch.Tensor) -> None:
        """Send a ring tensor to the other party."""
        self.channel.send(tag, value)

    def receive(self, tag: str, shape) -> torch.Tensor:
        """Receive a ring tensor of the given shape from the other party (after any `receive_later`)."""
        while self._later:
            later_tag, later_shape, then = self._later.pop(0)
            then(_ring(self.channel.recv(later_tag, dtype=np.int64, shape=later_shape)))
        return _ring(self.channel.recv(tag, dtype=np.int64, shape=tuple(shape)))

    def receive_later(self, tag: str, shape, then: Callable[[torch.Tensor], None]) -> None:
        """Read a ring tensor at the next `receive`, in order, and hand it to `then`: the party can go
        on sending in the same hop before it waits for this reply."""
        self._later.append((tag, tuple(shape), then))

    def exchange(self, tag: str, mine: torch.Tensor) -> torch.Tensor:
        """Both parties send at once and receive the other's tensor of the same shape (one flight)."""
        self.send(tag, mine)
        return self.receive(tag, mine.shape)

    def owner_term(self, term: Callable[[], torch.Tensor]) -> torch.Tensor | int:
        """A public (or owner-only) term that belongs on exactly one share: the owner's.
        Takes a callable so the user does not compute what it would throw away."""
        return term() if self.is_owner else 0


class DealerContext:
    """The offline helper's dry run: protocols deal material instead of computing.

    weight_mask(name) returns the mask U of a linear weight (the helper regenerates it from the seed
    the owner gave it; it never sees W). mask_product(name, v), when given, returns v @ U without the
    whole U (`decoder_weights.mask_product` draws it by row blocks); otherwise it is
    ring_matmul(v, weight_mask(name)). Both give the same ring tensor.
    """

    dealing = True

    def __init__(
        self,
        dealer: Dealer,
        weight_mask: Callable[[str], torch.Tensor] | None = None,
        mask_product: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ):
        self.dealer = dealer
        self.weight_mask = weight_mask
        self._mask_product = mask_product

    def mask_product(self, name: str, v: torch.Tensor) -> torch.Tensor:
        """v @ U for the mask U of linear weight `name` (int64, mod 2^64)."""
        if self._mask_product is not None:
            return self._mask_product(name, v)
        if self.weight_mask is None:
            raise ConfigError(f"the dry run asked for the mask of weight {name!r} but none was configured")
        from permllm.ring_matmul import ring_matmul

        return ring_matmul(v, self.weight_mask(name))

    def call(self, kind: str, key: str) -> DealerCall:
        return self.dealer.call(kind, key)

    def deal(self, call: DealerCall, request):
        """Deal one correlation of `call` with both seeds (the request's `deal`); returns what the
        dry run carries on, e.g. the user's dealt share of a permuted step's output."""
        return request.deal(call, self)


def _ring(array: np.ndarray) -> torch.Tensor:
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def shape_key(*shapes) -> str:
    """A compact key naming the shapes of a call, e.g. "4x576|1536"."""
    return "|".join("x".join(str(int(d)) for d in s) if isinstance(s, (tuple, list)) else str(s) for s in shapes)
