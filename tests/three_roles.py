"""The owner, user and helper of parties.roles in three threads of one process, over in-memory channels
(the same messages as the three-process session, without sockets); the owner's model is stubbed."""

from __future__ import annotations

import dataclasses
import io
import threading

import pytest

from permllm.transport.channel import FlightClock
from permllm.transport.memory import MemoryChannel


class TinyTokenizer:
    """Just enough of a tokenizer for parties.roles.run_user on the tiny model (ids < 97)."""

    eos_token_id = 2

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_tensors=None):
        return [1] + [5 + ord(c) % 90 for c in messages[-1]["content"]]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def run_three_roles(
    weights, prompt: str, max_new_tokens: int, *, wrap=None, owner_options=None, timeout: float = 120
) -> tuple[dict, dict, str]:
    """Run one session; returns (reports by role, exceptions by role, the user's printed output).
    wrap(channel, receiver) may wrap every channel end (e.g. to record what each role receives)."""
    import permllm.model.loading as loading
    from parties.roles import UserRequest, run_helper, run_owner, run_user

    clocks = {r: FlightClock() for r in ("owner", "user", "helper")}
    channels: dict[str, dict] = {r: {} for r in clocks}
    for a, b in (("owner", "user"), ("owner", "helper"), ("user", "helper")):
        end_a, end_b = MemoryChannel.pair(a, b, clocks[a], clocks[b], timeout=timeout)
        channels[a][b] = wrap(end_a, a) if wrap else end_a
        channels[b][a] = wrap(end_b, b) if wrap else end_b
    reports, errors = {}, {}
    quiet = lambda *args, **kwargs: None  # noqa: E731
    printed = io.StringIO()
    roles = {
        "owner": lambda: run_owner(channels["owner"], "smollm2", progress=False, log=quiet, **(owner_options or {})),
        "helper": lambda: run_helper(channels["helper"], progress=False, log=quiet),
        "user": lambda: run_user(
            channels["user"],
            UserRequest("smollm2", prompt, max_new_tokens),
            TinyTokenizer(),
            progress=False,
            log=quiet,
            out=printed,
        ),
    }

    def target(role):
        try:
            reports[role] = roles[role]()
        except BaseException as exc:  # returned to the caller
            errors[role] = exc
            for ch in channels[role].values():
                ch.close()

    with pytest.MonkeyPatch.context() as mp:
        # a shallow copy: the owner frees the float weights of what it loaded as it encodes them
        mp.setattr(loading, "load_model", lambda name, tokenizer=True, dtype=None: (_shallow_copy(weights), None))
        threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in roles]
        for t in threads:
            t.start()
        for t in threads:
            t.join(3 * timeout)
    assert all(not t.is_alive() for t in threads), "a role did not finish"
    return reports, errors, printed.getvalue()


def _shallow_copy(weights):
    if hasattr(weights, "layers"):
        return dataclasses.replace(weights, layers=list(weights.layers))
    return weights
