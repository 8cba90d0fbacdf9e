"""Benchmark: asyncmodels' execution against two durable Django peers, draining the same no-op calls.

    make bench-peers [BENCH_PEERS_ARGS='--calls 500 --repeat 3']
    .venv-bench/bin/python bench/peers.py [--calls 500] [--repeat 3] [--redis-db 6] [--keep] [--quick]

Runs only in the benchmark's own environment, ``.venv-bench`` (``make bench-peers`` makes it): the
peers are installed there, never as dependencies of the library. Settings: bench/peer_settings.py.

One worker process drains ``--calls`` no-op calls, for each of:

- asyncmodels: ``Echo.noop`` called on ``--calls`` objects (``bulk_call``, pushed to Redis on
  commit), run by one ``manage.py rqworker --burst``, forking (``asyncmodels.worker.Worker``),
  not (``asyncmodels.worker.SimpleWorker``), and not forking without RQ's per-job bookkeeping for
  asyncmodels' jobs (``asyncmodels.worker.LeanSimpleWorker``), the last also with psycopg's
  server-side binding and prepared statements (``ASYNCMODELS_PG_PREPARED=1``: Django's
  ``OPTIONS`` ``server_side_binding`` and ``prepare_threshold``, which Procrastinate's own
  psycopg connector has by default);
- django-tasks' database backend (package django-tasks-db): a ``@task`` no-op enqueued
  ``--calls`` times, run by one ``manage.py db_worker --batch`` (exits when no task is ready);
- Procrastinate (its Django contrib): a no-op task deferred ``--calls`` times, run by one
  ``manage.py procrastinate worker --one-shot`` at concurrency 1 (exits when no job is left).

Each is timed from starting the worker process until it exited with every call done (and
checked: the calls succeeded in each system's own table); worker start-up (Python, Django set-up,
asyncmodels' first recovery pass) is inside every figure alike. The workers log at WARNING;
``DEBUG`` is off. The enqueueing is not timed.

PostgreSQL (127.0.0.1:5432, user postgres): the databases ``asyncmodels_bench_peers`` (or
``$ASYNCMODELS_BENCH_DB``), its ``_other`` twin that the settings open, ``_tasks`` (django-tasks)
and ``_procrastinate`` (Procrastinate's schema, applied by its migrations); created with a marker
comment, dropped at the end unless ``--keep``; one of those names that this script did not make is
refused, never touched. Redis: 127.0.0.1:6379, database ``--redis-db`` (flushed before, between
runs and after). Each round runs every system once; the table shows the median calls/s and the
median of the per-round ratios "asyncmodels calls/s / peer calls/s" (above 1: asyncmodels is ahead).
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

DATABASE = os.environ.get("ASYNCMODELS_BENCH_DB", "asyncmodels_bench_peers")


def _parse_args() -> argparse.Namespace:
    parser = benchmark_parser(__doc__, redis_db=6)
    parser.add_argument("--calls", type=int, default=500, help="calls drained per run (500)")
    parser.add_argument("--quick", action="store_true", help="a smoke test (< 60 s): --calls 20 --repeat 1")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.repeat = 20, 1
    return args


ARGS = _parse_args()
REDIS_URL = f"redis://127.0.0.1:6379/{ARGS.redis_db}"
os.environ.update(
    DJANGO_SETTINGS_MODULE="bench.peer_settings",
    DJANGO_DEBUG="0",
    ASYNCMODELS_DB="postgres",
    ASYNCMODELS_PG_NAME=DATABASE,
    ASYNCMODELS_REDIS_URL=REDIS_URL,
    # One recovery pass as the worker starts, none in the middle; no per-call log lines.
    ASYNCMODELS_RECOVERY_INTERVAL_SECONDS="3600",
    ASYNCMODELS_LOG_LEVEL="WARNING",
    # Persistent database connections for every system alike, as deployed (each closes its
    # connection after every call or task with Django's default CONN_MAX_AGE of 0).
    ASYNCMODELS_CONN_MAX_AGE="60",
)

import django  # noqa: E402

django.setup()

import redis  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, connections, transaction  # noqa: E402
from tabulate import tabulate  # noqa: E402

from asyncmodels.dispatch import get_queue  # noqa: E402
from asyncmodels.models import CallState, MethodCall  # noqa: E402
from bench.databases import create_databases, drop_databases  # noqa: E402
from bench.workers import WorkerProcesses  # noqa: E402
from testproject.cloud.models import Echo  # noqa: E402

#: Written on the databases this script creates; it never uses, nor drops, one without it.
MARKER = "made by asyncmodels bench/peers.py"
DATABASES = [str(database["NAME"]) for database in settings.DATABASES.values()]
MANAGE = [sys.executable, "manage.py"]


class Peers:
    """The three systems' queues and tables: fill one with ``--calls`` no-ops, drain it, check it."""

    def __init__(self) -> None:
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.queue = get_queue("default")
        if Echo.objects.count() != ARGS.calls:
            Echo.objects.all().delete()
            Echo.objects.bulk_create(Echo(note=f"bench {i}") for i in range(ARGS.calls))
        self.echos = list(Echo.objects.order_by("pk"))
        self.workers = WorkerProcesses()

    def reset(self) -> None:
        """Empty every system's calls and the Redis database: each run starts alike."""
        from django_tasks_db.models import DBTaskResult
        from procrastinate.contrib.django.models import ProcrastinateJob

        for model in (MethodCall, DBTaskResult, ProcrastinateJob):
            with connections[model.objects.db].cursor() as cursor:
                cursor.execute(f"TRUNCATE {model._meta.db_table} RESTART IDENTITY CASCADE")
        self.redis.flushdb()

    def _drain(
        self, command: list[str], succeeded: Callable[[], int], env: dict[str, str] | None = None
    ) -> float:
        environ = {**os.environ, **(env or {})}
        elapsed = self.workers.run(command, 1, environ, timeout=max(120.0, ARGS.calls / 5))
        done = succeeded()
        if done != ARGS.calls:
            self.workers.fail(f"{shlex.join(command)}: {done} of {ARGS.calls} calls succeeded")
        return elapsed

    def asyncmodels(self, worker_class: str, env: dict[str, str] | None = None) -> Callable[[], float]:
        def run() -> float:
            Echo.noop.bulk_call(self.echos)  # pushed on commit, in one pipeline
            if self.queue.count != ARGS.calls:
                raise SystemExit(f"expected {ARGS.calls} jobs in the queue, found {self.queue.count}")
            command = [*MANAGE, "rqworker", "--burst", "-v", "0", "--worker-class", worker_class, "default"]
            return self._drain(
                command, lambda: MethodCall.objects.filter(state=CallState.SUCCEEDED).count(), env
            )

        return run

    def asyncmodels_task(self) -> float:
        """The peers' own workload: a no-op ``@task`` function (no object to reload), enqueued
        through the tasks framework on asyncmodels' backend, drained by ``LeanSimpleWorker``."""
        from bench.peer_tasks import asyncmodels_noop

        with transaction.atomic():  # pushed on commit, in one pipeline
            for _ in range(ARGS.calls):
                asyncmodels_noop.enqueue()
        if self.queue.count != ARGS.calls:
            raise SystemExit(f"expected {ARGS.calls} jobs in the queue, found {self.queue.count}")
        worker_class = "asyncmodels.worker.LeanSimpleWorker"
        command = [*MANAGE, "rqworker", "--burst", "-v", "0", "--worker-class", worker_class, "default"]
        return self._drain(command, lambda: MethodCall.objects.filter(state=CallState.SUCCEEDED).count())

    def django_tasks(self) -> float:
        from django_tasks_db.models import DBTaskResult

        from bench.peer_tasks import tasks_noop

        with transaction.atomic(using=DBTaskResult.objects.db):
            for _ in range(ARGS.calls):
                tasks_noop.enqueue()
        command = [*MANAGE, "db_worker", "--batch", "--no-startup-delay", "--no-reload", "-v", "0"]
        return self._drain(command, lambda: DBTaskResult.objects.filter(status="SUCCESSFUL").count())

    def procrastinate(self) -> float:
        from procrastinate.contrib.django.models import ProcrastinateJob

        from bench.peer_tasks import procrastinate_noop

        procrastinate_noop.batch_defer(*({} for _ in range(ARGS.calls)))
        command = [*MANAGE, "procrastinate", "worker", "--one-shot", "--concurrency", "1"]
        return self._drain(command, lambda: ProcrastinateJob.objects.filter(status="succeeded").count())


@dataclass
class System:
    """A system and its worker: how to drain ``--calls`` with it, and its calls/s in each round."""

    label: str
    worker: str
    run: Callable[[], float] = field(repr=False)
    rates: list[float] = field(default_factory=list)


def _header() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        (pg_version,) = cursor.fetchone() or ("?",)
    redis_version = str(redis.Redis.from_url(REDIS_URL).info("server")["redis_version"])
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"sizes: --calls {ARGS.calls} --repeat {ARGS.repeat} --redis-db {ARGS.redis_db}")
    print("databases:", ", ".join(DATABASES))
    packages = ["django", "rq", "django-rq", "django-tasks", "django-tasks-db", "procrastinate", "psycopg"]
    print(
        f"python {platform.python_version()}  "
        + "  ".join(f"{name} {version(name)}" for name in packages)
        + f"  postgresql {pg_version}  redis {redis_version}  cpus {os.cpu_count()}"
    )


def _table(subjects: list[System], peers: list[System]) -> str:
    """Rates, and per peer the median over rounds of each asyncmodels worker's rate / the peer's."""
    rows: list[list[str]] = []
    for system in [*subjects, *peers]:
        ratios = [
            statistics.median(mine / theirs for mine, theirs in zip(subject.rates, system.rates, strict=True))
            for subject in subjects
        ]
        rows.append(
            [
                system.label,
                system.worker,
                f"{statistics.median(system.rates):,.0f}",
                *(f"{ratio:.2f}x" if system in peers else "" for ratio in ratios),
            ]
        )
    return str(
        tabulate(
            rows,
            headers=[
                "system",
                "one worker",
                "calls/s",
                *(f"{subject.worker} / peer" for subject in subjects),
            ],
            colalign=("left", "left", "right", *("right" for _ in subjects)),
        )
    )


def main() -> int:
    create_databases(DATABASES, MARKER, "set ASYNCMODELS_BENCH_DB to another name")
    peers: Peers | None = None
    try:
        for alias in settings.DATABASES:
            call_command("migrate", database=alias, verbosity=0)
        _header()
        peers = Peers()
        subjects = [
            System("asyncmodels", "forking Worker", peers.asyncmodels("asyncmodels.worker.Worker")),
            System("asyncmodels", "SimpleWorker", peers.asyncmodels("asyncmodels.worker.SimpleWorker")),
            System(
                "asyncmodels", "LeanSimpleWorker", peers.asyncmodels("asyncmodels.worker.LeanSimpleWorker")
            ),
            # The same worker with psycopg's server-side binding and prepared statements (Django's
            # OPTIONS server_side_binding, prepare_threshold), as Procrastinate's connector has them.
            System(
                "asyncmodels",
                "LeanSimpleWorker, prepared",
                peers.asyncmodels("asyncmodels.worker.LeanSimpleWorker", {"ASYNCMODELS_PG_PREPARED": "1"}),
            ),
            System("asyncmodels", "@task on LeanSimpleWorker", peers.asyncmodels_task),
        ]
        others = [
            System("django-tasks (database)", "db_worker --batch", peers.django_tasks),
            System("Procrastinate", "worker --one-shot", peers.procrastinate),
        ]
        started = time.perf_counter()
        systems = [*subjects, *others]
        for round_number in range(1, ARGS.repeat + 1):
            shift = (round_number - 1) % len(systems)  # each round starts with another system
            for system in systems[shift:] + systems[:shift]:
                peers.reset()
                system.rates.append(ARGS.calls / system.run())
            peers.reset()
            print(
                f"round {round_number}/{ARGS.repeat} done ({time.perf_counter() - started:.0f} s)", flush=True
            )
        print(
            f"\nexecution of {ARGS.calls} no-op calls by one worker process, from its start to its exit "
            f"(start-up included), median of {ARGS.repeat} round(s); "
            "ratio = asyncmodels calls/s / peer calls/s (per round, then the median)"
        )
        print(_table(subjects, others))
    finally:
        if peers is not None:
            peers.workers.stop()
        redis.Redis.from_url(REDIS_URL).flushdb()
        if not ARGS.keep:
            drop_databases(DATABASES, MARKER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
