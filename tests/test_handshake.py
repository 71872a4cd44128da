"""Session handshake: version, model, fixed point, plan; every mismatch is named; fuzzed inputs."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parties.roles import Plan, check_hello
from parties.wire import recv_json, send_json
from permllm.errors import ConfigError, ProtocolError
from permllm.transport import MemoryChannel

FUZZ_EXAMPLES = int(os.environ.get("PERMLLM_FUZZ_EXAMPLES", "300"))
"""Examples per fuzz test: 300 in CI; `PERMLLM_FUZZ_EXAMPLES=5000 pytest tests/test_handshake.py` locally."""


def _hello(**changes):
    hello = Plan("smollm2", prompt_tokens=10, max_new_tokens=5, session="abc").hello()
    hello.update(changes)
    return hello


def test_a_good_hello_gives_the_plan():
    plan = check_hello(_hello(), "smollm2", max_positions=100)
    assert (plan.prompt_tokens, plan.max_new_tokens, plan.session) == (10, 5, "abc")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("protocol", 99, "protocol mismatch"),
        ("model", "minilm", "model mismatch"),
        ("act_bits", 12, "act_bits mismatch"),
        ("weight_bits", 20, "weight_bits mismatch"),
        ("prompt_tokens", 0, "bad plan"),
        ("max_new_tokens", "7", "bad plan"),
        ("max_new_tokens", 1000, "exceeds the model's 100 positions"),
    ],
)
def test_every_mismatch_is_named(field, value, message):
    with pytest.raises(ProtocolError, match=message):
        check_hello(_hello(**{field: value}), "smollm2", max_positions=100)


def test_the_hello_names_the_token_selection_and_the_owner_offers_only_the_table():
    assert _hello()["selection"] == "table"
    assert check_hello(_hello(), "smollm2", max_positions=100).selection == "table"
    hello = _hello()
    del hello["selection"]  # a hello without one asks for the default
    assert check_hello(hello, "smollm2", max_positions=100).selection == "table"
    # the BFV reply does not hide the permutation from the user yet (SECURITY.md): refused by default
    with pytest.raises(ProtocolError, match="token selection 'bfv' is not offered .the owner offers table."):
        check_hello(_hello(selection="bfv"), "smollm2", max_positions=100)
    offered = ("table", "bfv")
    assert check_hello(_hello(selection="bfv"), "smollm2", max_positions=100, offered=offered).selection == "bfv"
    with pytest.raises(ProtocolError, match="token selection \\['table'\\] is not offered"):
        check_hello(_hello(selection=["table"]), "smollm2", max_positions=100)


def test_error_messages_end_the_session_on_the_other_side():
    a, b = MemoryChannel.pair("owner", "user", timeout=2)
    send_json(a, "welcome", {"error": "model mismatch: the user has 'x', the owner 'smollm2'"})
    with pytest.raises(ProtocolError, match="owner ended the session: model mismatch"):
        recv_json(b, "welcome")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(_hello())) | st.text(max_size=6), json_values, max_size=8))
def test_fuzzed_hellos_only_raise_protocol_errors(hello):
    try:
        check_hello(hello, "smollm2", max_positions=100)
    except ProtocolError:
        pass


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.binary(max_size=200) | st.builds(lambda v: json.dumps(v).encode(), json_values))
def test_fuzzed_control_messages_only_raise_protocol_errors(raw):
    a, b = MemoryChannel.pair("owner", "user", timeout=2)
    a.send("hello", raw)
    try:
        message = recv_json(b, "hello")
        assert isinstance(message, dict)
    except ProtocolError:
        pass


# ------------------------------------------------------------------------------ the helper's check
def _arch():
    from protocols.model.decoder_weights import DecoderArch
    from tests.tiny_model import tiny_decoder

    return DecoderArch.from_config(tiny_decoder().config).to_dict()


def _plans(**owner_changes):
    from parties.models import PROTOCOL_VERSION, fingerprint

    arch = _arch()
    common = {
        "protocol": PROTOCOL_VERSION,
        "session": "s1",
        "fingerprint": fingerprint("smollm2", arch),
        "prompt_tokens": 9,
        "max_new_tokens": 4,
    }
    owner = {**common, "model": "smollm2", "arch": arch, **owner_changes}
    return owner, dict(common)


def test_helper_accepts_matching_plans():
    from parties.roles import _check_plans

    fam, arch, plan = _check_plans(*_plans())
    assert fam.name == "smollm2" and arch.to_dict() == _arch()
    assert (plan.prompt_tokens, plan.max_new_tokens, plan.session) == (9, 4, "s1")


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"session": "other"}, "session mismatch between the owner .'other'. and the user .'s1'."),
        ({"prompt_tokens": 10}, "prompt_tokens mismatch"),
        ({"max_new_tokens": 5}, "max_new_tokens mismatch"),
        ({"fingerprint": "f" * 32}, "fingerprint mismatch"),
        ({"prompt_tokens": "9"}, "owner's 'owner-plan' message has no valid 'prompt_tokens'"),
        ({"model": "gpt9"}, "unknown model 'gpt9'"),
        ({"arch": {"hidden": 32}}, "the owner sent a bad architecture: .*missing fields"),
        ({"arch": {**_arch(), "vocab": 1 << 30}}, "field 'vocab' has an invalid value"),
        ({"arch": {**_arch(), "hidden": 1 << 20, "vocab": 1 << 20}}, "linear-weight elements"),
        ({"selection": "bfv"}, "selection mismatch between the owner .'bfv'. and the user .'table'."),
    ],
)
def test_helper_names_every_mismatch_between_the_plans(changes, message):
    from parties.roles import _check_plans

    owner, user = _plans()
    owner.update(changes)
    if "arch" in changes or "model" in changes:
        user["fingerprint"] = owner["fingerprint"]
    with pytest.raises((ProtocolError, ConfigError), match=message):
        _check_plans(owner, user)


def test_helper_takes_the_selection_from_the_plans():
    from parties.roles import _check_plans

    owner, user = _plans()
    assert _check_plans(owner, user)[2].selection == "table"  # plans without one mean the table
    _, _, plan = _check_plans({**owner, "selection": "bfv"}, {**user, "selection": "bfv"})
    assert plan.selection == "bfv"
    with pytest.raises(ProtocolError, match="unknown token selection 'clear'"):
        _check_plans({**owner, "selection": "clear"}, {**user, "selection": "clear"})


def test_a_refused_session_reaches_both_parties_at_once():
    """The helper refuses mismatching plans and says so on both material streams: the owner and the user
    fail with its reason instead of waiting out the set-up timeout."""
    import time

    from parties.roles import SEED_TAG, run_helper
    from parties.wire import recv_records

    owner_plan, user_plan = _plans(max_new_tokens=6)
    (to_owner, owner_side), (to_user, user_side) = (
        MemoryChannel.pair("helper", "owner", timeout=5),
        MemoryChannel.pair("helper", "user", timeout=5),
    )
    send_json(owner_side, "owner-plan", owner_plan)
    owner_side.send(SEED_TAG, b"o" * 16)
    owner_side.send("mask-seed", b"m" * 16)
    send_json(user_side, "user-plan", user_plan)
    user_side.send(SEED_TAG, b"u" * 16)
    with pytest.raises(ProtocolError, match="max_new_tokens mismatch"):
        run_helper({"owner": to_owner, "user": to_user}, progress=False, log=lambda *a: None)
    for side in (owner_side, user_side):
        start = time.monotonic()
        with pytest.raises(
            ProtocolError, match="helper ended the session: the helper refused the session: max_new_tokens mismatch"
        ):
            recv_records(side, lambda record: None, timeout=60)
        assert time.monotonic() - start < 1


def _welcome() -> dict:
    """The owner's welcome that the user of Plan("smollm2", 9, 4, "s1") accepts, on the tiny decoder."""
    from parties.models import PROTOCOL_VERSION, fingerprint

    arch = _arch()
    return {
        "protocol": PROTOCOL_VERSION,
        "model": "smollm2",
        "session": "s1",
        "arch": arch,
        "fingerprint": fingerprint("smollm2", arch),
        "max_positions": 64,
        "eos_token_id": 2,
    }


def test_user_checks_the_welcome():
    from parties.families import family
    from parties.roles import _check_welcome

    plan = Plan("smollm2", prompt_tokens=9, max_new_tokens=4, session="s1")
    good = _welcome()
    assert _check_welcome(good, plan, family("smollm2")).to_dict() == good["arch"]
    for changes, message in [
        ({"protocol": 1}, "protocol mismatch"),  # the version before the seeded material stream
        ({"session": "s2"}, "session mismatch"),
        ({"model": "minilm"}, "model mismatch"),
        ({"fingerprint": "0" * 32}, "fingerprint"),
        ({"arch": [1, 2]}, "not a JSON object"),
        ({"max_positions": None}, "max_positions"),
        ({"max_positions": 12}, "exceeds the model's 12 positions"),
    ]:
        with pytest.raises((ProtocolError, ConfigError), match=message):
            _check_welcome({**good, **changes}, plan, family("smollm2"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(sorted(_plans()[0])) | st.text(max_size=6), json_values, max_size=9),
    st.dictionaries(st.sampled_from(sorted(_plans()[1])) | st.text(max_size=6), json_values, max_size=7),
)
def test_fuzzed_plans_only_raise_named_errors(owner_plan, user_plan):
    from parties.roles import _check_plans

    valid_owner, valid_user = _plans()
    for owner, user in ((owner_plan, user_plan), ({**valid_owner, **owner_plan}, {**valid_user, **user_plan})):
        try:
            _check_plans(owner, user)
        except (ProtocolError, ConfigError):
            pass


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["protocol", "model", "session", "arch", "fingerprint", "max_positions"]) | st.text(max_size=6),
        json_values,
        max_size=8,
    )
)
def test_fuzzed_welcomes_only_raise_named_errors(changes):
    from parties.families import family
    from parties.roles import _check_welcome

    good = _welcome()
    for welcome in (changes, {**good, **changes}):
        try:
            _check_welcome(welcome, Plan("smollm2", 9, 4, "s1"), family("smollm2"))
        except (ProtocolError, ConfigError):
            pass
