"""Additive 2-out-of-2 sharing over Z_2^64.

Notation used across the protocols: <x> = (x_o, x_u) with x = x_o + x_u mod 2^64; x_o is held by the
model owner, x_u by the user. A party's view of <x> is a `Shared`: its own share and the fixed-point scale.

`dealt` marks sharings whose user share is known to the offline helper (it was dealt as correlated
randomness). A linear layer on such an input needs no online message: the helper already knows what
the user would have masked. Both parties derive the flag from the protocol structure, so it agrees.
In the helper's dry run `local` is None and `user_share` carries the dealt user share, if any.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Shared:
    """One party's share of a fixed-point tensor.

    local: this party's share (int64), or None in the helper's dry run.
    bits: fixed-point scale of the shared value.
    shape: the tensor's shape (kept separately so the dry run knows it without data).
    dealt: the user share is helper-known correlated randomness.
    user_share: in the helper's dry run only, that dealt user share.
    """

    local: torch.Tensor | None
    bits: int
    shape: tuple[int, ...]
    dealt: bool = False
    user_share: torch.Tensor | None = None

    @staticmethod
    def of(local: torch.Tensor, bits: int, *, dealt: bool = False) -> Shared:
        return Shared(local, bits, tuple(local.shape), dealt)

    @staticmethod
    def placeholder(shape, bits: int, user_share: torch.Tensor | None = None) -> Shared:
        return Shared(None, bits, tuple(shape), user_share is not None, user_share)

    @property
    def is_placeholder(self) -> bool:
        return self.local is None

    def map(self, fn, shape=None, bits: int | None = None) -> Shared:
        """Apply a local linear map to the share (fn must be linear over the ring).

        Any local map voids `dealt`: the helper no longer knows the mapped share unless it applies
        the same map, which only happens through a protocol that says so."""
        new_bits = self.bits if bits is None else bits
        if self.local is None:
            new_shape = self.shape if shape is None else tuple(shape)
            return Shared(None, new_bits, new_shape)
        out = fn(self.local)
        return Shared(out, new_bits, tuple(out.shape))

    def __add__(self, other: Shared) -> Shared:
        if self.bits != other.bits:
            raise ValueError(f"cannot add shares at scales {self.bits} and {other.bits}")
        if self.shape != other.shape:
            raise ValueError(f"cannot add shares of shapes {self.shape} and {other.shape}")
        if self.local is None:
            return Shared(None, self.bits, self.shape)
        return Shared(self.local + other.local, self.bits, self.shape)

    def reshape(self, *shape) -> Shared:
        """A reshaped view. Keeps `dealt`: the helper reshapes the dealt share the same way."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        new_shape = _resolve(self.shape, shape)
        local = None if self.local is None else self.local.reshape(new_shape)
        user_share = None if self.user_share is None else self.user_share.reshape(new_shape)
        return Shared(local, self.bits, new_shape, self.dealt, user_share)

    def with_bits(self, bits: int) -> Shared:
        return replace(self, bits=bits)


def _resolve(old: tuple[int, ...], new: tuple[int, ...]) -> tuple[int, ...]:
    n = 1
    for d in old:
        n *= d
    known = 1
    for d in new:
        if d != -1:
            known *= d
    return tuple(n // known if d == -1 else d for d in new)


def split(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Share x as (x - mask, mask): the owner's and the user's share (tests and input sharing)."""
    return x - mask, mask
