"""Rescaling a shared fixed-point tensor: <x> at scale s -> <x / 2^k> at scale s - k.

No local share truncation (which fails with probability ~|x|/2^63 per element). Instead a one-sided
masked opening with a wrap correction made from one random OT per element, exact up to one unit in
the last place and with zero failure probability whenever |x| < 2^62. F is the `holder` (the party
that holds the mask and sends first), S the other party:

    material: F: r uniform in Z_2^64 (F's seeded draw "r"; F knows floor(r / 2^k) and rho = r_63)
              a random-OT correlation per element: S holds k0, k1 (uniform ring words), F holds
              krho = k_rho (k0 where rho = 0, k1 where rho = 1)
    F -> S:   c_F = x_F + r                                          (n words)
    S:        c = c_F + x_S + 2^62 = x' + r mod 2^64, x' = x + 2^62 in [0, 2^63): uniform to S
              the wrap of x' + r past 2^64 is w = rho (1 - c_63)  (x' < 2^63, so it can only wrap when
              rho = 1, and then it wrapped exactly when c_63 = 0); e = 1 - c_63 is S's, rho is F's
    S -> F:   d = k1 - k0 - e                                        (n words)
              z_S = -k0;  z_F = krho (rho = 0) or krho - d = k0 + e (rho = 1):  z_S + z_F = rho e = w
    y_S = floor(c / 2^k) - 2^(62-k) + 2^(64-k) z_S
    y_F = -floor(r / 2^k) + 2^(64-k) z_F
    so y = floor(x' / 2^k) - 2^(62-k) + eps, eps in {0, 1}  (the carry of the low bits of x' + r), i.e.
    floor(x / 2^k) or one above it.

Views: S sees c_F, a one-time pad of x_F under r (uniform, unknown to S); F sees d, padded by the key it
lacks (k1 where rho = 0, k0 where rho = 1). Cost: 2 messages of n words, one each way; F sends c_F and
reads d in the same call, so when F's share of x is ready a hop before S's (it rides F's previous
message), c_F travels on that hop, d on S's next one, and the call adds 1 flight to the critical path
as a simultaneous exchange would. Callers pick `holder` that way.

Material: with the helper, S's k0 and k1 are S's seeded draws and krho is dealt to F (the helper knows
F's seed, hence rho): n words dealt per truncation. Without it, the parties make the correlation with a
random OT; then k0, k1 and krho all arrive as dealt tensors, so the online phase reads all three with
`part` (dealt if present, else seeded). r is always F's own draw.
Reference: the MSB-known truncation pattern, e.g. Escudero et al., CRYPTO 2020; a random OT for the
wrap bit as in two-party truncation protocols of the same family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from permllm.ring import top_bit
from permllm.ring_kernels import OFFSET_BITS as _OFFSET_BITS
from permllm.ring_kernels import truncation_finish, truncation_open, truncation_reply
from permllm.sharing import Shared
from protocols.context import Role, shape_key


@dataclass(frozen=True)
class TruncationMask:
    """The correlation of one truncation: the holder's r (seeded) and a random OT per element in which
    the holder chooses rho = bit 63 of r: the other party's k0, k1 (seeded from the helper; made by
    oblivious transfer in the two-party mode), the holder's krho = k_rho (dealt)."""

    shape: tuple
    k: int
    holder: Role

    def deal(self, call, ctx) -> None:
        if self.holder is Role.OWNER:
            f_draw, s_draw, to_f = call.owner_draw, call.user_draw, call.to_owner
        else:
            f_draw, s_draw, to_f = call.user_draw, call.owner_draw, call.to_user
        rho = top_bit(f_draw("r", self.shape)).bool()
        to_f("krho", torch.where(rho, s_draw("k1", self.shape), s_draw("k0", self.shape)))


def trunc(ctx, x: Shared, k: int, *, holder: Role) -> Shared:
    """<x> / 2^k, scale x.bits - k. holder (F) sends c_F = x_F + r, the other party replies with d:
    8 bytes per element each way, 1 flight when F's share is ready a hop first (module docstring)."""
    if not 0 < k < _OFFSET_BITS:
        raise ValueError(f"truncation shift must be in (0, 62), got {k}")
    if k > x.bits:
        raise ValueError(f"cannot drop {k} bits from a value at scale {x.bits}")
    holder = Role(holder)
    shape = x.shape
    key = shape_key(shape, k, holder.value)
    if ctx.dealing:
        ctx.deal(ctx.call("trunc", key), TruncationMask(tuple(shape), k, holder))
        return Shared.placeholder(shape, x.bits - k)

    mat = ctx.take("trunc", key)
    if ctx.role is holder:
        r, krho = mat.draw("r", shape), mat.part("krho", shape)
        ctx.send("trunc", truncation_open(x.local, r, False))
        y = truncation_finish(r, krho, ctx.receive("trunc", shape), k)
    else:
        k0, k1 = mat.part("k0", shape), mat.part("k1", shape)
        d, y = truncation_reply(ctx.receive("trunc", shape), x.local, k0, k1, k)
        ctx.send("trunc", d)
    return Shared.of(y, x.bits - k)
