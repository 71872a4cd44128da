"""Harnesses on top of the engine: the token-latency scenarios behind ``permllm bench`` and the
fidelity evaluation (``python -m permllm_bench.fidelity``). Nothing in permllm/, protocols/,
netsim/ or parties/ imports this package."""
