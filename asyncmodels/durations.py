"""Durations as people type them (``90s``, ``15m``, ``12h``, ``7d``, ``2w``, ``1h30m``), both ways.

The commands read them (``--since 1h``, ``--succeeded 7d``) and their reports print them.
"""

from __future__ import annotations

import datetime
import math
import re

#: Units of a duration, in seconds: seconds, minutes, hours, days, weeks.
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> datetime.timedelta:
    """Read ``text`` as a duration: numbers with units (``7d``, ``1h30m``), or a bare number of
    seconds. Returns a ``timedelta`` of zero or more. Raises ``ValueError`` for anything else
    (a negative, infinite or too long duration, an unknown unit, empty text)."""
    cleaned = text.strip().lower()
    try:
        seconds = float(cleaned)
    except ValueError:
        if not cleaned or _PART.sub("", cleaned):
            raise ValueError(
                f"{text!r} is not a duration: use a number and a unit (s, m, h, d, w), e.g. 30m, 7d, 1h30m"
            ) from None
        seconds = sum(float(number) * UNITS[unit] for number, unit in _PART.findall(cleaned))
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{text!r} is not a duration of zero or more seconds")
    try:
        return datetime.timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"{text!r} is too long a duration") from None


def format_duration(value: datetime.timedelta) -> str:
    """``value`` as short text that ``parse_duration`` reads back: ``1h30m``, ``7d``, ``45s``,
    ``0.5s``, ``0s``; whole seconds below a minute, days as the largest unit."""
    seconds = max(value.total_seconds(), 0.0)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        whole = int(seconds // size)
        if whole:
            parts.append(f"{whole}{unit}")
            seconds -= whole * size
    if seconds >= 1 or not parts:
        parts.append(f"{seconds:.0f}s" if seconds >= 1 or not seconds else f"{seconds:.1f}s")
    return "".join(parts)
