"""Progress bars on stderr: one helper for the roles, the in-process sessions and the harnesses.

A bar counts work (tokens, layers, weights, protocol calls, prompts) towards its total where the total
is known; with total=None it counts without a total, and with unit=None it only shows the elapsed time
(for waits whose progress this process cannot see, such as a session run by other processes)."""

from __future__ import annotations

import sys

from tqdm import tqdm

ELAPSED_ONLY = "{desc} [{elapsed}]"


def progress_bar(total: int | None, desc: str, *, unit: str | None = "it", enabled: bool = True) -> tqdm:
    """A transient bar (it disappears when closed). Call .update(n) per unit done; an elapsed-only bar
    (unit=None) wants .refresh() now and then instead."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit or "it",
        bar_format=ELAPSED_ONLY if unit is None else None,
        disable=not enabled,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )
