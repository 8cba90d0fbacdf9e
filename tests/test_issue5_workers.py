"""Issue 5 against real worker processes: unique calls made at the same instant, exclusive methods
drained by two workers (and across a kill -9), and dependencies (a workflow of five calls).

Every worker here is a real ``manage.py rqworker`` process (``spawn_worker``, with leases of 2 s,
or a ``--burst`` one) against a Redis server it can reach (an embedded one in the fake mode). Runs
of ``Ledger`` methods write a ``Run`` row with ``time.time()`` at start and end in the work horse,
so overlaps are read from what the workers really did.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from django.db import connection, connections, transaction
from rq import Worker as RQWorker

from asyncmodels import decorator
from asyncmodels.models import TERMINAL_STATES, CallState, MethodCall, MethodCallTag
from testproject.cloud.models import Account, Instance, Ledger, Report, Run

from .conftest import ALL_QUEUES, REPO, SpawnWorker, WorkerProcess, _worker_env, wait_for

pytestmark = [pytest.mark.django_db(transaction=True, databases=["default", "other"]), pytest.mark.live_redis]

REBOOT = "cloud.Instance.reboot"


def _postgres() -> bool:
    return connection.vendor == "postgresql"


#: How long each racing caller keeps its transaction open after its call. On PostgreSQL the second
#: INSERT then really waits on the first one's uncommitted row. SQLite takes no part: a transaction
#: that read before it writes cannot wait for another writer (SQLite answers "database is locked"
#: at once), so there the callers race in autocommit (the call's own savepoint transaction).
def _hold() -> float:
    return 0.3 if _postgres() else 0.0


def _instance() -> Instance:
    return Instance.objects.create(account=Account.objects.create(name="acme"), name="web1")


def _refresh(calls: Sequence[MethodCall]) -> list[MethodCall]:
    by_pk = MethodCall.objects.in_bulk([call.pk for call in calls])
    return [by_pk[call.pk] for call in calls]


def _all_finished(calls: Sequence[MethodCall]) -> bool:
    return (
        not MethodCall.objects.filter(pk__in=[c.pk for c in calls])
        .exclude(state__in=TERMINAL_STATES)
        .exists()
    )


def _burst_worker() -> str:
    """One ``manage.py rqworker --burst`` process over every queue; return its output."""
    completed = subprocess.run(
        [sys.executable, "manage.py", "rqworker", "--burst", *ALL_QUEUES],
        cwd=REPO,
        env=_worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    return output


def _workers_up(redis_connection: redis.Redis, count: int) -> None:
    wait_for(
        lambda: len(RQWorker.all(connection=redis_connection)) >= count,
        message=f"{count} worker(s) to register with Redis",
    )


def _assert_serial(runs: Sequence[Run], what: str) -> None:
    """No two runs overlap: each starts after the previous one (by start) ended."""
    ordered = sorted(runs, key=lambda run: run.start)
    for before, after in itertools.pairwise(ordered):
        assert before.end is not None and after.start >= before.end, (
            f"{what}: run {after.pk} ({after.method}, pid {after.pid}) started at {after.start:.3f}, "
            f"before run {before.pk} ({before.method}, pid {before.pid}) ended at {before.end}"
        )


def _overlap(a: Run, b: Run) -> bool:
    assert a.end is not None and b.end is not None
    return a.start < b.end and b.start < a.end


# ------------------------------------------------------------------------------------------------
# unique=True: two callers at the same instant
# ------------------------------------------------------------------------------------------------


def _in_threads(*functions: Callable[[], Any]) -> list[Any]:
    """Run each function in its own thread (own database connection), started at one barrier."""
    barrier = threading.Barrier(len(functions))
    results: list[Any] = [None] * len(functions)

    def run(index: int, function: Callable[[], Any]) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = function()
        except BaseException as exc:
            results[index] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i, f), name=f"racer-{i}") for i, f in enumerate(functions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def _assert_one_unfinished_reboot_then_a_new_one(instance: Instance, pk: int, queued_jobs: Any) -> None:
    """After the race: one unfinished row with its own tags, pushed once; once a worker ran it, a
    new call is a new row."""
    unfinished = MethodCall.objects.own_calls(instance).for_method(REBOOT).unfinished()
    assert list(unfinished.values_list("pk", flat=True)) == [pk]
    assert MethodCall.objects.own_calls(instance).count() == 1  # the loser wrote nothing at all
    tags = MethodCallTag.objects.filter(call__in=MethodCall.objects.own_calls(instance))
    assert sorted(tags.values_list("call_id", "tag")) == [
        (pk, f"cloud.account:{instance.account_id}"),
        (pk, "region:eu"),
    ]
    assert queued_jobs("provisioning") == 1  # the duplicate pushed nothing

    _burst_worker()
    call = MethodCall.objects.get(pk=pk)
    assert call.state == CallState.SUCCEEDED, (call.state, call.error)
    assert call.attempts == 1
    instance.refresh_from_db()
    assert instance.status == "running"

    again = instance.reboot(reason="after")
    assert again.pk != pk
    assert again.state in {CallState.PENDING, CallState.ENQUEUED}
    assert MethodCall.objects.own_calls(instance).for_method(REBOOT).unfinished().get().pk == again.pk


def test_unique_call_made_by_two_threads_at_once_is_one_row(
    monkeypatch: pytest.MonkeyPatch, queued_jobs: Any
) -> None:
    instance = _instance()
    hold = _hold()
    # Both callers pass the "is there an unfinished call?" look-up before either inserts: the
    # database's partial unique constraint alone must then keep the second row out.
    checked = threading.Barrier(2)
    lookups: dict[str, list[int | None]] = {}
    original = decorator._unfinished_with_key

    def looked_up(database: str, key: str) -> MethodCall | None:
        found = original(database, key)
        mine = lookups.setdefault(threading.current_thread().name, [])
        mine.append(found.pk if found is not None else None)
        if len(mine) == 1:
            checked.wait(timeout=30)
        return found

    monkeypatch.setattr(decorator, "_unfinished_with_key", looked_up)

    def reboot() -> int:
        mine = Instance.objects.get(pk=instance.pk)  # read on this thread's own connection
        if not hold:
            return mine.reboot(reason="race").pk
        with transaction.atomic():
            call = mine.reboot(reason="race")
            time.sleep(hold)  # keep the row uncommitted: the other INSERT must wait for it
        return call.pk

    results = _in_threads(reboot, reboot)
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert results[0] == results[1], results
    pk = results[0]
    # One caller inserted; the other found nothing, lost the INSERT to the constraint and then
    # found the winner's row: the race really went through the database.
    assert sorted(lookups.values(), key=len) == [[None], [None, pk]], lookups
    monkeypatch.setattr(decorator, "_unfinished_with_key", original)
    _assert_one_unfinished_reboot_then_a_new_one(instance, pk, queued_jobs)


RACER = textwrap.dedent(
    """
    import sys, time, pathlib
    import django

    django.setup()
    from django.db import transaction
    from asyncmodels import decorator
    from testproject.cloud.models import Instance

    pk, name, hold, sync = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), pathlib.Path(sys.argv[4])
    instance = Instance.objects.get(pk=pk)
    original = decorator._unfinished_with_key
    lookups = []

    def barrier(stage):
        (sync / f"{stage}-{name}").touch()
        deadline = time.monotonic() + 30
        while len(list(sync.glob(f"{stage}-*"))) < 2:
            if time.monotonic() > deadline:
                raise SystemExit(f"{stage}: the other racer never came")
            time.sleep(0.002)

    def looked_up(database, key):
        found = original(database, key)
        lookups.append(found.pk if found is not None else None)
        if len(lookups) == 1:
            barrier("checked")
        return found

    decorator._unfinished_with_key = looked_up
    barrier("start")
    if hold:
        with transaction.atomic():
            call = instance.reboot(reason="race")
            time.sleep(hold)
    else:
        call = instance.reboot(reason="race")
    print("RESULT", call.pk, lookups)
    """
)


def test_unique_call_made_by_two_processes_at_once_is_one_row(tmp_path: Path, queued_jobs: Any) -> None:
    instance = _instance()
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(instance.pk), name, str(_hold()), str(tmp_path)],
            cwd=REPO,
            env=_worker_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("a", "b")
    ]
    outputs = [racer.communicate(timeout=90)[0] for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], outputs
    results = [
        line.split(" ", 2) for out in outputs for line in out.splitlines() if line.startswith("RESULT")
    ]
    assert len(results) == 2, outputs
    pks = {int(pk) for _, pk, _ in results}
    assert len(pks) == 1, outputs
    pk = pks.pop()
    assert sorted(lookups for _, _, lookups in results) == [f"[None, {pk}]", "[None]"], outputs
    _assert_one_unfinished_reboot_then_a_new_one(instance, pk, queued_jobs)


# ------------------------------------------------------------------------------------------------
# exclusive: two workers drain calls on a few ledgers
# ------------------------------------------------------------------------------------------------


def test_exclusive_calls_of_one_ledger_never_overlap_on_two_workers(
    spawn_worker: SpawnWorker, redis_connection: redis.Redis
) -> None:
    workers = [spawn_worker(ASYNCMODELS_LOG_LEVEL="INFO") for _ in range(2)]
    _workers_up(redis_connection, 2)
    a, b, c = (Ledger.objects.create(name=name) for name in "abc")
    with transaction.atomic():  # all pushed at once, on commit
        a_calls = [a.settle(seconds=0.5) for _ in range(4)]
        b_calls = [b.settle(seconds=0.6) for _ in range(2)]
        c_calls = [c.post(seconds=0.3), c.audit(seconds=0.3), c.post(seconds=0.3), c.audit(seconds=0.3)]
    calls = [*a_calls, *b_calls, *c_calls]
    wait_for(lambda: _all_finished(calls), timeout=60, message="every ledger call to finish")
    outputs = "\n".join(worker.output() for worker in workers)

    for call in _refresh(calls):
        assert call.state == CallState.SUCCEEDED, (call.pk, call.state, call.state_reason, call.error)
        # A call parked while the ledger was busy held no attempt: each ran exactly once.
        assert call.attempts == 1 and [e["outcome"] for e in call.attempt_log] == ["succeeded"], call.pk
    for ledger, ledger_calls in ((a, a_calls), (b, b_calls), (c, c_calls)):
        runs = list(Run.objects.filter(ledger=ledger))
        assert len(runs) == len(ledger_calls), (ledger, runs)
        assert {call.return_value["run"] for call in _refresh(ledger_calls)} == {run.pk for run in runs}
        _assert_serial(runs, f"ledger {ledger.name}")
    assert (
        sorted(Run.objects.filter(ledger=c).values_list("method", flat=True)) == ["audit"] * 2 + ["post"] * 2
    )

    # The two workers really competed for ledger a: at least one of its calls found it busy and
    # was parked (the log line of exclusive.wait_turn), and was released later.
    parked = [call.pk for call in a_calls if f"Call {call.pk} waits: " in outputs]
    assert parked, f"no call of ledger a was ever parked; worker output:\n{outputs[-3000:]}"
    # Different ledgers are not serialized: some run of ledger b overlapped one of ledger a.
    a_runs, b_runs = list(Run.objects.filter(ledger=a)), list(Run.objects.filter(ledger=b))
    assert any(_overlap(x, y) for x in a_runs for y in b_runs), (
        [(r.start, r.end) for r in a_runs],
        [(r.start, r.end) for r in b_runs],
    )


# ------------------------------------------------------------------------------------------------
# exclusive + kill -9 of the holder
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kill", ["horse", "worker"])
def test_exclusive_holder_killed_mid_run_is_recovered_and_the_waiting_call_then_runs(
    spawn_worker: SpawnWorker, kill: str
) -> None:
    ledger = Ledger.objects.create(name="killed")
    holder = ledger.settle(seconds=60)
    doomed = spawn_worker()
    wait_for(lambda: Run.objects.filter(ledger=ledger).exists(), message="the holder to start its run")
    waiter = ledger.settle(seconds=0.2)
    survivor: WorkerProcess = doomed
    if kill == "worker":
        survivor = spawn_worker()  # takes the waiter while the holder runs: it must park it
        wait_for(lambda: _refresh([waiter])[0].state == CallState.WAITING, message="the waiter to be parked")
        parked = _refresh([waiter])[0]
        assert parked.state_reason.startswith(f"Waiting for call #{holder.pk} to finish"), parked.state_reason
        assert parked.attempts == 0
    killed_at = time.time()
    if kill == "worker":
        doomed.kill_all()
    else:
        doomed.kill_horse()
    wait_for(lambda: _all_finished([holder, waiter]), timeout=45, message="recovery and the waiter's run")
    assert survivor.process.poll() is None  # the worker that recovered is alive

    holder, waiter = _refresh([holder, waiter])
    assert holder.state == CallState.FAILED and holder.error_type == "asyncmodels.WorkerLost", (
        holder.state,
        holder.error,
    )
    assert [e["outcome"] for e in holder.attempt_log] == ["lost"]
    assert waiter.state == CallState.SUCCEEDED, (waiter.state, waiter.state_reason, waiter.error)
    assert waiter.attempts == 1
    assert holder.finished_at is not None and waiter.started_at is not None
    assert waiter.started_at >= holder.finished_at  # released by the end of the lost attempt
    held, ran = Run.objects.filter(ledger=ledger).order_by("start")
    assert held.end is None  # the holder's run died with its process
    assert ran.pk == waiter.return_value["run"] and ran.end is not None
    assert ran.start > killed_at
    assert not MethodCall.objects.filter(state__in=[CallState.RUNNING, CallState.WAITING]).exists()


# ------------------------------------------------------------------------------------------------
# dependencies: Report.build() (fetch -> 3 slices -> assemble)
# ------------------------------------------------------------------------------------------------


def _workflow(report: Report) -> tuple[MethodCall, list[MethodCall], MethodCall]:
    calls = list(MethodCall.objects.own_calls(report).order_by("pk"))
    assert [call.method.rsplit(".", 1)[1] for call in calls] == ["fetch"] + ["slice"] * 3 + ["assemble"]
    return calls[0], calls[1:4], calls[4]


def test_report_workflow_runs_each_step_after_the_ones_it_needs(
    spawn_worker: SpawnWorker, redis_connection: redis.Redis
) -> None:
    report = Report.objects.create(topic="sales")
    with transaction.atomic():
        last = report.build()
    spawn_worker(), spawn_worker()
    wait_for(lambda: _all_finished([last]), timeout=60, message="the assembly to finish")
    fetch, slices, assemble = _workflow(report)
    assert assemble.pk == last.pk
    for call in (fetch, *slices, assemble):
        assert call.state == CallState.SUCCEEDED, (call.pk, call.method, call.state, call.error)
        assert call.attempts == 1 and call.started_at is not None and call.finished_at is not None
    assert fetch.finished_at is not None and assemble.started_at is not None
    for piece in slices:
        assert piece.started_at is not None and fetch.finished_at <= piece.started_at, (fetch, piece)
        assert piece.finished_at is not None and piece.finished_at <= assemble.started_at
    lines = [f"sales: line {n}" for n in range(1, 13)]
    assert [piece.return_value for piece in slices] == [[x.upper() for x in lines[p::3]] for p in range(3)]
    assert assemble.return_value == 12
    report.refresh_from_db()
    assert report.text == "\n".join(line.upper() for line in lines)


def test_report_with_a_broken_source_cancels_every_later_step_and_runs_none(
    spawn_worker: SpawnWorker,
) -> None:
    report = Report.objects.create(topic="broken source")
    with transaction.atomic():
        last = report.build()
    spawn_worker()
    wait_for(lambda: _all_finished([last]), timeout=60, message="the workflow to end")
    fetch, slices, assemble = _workflow(report)
    assert fetch.state == CallState.FAILED and fetch.error_type == "builtins.ConnectionError"
    assert fetch.attempts == 1
    for piece in slices:
        assert piece.state == CallState.CANCELLED, (piece.pk, piece.state)
        assert piece.state_reason == (
            f"Call #{fetch.pk} (cloud.Report.fetch), which this call waited for, failed; this call never ran."
        )
    assert assemble.state == CallState.CANCELLED
    named = [
        piece.pk for piece in slices if f"Call #{piece.pk} (cloud.Report.slice)" in assemble.state_reason
    ]
    assert len(named) == 1 and "cancelled; this call never ran." in assemble.state_reason, (
        assemble.state_reason
    )
    for call in (*slices, assemble):
        assert call.attempts == 0 and call.started_at is None and call.worker == "", call.pk
        assert call.finished_at is not None and fetch.finished_at is not None
        assert call.finished_at >= fetch.finished_at
    time.sleep(1.5)  # the worker (and its recovery passes) stay alive: nothing runs later either
    assert [c.state for c in _refresh([*slices, assemble])] == [CallState.CANCELLED] * 4
    report.refresh_from_db()
    assert report.text == ""


# ------------------------------------------------------------------------------------------------
# exclusive: the holder ends between a failed claim and the parking
# ------------------------------------------------------------------------------------------------


def test_call_whose_holder_ended_just_before_it_was_parked_is_run_without_waiting_for_recovery(
    monkeypatch: pytest.MonkeyPatch, redis_connection: redis.Redis
) -> None:
    """The claim finds the ledger busy; the holder ends (and finds nobody waiting to release)
    before the call is parked: ``wait_turn`` must see the key free and get the call run by the
    workers now, not leave it for recovery's grace period. In-process (an RQ SimpleWorker in the
    test process), so the interleaving can be forced; the Redis is a real server."""
    from rq import SimpleWorker

    from asyncmodels import dispatch, job

    ledger = Ledger.objects.create(name="race")
    holder = ledger.settle(seconds=0)
    MethodCall.objects.filter(pk=holder.pk).update(state=CallState.RUNNING, attempts=1, worker="elsewhere")
    waiter = ledger.settle(seconds=0)
    original = job._claim

    def claim_then_holder_ends(call_id: int, database: str) -> int | MethodCall:
        claimed = original(call_id, database)
        if claimed == job.BUSY:  # the holder ends now: nobody is waiting yet, so it releases nobody
            MethodCall.objects.filter(pk=holder.pk).update(state=CallState.SUCCEEDED)
        return claimed

    monkeypatch.setattr(job, "_claim", claim_then_holder_ends)
    queue = dispatch.get_queue("default")
    for _ in range(3):  # a few bursts: the call must not depend on recovery's grace period
        SimpleWorker([queue], connection=redis_connection).work(burst=True)
    waiter.refresh_from_db()
    assert waiter.state == CallState.SUCCEEDED, (waiter.state, waiter.state_reason, queue.count)
