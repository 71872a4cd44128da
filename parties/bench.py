"""`permllm bench`: token-latency benchmarks under simulated networks (being written)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="the reduced scenario set (under 10 minutes)")
    parser.add_argument("--json", dest="json_path", default=None, help="write every figure as JSON here")
    parser.add_argument("--plot", default=None, help="write a PNG of decode s/token against RTT here")


def run_bench(args) -> int:
    raise SystemExit("permllm bench: not implemented yet")
