"""``manage.py asyncmodels_prune``: delete finished calls older than a retention period, per state.

The work is ``asyncmodels.retention.prune_finished_calls``: bounded batches, each its own short
transaction, by primary key; unfinished calls and calls an unfinished call depends on are kept.
"""

from __future__ import annotations

import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from asyncmodels import conf
from asyncmodels.durations import format_duration
from asyncmodels.exceptions import ConfigurationError
from asyncmodels.management.arguments import add_database_option, duration, positive_int
from asyncmodels.management.progress import progress_bar, progress_enabled
from asyncmodels.retention import DEFAULT_BATCH_SIZE, PRUNABLE_ORDER, count_prunable, prune_finished_calls


class Command(BaseCommand):
    help = (
        "Delete finished calls older than a retention period, per state (--succeeded 7d --failed 30d), "
        "in bounded batches. Without a state option, ASYNCMODELS['RETENTION_SECONDS'] is used. Unfinished "
        "calls, and finished calls an unfinished call depends on, are never deleted."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        for state in PRUNABLE_ORDER:
            parser.add_argument(
                f"--{state}",
                type=duration,
                metavar="AGE",
                help=f"Delete {state} calls that finished longer ago than AGE (e.g. 7d, 12h).",
            )
        parser.add_argument(
            "--dry-run", action="store_true", help="Count what would be deleted, per state; delete nothing."
        )
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            metavar="N",
            default=DEFAULT_BATCH_SIZE,
            help=f"Calls deleted per transaction (default {DEFAULT_BATCH_SIZE}).",
        )
        add_database_option(parser)

    def handle(self, *args: Any, dry_run: bool, batch_size: int, database: str, **options: Any) -> None:
        retention: dict[str, datetime.timedelta] = {
            state: options[state] for state in PRUNABLE_ORDER if options.get(state) is not None
        }
        if not retention:
            try:
                retention = conf.get_retention()
            except ConfigurationError as exc:
                raise CommandError(str(exc)) from exc
            if not retention:
                raise CommandError(
                    "Nothing to prune by: give a retention per state (--succeeded 7d --failed 30d "
                    "--cancelled 30d), or set ASYNCMODELS['RETENTION_SECONDS']."
                )
        periods = ", ".join(f"{state} older than {format_duration(age)}" for state, age in retention.items())
        try:
            if dry_run:
                report = count_prunable(retention, database=database)
            else:
                total = None
                if progress_enabled(self.stdout):
                    total = count_prunable(retention, database=database).total
                with progress_bar(self.stdout, total=total, unit="call", desc="pruning") as advance:
                    report = prune_finished_calls(
                        retention, database=database, batch_size=batch_size, progress=advance
                    )
        except DatabaseError as exc:
            raise CommandError(
                f"Pruning on database {database!r} failed (batches before it stay done): {exc}"
            ) from exc
        self.stdout.write(f"Prune on {database!r} ({periods}): {report}.")
