"""The δ re-share attack of a deviating user: weight confidentiality assumes a semi-honest user.

In a permuted non-linear step the user re-shares its result as e = Y - a2, and nothing checks Y. A user
that adds δ to entry k of Y makes the shared output f(x) + δ·1[pi^-1(k)]. When that output feeds a
linear layer, the layer's output gains δ·W[r] for the row r = pi^-1(k) of the weight, and the next
permuted reveal shows the user that sum, shuffled. With δ far above the honest values the user reads
the row's entries, exactly: here δ adds 2^40 to one ring word of the SwiGLU output, so the final norm
reveals words h + 2^40·W_down[r] (h the residual row at LINEAR_BITS, W_down encoded at WEIGHT_BITS), and
since |h| < 2^39 (asserted on the honest run) round(word / 2^40) is W_down[r]'s encoded entry. The
row's order stays hidden by the reveal's permutation and the user does not learn r, but every query
gives it one more row of a weight; the tokens it gets are garbage from then on, and the owner cannot
tell (nothing checks a re-share).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parties.inprocess import Seeds
from parties.session import private_generate_inprocess
from protocols import permute
from protocols.model.decoder_weights import owner_weights
from tests.tiny_model import tiny_decoder

SEEDS = Seeds(owner=bytes(range(30, 46)), user=bytes(range(60, 76)))
DELTA_BITS = 40  # δ: 2^40 added to one ring word of the SwiGLU output (2^24 as a value at ACT_BITS)
ENTRY = 5  # the permuted SwiGLU entry the user shifts


def run_session(mp, *, deviate: bool) -> dict:
    """The tiny decoder (2 layers) on a one-token prompt for one token, the user's revealed words recorded
    by tag; with `deviate`, the user adds δ to entry ENTRY of its re-share of the last layer's SwiGLU."""
    seen = {}
    reveal, reshare = permute._reveal_permuted, permute._reshare

    def recording_reveal(ctx, mat, x, lengths, tag):
        revealed, pi = reveal(ctx, mat, x, lengths, tag)
        if not ctx.is_owner:
            seen[tag] = revealed.clone()
        return revealed, pi

    def deviating_reshare(ctx, mat, pi, values, out_shape, out_bits, tag):
        if deviate and not ctx.is_owner and tag == "L1.act":
            values = np.array(values, dtype=np.float64)
            values.reshape(-1)[ENTRY] += 2.0 ** (DELTA_BITS - out_bits)  # the ring word grows by 2^40
        return reshare(ctx, mat, pi, values, out_shape, out_bits, tag)

    mp.setattr(permute, "_reveal_permuted", recording_reveal)
    mp.setattr(permute, "_reshare", deviating_reshare)
    private_generate_inprocess(tiny_decoder(seed=5), [7], 1, seeds=SEEDS, timeout=300)
    return seen


def test_a_deviating_user_reads_a_weight_row_from_the_next_reveal():
    with pytest.MonkeyPatch.context() as mp:
        honest = run_session(mp, deviate=False)["fnorm"].reshape(-1)
    with pytest.MonkeyPatch.context() as mp:
        attacked = run_session(mp, deviate=True)["fnorm"].reshape(-1)
    assert int(honest.abs().max()) < 2 ** (DELTA_BITS - 1)  # the honest residual row: |h| < 2^39 at LINEAR_BITS
    assert not torch.any(torch.round(honest.double() / 2.0**DELTA_BITS))  # honestly, nothing shows at 2^40

    recovered = torch.sort(torch.round(attacked.double() / 2.0**DELTA_BITS).long()).values
    down = owner_weights(tiny_decoder(seed=5))["L1.down"].local  # (intermediate, hidden), encoded
    rows = [r for r in range(down.shape[0]) if torch.equal(recovered, torch.sort(down[r]).values)]
    assert len(rows) == 1  # exactly one row of W_down, all its entries exact (as a multiset)
    assert torch.count_nonzero(recovered) > down.shape[1] // 2  # a real row, not the zeros of the honest run
