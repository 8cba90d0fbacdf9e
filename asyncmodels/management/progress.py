"""Progress bars for long-running commands (prune, retry of many): tqdm's, on a terminal only.

A bar is drawn on standard error when both standard output and standard error are terminals; in
CI, cron or a pipe nothing is drawn and the command prints only its summary.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm


def progress_enabled(stdout: Any) -> bool:
    """Whether a bar would be drawn for a command writing to ``stdout`` (a stream, or Django's
    ``OutputWrapper``): both it and ``sys.stderr`` are terminals."""
    return bool(getattr(stdout, "isatty", lambda: False)()) and sys.stderr.isatty()


@contextmanager
def progress_bar(
    stdout: Any, *, total: int | None, unit: str, desc: str
) -> Iterator[Callable[[int], object]]:
    """Yield ``advance(n)``, which moves a bar on ``sys.stderr`` by ``n`` ``unit``; a no-op when
    ``progress_enabled(stdout)`` is false. ``total``: the expected count, if known."""
    if not progress_enabled(stdout):
        yield lambda n: None
        return
    with tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar.update
