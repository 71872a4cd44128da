"""Run one of the bench's `permllm` commands without the `permllm` front end (`python -m ...`)."""

from __future__ import annotations

import argparse
import sys

from permllm.errors import PermLLMError


def run_standalone(command, prog: str, argv=None) -> int:
    """Parse `argv` with `command.add_arguments` and run it; a PermLLMError exits 2 with its message."""
    parser = argparse.ArgumentParser(prog=prog, description=command.description, allow_abbrev=False)
    command.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return command.run(args)
    except PermLLMError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
