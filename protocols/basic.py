"""Input sharing and opening.

share_input: the party holding a plaintext encodes it and sends it masked with its own fresh
randomness; the other party's share is what it receives. 1 flight, n*8 bytes, no helper material.
    user input x: user keeps x_u = r (fresh, its own cryptographic PRG), sends x_o = x - r.
reveal_to_user / reveal_to_owner: the other party sends its share. 1 flight, n*8 bytes.
reveal_to_both: both send at once. 1 flight, n*8 bytes each way.
"""

from __future__ import annotations

import torch

from permllm.prg import Prg, fresh_seed
from permllm.sharing import Shared
from protocols.context import Role


def share_input(ctx, holder: Role, value: torch.Tensor | None, shape, bits: int, tag: str = "input") -> Shared:
    """<value> from the plaintext of `holder` (int64 at scale `bits`); the other party passes None."""
    shape = tuple(shape)
    if ctx.dealing:
        return Shared.placeholder(shape, bits)
    holds = ctx.role is Role(holder)
    if holds and tuple(value.shape) != shape:
        raise ValueError(f"input has shape {tuple(value.shape)}, expected {shape}")
    if holds:
        mask = Prg(fresh_seed(), "input").int64(shape)
        ctx.send(tag, value - mask)
        return Shared.of(mask, bits)
    return Shared.of(ctx.receive(tag, shape), bits)


def reveal_to(ctx, receiver: Role, x: Shared, tag: str = "reveal") -> torch.Tensor | None:
    """Open <x> to `receiver` only: it gets the int64 value (scale x.bits), the sender gets None."""
    if ctx.dealing:
        return None
    if ctx.role is Role(receiver):
        return x.local + ctx.receive(tag, x.shape)
    ctx.send(tag, x.local)
    return None


def reveal_to_both(ctx, x: Shared, tag: str = "open") -> torch.Tensor | None:
    """Open <x> to both parties (int64 at scale x.bits)."""
    if ctx.dealing:
        return None
    return x.local + ctx.exchange(tag, x.local)
