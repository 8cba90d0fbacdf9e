"""Retry policy: how many further attempts a failed call gets, and how long it waits between them.

``retries=N`` means up to N further attempts after the first, N + 1 in all (README, Retries).
The wait before attempt n + 1 is exponential in n, capped, with "equal jitter": half of it is
fixed, half random, so that calls failing together (a dependency went down) do not all come back
in the same second, yet none comes back much sooner than planned.
"""

from __future__ import annotations

import datetime
import math
import random
from dataclasses import dataclass
from typing import Any

from .exceptions import InvalidOptionError

#: The longest timeout or backoff accepted: RQ's timer and every database's interval arithmetic
#: handle it, and nothing sensible waits longer between two attempts.
MAX_DURATION = datetime.timedelta(days=365)


def as_timedelta(value: Any, *, name: str, allow_none: bool = False) -> datetime.timedelta | None:
    """Return ``value`` (a ``timedelta``, or seconds as ``int``/``float``) as a positive ``timedelta``.

    Raises ``InvalidOptionError`` naming ``name`` for anything else, zero or a negative duration.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, datetime.timedelta):
        duration = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        if not 0 < value <= MAX_DURATION.total_seconds():
            raise InvalidOptionError(
                f"{name} must be more than 0 and at most {MAX_DURATION.days} days, not {value!r}."
            )
        duration = datetime.timedelta(seconds=value)
    else:
        raise InvalidOptionError(f"{name} must be a timedelta or a finite number of seconds, not {value!r}.")
    if not datetime.timedelta(0) < duration <= MAX_DURATION:
        raise InvalidOptionError(
            f"{name} must be more than 0 and at most {MAX_DURATION.days} days, not {value!r}."
        )
    return duration


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` further attempts; waits grow from ``backoff`` by doubling, capped at ``backoff_max``."""

    retries: int = 0
    backoff: datetime.timedelta = datetime.timedelta(seconds=10)
    backoff_max: datetime.timedelta = datetime.timedelta(hours=1)

    def allows_another_attempt(self, attempts: int) -> bool:
        """Whether a call that has started ``attempts`` attempts may start another."""
        return attempts <= self.retries

    def delay_after(self, attempt: int, rng: random.Random | None = None) -> datetime.timedelta:
        """The wait after attempt number ``attempt`` (1-based) failed: in [cap / 2, cap].

        ``cap`` is ``backoff * 2 ** (attempt - 1)``, never more than ``backoff_max``.
        """
        doublings = min(max(attempt - 1, 0), 62)  # past 2**62 every cap is backoff_max anyway
        cap = min(self.backoff_max.total_seconds(), self.backoff.total_seconds() * 2**doublings)
        jitter = (rng or random).random()
        return datetime.timedelta(seconds=cap / 2 + cap / 2 * jitter)
