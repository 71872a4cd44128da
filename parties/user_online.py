"""The user's online phase, one flavour per model family: a decoder streams its answer token by token,
an encoder prints one embedding. Each returns the online part of the user's report."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from parties.handshake import Plan
from parties.metrics import Phases, median_step, percentile_step


@dataclass
class OnlineSession:
    """What the user's online phase runs on. ctx: its `PartyContext` with the owner; driver: its secure
    decoder or encoder; lookup: its side of token selection (None for an encoder); welcome: the owner's
    checked welcome; phases: where the 'online' time goes."""

    ctx: object
    driver: object
    plan: Plan
    prompt_ids: list[int]
    lookup: object
    welcome: dict
    phases: Phases

    def __post_init__(self):
        stats = self.ctx.channel.stats
        self.start_bytes = stats.bytes_sent + stats.bytes_received
        self.start_depth = self.ctx.channel.clock.depth


@dataclass
class GenerationReport:
    """The online part of a decoder user's report: the answer, and per-token medians of time, bytes, flights."""

    generated_tokens: int
    token_ids: list[int]
    text: str
    ttft_s: float | None
    decode_s_per_token: float | None
    decode_s_per_token_p90: float | None
    online_bytes_per_token: float | None
    online_bytes_per_token_up: float | None
    online_bytes_per_token_down: float | None
    prefill_bytes: int | None
    flights_per_token: float | None
    prefill_flights: int | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EmbeddingReport:
    """The online part of an encoder user's report: the embedding and the session's time, bytes, flights."""

    embedding: list[float]
    online_s: float
    online_bytes: int
    online_flights: int

    def to_dict(self) -> dict:
        return {
            "embedding": self.embedding,
            "text": "",
            "token_ids": [],
            "generated_tokens": 0,
            "online_s": self.online_s,
            "online_bytes": self.online_bytes,
            "online_flights": self.online_flights,
        }


def stream_answer(fam, session: OnlineSession, request, tokenizer, out) -> GenerationReport:
    """Generate up to the plan's budget, writing the decoded answer to `out` as each token arrives."""
    from protocols.model.generation import GenerationTrace, SamplingConfig, token_chooser

    welcome_eos = session.welcome.get("eos_token_id")
    eos = frozenset(i for i in (tokenizer.eos_token_id, welcome_eos) if isinstance(i, int))
    trace = GenerationTrace()
    tokens: list[int] = []
    printed = [""]

    def stream(token):
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        out.write(text[len(printed[0]) :])
        out.flush()
        printed[0] = text

    with session.phases.timed("online"):
        fam.run_session(
            session.ctx,
            session.driver,
            session.plan,
            prompt_ids=session.prompt_ids,
            eos_ids=eos,
            choose=token_chooser(request.sampling or SamplingConfig()),
            lookup=session.lookup,
            on_token=stream,
            trace=trace,
        )
    out.write("\n")
    out.flush()
    byte_marks = [s + r for s, r in trace.token_bytes]
    return GenerationReport(
        generated_tokens=len(tokens),
        token_ids=tokens,
        text=tokenizer.decode(tokens, skip_special_tokens=True),
        ttft_s=trace.token_times[0] - trace.start if trace.token_times else None,
        decode_s_per_token=median_step(trace.token_times),
        decode_s_per_token_p90=percentile_step(trace.token_times, 0.9),
        online_bytes_per_token=median_step(byte_marks),
        online_bytes_per_token_up=median_step([s for s, _ in trace.token_bytes]),
        online_bytes_per_token_down=median_step([r for _, r in trace.token_bytes]),
        prefill_bytes=byte_marks[0] - session.start_bytes if byte_marks else None,
        flights_per_token=median_step(trace.token_depths),
        prefill_flights=trace.token_depths[0] - trace.start_depth if trace.token_depths else None,
    )


def print_embedding(fam, session: OnlineSession, out) -> EmbeddingReport:
    """Embed the sentence and write the first dimensions of the embedding to `out`."""
    with session.phases.timed("online"):
        embedding = fam.run_session(session.ctx, session.driver, session.plan, prompt_ids=session.prompt_ids)
    shown = " ".join(f"{v:+.4f}" for v in embedding[:8])
    out.write(f"embedding ({len(embedding)} dims, L2-normalised): {shown} ...\n")
    out.flush()
    channel = session.ctx.channel
    return EmbeddingReport(
        embedding=[float(v) for v in embedding],
        online_s=session.phases.seconds["online"],
        online_bytes=channel.stats.bytes_sent + channel.stats.bytes_received - session.start_bytes,
        online_flights=channel.clock.depth - session.start_depth,
    )
