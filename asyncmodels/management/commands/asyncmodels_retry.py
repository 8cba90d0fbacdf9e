"""``manage.py asyncmodels_retry``: retry failed (or cancelled) calls selected from the shell.

The work is ``asyncmodels.bulk_retry``: each call through ``MethodCall.retry()``, as the admin's
retry action does, pushed to RQ when its update commits.
"""

from __future__ import annotations

import datetime
import getpass
import socket
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from asyncmodels.bulk_retry import DEFAULT_LIMIT, CallSelection, retry_calls, select_calls
from asyncmodels.exceptions import SelectionTooLargeError
from asyncmodels.management.arguments import add_database_option, moment, positive_int
from asyncmodels.management.progress import progress_bar
from asyncmodels.models import CallState, MethodCall

#: Calls listed one per line in a report; more are counted.
LISTED = 50


class Command(BaseCommand):
    help = (
        "Retry failed calls selected by method, model, object, tag, error text or time (all given "
        "criteria must hold; a repeated option matches any of its values, but --tag all of them). "
        "Cancelled calls only with --state cancelled. --dry-run lists what would be retried. "
        "Times: 2026-12-01T08:00, or 30m, 7d ago."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--state",
            action="append",
            dest="states",
            choices=[CallState.FAILED.value, CallState.CANCELLED.value],
            help="Retry calls in this state (repeatable; default: failed only).",
        )
        parser.add_argument(
            "--method",
            action="append",
            dest="methods",
            default=[],
            metavar="NAME",
            help="Calls of this method, by registry name: app_label.Model.method (repeatable).",
        )
        parser.add_argument(
            "--model",
            action="append",
            dest="models",
            default=[],
            metavar="LABEL",
            help="Calls on objects of this model, app_label.Model (repeatable).",
        )
        parser.add_argument(
            "--object",
            action="append",
            dest="objects",
            default=[],
            metavar="OBJECT",
            help="Calls on (or tagged with) the object app_label.Model:pk, e.g. cloud.Account:121 "
            "(repeatable).",
        )
        parser.add_argument(
            "--tag",
            action="append",
            dest="tags",
            default=[],
            metavar="TAG",
            help="Calls carrying this tag, e.g. region:eu (repeatable: all of them).",
        )
        parser.add_argument(
            "--error", default="", metavar="TEXT", help="Text in the error message or type (any case)."
        )
        parser.add_argument(
            "--since",
            type=moment,
            metavar="WHEN",
            help="Calls that finished at or after this time (or this long ago).",
        )
        parser.add_argument(
            "--until",
            type=moment,
            metavar="WHEN",
            help="Calls that finished before this time (or this long ago).",
        )
        parser.add_argument(
            "--all", action="store_true", help="Allow retrying every failed call (no other criterion)."
        )
        parser.add_argument(
            "--limit",
            type=positive_int,
            metavar="N",
            default=DEFAULT_LIMIT,
            help=f"Refuse, changing nothing, if more calls match (default {DEFAULT_LIMIT}).",
        )
        parser.add_argument("--reason", default="", metavar="TEXT", help="Kept in each call's state_reason.")
        parser.add_argument(
            "--dry-run", action="store_true", help="List the calls it would retry; change nothing."
        )
        add_database_option(parser)

    def handle(
        self,
        *args: Any,
        states: list[str] | None,
        methods: list[str],
        models: list[str],
        objects: list[str],
        tags: list[str],
        error: str,
        since: datetime.datetime | datetime.timedelta | None,
        until: datetime.datetime | datetime.timedelta | None,
        all: bool,
        limit: int,
        reason: str,
        dry_run: bool,
        database: str,
        **options: Any,
    ) -> None:
        selection = CallSelection(
            states=tuple(dict.fromkeys(states or [CallState.FAILED.value])),
            methods=tuple(methods),
            models=tuple(models),
            objects=tuple(objects),
            tags=tuple(tags),
            error=error,
            finished_after=since,
            finished_before=until,
        )
        if not selection.is_narrowed and not all:
            raise CommandError(
                "No selection given: name a --method, --model, --object, --tag, --error, --since or --until, "
                "or pass --all to retry every selected-state call."
            )
        try:
            calls = select_calls(selection, database=database, limit=limit)
        except SelectionTooLargeError as exc:
            raise CommandError(f"{exc} (--limit {limit})") from exc
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        except DatabaseError as exc:
            raise CommandError(f"Could not read the calls on database {database!r}: {exc}") from exc
        if not calls:
            self.stdout.write("No call matches; nothing to retry.")
            return
        if dry_run:
            self.stdout.write(f"Would retry {len(calls)} call(s) (dry run: nothing changed):")
            self._list(calls)
            return
        who = f"{getpass.getuser()}@{socket.gethostname()}"
        with progress_bar(self.stdout, total=len(calls), unit="call", desc="retrying") as advance:
            try:
                report = retry_calls(
                    calls, reason=reason or f"Retried by asyncmodels_retry ({who}).", progress=advance
                )
            except DatabaseError as exc:
                raise CommandError(f"Retrying on database {database!r} failed part-way: {exc}") from exc
        self.stdout.write(f"Retried {len(report.retried)} call(s); pushed to RQ on commit.")
        self._list(report.retried)
        if report.skipped:
            self.stdout.write(f"Left alone {len(report.skipped)} call(s) that moved on meanwhile:")
            self._list(report.skipped)
        if report.refused:
            for call, why in report.refused:
                self.stderr.write(f"#{call.pk} refused: {why}")
            raise CommandError(f"{len(report.refused)} call(s) could not be retried (see above).")

    def _list(self, calls: list[MethodCall]) -> None:
        for call in calls[:LISTED]:
            finished = f"{call.finished_at:%Y-%m-%d %H:%M:%S}" if call.finished_at else "-"
            first_line = (call.error or "").strip().splitlines()[:1]
            error = first_line[0][:100] if first_line else ""
            target = f"{call.object_id}" if call.object_id else "task"
            self.stdout.write(
                f"  #{call.pk} {call.state} {call.method}({target}) queue={call.queue} "
                f"attempts={call.attempts} finished={finished} {error}".rstrip()
            )
        if len(calls) > LISTED:
            self.stdout.write(f"  ... and {len(calls) - LISTED} more")
