"""In-process runs of the bench: owner and user as two threads on one prepared model
(`parties.session`), with step hooks that time and count each layer part and each forward's dealing,
and the RTT sweep (one session whose netsim profile changes between tokens)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from parties.metrics import median, steps
from parties.progress import progress_bar
from parties.session import PreparedModel, generate


class PartRecorder:
    """A SecureDecoder step hook: per named part, wall time, flight depth and bytes at begin and end."""

    def __init__(self):
        self.events = []  # (part, t0, t1, depth0, depth1, sent0, sent1, recv0, recv1)
        self._open = None

    def begin(self, part, ctx):
        ch = ctx.channel
        self._open = (part, time.perf_counter(), ch.clock.depth, ch.stats.bytes_sent, ch.stats.bytes_received)

    def end(self, part, ctx):
        ch = ctx.channel
        p, t0, d0, s0, r0 = self._open
        self.events.append(
            (p, t0, time.perf_counter(), d0, ch.clock.depth, s0, ch.stats.bytes_sent, r0, ch.stats.bytes_received)
        )

    def forwards(self) -> list[list[tuple]]:
        """Events split per forward call (each starts with 'embedding'); the norm right before lm_head is
        relabelled 'final_norm'."""
        out: list[list[tuple]] = []
        for i, e in enumerate(self.events):
            if e[0] == "embedding":
                out.append([])
            if e[0] == "norm" and i + 1 < len(self.events) and self.events[i + 1][0] == "lm_head":
                e = ("final_norm",) + e[1:]
            out[-1].append(e)
        return out


class DealMarks:
    """A step hook for the helper's dry run: where each forward call's dealing starts (time, call index)."""

    def __init__(self):
        self.marks = []

    def begin(self, part, ctx):
        if part == "embedding":
            self.marks.append((time.perf_counter(), len(ctx.dealer.owner_records)))

    def end(self, part, ctx):
        pass

    def per_forward(self, end_time: float, call_bytes: list[int]) -> list[dict]:
        """Seconds, material bytes and protocol calls of each forward's dealing (the token choice after a
        forward included); end_time: when the dry run ended, call_bytes: bytes of every dealt call."""
        bounds = self.marks + [(end_time, len(call_bytes))]
        return [
            {"seconds": t1 - t0, "bytes": sum(call_bytes[i0:i1]), "calls": i1 - i0}
            for (t0, i0), (t1, i1) in zip(bounds, bounds[1:])
        ]


@dataclass
class InProcessRun:
    tokens: list
    trace: object  # the user's GenerationTrace
    user_parts: PartRecorder | None
    owner_parts: PartRecorder | None
    dealing: list  # per forward: seconds, bytes, calls
    deal_s: float
    wall_s: float

    def steps(self, key: str = "time") -> list:
        t = self.trace
        if key == "time":
            marks = t.token_times
        elif key == "depth":
            marks = t.token_depths
        else:
            marks = [s + r for s, r in t.token_bytes]
        return steps(marks)


def run_generation(
    prepared: PreparedModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    parts: bool = False,
    wrap_channel=None,
    on_token=None,
    desc: str = "in-process",
) -> InProcessRun:
    """One greedy private generation on `prepared` with fresh dealer seeds (a real session's: the
    permutations of one query never repeat in another); parts=True records each layer part."""
    marks = DealMarks()
    user_parts, owner_parts = (PartRecorder(), PartRecorder()) if parts else (None, None)
    hooks = {"helper": [marks]}
    if parts:
        hooks.update(owner=[owner_parts], user=[user_parts])
    bar = progress_bar(max_new_tokens, desc, unit="tok")

    def token_seen(token):
        bar.update(1)
        if on_token is not None:
            on_token(token)

    try:
        result = generate(
            prepared, prompt_ids, max_new_tokens, wrap_channel=wrap_channel, on_token=token_seen, hooks=hooks
        )
    finally:
        bar.close()
    session = result.session
    return InProcessRun(
        tokens=result.tokens,
        trace=result.user_trace,
        user_parts=user_parts,
        owner_parts=owner_parts,
        dealing=marks.per_forward(session.deal_end, session.dealt_call_bytes),
        deal_s=session.deal_s,
        wall_s=session.online_s,
    )


def prompt_of_length(tokenizer, n: int) -> list[int]:
    """n chat-templated token ids (a long chat prompt, truncated or repeated: only the length matters here)."""
    from permllm.model.prompts import FIDELITY_PROMPTS, chat_token_ids

    text = " ".join(FIDELITY_PROMPTS[-4:])
    ids = chat_token_ids(tokenizer, text)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def run_sweep(
    prepared: PreparedModel, prompt_ids: list[int], rtts_ms: list[float], mbit_s: float, per_point: int
) -> dict:
    """One in-process session whose link profile changes every `per_point` decode steps."""
    from netsim import NetSim

    specs = [("none", 0.0, None)] + [(f"{r:g},{mbit_s:g}", r, mbit_s) for r in rtts_ms]
    sims = []

    def wrap(channel):
        sim = NetSim(channel, "none")
        sims.append(sim)
        return sim

    seen = [0]

    def on_token(_token):
        # called on the user's thread after token i is chosen, before it tells the owner to go on: no
        # frame is in flight, so both ends can switch to the next point's profile here
        point = seen[0] // per_point
        seen[0] += 1
        if point < len(specs):
            for sim in sims:
                sim.set_profile(specs[point][0])

    run = run_generation(
        prepared,
        prompt_ids,
        1 + per_point * len(specs),
        wrap_channel=wrap,
        on_token=on_token,
        desc="RTT sweep (in-process)",
    )
    times, depths, nbytes = run.steps("time"), run.steps("depth"), run.steps("bytes")
    points = []
    for i, (spec, rtt, mbit) in enumerate(specs):
        idx = list(range(i * per_point, min((i + 1) * per_point, len(times))))
        points.append(
            {
                "spec": spec,
                "rtt_ms": rtt,
                "mbit_s": mbit,
                "decode_s_per_token": median([times[j] for j in idx]),
                "steps_s": [times[j] for j in idx],
                "flights": median([depths[j] for j in idx]),
                "bytes": median([nbytes[j] for j in idx]),
            }
        )
    return {
        "mode": f"in-process owner+user threads over netsim-wrapped in-memory channels, {mbit_s:g} Mbit/s, "
        f"{per_point} decode step(s) per point, prompt {len(prompt_ids)} tokens",
        "mbit_s": mbit_s,
        "tokens_per_point": per_point,
        "prompt_tokens": len(prompt_ids),
        "points": points,
    }
