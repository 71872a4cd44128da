"""The roles' progress bars (on stderr, off with --quiet)."""

from __future__ import annotations

import sys


def progress_bar(total, desc: str, enabled: bool, unit: str = "it"):
    """A tqdm bar on stderr; a disabled one still accepts update() and close()."""
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True
    )
