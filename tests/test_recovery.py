"""Recovery passes: lost pushes, flushed Redis, dead jobs, expired leases; safe in parallel."""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable

import pytest
import redis
from django.conf import settings
from django.db import connection, transaction
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext
from pytest_django import DjangoAssertNumQueries
from rq import Queue
from rq.job import Job, JobStatus

from asyncmodels import dispatch
from asyncmodels.models import CallState, MethodCall
from asyncmodels.recovery import RecoveryReport, recover_stranded_calls
from testproject.cloud.models import Echo

from .conftest import RunWorker, dead_queue

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

AGES_AGO = datetime.timedelta(minutes=5)


@pytest.fixture
def dead_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = dead_queue("default")
    monkeypatch.setattr(dispatch, "get_queue", lambda name: dead)


def _age(call: MethodCall, **fields: object) -> None:
    MethodCall.objects.filter(pk=call.pk).update(**{name: Now() - AGES_AGO for name in fields})


def test_pending_call_whose_push_was_lost_is_pushed_after_the_grace(
    monkeypatch: pytest.MonkeyPatch, run_worker: RunWorker
) -> None:
    echo = Echo.objects.create()
    real_get_queue = dispatch.get_queue
    dead = dead_queue("default")
    monkeypatch.setattr(dispatch, "get_queue", lambda name: dead)
    call = echo.bump()
    call.refresh_from_db()
    assert call.state == CallState.PENDING
    assert "push to queue 'default' failed" in call.state_reason
    monkeypatch.setattr(dispatch, "get_queue", real_get_queue)  # Redis is back

    assert recover_stranded_calls().pushed_pending == 0  # too young: its push may be in flight
    _age(call, created_at=True)
    assert recover_stranded_calls().pushed_pending == 1
    call.refresh_from_db()
    assert (call.state, call.state_reason) == (CallState.ENQUEUED, "")
    run_worker()
    echo.refresh_from_db()
    assert echo.hits == 1


def test_rolled_back_call_is_never_recovered(queued_jobs: Callable[..., int]) -> None:
    echo = Echo.objects.create()
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        echo.bump()
        1 / 0  # noqa: B018
    assert recover_stranded_calls().total == 0
    assert MethodCall.objects.count() == 0
    assert queued_jobs() == 0


def test_enqueued_call_whose_job_was_flushed_is_pushed_again_without_a_new_attempt(
    redis_connection: redis.Redis, run_worker: RunWorker
) -> None:
    echo = Echo.objects.create()
    call = echo.bump()
    redis_connection.flushdb()
    _age(call, enqueued_at=True)
    report = recover_stranded_calls()
    assert report.repushed_enqueued == 1
    assert recover_stranded_calls().repushed_enqueued == 0  # now RQ holds it again
    run_worker()
    call.refresh_from_db()
    assert (call.state, call.attempts) == (CallState.SUCCEEDED, 1)
    echo.refresh_from_db()
    assert echo.hits == 1


def test_enqueued_call_whose_job_died_in_rq_is_pushed_again(
    redis_connection: redis.Redis, run_worker: RunWorker
) -> None:
    call = Echo.objects.create().bump()
    queue = dispatch.get_queue("default")
    job = Job.fetch(call.job_id, connection=queue.connection)
    queue.remove(job)
    job.set_status(JobStatus.FAILED)  # e.g. its work horse was killed before it claimed the call
    _age(call, enqueued_at=True)
    assert recover_stranded_calls().repushed_enqueued == 1
    run_worker()
    call.refresh_from_db()
    assert call.state == CallState.SUCCEEDED


def test_enqueued_call_still_queued_in_rq_is_left_alone(queued_jobs: Callable[..., int]) -> None:
    call = Echo.objects.create().bump()
    _age(call, enqueued_at=True)
    assert recover_stranded_calls().total == 0
    assert queued_jobs() == 1


def _claimed_then_lost(call: MethodCall) -> None:
    """What a worker killed mid-call leaves: running, attempt 1, a lease that ran out."""
    MethodCall.objects.filter(pk=call.pk).update(
        state=CallState.RUNNING,
        attempts=1,
        worker="killed-worker",
        started_at=Now() - AGES_AGO,
        lease_expires_at=Now() - datetime.timedelta(seconds=1),
    )


def test_running_call_with_expired_lease_and_no_retries_fails_saying_the_worker_was_lost() -> None:
    call = Echo.objects.create().bump()
    _claimed_then_lost(call)
    assert recover_stranded_calls().failed_lost == 1
    call.refresh_from_db()
    assert call.state == CallState.FAILED
    assert call.error_type == "asyncmodels.WorkerLost"
    assert "killed-worker" in call.error and "was lost" in call.error
    assert "does not retry" in call.error
    assert call.attempt_log[-1]["outcome"] == "lost"
    assert call.lease_expires_at is None and call.finished_at is not None


def test_lost_running_call_that_was_asked_to_stop_ends_cancelled_not_retried() -> None:
    call = Echo.objects.create().flaky(failures=0)  # retries=2
    _claimed_then_lost(call)
    call.refresh_from_db()
    assert call.cancel(reason="operator: stop") is True
    report = recover_stranded_calls()
    assert (report.retried_lost, report.failed_lost, report.cancelled_lost, report.total) == (0, 0, 1, 1)
    call.refresh_from_db()
    assert (call.state, call.state_reason, call.run_after) == (CallState.CANCELLED, "operator: stop", None)
    assert call.finished_at is not None and call.lease_expires_at is None
    assert call.attempt_log[-1]["outcome"] == "lost"


def test_running_call_with_expired_lease_and_retries_is_retried(run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    call = echo.flaky(failures=0)
    _claimed_then_lost(call)
    assert recover_stranded_calls().retried_lost == 1
    call.refresh_from_db()
    assert call.state == CallState.SCHEDULED
    assert "was lost" in call.state_reason and "Attempt 2 of 3" in call.state_reason
    MethodCall.objects.filter(pk=call.pk).update(run_after=Now() - datetime.timedelta(seconds=1))
    assert recover_stranded_calls().pushed_due == 1
    run_worker()
    call.refresh_from_db()
    assert (call.state, call.attempts) == (CallState.SUCCEEDED, 2)
    assert [entry["outcome"] for entry in call.attempt_log] == ["lost", "succeeded"]


def test_running_call_with_a_live_lease_is_left_alone() -> None:
    call = Echo.objects.create().bump()
    MethodCall.objects.filter(pk=call.pk).update(
        state=CallState.RUNNING, attempts=1, lease_expires_at=Now() + datetime.timedelta(minutes=1)
    )
    assert recover_stranded_calls().total == 0
    call.refresh_from_db()
    assert call.state == CallState.RUNNING


def test_late_outcome_of_an_attempt_declared_lost_is_not_recorded() -> None:
    from asyncmodels.job import _finish

    call = Echo.objects.create().bump()
    _claimed_then_lost(call)
    stale = MethodCall.objects.get(pk=call.pk)  # what the slow worker holds
    recover_stranded_calls()
    assert _finish(stale, state=CallState.SUCCEEDED) is False
    call.refresh_from_db()
    assert call.state == CallState.FAILED


def test_cancelled_call_is_never_pushed(queued_jobs: Callable[..., int], dead_redis: None) -> None:
    call = Echo.objects.create().bump()  # push fails: pending
    assert call.cancel() is True
    _age(call, created_at=True)
    assert recover_stranded_calls().total == 0
    call.refresh_from_db()
    assert call.state == CallState.CANCELLED


def test_two_recoveries_at_once_push_each_call_once(
    monkeypatch: pytest.MonkeyPatch, queued_jobs: Callable[..., int], run_worker: RunWorker
) -> None:
    echoes = [Echo.objects.create() for _ in range(20)]
    real_get_queue = dispatch.get_queue
    monkeypatch.setattr(
        dispatch,
        "get_queue",
        lambda name: dead_queue("default"),
    )
    calls = [echo.bump() for echo in echoes]  # every push lost
    monkeypatch.setattr(dispatch, "get_queue", real_get_queue)
    MethodCall.objects.update(created_at=Now() - AGES_AGO)
    reports: list[RecoveryReport] = []
    barrier = threading.Barrier(2)

    def recover() -> None:
        barrier.wait()
        try:
            reports.append(recover_stranded_calls(["default"]))
        finally:
            connection.close()

    threads = [threading.Thread(target=recover) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(report.pushed_pending for report in reports) >= len(calls)
    assert queued_jobs() == len(calls)  # RQ refused every second push of the same attempt
    run_worker()
    assert sorted(Echo.objects.values_list("hits", flat=True)) == [1] * len(calls)


def test_a_pass_with_nothing_to_do_is_five_indexed_queries(
    django_assert_num_queries: DjangoAssertNumQueries,
) -> None:
    for _ in range(3):
        call = Echo.objects.create().bump()
        MethodCall.objects.filter(pk=call.pk).update(state=CallState.SUCCEEDED)
    # due, pending, enqueued, lost leases, waiting: one partial-index read each.
    with django_assert_num_queries(5):
        assert recover_stranded_calls(["default"]).total == 0


@pytest.mark.skipif(
    not settings.DATABASES["default"]["ENGINE"].endswith("postgresql"), reason="PostgreSQL plans"
)
def test_a_pass_reads_its_partial_indexes_never_the_whole_table() -> None:
    """Every read of a pass (moving a call of each kind, and idle) can be served by an index: with
    sequential scans priced out, no plan scans the calls table (bench/scale.py EXPLAINs them on a
    million rows)."""
    calls = [Echo.objects.create().bump() for _ in range(4)]
    _age(calls[0], enqueued_at=True)  # enqueued, its job flushed below
    MethodCall.objects.filter(pk=calls[1].pk).update(state=CallState.PENDING, created_at=Now() - AGES_AGO)
    MethodCall.objects.filter(pk=calls[2].pk).update(state=CallState.SCHEDULED, run_after=Now())
    _claimed_then_lost(calls[3])
    dispatch.get_queue("default").connection.flushdb()
    with CaptureQueriesContext(connection) as moving:
        assert recover_stranded_calls(["default"]).total == 4
    with CaptureQueriesContext(connection) as idle:
        assert recover_stranded_calls(["default"]).total == 0
    reads = {
        query["sql"]
        for query in [*moving.captured_queries, *idle.captured_queries]
        if query["sql"].startswith("SELECT") and "asyncmodels_methodcall" in query["sql"]
    }
    assert len(reads) >= 5, reads
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # tiny tables: ask what it *can* do
        for sql in reads:
            cursor.execute("EXPLAIN " + sql)
            plan = "\n".join(row[0] for row in cursor.fetchall())
            assert "Seq Scan on asyncmodels_methodcall " not in plan, (sql, plan)


def test_recover_command_prints_a_summary_and_fails_on_unknown_database(dead_redis: None) -> None:
    from io import StringIO

    from django.core.management import CommandError, call_command

    call = Echo.objects.create().bump()
    _age(call, created_at=True)
    out = StringIO()
    with pytest.raises(CommandError, match="1 recovery step"):  # Redis is still down: exit non-zero
        call_command("asyncmodels_recover", "--database", "default", stdout=out)
    assert "pending pushed 0" in out.getvalue() and "errors 1" in out.getvalue()
    with pytest.raises(CommandError, match="Unknown database alias"):
        call_command("asyncmodels_recover", "--database", "nope")


def test_with_redis_down_a_pass_stops_pushing_after_the_first_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attempts: list[str] = []

    def counting_dead_queue(name: str) -> Queue:
        attempts.append(name)
        return dead_queue(name)

    monkeypatch.setattr(dispatch, "get_queue", counting_dead_queue)
    for _ in range(5):
        Echo.objects.create().bump()
    attempts.clear()
    MethodCall.objects.update(created_at=Now() - AGES_AGO)
    report = recover_stranded_calls(["default"])
    assert (report.pushed_pending, report.errors) == (0, 1)
    assert len(attempts) == 1  # not five waits on a dead Redis
    assert MethodCall.objects.pending().count() == 5


def test_job_taken_off_the_queue_by_a_worker_that_died_before_claiming_is_pushed_again(
    redis_connection: redis.Redis, run_worker: RunWorker
) -> None:
    call = Echo.objects.create().bump()
    queue = dispatch.get_queue("default")
    queue.connection.lrem(queue.key, 0, call.job_id)  # dequeued; its status still says "queued"
    assert Job.fetch(call.job_id, connection=queue.connection).get_status() == JobStatus.QUEUED
    _age(call, enqueued_at=True)
    assert recover_stranded_calls().repushed_enqueued == 1
    run_worker()
    call.refresh_from_db()
    assert (call.state, call.attempts) == (CallState.SUCCEEDED, 1)


def test_running_row_from_before_leases_existed_is_judged_by_its_start() -> None:
    call = Echo.objects.create().bump()
    MethodCall.objects.filter(pk=call.pk).update(
        state=CallState.RUNNING, attempts=1, started_at=Now() - AGES_AGO, lease_expires_at=None
    )
    assert recover_stranded_calls().failed_lost == 1
    call.refresh_from_db()
    assert call.error_type == "asyncmodels.WorkerLost"


def test_call_whose_queue_left_rq_queues_fails_saying_so_and_others_still_move(
    settings: object, dead_redis: None
) -> None:
    stranded = Echo.objects.create().bump.using(queue="urgent")()
    other = Echo.objects.create().bump()
    queues = dict(settings.RQ_QUEUES)  # type: ignore[attr-defined]
    del queues["urgent"]
    settings.RQ_QUEUES = queues  # type: ignore[attr-defined]
    MethodCall.objects.update(created_at=Now() - AGES_AGO - datetime.timedelta(minutes=1))
    MethodCall.objects.filter(pk=other.pk).update(created_at=Now() - AGES_AGO)
    recover_stranded_calls(["default"])
    stranded.refresh_from_db()
    assert (stranded.state, stranded.error_type) == (CallState.FAILED, "asyncmodels.UnknownQueue")
    assert "'urgent' is no longer in settings.RQ_QUEUES" in stranded.error
    other.refresh_from_db()
    assert other.state == CallState.PENDING  # Redis is down for it: it waits, with its reason
    assert "push to queue 'default' failed" in other.state_reason


def test_a_row_that_breaks_recovery_does_not_stop_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncmodels import recovery

    broken, fine = Echo.objects.create().bump(), Echo.objects.create().bump()
    for call in (broken, fine):
        _claimed_then_lost(call)
    real = recovery.lost_attempt_changes

    def fail_for_one(call: MethodCall, reason: str | None = None) -> dict[str, object]:
        if call.pk == broken.pk:
            raise RuntimeError("a corrupt row")
        return real(call, reason)

    monkeypatch.setattr(recovery, "lost_attempt_changes", fail_for_one)
    report = recover_stranded_calls(["default"])
    assert (report.failed_lost, report.errors) == (1, 1)
    fine.refresh_from_db()
    assert fine.state == CallState.FAILED


def _strand(count: int) -> dict[str, list[MethodCall]]:
    """``count`` stranded calls of each kind a pass moves, their jobs flushed from Redis."""
    succeeded, failed = Echo.objects.create().bump(), Echo.objects.create().bump()
    made: dict[str, list[MethodCall]] = {
        kind: [] for kind in ("pending", "enqueued", "lost", "due", "released", "doomed")
    }
    for _ in range(count):
        echo = Echo.objects.create()
        made["pending"].append(echo.bump())
        made["enqueued"].append(echo.bump())
        made["lost"].append(echo.bump())
        made["due"].append(echo.bump())
        made["released"].append(echo.bump.using(after=[succeeded])())
        made["doomed"].append(echo.bump.using(after=[failed])())
    MethodCall.objects.filter(pk=succeeded.pk).update(state=CallState.SUCCEEDED, finished_at=Now())
    MethodCall.objects.filter(pk=failed.pk).update(state=CallState.FAILED, finished_at=Now())
    ids = {kind: [call.pk for call in calls] for kind, calls in made.items()}
    MethodCall.objects.filter(pk__in=ids["pending"]).update(
        state=CallState.PENDING, created_at=Now() - AGES_AGO
    )
    MethodCall.objects.filter(pk__in=ids["enqueued"]).update(enqueued_at=Now() - AGES_AGO)
    MethodCall.objects.filter(pk__in=ids["due"]).update(state=CallState.SCHEDULED, run_after=Now())
    for call in made["lost"]:
        _claimed_then_lost(call)
    dispatch.get_queue("default").connection.flushdb()
    return made


@pytest.mark.parametrize("count", [2, 6])
def test_a_pass_moves_stranded_calls_as_sets_in_as_many_statements_for_two_as_for_six(
    count: int, queued_jobs: Callable[..., int]
) -> None:
    """Each step takes its rows in one UPDATE and pushes them in one pipeline (issue 6: a pass
    over 100 stranded calls under 100 ms): the statements of a pass do not grow with the calls
    it moves. Measured against a pass over one call of each kind, in the same test."""
    _strand(1)
    with CaptureQueriesContext(connection) as one_each:
        assert recover_stranded_calls(["default"]).total == 6
    MethodCall.objects.all().delete()
    made = _strand(count)
    with CaptureQueriesContext(connection) as many:
        report = recover_stranded_calls(["default"])
    assert (report.pushed_pending, report.repushed_enqueued, report.failed_lost) == (count, count, count)
    assert (report.pushed_due, report.released_waiting, report.cancelled_waiting) == (count, count, count)
    assert report.errors == 0
    assert len(many.captured_queries) == len(one_each.captured_queries), [
        query["sql"][:120] for query in many.captured_queries
    ]
    expected = {"pending": "enqueued", "enqueued": "enqueued", "lost": "failed", "due": "enqueued"}
    expected |= {"released": "enqueued", "doomed": "cancelled"}
    for kind, calls in made.items():
        states = set(
            MethodCall.objects.filter(pk__in=[call.pk for call in calls]).values_list("state", flat=True)
        )
        assert states == {expected[kind]}, kind
    assert queued_jobs() == 4 * count  # each pushed call's job is in the queue, once
    doomed = MethodCall.objects.get(pk=made["doomed"][0].pk)
    assert "which this call waited for, failed; this call never ran" in doomed.state_reason
    lost = MethodCall.objects.get(pk=made["lost"][0].pk)
    assert lost.error_type == "asyncmodels.WorkerLost" and lost.attempt_log[-1]["outcome"] == "lost"
