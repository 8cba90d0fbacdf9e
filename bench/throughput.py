"""Benchmark: how fast calls are enqueued and executed, against what RQ and hand-written code do.

    .venv/bin/python bench/throughput.py [--calls 1000] [--batch 100] [--bulk 2000] [--jobs 200]
                                         [--repeat 3] [--redis-db 4] [--keep] [--quick]

Runs on PostgreSQL (127.0.0.1:5432, user postgres) in a database of its own
(``asyncmodels_bench_tp``, or ``$ASYNCMODELS_BENCH_DB``, and its ``_other`` twin that the
settings also open; created with a marker comment, dropped at the end unless ``--keep``; a
database of that name that this script did not make is refused, never touched) and on the Redis
at 127.0.0.1:6379, database ``--redis-db`` (flushed before, between measurements and after).
Workers are real ``manage.py rqworker --burst`` processes that this script starts and waits for.

Every row is measured in each of ``--repeat`` rounds, next to its baselines; the table shows the
median calls/s and the median of the per-round ratios "asyncmodels calls/s / baseline calls/s"
(below 1: asyncmodels is slower than the baseline; above 1: faster). Absolute rates drift on a
shared machine; the ratios are the figures to quote.

- enqueue, one call per transaction: ``echo.noop()`` in ``transaction.atomic()``, against the floor
  done by hand (an ORM ``INSERT`` of a ``MethodCall`` row + ``transaction.on_commit`` + a bare
  RQ enqueue of a no-op job) and against the bare RQ enqueue alone;
- enqueue, ``--batch`` calls per transaction: the same (asyncmodels pushes them in one pipeline
  on commit), against ``--batch`` times the floor in one transaction, and ``enqueue_many`` alone;
- bulk: ``Echo.noop.bulk_call(objects)`` against single calls (one per transaction) and against a
  hand-written ``bulk_create`` + one pipelined ``enqueue_many`` on commit;
- execution: draining ``--jobs`` calls with one and two workers, forking
  (``asyncmodels.worker.Worker``), not (``asyncmodels.worker.SimpleWorker``) and not forking
  without RQ's per-job bookkeeping for asyncmodels' jobs (``asyncmodels.worker.LeanSimpleWorker``;
  its baselines run on it too, as plain RQ jobs, so they take RQ's full path), from starting the
  workers until they all exited with the queue empty, against a bare RQ job doing the same
  database claim and finish by hand (two ``UPDATE``s of an equivalent row) and a bare no-op job.
  Worker start-up (Django set-up, a first recovery pass) is inside every figure alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.options import benchmark_parser  # noqa: E402

DATABASE = os.environ.get("ASYNCMODELS_BENCH_DB", "asyncmodels_bench_tp")


def _redis_url(db: int) -> str:
    return f"redis://127.0.0.1:6379/{db}"


def _parse_args() -> argparse.Namespace:
    parser = benchmark_parser(__doc__, redis_db=4)
    parser.add_argument("--calls", type=int, default=1000, help="calls per enqueue measurement (1000)")
    parser.add_argument("--batch", type=int, default=100, help="calls per transaction, batched row (100)")
    parser.add_argument("--bulk", type=int, default=2000, help="objects per bulk_call (2000)")
    parser.add_argument("--jobs", type=int, default=200, help="calls drained per execution run (200)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test (< 30 s): --calls 100 --batch 50 --bulk 100 --jobs 10 --repeat 1",
    )
    args = parser.parse_args()
    if args.quick:
        args.calls, args.batch, args.bulk, args.jobs, args.repeat = 100, 50, 100, 10, 1
    args.calls = max(args.calls // args.batch, 1) * args.batch  # whole transactions in the batched row
    return args


ARGS = _parse_args()
os.environ.update(
    DJANGO_SETTINGS_MODULE="testproject.settings",
    ASYNCMODELS_DB="postgres",
    ASYNCMODELS_PG_NAME=DATABASE,
    ASYNCMODELS_REDIS_URL=_redis_url(ARGS.redis_db),
    # Persistent database connections, as deployed (README, Run workers): without them every
    # job of a non-forking worker opens a new connection (Django closes it after each job).
    ASYNCMODELS_CONN_MAX_AGE="60",
    DJANGO_DEBUG="0",  # as deployed: no query log, no debug pages
)

import django  # noqa: E402

django.setup()

import redis  # noqa: E402
from django.contrib.contenttypes.models import ContentType  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from rq import Queue  # noqa: E402
from tabulate import tabulate  # noqa: E402

from asyncmodels.dispatch import get_queue  # noqa: E402
from asyncmodels.models import CallState, MethodCall  # noqa: E402
from bench.databases import create_databases, drop_databases  # noqa: E402
from bench.workers import WorkerProcesses  # noqa: E402
from testproject.cloud.models import Echo  # noqa: E402

#: Written on the databases this script creates; it never uses, nor drops, one without it.
MARKER = "made by asyncmodels bench/throughput.py"
HINT = "set ASYNCMODELS_BENCH_DB to another name"
DATABASES = (DATABASE, DATABASE + "_other")  # the workers' recovery passes open the latter
NOOP = "testproject.cloud.bench_jobs.noop"
CLAIM_AND_FINISH = "testproject.cloud.bench_jobs.claim_and_finish"
QUEUE = "default"
FORKING = "asyncmodels.worker.Worker"
SIMPLE = "asyncmodels.worker.SimpleWorker"
LEAN = "asyncmodels.worker.LeanSimpleWorker"


class Bench:
    """The state shared by the measurements: the objects, the queue, the Redis to flush."""

    def __init__(self, redis_db: int) -> None:
        self.redis = redis.Redis.from_url(_redis_url(redis_db))
        self.queue: Queue = get_queue(QUEUE)
        self.echo_type = ContentType.objects.get_for_model(Echo)
        size = max(ARGS.bulk, ARGS.jobs, ARGS.calls)
        if Echo.objects.count() < size:
            Echo.objects.all().delete()
            Echo.objects.bulk_create(Echo(note=f"bench {i}") for i in range(size))
        self.echos = list(Echo.objects.order_by("pk")[:size])
        self.workers = WorkerProcesses()

    def reset(self) -> None:
        """Empty the calls table and the Redis database: each measurement starts alike."""
        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {MethodCall._meta.db_table} RESTART IDENTITY CASCADE")
        self.redis.flushdb()

    def hand_row(self, echo: Echo, state: str = CallState.PENDING) -> MethodCall:
        """A row like the one ``echo.noop()`` writes, built by hand (not saved)."""
        return MethodCall(
            content_type=self.echo_type,
            object_id=str(echo.pk),
            method="cloud.Echo.noop",
            queue=QUEUE,
            state=state,
            args=[],
            kwargs={},
        )

    def bare_enqueue(self) -> None:
        self.queue.enqueue(NOOP, result_ttl=0)

    def bare_enqueue_many(self, count: int, function: str = NOOP, ids: list[int] | None = None) -> None:
        datas = [
            Queue.prepare_data(function, [ids[i], "default"] if ids else [], result_ttl=0)
            for i in range(count)
        ]
        with self.redis.pipeline(transaction=False) as pipeline:
            self.queue.enqueue_many(datas, pipeline=pipeline)
            pipeline.execute()

    # --- enqueue -------------------------------------------------------------------------------

    def library_single(self) -> float:
        echos = self.echos
        started = time.perf_counter()
        for i in range(ARGS.calls):
            with transaction.atomic():
                echos[i % len(echos)].noop()
        return self._done(started, lambda: self._enqueued_calls() == ARGS.calls)

    def hand_single(self) -> float:
        echos = self.echos
        started = time.perf_counter()
        for i in range(ARGS.calls):
            with transaction.atomic():
                self.hand_row(echos[i % len(echos)]).save()
                transaction.on_commit(self.bare_enqueue)
        return self._done(started, lambda: self.queue.count == ARGS.calls)

    def bare_single(self) -> float:
        started = time.perf_counter()
        for _ in range(ARGS.calls):
            self.bare_enqueue()
        return self._done(started, lambda: self.queue.count == ARGS.calls)

    def library_batched(self) -> float:
        echos, batch = self.echos, ARGS.batch
        started = time.perf_counter()
        for start in range(0, ARGS.calls, batch):
            with transaction.atomic():
                for i in range(start, start + batch):
                    echos[i % len(echos)].noop()
        return self._done(started, lambda: self._enqueued_calls() == ARGS.calls)

    def hand_batched(self) -> float:
        echos, batch = self.echos, ARGS.batch
        started = time.perf_counter()
        for start in range(0, ARGS.calls, batch):
            with transaction.atomic():
                for i in range(start, start + batch):
                    self.hand_row(echos[i % len(echos)]).save()
                    transaction.on_commit(self.bare_enqueue)
        return self._done(started, lambda: self.queue.count == ARGS.calls)

    def bare_batched(self) -> float:
        started = time.perf_counter()
        for _ in range(0, ARGS.calls, ARGS.batch):
            self.bare_enqueue_many(ARGS.batch)
        return self._done(started, lambda: self.queue.count == ARGS.calls)

    # --- bulk ----------------------------------------------------------------------------------

    def library_bulk(self) -> float:
        objects = self.echos[: ARGS.bulk]
        started = time.perf_counter()
        Echo.noop.bulk_call(objects)
        return self._done(started, lambda: self._enqueued_calls() == ARGS.bulk)

    def library_bulk_singly(self) -> float:
        objects = self.echos[: ARGS.bulk]
        started = time.perf_counter()
        for echo in objects:
            with transaction.atomic():
                echo.noop()
        return self._done(started, lambda: self._enqueued_calls() == ARGS.bulk)

    def hand_bulk(self) -> float:
        objects = self.echos[: ARGS.bulk]
        started = time.perf_counter()
        with transaction.atomic():
            MethodCall.objects.bulk_create(self.hand_row(echo) for echo in objects)
            transaction.on_commit(lambda: self.bare_enqueue_many(len(objects)))
        return self._done(started, lambda: self.queue.count == ARGS.bulk)

    # --- execution -----------------------------------------------------------------------------

    def drain_library(self, worker_class: str, workers: int) -> float:
        Echo.noop.bulk_call(self.echos[: ARGS.jobs])  # pushed on commit, in one pipeline
        return self._drain(worker_class, workers, lambda: self._finished_calls() == ARGS.jobs)

    def drain_claim_and_finish(self, worker_class: str, workers: int) -> float:
        rows = MethodCall.objects.bulk_create(
            self.hand_row(echo, CallState.ENQUEUED) for echo in self.echos[: ARGS.jobs]
        )
        self.bare_enqueue_many(len(rows), CLAIM_AND_FINISH, [row.pk for row in rows])
        return self._drain(worker_class, workers, lambda: self._finished_calls() == ARGS.jobs)

    def drain_noop(self, worker_class: str, workers: int) -> float:
        self.bare_enqueue_many(ARGS.jobs)
        return self._drain(worker_class, workers, lambda: True)

    def _drain(self, worker_class: str, count: int, check: Callable[[], bool]) -> float:
        if self.queue.count != ARGS.jobs:
            raise SystemExit(f"expected {ARGS.jobs} jobs in the queue, found {self.queue.count}")
        env = {
            **os.environ,
            # One recovery pass as each worker starts (alike for every row), none in the middle.
            "ASYNCMODELS_RECOVERY_INTERVAL_SECONDS": "3600",
            "ASYNCMODELS_LOG_LEVEL": "WARNING",
        }
        command = [
            sys.executable, "manage.py", "rqworker", "--burst", "--worker-class", worker_class, QUEUE,
        ]  # fmt: skip
        elapsed = self.workers.run(command, count, env, timeout=max(120.0, ARGS.jobs / 5))
        if self.queue.count or not check():
            self.workers.fail(
                f"{worker_class}: {self.queue.count} jobs left, "
                f"{self._finished_calls()} of {ARGS.jobs} calls succeeded"
            )
        return elapsed

    # --- checks ----------------------------------------------------------------------------------

    def _enqueued_calls(self) -> int:
        enqueued = MethodCall.objects.filter(state=CallState.ENQUEUED).count()
        return enqueued if self.queue.count == enqueued else -1

    def _finished_calls(self) -> int:
        return MethodCall.objects.filter(state=CallState.SUCCEEDED).count()

    @staticmethod
    def _done(started: float, check: Callable[[], bool]) -> float:
        elapsed = time.perf_counter() - started
        if not check():
            raise SystemExit("a measurement did not leave the expected rows and jobs; see above")
        return elapsed


@dataclass
class Variant:
    label: str
    calls: int
    run: Callable[[], float]
    rates: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


@dataclass
class Section:
    title: str
    subject: Variant  # asyncmodels
    baselines: list[Variant]


def _sections(bench: Bench) -> list[Section]:
    calls, batch, bulk, jobs = ARGS.calls, ARGS.batch, ARGS.bulk, ARGS.jobs
    sections = [
        Section(
            "enqueue, 1 call / transaction",
            Variant("asyncmodels: echo.noop() + commit", calls, bench.library_single),
            [
                Variant("by hand: ORM INSERT + on_commit + RQ enqueue", calls, bench.hand_single),
                Variant("bare RQ: queue.enqueue(noop)", calls, bench.bare_single),
            ],
        ),
        Section(
            f"enqueue, {batch} calls / transaction",
            Variant(f"asyncmodels: {batch} x echo.noop() + commit", calls, bench.library_batched),
            [
                Variant(f"by hand: {batch} x (INSERT + on_commit enqueue)", calls, bench.hand_batched),
                Variant(f"bare RQ: enqueue_many({batch}) in a pipeline", calls, bench.bare_batched),
            ],
        ),
        Section(
            f"bulk, {bulk} objects",
            Variant(f"asyncmodels: Echo.noop.bulk_call({bulk} objects)", bulk, bench.library_bulk),
            [
                Variant("asyncmodels: echo.noop(), 1 / transaction", bulk, bench.library_bulk_singly),
                Variant("by hand: bulk_create + 1 pipelined enqueue_many", bulk, bench.hand_bulk),
            ],
        ),
    ]
    # The lean worker's baselines run on asyncmodels' SimpleWorker (RQ's, plus recovery passes):
    # its target is set against the hand-written job as RQ's SimpleWorker runs it.
    for worker_class, baseline_class, kind in (
        (FORKING, FORKING, "forking"),
        (SIMPLE, SIMPLE, "simple"),
        (LEAN, SIMPLE, "lean simple"),
    ):
        on = "" if baseline_class == worker_class else " (on SimpleWorker)"
        for workers in (1, 2):

            def run(
                method: Callable[[str, int], float], worker_class: str = worker_class, workers: int = workers
            ) -> Callable[[], float]:
                return lambda: method(worker_class, workers)

            sections.append(
                Section(
                    f"execute {jobs}, {workers} {kind} worker{'s' if workers > 1 else ''}",
                    Variant("asyncmodels: run_method_call", jobs, run(bench.drain_library)),
                    [
                        Variant(
                            f"bare RQ job: UPDATE claim + UPDATE finish{on}",
                            jobs,
                            run(bench.drain_claim_and_finish, baseline_class),
                        ),
                        Variant(f"bare RQ job: no-op{on}", jobs, run(bench.drain_noop, baseline_class)),
                    ],
                )
            )
    return sections


def _measure(bench: Bench, variant: Variant) -> float:
    bench.reset()
    elapsed = variant.run()
    bench.reset()
    rate = variant.calls / elapsed
    variant.rates.append(rate)
    return rate


def _header() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        (pg_version,) = cursor.fetchone() or ("?",)
    redis_version = str(redis.Redis.from_url(_redis_url(ARGS.redis_db)).info("server")["redis_version"])
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(
        f"sizes: --calls {ARGS.calls} --batch {ARGS.batch} --bulk {ARGS.bulk} --jobs {ARGS.jobs} "
        f"--repeat {ARGS.repeat} --redis-db {ARGS.redis_db}; database {DATABASE}"
    )
    print(
        f"python {platform.python_version()}  django {django.get_version()}  rq {version('rq')}  "
        f"django-rq {version('django-rq')}  redis-py {version('redis')}  psycopg {version('psycopg')}  "
        f"postgresql {pg_version}  redis {redis_version}  cpus {os.cpu_count()}"
    )


def main() -> int:
    create_databases(DATABASES, MARKER, HINT)
    from django.core.management import call_command

    bench: Bench | None = None
    try:
        call_command("migrate", verbosity=0)
        call_command("migrate", database="other", verbosity=0)
        _header()
        bench = Bench(ARGS.redis_db)
        bench.reset()
        sections = _sections(bench)
        # Warm-up: connections, content types, imports; not measured.
        for _ in range(3):
            with transaction.atomic():
                bench.echos[0].noop()
            bench.bare_enqueue()
        bench.reset()
        started = time.perf_counter()
        for round_number in range(1, ARGS.repeat + 1):
            for section in sections:
                subject = _measure(bench, section.subject)
                for baseline in section.baselines:
                    baseline.ratios.append(subject / _measure(bench, baseline))
            print(
                f"round {round_number}/{ARGS.repeat} done ({time.perf_counter() - started:.0f} s)", flush=True
            )
        rows: list[list[str]] = []
        for section in sections:
            rows.append(
                [section.title, section.subject.label, f"{statistics.median(section.subject.rates):,.0f}", ""]
            )
            for baseline in section.baselines:
                rows.append(
                    [
                        "",
                        baseline.label,
                        f"{statistics.median(baseline.rates):,.0f}",
                        f"{statistics.median(baseline.ratios):.2f}x",
                    ]
                )
        print(
            f"\nthroughput on PostgreSQL + Redis, median of {ARGS.repeat} round(s); "
            "ratio = asyncmodels calls/s / baseline calls/s (per round, then the median)"
        )
        print(
            tabulate(
                rows,
                headers=["measure", "variant", "calls/s", "ratio"],
                colalign=("left", "left", "right", "right"),
            )
        )
    finally:
        if bench is not None:
            bench.workers.stop()
            bench.redis.flushdb()
        else:
            redis.Redis.from_url(_redis_url(ARGS.redis_db)).flushdb()
        if not ARGS.keep:
            drop_databases(DATABASES, MARKER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
