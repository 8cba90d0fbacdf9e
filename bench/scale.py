"""Benchmark: asyncmodels over a million calls on PostgreSQL (issue 6): recovery, plans, memory.

    .venv/bin/python bench/scale.py [--rows 1000000] [--stranded 100] [--rounds 7]
                                    [--calls 10000] [--warm-calls 100] [--redis-db 7]
                                    [--parts plans,recovery,memory] [--keep] [--quick]

Runs in a PostgreSQL database of its own (``asyncmodels_bench_scale`` on 127.0.0.1, or
``$ASYNCMODELS_BENCH_DB``, and its ``_other`` twin that the settings also open; created with a
marker comment, dropped at the end unless ``--keep``; a database of that name that this script
did not make is refused, never touched) and on the Redis at 127.0.0.1:6379, database
``--redis-db`` (flushed before, between rounds and after). The calls table is seeded with
``--rows`` finished calls (``bench/seeding.py``, the seeding of ``bench/admin_list.py``). Three
parts, each printed against issue 6's target:

1. Recovery: "one recovery pass over a million finished calls with a hundred stranded ones, under
   100 ms". Each of ``--rounds`` rounds adds ``--stranded`` stranded calls, a fifth of each kind a
   pass moves on (pending past the push grace; enqueued with no RQ job; running with an expired
   lease; scheduled and due; waiting for a call that succeeded), times one pass over the default
   database (``recover_stranded_calls(["default"])``, the pushes to Redis included), checks that
   it moved every one of them (the report's total, each row's new state, each pushed call's job
   in the queue), then times an idle pass (nothing to move), and removes them. The baseline is
   the very same pass, with the same stranded mix, over the ``other`` database, whose calls table
   holds nothing else: the ratio "pass over the million / pass over the stranded alone" is what
   the million finished calls cost a pass (1.0x: nothing; a scan would show as 100x and more).
   The table shows medians of the rounds.
2. Plans: "indexes that match every filter the recovery and the admin use, and nothing on the hot
   path that scans". Every statement on the calls table that a recovery pass (moving and idle),
   a call (``echo.noop()`` and its push on commit), the job (claim, run, finish) and the admin's
   call list (unfiltered, each filter, both searches) sends is captured, one of each shape is
   EXPLAINed on the seeded table (``EXPLAIN ANALYZE`` for reads, plain ``EXPLAIN`` for writes),
   and flagged if it has a sequential scan of the calls table, a sort of more than 1,000 rows or
   a scan node that read and threw away more than 10,000 rows.
3. Memory: "a worker's resident memory after 10,000 calls against after 100, within 10 %". Three
   real ``manage.py rqworker`` processes (not ``--burst``), run at once, each on a queue of its
   own: ``asyncmodels.worker.SimpleWorker`` (the calls run in it) on ``default``,
   ``asyncmodels.worker.LeanSimpleWorker`` (likewise) on ``provisioning``, and the forking
   ``asyncmodels.worker.Worker`` (each call runs in a work horse, a fresh fork that exits after
   it: the parent's memory is measured) on ``urgent``. Each is given ``--warm-calls``
   ``Echo.noop()`` calls, then as many more as make ``--calls`` in all; its VmRSS
   (/proc/<pid>/status) is read once each batch has run. The workers run with the demo's settings
   (``DEBUG`` on, as a developer's would), between them recovery passes every 10 s.

The admin page times against their 300 ms target are ``bench/admin_list.py``'s (``make
bench-admin``). Absolute times drift on a shared machine; the ratios are the figures to quote.
``--quick`` is a smoke test (< 60 s): 20,000 rows, 10 stranded, 3 rounds, 30 then 300 calls.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATABASE = os.environ.get("ASYNCMODELS_BENCH_DB", "asyncmodels_bench_scale")
#: Written on the databases this script creates; it never seeds, nor drops, one without it.
MARKER = "made by asyncmodels bench/scale.py"
#: The settings' second alias opens the "_other" database: the recovery baseline's.
DATABASES = (DATABASE, DATABASE + "_other")
RECOVERY_TARGET_MS = 100.0
MEMORY_TARGET_RATIO = 1.10
QUEUE = "default"


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="finished calls to seed (1000000)")
    parser.add_argument("--stranded", type=int, default=100, help="stranded calls per pass, 5 kinds (100)")
    parser.add_argument("--rounds", type=int, default=7, help="recovery rounds; medians shown (7)")
    parser.add_argument("--calls", type=int, default=10_000, help="calls a worker runs in all (10000)")
    parser.add_argument("--warm-calls", type=int, default=100, help="calls before the first reading (100)")
    parser.add_argument("--redis-db", type=int, default=7, help="Redis database number, flushed (7)")
    parser.add_argument(
        "--parts",
        default="plans,recovery,memory",
        help="which parts to run, comma-separated (plans,recovery,memory)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the benchmark databases afterwards")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test (< 60 s): --rows 20000 --stranded 10 --rounds 3 --calls 300 --warm-calls 30",
    )
    args = parser.parse_args()
    if args.quick:
        args.rows, args.stranded, args.rounds, args.calls, args.warm_calls = 20_000, 10, 3, 300, 30
    args.stranded = max(args.stranded // len(KINDS), 1) * len(KINDS)  # as many of each kind
    return args


#: The kinds of stranded call a pass moves on, and the state each must be in after it.
KINDS = {
    "pending": "enqueued",
    "enqueued": "enqueued",  # re-pushed: its job is back in the queue
    "running": "failed",  # Echo.noop does not retry: a lost attempt fails the call
    "scheduled": "enqueued",
    "waiting": "enqueued",
}
ARGS = _parse_args()
os.environ.update(
    DJANGO_SETTINGS_MODULE="testproject.settings",
    ASYNCMODELS_DB="postgres",
    ASYNCMODELS_PG_NAME=DATABASE,
    ASYNCMODELS_REDIS_URL=f"redis://127.0.0.1:6379/{ARGS.redis_db}",
    # Recovery logs a warning per re-pushed or lost call: kept out of the output (and the workers').
    ASYNCMODELS_LOG_LEVEL="ERROR",
)

import django  # noqa: E402

django.setup()

from django.contrib.contenttypes.models import ContentType  # noqa: E402
from django.db import connections, transaction  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402
from django.utils import timezone  # noqa: E402
from tabulate import tabulate  # noqa: E402

from asyncmodels.dispatch import get_queue  # noqa: E402
from asyncmodels.job import run_method_call  # noqa: E402
from asyncmodels.models import CallState, MethodCall, MethodCallDependency  # noqa: E402
from asyncmodels.recovery import RecoveryReport, recover_stranded_calls  # noqa: E402
from bench.databases import create_databases, drop_databases  # noqa: E402
from bench.seeding import seed_calls  # noqa: E402
from testproject.cloud.models import Echo, Instance  # noqa: E402

# --- recovery --------------------------------------------------------------------------------


class Stranded:
    """Stranded calls on one database: made before a pass, checked and removed after it."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.content_type = ContentType.objects.db_manager(database).get_for_model(Echo)
        # What the waiting calls wait for: a call that succeeded (kept for every round).
        self.dependency = self._row("succeeded", finished_at=timezone.now())
        self.dependency.save(using=database)
        self.kinds: dict[int, str] = {}

    def _row(self, state: str, **fields: Any) -> MethodCall:
        return MethodCall(
            content_type=self.content_type,
            object_id="1",
            method="cloud.Echo.noop",
            queue=QUEUE,
            state=state,
            args=[],
            kwargs={},
            policy={"retries": 0},
            **fields,
        )

    def make(self, count: int) -> None:
        """Write ``count`` stranded calls, as many of each kind (one INSERT, one for the links)."""
        now = timezone.now()
        past = now - timedelta(hours=1)
        fields: dict[str, dict[str, Any]] = {
            "pending": {"created_at": past},
            "enqueued": {"created_at": past, "enqueued_at": past},
            "running": {
                "created_at": past,
                "enqueued_at": past,
                "started_at": past,
                "attempts": 1,
                "worker": "bench-lost-worker",
                "lease_expires_at": now - timedelta(minutes=1),
            },
            "scheduled": {"created_at": past, "run_after": now - timedelta(minutes=1)},
            "waiting": {"created_at": past},
        }
        kinds = [list(KINDS)[i % len(KINDS)] for i in range(count)]
        rows = [self._row(kind, **fields[kind]) for kind in kinds]
        rows = MethodCall.objects.using(self.database).bulk_create(rows)
        self.kinds = {row.pk: row.state for row in rows}
        MethodCallDependency.objects.using(self.database).bulk_create(
            MethodCallDependency(call=row, depends_on=self.dependency)
            for row in rows
            if row.state == "waiting"
        )

    def check(self, report: RecoveryReport) -> None:
        """Exit unless the pass moved every stranded call, and only those, as recovery should."""
        problems = []
        if report.total != len(self.kinds) or report.errors:
            problems.append(f"the pass reported {report}, not {len(self.kinds)} calls moved")
        job_ids = set(get_queue(QUEUE).get_job_ids())
        rows = MethodCall.objects.using(self.database).filter(pk__in=self.kinds)
        for call in rows:
            kind, expected = self.kinds[call.pk], KINDS[self.kinds[call.pk]]
            if call.state != expected:
                problems.append(f"{kind} call {call.pk} is {call.state}, not {expected}")
            elif expected == "enqueued" and call.job_id not in job_ids:
                problems.append(f"{kind} call {call.pk} is enqueued but job {call.job_id} is not queued")
        if problems:
            raise SystemExit(f"recovery on {self.database!r}: " + "; ".join(problems[:10]))

    def remove(self) -> None:
        MethodCall.objects.using(self.database).filter(pk__in=self.kinds).delete()
        self.kinds = {}


def _timed_pass(database: str) -> tuple[float, RecoveryReport]:
    started = time.perf_counter()
    report = recover_stranded_calls([database])
    return (time.perf_counter() - started) * 1000, report


@dataclass
class PassTimes:
    moving: list[float] = field(default_factory=list)
    idle: list[float] = field(default_factory=list)


def measure_recovery(redis_flush: Callable[[], None]) -> dict[str, PassTimes]:
    """Time ``ARGS.rounds`` rounds of passes over both databases; alternate which goes first."""
    stranded = {database: Stranded(database) for database in ("default", "other")}
    times = {database: PassTimes() for database in stranded}
    for database in stranded:  # warm-up: connections, content types, imports; not measured
        recover_stranded_calls([database])
    for round_number in range(ARGS.rounds):
        order = ["default", "other"] if round_number % 2 == 0 else ["other", "default"]
        for database in order:
            redis_flush()
            stranded[database].make(ARGS.stranded)
            moving_ms, report = _timed_pass(database)
            stranded[database].check(report)
            idle_ms, idle_report = _timed_pass(database)
            if idle_report.total or idle_report.errors:
                raise SystemExit(f"the idle pass on {database!r} did something: {idle_report}")
            stranded[database].remove()
            times[database].moving.append(moving_ms)
            times[database].idle.append(idle_ms)
    for each in stranded.values():
        each.dependency.delete()
    redis_flush()
    return times


# --- plans -----------------------------------------------------------------------------------


@dataclass
class Statement:
    sources: list[str]
    sql: str
    count: int = 1


def _shape(sql: str) -> str:
    """The statement with its literal values blanked, so one EXPLAIN stands for its repeats."""
    sql = re.sub(r"'(?:[^']|'')*'", "?", sql)
    sql = re.sub(r"\b\d+(?:\.\d+)?\b", "?", sql)
    return re.sub(r"\(\?(?:, \?)*\)", "(?...)", sql)


class Audit:
    """The statements on the calls table sent while ``capture()`` is open, one of each shape."""

    def __init__(self) -> None:
        self.statements: dict[str, Statement] = {}

    @contextmanager
    def capture(self, source: str) -> Iterator[None]:
        with CaptureQueriesContext(connections["default"]) as captured:
            yield
        for query in captured.captured_queries:
            sql = query["sql"]
            if "asyncmodels_methodcall" not in sql or not sql.lstrip().startswith(
                ("SELECT", "UPDATE", "DELETE", "INSERT", "WITH")
            ):
                continue
            shape = _shape(sql)
            if shape in self.statements:
                self.statements[shape].count += 1
                if source not in self.statements[shape].sources:
                    self.statements[shape].sources.append(source)
            else:
                self.statements[shape] = Statement([source], sql)

    def explain(self) -> list[list[str]]:
        """One row per statement: where from, what, the plan's scans, and a verdict."""
        rows = []
        with connections["default"].cursor() as cursor:
            for statement in self.statements.values():
                reads = (
                    statement.sql.lstrip().startswith(("SELECT", "WITH"))
                    and "FOR UPDATE" not in statement.sql
                )
                options = "(ANALYZE, FORMAT JSON)" if reads else "(FORMAT JSON)"
                cursor.execute(f"EXPLAIN {options} {statement.sql}")
                (found,) = cursor.fetchone() or ("[{}]",)
                plan: list[dict[str, Any]] = json.loads(found) if isinstance(found, str) else found
                scans, problems = _judge(plan[0]["Plan"])
                rows.append(
                    [
                        ", ".join(statement.sources),
                        _summary(statement.sql) + (f"  (x{statement.count})" if statement.count > 1 else ""),
                        " / ".join(scans) or "-",
                        "; ".join(problems) or "ok",
                    ]
                )
        return rows


def _judge(node: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The scans of a plan (``Index Scan asyncmodels_call_due``) and what is wrong with it."""
    scans: list[str] = []
    problems: list[str] = []
    kind = str(node.get("Node Type", ""))
    relation = node.get("Relation Name")
    rows = node.get("Actual Rows", node.get("Plan Rows", 0))
    if "Scan" in kind and relation:
        scans.append(f"{kind} {node.get('Index Name', relation)}")
        if kind == "Seq Scan" and relation == "asyncmodels_methodcall":
            problems.append(f"Seq Scan of the calls table ({rows} rows)")
    elif "Scan" in kind and node.get("Index Name"):
        scans.append(f"{kind} {node['Index Name']}")
    removed = node.get("Rows Removed by Filter", 0)
    if removed > 10_000:
        problems.append(f"{kind} threw away {removed} rows")
    if kind == "Sort" and rows > 10_000:
        problems.append(f"Sort of {rows} rows")
    for child in node.get("Plans", []):
        child_scans, child_problems = _judge(child)
        scans += child_scans
        problems += child_problems
    return scans, problems


def _summary(sql: str) -> str:
    """The statement's verb, its WHERE and its ORDER BY, shortened; the columns left out."""
    shape = re.sub(r'"asyncmodels_methodcall"\.', "", sql)
    shape = re.sub(r"SELECT .*? FROM", "SELECT ... FROM", shape, count=1, flags=re.S)
    shape = re.sub(r"SET .*? WHERE", "SET ... WHERE", shape, count=1, flags=re.S)
    shape = re.sub(r"\s+", " ", shape)
    return shape if len(shape) <= 200 else shape[:199] + "…"


SEARCH = (
    "not counted: the admin's search box, an exact object id (index asyncmodels_call_object_id) or "
    "text in the error message, which reads every call that has an error (partial index "
    "asyncmodels_call_has_error): a substring match has no index to serve it but a trigram one"
)


def audit_plans(audit: Audit, redis_flush: Callable[[], None]) -> list[list[str]]:
    """Capture the statements of recovery, a call and its job, and the admin list; EXPLAIN them."""
    from django.contrib.auth.models import User
    from django.test import Client

    stranded = Stranded("default")
    stranded.make(ARGS.stranded)
    with audit.capture("recovery, moving"):
        stranded.check(recover_stranded_calls(["default"]))
    with audit.capture("recovery, idle"):
        recover_stranded_calls(["default"])
    stranded.remove()
    echo = Echo.objects.create(note="audit")
    with audit.capture("call + push"), transaction.atomic():
        call = echo.noop()
    with audit.capture("job"):
        run_method_call(call.pk, "default")
    # The next call on the same model: on PostgreSQL its claim also reads its object.
    with transaction.atomic():
        second = echo.noop()
    with audit.capture("job, same model again"):
        run_method_call(second.pk, "default")
    for each in (call, second):
        each.refresh_from_db()
        if each.state != CallState.SUCCEEDED:
            raise SystemExit(f"the audit's call ended {each.state}: {each.error}")
        each.delete()
    echo.delete()
    redis_flush()

    user = User.objects.filter(username="bench").first() or User.objects.create_superuser("bench", "", "pw")
    client = Client()
    client.force_login(user)
    instance_type = ContentType.objects.get_for_model(Instance).pk
    filters = [
        {},
        {"state__exact": "failed"},
        {"state__exact": "running"},
        {"attention": "lease-expired"},
        {"attention": "overdue"},
        {"queue": "urgent"},
        {"method": "cloud.Instance.backup"},
        {"model": "cloud.echo"},
        {"created": "24h"},
        {
            "created": (timezone.now() - timedelta(days=3))
            .replace(minute=0, second=0, microsecond=0)
            .isoformat()
        },
        {"tag": "region:eu"},
        {"object": f"{instance_type}:4242"},
        {"p": "3"},
        {"q": "4242"},  # searches: an exact object id, or text in the error (see SEARCH)
        {"q": "xl-999"},
    ]
    for query in filters:
        url = "/admin/asyncmodels/methodcall/?" + urlencode(query)
        label = ("admin search " if "q" in query else "admin list ") + (urlencode(query) or "(all)")
        with audit.capture(label):
            response = client.get(url)
        if response.status_code != 200:
            raise SystemExit(f"{url} answered {response.status_code}")
    stranded.make(ARGS.stranded)  # the recovery reads EXPLAINed with stranded calls to find
    try:
        return audit.explain()
    finally:
        stranded.remove()
        stranded.dependency.delete()


# --- memory ----------------------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    if match is None:
        raise SystemExit(f"no VmRSS for process {pid}")
    return int(match.group(1))


class WorkerRun:
    """One ``manage.py rqworker`` process of this script's, on a queue of its own, given calls."""

    def __init__(self, worker_class: str, queue: str, log: IO[bytes]) -> None:
        command = [sys.executable, "manage.py", "rqworker", "--worker-class", worker_class, queue]
        self.worker_class = worker_class
        self.queue = queue
        self.log = log
        self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        self.first = self.last = self.made = 0
        self.started = 0.0

    def make_calls(self, echos: list[Echo], count: int) -> None:
        """Make ``count`` ``Echo.noop()`` calls on this run's queue, pushed in batches on commit."""
        self.started = time.perf_counter()
        ids: list[int] = []
        for start in range(0, count, len(echos)):
            with transaction.atomic():
                ids += [
                    echo.noop.using(queue=self.queue)().pk for echo in echos[: min(len(echos), count - start)]
                ]
        self.first, self.last, self.made = min(ids), max(ids), len(ids)

    def finished(self) -> float | None:
        """The seconds since ``make_calls()`` if all its calls succeeded, else ``None``."""
        calls = MethodCall.objects.filter(pk__gte=self.first, pk__lte=self.last, queue=self.queue)
        if calls.filter(state=CallState.SUCCEEDED).count() == self.made:
            return time.perf_counter() - self.started
        if self.process.poll() is not None:
            self.log.seek(0)
            sys.stderr.write(self.log.read().decode(errors="replace")[-5000:])
            raise SystemExit(f"{self.worker_class} exited")
        return None

    def rss_kib(self) -> int:
        return _rss_kib(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # warm shutdown: it is idle, so at once
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _run_batch(runs: list[WorkerRun], echos: list[Echo], count: int) -> dict[str, float]:
    """Give each run ``count`` calls; wait until all succeeded; return the seconds each took."""
    for run in runs:
        run.make_calls(echos, count)
    seconds: dict[str, float] = {}
    deadline = time.perf_counter() + max(300.0, count / 2)
    while len(seconds) < len(runs):
        for run in runs:
            if run.worker_class not in seconds and (took := run.finished()) is not None:
                seconds[run.worker_class] = took
        if time.perf_counter() > deadline:
            raise SystemExit(f"the workers did not run {count} calls in time: {seconds}")
        time.sleep(0.5)
    time.sleep(1)  # the workers finish the last job's bookkeeping and wait for the next
    return seconds


def measure_memory() -> list[list[str]]:
    """One row per worker class: its RSS after the warm calls and after all, their ratio.

    The workers run at once, each on a queue of its own (the memory of one does not depend on
    the other; the time they take does, and is shown only to say how long it took)."""
    size = min(ARGS.warm_calls, 1000)
    echos = list(Echo.objects.order_by("pk")[:size])
    if len(echos) < size:
        Echo.objects.bulk_create(Echo(note=f"bench {i}") for i in range(size - len(echos)))
        echos = list(Echo.objects.order_by("pk")[:size])
    with (
        tempfile.TemporaryFile() as simple_log,
        tempfile.TemporaryFile() as lean_log,
        tempfile.TemporaryFile() as forking_log,
    ):
        runs = [
            WorkerRun("asyncmodels.worker.SimpleWorker", "default", simple_log),
            WorkerRun("asyncmodels.worker.LeanSimpleWorker", "provisioning", lean_log),
            WorkerRun("asyncmodels.worker.Worker", "urgent", forking_log),
        ]
        try:
            warm_seconds = _run_batch(runs, echos, ARGS.warm_calls)
            warm = {run.worker_class: run.rss_kib() for run in runs}
            rest_seconds = _run_batch(runs, echos, ARGS.calls - ARGS.warm_calls)
            after = {run.worker_class: run.rss_kib() for run in runs}
        finally:
            for run in runs:
                run.stop()
    rows = []
    for run in runs:
        name = run.worker_class
        ratio = after[name] / warm[name]
        rows.append(
            [
                f"{name.rsplit('.', 1)[-1]} (queue {run.queue})",
                f"{warm[name] / 1024:.1f}",
                f"{after[name] / 1024:.1f}",
                f"{ratio:.3f}",
                "met" if ratio <= MEMORY_TARGET_RATIO else "MISSED",
                f"{warm_seconds[name]:.0f} + {rest_seconds[name]:.0f} s",
            ]
        )
    return rows


# --- the run ---------------------------------------------------------------------------------


def main() -> int:
    import redis
    from django.core.management import call_command
    from django.test.utils import setup_test_environment

    # A SIGTERM ends the run through the finally clauses: workers stopped, databases dropped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    create_databases(DATABASES, MARKER, "set ASYNCMODELS_BENCH_DB to another name")
    redis_client = redis.Redis.from_url(os.environ["ASYNCMODELS_REDIS_URL"])

    def redis_flush() -> None:
        redis_client.flushdb()

    redis_flush()
    setup_test_environment()
    started = time.perf_counter()
    try:
        call_command("migrate", verbosity=0)
        call_command("migrate", database="other", verbosity=0)
        print("command:", shlex.join([sys.executable, *sys.argv]))
        with connections["default"].cursor() as cursor:
            cursor.execute("SHOW server_version")
            (version,) = cursor.fetchone() or ("?",)
        print(f"database {DATABASE} (PostgreSQL {version}), Redis database {ARGS.redis_db}")
        seed_calls(ARGS.rows, unfinished=False)
        MethodCall.objects.using("other").all().delete()

        parts = set(ARGS.parts.split(","))
        if "plans" in parts:
            report_plans(redis_flush)
        if "recovery" in parts:
            report_recovery(redis_flush)
        if "memory" in parts:
            report_memory()
        print(f"\ndone in {time.perf_counter() - started:.0f} s")
    finally:
        redis_flush()
        if not ARGS.keep:
            drop_databases(DATABASES, MARKER)
    return 0


def report_plans(redis_flush: Callable[[], None]) -> None:
    plans = audit_plans(Audit(), redis_flush)
    print(f"\nplans on {ARGS.rows:,} calls: every statement on the calls table, one of each shape")
    print(
        tabulate(
            plans,
            headers=["sent by", "statement", "scans", "verdict"],
            maxcolwidths=[24, 90, 60, 40],
        )
    )
    hot = [row for row in plans if not row[0].startswith("admin search")]
    flagged = sum(row[-1] != "ok" for row in hot)
    print(
        f"target: no scan of the calls table on the hot path (recovery, call, job, admin list and "
        f"filters): {len(hot)} statements, {flagged} flagged: " + ("met" if not flagged else "MISSED")
    )
    print(SEARCH)


def report_recovery(redis_flush: Callable[[], None]) -> None:
    times = measure_recovery(redis_flush)
    per_kind = ARGS.stranded // len(KINDS)
    rows = []
    for label, ours, base in (
        (f"moving {ARGS.stranded} stranded", times["default"].moving, times["other"].moving),
        ("idle (nothing to move)", times["default"].idle, times["other"].idle),
    ):
        ours_ms, base_ms = statistics.median(ours), statistics.median(base)
        rows.append(
            [
                label,
                f"{ours_ms:.1f}",
                f"{min(ours):.1f}-{max(ours):.1f}",
                f"{base_ms:.1f}",
                f"{ours_ms / base_ms:.2f}x",
            ]
        )
    print(
        f"\nrecovery pass over {ARGS.rows:,} finished calls, median of {ARGS.rounds} rounds; stranded: "
        f"{per_kind} each of {', '.join(KINDS)}; pushes to Redis included. Baseline: the same pass "
        "over a calls table holding only the stranded calls"
    )
    print(
        tabulate(
            rows,
            headers=["pass", "ms", "range", "baseline ms", "ms / baseline ms"],
            colalign=("left", "right", "right", "right", "right"),
        )
    )
    moving_ms = statistics.median(times["default"].moving)
    print(
        f"target: one pass with {ARGS.stranded} stranded calls over {ARGS.rows:,} in under "
        f"{RECOVERY_TARGET_MS:.0f} ms: {moving_ms:.1f} ms: "
        + ("met" if moving_ms < RECOVERY_TARGET_MS else "MISSED")
    )


def report_memory() -> None:
    memory = measure_memory()
    print(
        f"\nworker resident memory (VmRSS) after {ARGS.warm_calls:,} and after {ARGS.calls:,} "
        "Echo.noop() calls; the forking Worker's is its parent's (each call runs in a fresh fork)"
    )
    print(
        tabulate(
            memory,
            headers=[
                "worker",
                f"MiB after {ARGS.warm_calls:,}",
                f"MiB after {ARGS.calls:,}",
                "ratio",
                f"target <= {MEMORY_TARGET_RATIO:.2f}",
                "time",
            ],
            colalign=("left", "right", "right", "right", "left", "right"),
        )
    )


if __name__ == "__main__":
    sys.exit(main())
