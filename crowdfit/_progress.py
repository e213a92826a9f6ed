"""A progress bar for long host loops: tqdm when it is installed, a plain text line otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable


def progress(items: Iterable, *, total: int, desc: str, enabled: bool | None = None):
    """Iterate over `items`, showing progress on stderr when `enabled` (None: only if `total > 1`
    and stderr is a terminal or tqdm is installed)."""
    if enabled is None:
        enabled = total > 1 and sys.stderr.isatty()
    if not enabled:
        yield from items
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, total=total, desc=desc, leave=False)
        return
    start = time.perf_counter()
    for i, item in enumerate(items):
        yield item
        elapsed = time.perf_counter() - start
        print(f"\r{desc}: {i + 1}/{total} ({elapsed:.1f} s)", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
