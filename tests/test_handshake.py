"""Session handshake: version, model, fixed point, plan; every mismatch is named; fuzzed inputs."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parties.roles import Plan, check_hello
from parties.wire import recv_json, send_json
from permllm.errors import ProtocolError
from permllm.transport import MemoryChannel

FUZZ_EXAMPLES = int(os.environ.get("PERMLLM_FUZZ_EXAMPLES", "300"))


def _hello(**changes):
    hello = Plan("smollm2", prompt_tokens=10, max_new_tokens=5, session="abc").hello()
    hello.update(changes)
    return hello


def test_a_good_hello_gives_the_plan():
    plan = check_hello(_hello(), "smollm2", max_positions=100)
    assert (plan.prompt_tokens, plan.max_new_tokens, plan.session) == (10, 5, "abc")


@pytest.mark.parametrize("field,value,message", [
    ("protocol", 99, "protocol mismatch"),
    ("model", "minilm", "model mismatch"),
    ("act_bits", 12, "act_bits mismatch"),
    ("weight_bits", 20, "weight_bits mismatch"),
    ("prompt_tokens", 0, "bad plan"),
    ("max_new_tokens", "7", "bad plan"),
    ("max_new_tokens", 1000, "exceeds the model's 100 positions"),
])
def test_every_mismatch_is_named(field, value, message):
    with pytest.raises(ProtocolError, match=message):
        check_hello(_hello(**{field: value}), "smollm2", max_positions=100)


def test_error_messages_end_the_session_on_the_other_side():
    a, b = MemoryChannel.pair("owner", "user", timeout=2)
    send_json(a, "welcome", {"error": "model mismatch: the user has 'x', the owner 'smollm2'"})
    with pytest.raises(ProtocolError, match="owner ended the session: model mismatch"):
        recv_json(b, "welcome")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=10)


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
