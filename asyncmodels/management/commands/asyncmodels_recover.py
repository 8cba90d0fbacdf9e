"""``manage.py asyncmodels_recover``: one recovery pass, or ``--loop`` for a recovery process.

Workers of class ``asyncmodels.worker.Worker`` already run recovery by themselves; this command
is for a deployment that cannot use that class, for cron, and for an operator at 3 a.m.
"""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from asyncmodels.recovery import RecoveryReport, recover_stranded_calls, recovery_databases


def positive_seconds(text: str) -> float:
    """argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return value


class RecoveryLoop:
    """Run passes every ``interval`` seconds until ``stop()`` (SIGTERM/SIGINT) is requested."""

    def __init__(self, command: Command, databases: list[str], interval: float, verbosity: int) -> None:
        self.command = command
        self.verbosity = verbosity
        self.databases = databases
        self.interval = interval
        self._stopped = threading.Event()

    def stop(self, signum: int, frame: FrameType | None) -> None:
        self.command.stdout.write("Stopping after this pass.")
        self._stopped.set()

    def run(self) -> RecoveryReport:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        total = RecoveryReport()
        while not self._stopped.is_set():
            report = recover_stranded_calls(self.databases)
            total += report
            if report.total or report.errors or self.verbosity >= 2:
                self.command.stdout.write(f"Recovery pass: {report}.")
            connections.close_all()
            self._stopped.wait(self.interval)
        return total


class Command(BaseCommand):
    help = "Push lost and due calls, and end or retry calls whose worker was lost (one pass, or --loop)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--loop", action="store_true", help="Run passes until SIGTERM/SIGINT.")
        parser.add_argument(
            "--interval",
            type=positive_seconds,
            default=10.0,
            help="Seconds between passes with --loop (default 10).",
        )
        parser.add_argument(
            "--database",
            action="append",
            dest="databases",
            help="Database alias to recover (repeatable; default: every alias holding asyncmodels' table).",
        )

    def handle(
        self, *args: Any, loop: bool, interval: float, databases: list[str] | None, **options: Any
    ) -> None:
        known = recovery_databases()
        unknown = sorted(set(databases or ()) - set(known))
        if unknown:
            raise CommandError(
                f"Unknown database alias(es): {', '.join(unknown)}. Known: {', '.join(known)}."
            )
        selected = databases or known
        if loop:
            total = RecoveryLoop(self, selected, interval, int(options["verbosity"])).run()
            self.stdout.write(f"Recovery stopped. In all: {total}.")
        else:
            total = recover_stranded_calls(selected)
            self.stdout.write(f"Recovery pass: {total}.")
        if total.errors:
            raise CommandError(f"{total.errors} recovery step(s) failed; see the log.")
