"""argparse types shared by asyncmodels' management commands: durations, moments, counts, aliases.

Each raises ``argparse.ArgumentTypeError`` with a message naming the bad text, so a command given
bad input stops before it reads or changes anything (argparse exits with status 2).
"""

from __future__ import annotations

import argparse
import datetime

from django.conf import settings
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from asyncmodels.durations import parse_duration


def duration(text: str) -> datetime.timedelta:
    """argparse type: a duration such as ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` or ``1h30m``; a
    bare number is seconds (``asyncmodels.durations.parse_duration``). Returns a ``timedelta``."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_duration(text: str) -> datetime.timedelta:
    """argparse type: a ``duration`` longer than zero."""
    value = duration(text)
    if not value:
        raise argparse.ArgumentTypeError(f"{text!r} must be longer than 0 seconds")
    return value


def moment(text: str) -> datetime.datetime | datetime.timedelta:
    """argparse type: a point in time, either an ISO 8601 date or date and time (``2026-12-01``,
    ``2026-12-01T08:00``; without an offset, in ``settings.TIME_ZONE``) returned as an aware
    ``datetime``, or a ``duration`` meaning that long ago, returned as a ``timedelta`` (the
    library subtracts it from the database's clock)."""
    parsed: datetime.datetime | None
    try:
        parsed = parse_datetime(text.strip())
        if parsed is None:
            day = parse_date(text.strip())
            parsed = datetime.datetime.combine(day, datetime.time()) if day is not None else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid date or time") from None
    if parsed is None:
        try:
            return duration(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither a date/time (2026-12-01T08:00) nor a duration ago (30m, 7d)"
            ) from None
    if settings.USE_TZ and timezone.is_naive(parsed):
        parsed = timezone.make_aware(parsed, timezone.get_default_timezone())
    return parsed


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def fraction(text: str) -> float:
    """argparse type: a number from 0 to 1 (``0.05`` is 5 %)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be from 0 to 1 (0.05 is 5 %)")
    return value


def database_alias(text: str) -> str:
    """argparse type: a key of ``settings.DATABASES``."""
    if text not in settings.DATABASES:
        raise argparse.ArgumentTypeError(
            f"unknown database alias {text!r}; known: {', '.join(sorted(settings.DATABASES))}"
        )
    return text


def add_database_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--database ALIAS`` (default ``"default"``, checked by ``database_alias``) to ``parser``."""
    parser.add_argument(
        "--database",
        type=database_alias,
        default="default",
        metavar="ALIAS",
        help="Database alias (default: default).",
    )
