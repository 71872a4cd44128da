"""W - U between the owner and the user without either holding all of it: the owner sends it by row
blocks of at most 8 MB, the user writes each block to disk as it arrives (its cache entry, or a private
scratch file), reads it back one weight by row blocks to precompute its linear shares, and holds no
W - U online. A damaged or short cache entry is removed (and fetched again). All exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import parties.masks as masks
import parties.user as user_role
import protocols.model.decoder_weights as dw
from parties.masks import MaskedCache, MaskedDigest, MaskedFile, masked_digest, private_scratch_file
from parties.owner import send_masked_weights
from permllm.errors import MaterialMismatch, ProtocolError
from permllm.transport.frames import header_length
from permllm.transport.memory import MemoryChannel
from tests.three_roles import run_three_roles
from tests.tiny_model import tiny_decoder

SEED = bytes(range(16))
KEY = ("v1", "fingerprint", "weights", 0)


def _arrays(shapes: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        n: rng.integers(-(2**63), 2**63 - 1, size=(d_in, d_out), dtype=np.int64) for n, (d_in, d_out) in shapes.items()
    }


SHAPES = {"a": (7, 5), "b": (3, 11), "c": (1, 4)}


def test_a_cache_entry_is_read_back_by_row_blocks_and_checked_against_its_digest(tmp_path):
    arrays = _arrays(SHAPES)
    cache = MaskedCache(tmp_path)
    cache.store(KEY, arrays, masked_digest(arrays.items()))
    digest, entry = cache.open(KEY, SHAPES)
    try:
        assert digest == masked_digest(arrays.items()) == entry.digest()
        for name, want in arrays.items():
            blocks = list(entry.blocks(name, elements=12))
            assert all(block.numel() <= max(12, want.shape[1]) for _, _, block in blocks)
            assert [(i, j) for i, j, _ in blocks][0][0] == 0 and blocks[-1][1] == want.shape[0]
            assert np.array_equal(np.concatenate([b.numpy() for _, _, b in blocks]), want)
            assert torch.equal(entry.whole(name), torch.from_numpy(want))
    finally:
        entry.close()
    loaded_digest, loaded = cache.load(KEY, SHAPES)
    assert loaded_digest == digest and all(np.array_equal(loaded[n], arrays[n]) for n in arrays)


@pytest.mark.parametrize("damage", ["flip", "truncate", "layout"])
def test_a_damaged_short_or_other_layout_entry_is_removed(tmp_path, damage):
    arrays = _arrays(SHAPES)
    cache = MaskedCache(tmp_path)
    cache.store(KEY, arrays, masked_digest(arrays.items()))
    (data,) = tmp_path.glob("*.bin")
    shapes = dict(SHAPES)
    if damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[-3] ^= 1
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-8])
    else:
        shapes["c"] = (2, 2)
    assert cache.open(KEY, shapes) is None
    assert list(tmp_path.iterdir()) == []  # removed: the next session fetches W - U again


def test_a_streamed_entry_whose_digest_fails_leaves_nothing_behind(tmp_path):
    arrays = _arrays(SHAPES)
    cache = MaskedCache(tmp_path)

    def refuse():
        raise ProtocolError("digest mismatch")

    with pytest.raises(ProtocolError):
        cache.store_stream(KEY, [[a.shape, iter([a[:1], a[1:]])] for a in arrays.values()], refuse)
    assert list(tmp_path.iterdir()) == []
    cache.store_stream(KEY, [[a.shape, iter([a[:1], a[1:]])] for a in arrays.values()], lambda: "d")
    entry = cache.data_file(KEY, SHAPES)
    try:
        assert entry.digest() == masked_digest(arrays.items())
    finally:
        entry.close()


def test_the_incremental_digest_is_the_digest_of_whole_weights():
    arrays = _arrays(SHAPES, seed=1)
    digest = MaskedDigest()
    for name, a in arrays.items():
        digest.begin(name, a.shape)
        for i in range(a.shape[0]):
            digest.update(a[i : i + 1])
    assert digest.hexdigest() == masked_digest(arrays.items())


def test_the_owner_sends_w_minus_u_in_bounded_blocks_and_the_user_stages_them(monkeypatch):
    """Every message carries at most MASK_CHUNK_ELEMENTS entries of one weight's rows; the user puts them
    back exactly (digest included); the bytes are W - U's plus one header per block."""
    monkeypatch.setattr(dw, "MASK_CHUNK_ELEMENTS", 40)
    weights = tiny_decoder(seed=5)
    arch = dw.DecoderArch.from_config(weights.config)
    shapes = dw.linear_shapes(arch)
    owner_w = dw.owner_weights(weights)
    owner_end, user_end = MemoryChannel.pair("user", "owner", timeout=30)
    sent, digest = send_masked_weights(owner_end, owner_w, SEED)
    whole = {name: dw.masked_weight(w, SEED).numpy() for name, w in owner_w.items()}
    assert digest == masked_digest(whole.items())

    headers = 0
    for name, (d_in, d_out, _) in shapes.items():
        step = max(1, 40 // d_out)
        headers += -(-d_in // step) * header_length(len(f"w.{name}"), 2)
    assert sent == sum(a.nbytes for a in whole.values()) + headers

    received, staged = {}, MaskedDigest()
    scratch = private_scratch_file()
    for _, blocks in user_role.receive_masked_weights(user_end, shapes, staged, received, 5, False):
        for block in blocks:
            assert block.size <= max(40, block.shape[1])
            scratch.write(memoryview(block).cast("B"))
    scratch.flush()
    assert received["bytes"] == sent and staged.hexdigest() == digest
    entry = MaskedFile(scratch, shapes)
    try:
        assert all(np.array_equal(entry.whole(name).numpy(), a) for name, a in whole.items())
    finally:
        entry.close()


def test_a_block_of_the_wrong_shape_is_refused():
    shapes = {"a": (4, 3, 16)}
    owner_end, user_end = MemoryChannel.pair("user", "owner", timeout=30)
    owner_end.send("w.a", np.zeros((5, 3), dtype=np.int64))  # more rows than the weight has
    with pytest.raises(ProtocolError, match="block of shape"):
        for _, blocks in user_role.receive_masked_weights(user_end, shapes, MaskedDigest(), {}, 5, False):
            list(blocks)


def test_the_user_reads_w_minus_u_one_weight_at_a_time_and_holds_none_online(monkeypatch, tmp_path):
    """A whole session: the user precomputes every linear share (masked-input and dealt-input calls)
    from W - U read back by small row blocks, weight after weight, never whole; the driver it runs
    online holds no W - U; the tokens are those of a session with large blocks."""
    baseline, errors, _ = run_three_roles(tiny_decoder(seed=2), "hello there", 3)
    assert not errors

    reads, held = [], {}
    original_blocks = MaskedFile.blocks

    def recording_blocks(self, name, elements=masks.READ_BLOCK_ELEMENTS):
        for i, j, block in original_blocks(self, name, 50):
            reads.append((name, i, j, block.numel()))
            yield i, j, block

    def no_whole(self, name):
        raise AssertionError(f"{name}: W - U read whole")

    original_precompute = user_role.precompute_shares

    def recording_precompute(fam, arch, material, masked):
        weights = original_precompute(fam, arch, material, masked)
        held.update({name: w.local for name, w in weights.items()})
        return weights

    monkeypatch.setattr(MaskedFile, "blocks", recording_blocks)
    monkeypatch.setattr(MaskedFile, "whole", no_whole)
    monkeypatch.setattr(user_role, "precompute_shares", recording_precompute)
    reports, errors, _ = run_three_roles(tiny_decoder(seed=2), "hello there", 3)
    assert not errors
    assert reports["user"]["token_ids"] == baseline["user"]["token_ids"]
    assert held and all(local is None for local in held.values())
    names = [name for name, *_ in reads]
    order = list(dict.fromkeys(names))
    assert sorted(order) == sorted(held) and names == sorted(names, key=order.index)  # one weight at a time
    assert max(n for *_, n in reads) <= 2 * 50 and len(reads) > len(order)  # by row blocks


def test_a_dealt_input_share_is_used_only_for_the_input_it_was_computed_for():
    """The online call checks its input against the precomputed one; without W~ it refuses clearly."""
    from protocols.linear import LinearWeight, _dealt_user_term

    class Material:
        def __init__(self, kept):
            self.kept = kept

        def local(self, name):
            return self.kept.get(name)

        def draw(self, name, shape):
            return torch.zeros(shape, dtype=torch.int64)

    x = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    term = torch.full((2, 4), 7, dtype=torch.int64)
    mat = Material({"v@W~+s": term, "x_u": x.clone()})
    weight = LinearWeight("w", 16, 3, 4)
    assert torch.equal(_dealt_user_term(mat, weight, x), term)
    with pytest.raises(MaterialMismatch, match="holds no W~"):
        _dealt_user_term(mat, weight, x + 1)
    weight.local = torch.ones((3, 4), dtype=torch.int64)
    assert torch.equal(_dealt_user_term(mat, weight, x + 1), (x + 1) @ weight.local)
