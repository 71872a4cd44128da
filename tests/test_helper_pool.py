"""The helper's memory and its material pool: v @ U drawn by row blocks is the product with the whole
mask, exactly; a second session for the same user key and plan is served from material dealt ahead
(the same material `deal_to` gives for the seeds the helper hands out), a different plan is dealt live,
the pool stays bounded (the services: tests/test_services.py)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from permllm.prg import Prg
from permllm.ring_matmul import ring_matmul
from permllm.transport import MemoryChannel
from protocols.model import decoder_weights as dw

pytestmark = pytest.mark.timeout(600)

OWNER_SEED, USER_SEED, MASK_SEED = b"o" * 16, b"u" * 16, b"m" * 16


def test_mask_product_by_row_blocks_is_the_product_with_the_whole_mask(monkeypatch):
    monkeypatch.setattr(dw, "MASK_CHUNK_ELEMENTS", 7 * 5)  # several row blocks, the last one short
    seed = bytes(range(16))
    v = Prg(bytes(16), "test/v").int64((3, 23))
    want = ring_matmul(v, dw.weight_mask(seed, "L0.o", 23, 7))
    got = dw.mask_product(seed, "L0.o", 23, 7, v)
    assert got.dtype == torch.int64
    assert torch.equal(got, want)
    assert not torch.equal(dw.mask_product(bytes(16), "L0.o", 23, 7, v), want)  # the seed matters


def _plans(prompt_tokens=3, max_new_tokens=2):
    from parties.models import PROTOCOL_VERSION, fingerprint
    from tests.tiny_model import tiny_decoder

    arch = dw.DecoderArch.from_config(tiny_decoder().config).to_dict()
    common = {
        "protocol": PROTOCOL_VERSION,
        "session": "s1",
        "fingerprint": fingerprint("smollm2", arch),
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": max_new_tokens,
    }
    return {**common, "model": "smollm2", "arch": arch}, dict(common)


def _session(pool, user_key="alice", **plan) -> dict:
    """One session of run_helper on in-memory channels, the owner and the user played here: returns the
    helper's report and what each party received (its seed, whether pooled, its records)."""
    from parties.helper import run_helper
    from parties.wire import recv_records, recv_stream_seed, send_json

    owner_plan, user_plan = _plans(**plan)
    (to_owner, owner), (to_user, user) = (
        MemoryChannel.pair("helper", "owner", timeout=60),
        MemoryChannel.pair("helper", "user", timeout=60),
    )
    send_json(owner, "owner-plan", owner_plan)
    owner.send("seed", OWNER_SEED)
    owner.send("mask-seed", MASK_SEED)
    send_json(user, "user-plan", user_plan)
    user.send("seed", USER_SEED)
    got = {}

    def party(name, channel, seed):
        got[name] = recv_stream_seed(channel, seed, timeout=60)
        records = []
        recv_records(channel, records.append, timeout=60)
        got[name + "_records"] = records

    threads = [
        threading.Thread(target=party, args=("owner", owner, OWNER_SEED)),
        threading.Thread(target=party, args=("user", user, USER_SEED)),
    ]
    for t in threads:
        t.start()
    report = run_helper(
        {"owner": to_owner, "user": to_user}, progress=False, log=lambda *a: None, pool=pool, user_key=user_key
    )
    for t in threads:
        t.join(60)
    return {"report": report, **got}


def _dealt(owner_seed, user_seed, **plan):
    """What `deal_to` deals for these seeds: (owner records, user records)."""
    from parties.handshake import check_plans
    from parties.helper import deal_to

    fam, arch, plan = check_plans(*_plans(**plan))
    pairs = []
    deal_to(fam, arch, plan, owner_seed, user_seed, MASK_SEED, lambda o, u: pairs.append((o, u)))
    return [o for o, _ in pairs], [u for _, u in pairs]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        (x.index, x.kind, x.key, sorted(x.tensors)) == (y.index, y.kind, y.key, sorted(y.tensors))
        and all(torch.equal(x.tensors[n], y.tensors[n]) for n in x.tensors)
        for x, y in zip(a, b)
    )


def _wait_ready(pool, key, count=1):
    deadline = time.monotonic() + 300
    while pool.ready(key) < count:
        assert time.monotonic() < deadline, "the pool did not fill"
        time.sleep(0.05)


def _key(user_key="alice", **plan):
    from parties.handshake import check_plans
    from parties.helper_pool import PoolKey

    owner_plan, _ = _plans(**plan)
    return PoolKey.of(user_key, owner_plan["fingerprint"], check_plans(*_plans(**plan))[2], MASK_SEED)


def test_a_second_session_is_served_from_the_pool_with_the_material_of_its_seeds():
    from parties.helper import deal_to
    from parties.helper_pool import MaterialPool

    pool = MaterialPool(deal_to, 1, log=lambda *a: None)
    try:
        first = _session(pool)
        assert first["report"]["served_from_pool"] is False and first["report"]["pool_depth"] == 1
        assert first["owner"] == (OWNER_SEED, False) and first["user"] == (USER_SEED, False)
        live_owner, live_user = _dealt(OWNER_SEED, USER_SEED)
        assert _same(first["owner_records"], live_owner) and _same(first["user_records"], live_user)

        _wait_ready(pool, _key())
        second = _session(pool)
        assert second["report"]["served_from_pool"] is True
        (owner_seed, owner_pooled), (user_seed, user_pooled) = second["owner"], second["user"]
        assert owner_pooled and user_pooled
        assert len({owner_seed, user_seed, OWNER_SEED, USER_SEED}) == 4  # fresh, and each party only its own
        assert second["report"]["calls"] == len(live_owner)
        pooled_owner, pooled_user = _dealt(owner_seed, user_seed)
        assert _same(second["owner_records"], pooled_owner) and _same(second["user_records"], pooled_user)
        assert not _same(second["user_records"], live_user)  # new randomness, not a replay

        _wait_ready(pool, _key())  # refilled after the pooled session too
        assert pool.ready(_key()) == 1  # depth 1: no more
        assert pool.dealt == 2
    finally:
        pool.close()


def test_a_different_plan_or_key_is_dealt_live_and_the_pool_is_bounded():
    from parties.helper import deal_to
    from parties.helper_pool import MaterialPool

    pool = MaterialPool(deal_to, 1, max_keys=2, log=lambda *a: None)
    try:
        _session(pool)
        _wait_ready(pool, _key())
        other = _session(pool, max_new_tokens=1)  # alice, another plan: live, and it replaces her pool
        assert other["report"]["served_from_pool"] is False and other["owner"] == (OWNER_SEED, False)
        _wait_ready(pool, _key(max_new_tokens=1))
        assert pool.ready(_key()) == 0
        assert _session(pool, user_key="bob")["report"]["served_from_pool"] is False  # bob's pool is his
        _wait_ready(pool, _key("bob"))
        _session(pool, user_key="carol")
        _wait_ready(pool, _key("carol"))
        # two keys at most: alice's (the least recently served) went
        assert [pool.ready(_key(k)) for k in ("bob", "carol")] == [1, 1]
        assert pool.ready(_key(max_new_tokens=1)) == 0
        assert _session(pool, max_new_tokens=1)["report"]["served_from_pool"] is False
    finally:
        pool.close()


def test_depth_zero_deals_every_session_live():
    from parties.helper import deal_to
    from parties.helper_pool import MaterialPool

    pool = MaterialPool(deal_to, 0, log=lambda *a: None)
    try:
        for _ in range(2):
            report = _session(pool)["report"]
            assert report["served_from_pool"] is False and report["pool_depth"] == 0
        assert pool.ready(_key()) == 0 and pool.dealt == 0
    finally:
        pool.close()
    with pytest.raises(ValueError, match="pool depth"):
        MaterialPool(deal_to, -1)
