"""``manage.py asyncmodels_status``: what is queued, what is stuck, what failed lately.

A health check too: it exits with status 1 when something needs a human (``asyncmodels.status``).
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from asyncmodels.management.arguments import (
    add_database_option,
    duration,
    fraction,
    positive_duration,
)
from asyncmodels.status import DEFAULT_WINDOW, Thresholds, format_status, read_status

DEFAULTS = Thresholds()


class Command(BaseCommand):
    help = (
        "Show calls per queue and state, the oldest pending and enqueued call, the longest running one, "
        "expired leases and the recent failure rate. Exits with status 1 when calls are stuck (a health "
        "check). Durations: 90s, 15m, 12h, 7d, 1h30m."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print the report as JSON (README: shape).")
        add_database_option(parser)
        parser.add_argument(
            "--since",
            metavar="AGE",
            type=positive_duration,
            default=DEFAULT_WINDOW,
            help="Count finished calls created this long ago or since, and their failure rate (default 1h).",
        )
        parser.add_argument(
            "--pending-after",
            metavar="AGE",
            type=duration,
            default=DEFAULTS.pending,
            help="A pending call (not pushed) older than this is stuck (default 5m).",
        )
        parser.add_argument(
            "--enqueued-after",
            metavar="AGE",
            type=duration,
            default=DEFAULTS.enqueued,
            help="An enqueued call not claimed by a worker for this long is stuck (default 30m).",
        )
        parser.add_argument(
            "--lease-grace",
            metavar="AGE",
            type=duration,
            default=DEFAULTS.lease_grace,
            help="A running call whose lease expired longer ago than this is stuck (default 1m; 0: any).",
        )
        parser.add_argument(
            "--overdue-after",
            metavar="AGE",
            type=duration,
            default=DEFAULTS.overdue,
            help="A scheduled call due longer ago than this is stuck (default 5m).",
        )
        parser.add_argument(
            "--max-failure-rate",
            type=fraction,
            metavar="FRACTION",
            default=None,
            help="Also exit with status 1 when more than this fraction (0 to 1) of the calls finished "
            "in the window failed (default: never).",
        )

    def handle(
        self,
        *args: Any,
        json: bool,
        database: str,
        since: datetime.timedelta,
        pending_after: datetime.timedelta,
        enqueued_after: datetime.timedelta,
        lease_grace: datetime.timedelta,
        overdue_after: datetime.timedelta,
        max_failure_rate: float | None,
        **options: Any,
    ) -> None:
        thresholds = Thresholds(pending_after, enqueued_after, lease_grace, overdue_after, max_failure_rate)
        try:
            status = read_status(database, window=since, thresholds=thresholds)
        except DatabaseError as exc:
            raise CommandError(f"Could not read the calls on database {database!r}: {exc}") from exc
        if json:
            self.stdout.write(_dumps(status.as_json()))
        else:
            self.stdout.write(format_status(status))
        if not status.healthy:
            raise CommandError(
                f"{len(status.problems)} problem(s) need a human: " + "; ".join(status.problems)
            )


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2)
