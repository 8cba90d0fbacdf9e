"""Trying to break the set-wise recovery (asyncmodels/recovery.py): passes at once, a worker's claim
during a pass, mixed batches, dead servers, unknown queues, a failing signal receiver."""

from __future__ import annotations

import datetime
import threading
import time

import pytest
import redis
from django.db import connection
from django.db.models.functions import Now

from asyncmodels import dispatch
from asyncmodels.models import CallState, MethodCall
from asyncmodels.recovery import RecoveryReport, recover_stranded_calls
from testproject.cloud.models import Echo, Ledger

from .conftest import RunWorker, dead_queue, won_claim

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

AGES_AGO = datetime.timedelta(minutes=5)


def _lost(call: MethodCall, attempts: int = 1) -> None:
    MethodCall.objects.filter(pk=call.pk).update(
        state=CallState.RUNNING,
        attempts=attempts,
        worker="killed-worker",
        started_at=Now() - AGES_AGO,
        lease_expires_at=Now() - datetime.timedelta(seconds=1),
    )


# 1. An enqueued call whose job was flushed and whose queue then left RQ_QUEUES.
def test_enqueued_call_whose_queue_left_rq_queues_is_failed_not_stuck(
    settings: object, redis_connection: redis.Redis
) -> None:
    stranded = Echo.objects.create().bump.using(queue="urgent")()
    redis_connection.flushdb()
    MethodCall.objects.filter(pk=stranded.pk).update(enqueued_at=Now() - AGES_AGO)
    queues = dict(settings.RQ_QUEUES)  # type: ignore[attr-defined]
    del queues["urgent"]
    settings.RQ_QUEUES = queues  # type: ignore[attr-defined]
    reports = [recover_stranded_calls(["default"]) for _ in range(3)]
    stranded.refresh_from_db()
    assert (stranded.state, stranded.error_type) == (CallState.FAILED, "asyncmodels.UnknownQueue"), (
        stranded.state,
        [str(r) for r in reports],
    )


# 2. A batch of lost attempts mixing a retry, a failure and a cancel request.
def test_a_batch_of_lost_attempts_of_every_kind_ends_each_row_its_own_way() -> None:
    echo = Echo.objects.create()
    retried = echo.flaky(failures=0)  # retries=2
    failed = echo.bump()  # no retries
    cancelled = echo.flaky(failures=0)
    retried_last = echo.flaky(failures=0)  # its last attempt: fails
    for call in (retried, failed, cancelled):
        _lost(call)
    _lost(retried_last, attempts=3)
    cancelled.refresh_from_db()
    assert cancelled.cancel(reason="operator: stop")
    report = recover_stranded_calls(["default"])
    assert (report.retried_lost, report.failed_lost, report.cancelled_lost, report.errors) == (1, 2, 1, 0)
    for call in (retried, failed, cancelled, retried_last):
        call.refresh_from_db()
    assert retried.state == CallState.SCHEDULED and retried.finished_at is None
    assert retried.run_after is not None and "Attempt 2 of 3" in retried.state_reason
    assert failed.state == CallState.FAILED and failed.finished_at is not None
    assert "does not retry" in failed.error and failed.state_reason == ""
    assert retried_last.state == CallState.FAILED
    assert "No retry left (attempt 3 of 3, retries=2); the call failed." in retried_last.error
    assert "does not retry" not in retried_last.error  # it did retry: it used its retries up
    assert cancelled.state == CallState.CANCELLED and cancelled.state_reason == "operator: stop"
    assert cancelled.run_after is None and cancelled.finished_at is not None
    for call in (retried, failed, cancelled, retried_last):
        assert call.lease_expires_at is None
        assert call.attempt_log[-1]["outcome"] == "lost"
        assert call.attempt_log[-1]["attempt"] == call.attempts, call.attempt_log


def _strand_everything(count: int) -> dict[str, list[MethodCall]]:
    succeeded, failed = Echo.objects.create().bump(), Echo.objects.create().bump()
    made: dict[str, list[MethodCall]] = {
        kind: [] for kind in ("pending", "enqueued", "lost", "lost_retry", "due", "released", "doomed")
    }
    for _ in range(count):
        echo = Echo.objects.create()
        made["pending"].append(echo.bump())
        made["enqueued"].append(echo.bump())
        made["lost"].append(echo.bump())
        made["lost_retry"].append(echo.flaky(failures=0))
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
    for call in made["lost"] + made["lost_retry"]:
        _lost(call)
    dispatch.get_queue("default").connection.flushdb()
    return made


# 3. Three passes at once over stranded calls of every kind: each moved once, nothing lost.
@pytest.mark.parametrize("passes", [3])
def test_three_passes_at_once_move_each_call_once(
    passes: int, redis_connection: redis.Redis, run_worker: RunWorker
) -> None:
    made = _strand_everything(15)
    reports: list[RecoveryReport] = []
    barrier = threading.Barrier(passes)

    def recover() -> None:
        barrier.wait()
        try:
            reports.append(recover_stranded_calls(["default"]))
        finally:
            connection.close()

    threads = [threading.Thread(target=recover) for _ in range(passes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = sum(reports, RecoveryReport())
    assert total.errors == 0, [str(r) for r in reports]
    assert (total.pushed_pending, total.repushed_enqueued, total.failed_lost, total.retried_lost) == (
        15,
        15,
        15,
        15,
    ), str(total)
    assert (total.pushed_due, total.released_waiting, total.cancelled_waiting) == (15, 15, 15), str(total)
    queue = dispatch.get_queue("default")
    listed = [str(job_id) for job_id in redis_connection.lrange(queue.key, 0, -1)]
    assert len(listed) == len(set(listed)) == 60, len(listed)
    run_worker()
    for kind in ("pending", "enqueued", "due", "released"):
        states = set(
            MethodCall.objects.filter(pk__in=[c.pk for c in made[kind]]).values_list("state", "attempts")
        )
        assert states == {(CallState.SUCCEEDED, 1)}, (kind, states)


# 4. A worker claiming a call while a pass holds its transaction (between take and commit).
def test_a_claim_during_the_pass_transaction_waits_and_wins_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asyncmodels.job import _claim

    call = Echo.objects.create().bump()
    MethodCall.objects.filter(pk=call.pk).update(state=CallState.PENDING, created_at=Now() - AGES_AGO)
    dispatch.get_queue("default").connection.flushdb()
    in_push = threading.Event()
    release = threading.Event()
    real_send_jobs = dispatch.send_jobs

    def slow_send_jobs(*args, **kwargs):  # type: ignore[no-untyped-def]
        in_push.set()
        release.wait(10)
        return real_send_jobs(*args, **kwargs)

    monkeypatch.setattr(dispatch, "send_jobs", slow_send_jobs)
    reports: list[RecoveryReport] = []

    def recover() -> None:
        try:
            reports.append(recover_stranded_calls(["default"]))
        finally:
            connection.close()

    thread = threading.Thread(target=recover)
    thread.start()
    assert in_push.wait(10)
    claims: list[object] = []

    def claim() -> None:
        try:
            claims.append(_claim(call.pk, "default"))
        except Exception as exc:
            claims.append(exc)
        finally:
            connection.close()

    claimer = threading.Thread(target=claim)
    claimer.start()
    time.sleep(0.5)
    release.set()
    thread.join()
    claimer.join()
    assert reports and reports[0].errors == 0, [str(r) for r in reports]
    assert len(claims) == 1 and won_claim(claims[0]), claims  # type: ignore[arg-type]
    call.refresh_from_db()
    assert (call.state, call.attempts) == (CallState.RUNNING, 1)


# 5. Two queues on two Redis servers in one batch, one server dead.
def test_a_batch_over_two_redis_servers_one_dead(
    monkeypatch: pytest.MonkeyPatch, settings: object, run_worker: RunWorker
) -> None:
    a = Echo.objects.create().bump()
    b = Echo.objects.create().bump.using(queue="urgent")()
    MethodCall.objects.update(state=CallState.PENDING, created_at=Now() - AGES_AGO, enqueued_at=None)
    dispatch.get_queue("default").connection.flushdb()
    queues = dict(settings.RQ_QUEUES)  # type: ignore[attr-defined]
    queues["urgent"] = {"URL": "redis://127.0.0.1:1/0"}
    settings.RQ_QUEUES = queues  # type: ignore[attr-defined]
    real_get_queue = dispatch.get_queue
    dead = dead_queue("urgent")
    monkeypatch.setattr(
        dispatch, "get_queue", lambda name: dead if name == "urgent" else real_get_queue(name)
    )
    report = recover_stranded_calls(["default"])
    assert (report.pushed_pending, report.errors) == (1, 1), str(report)
    a.refresh_from_db()
    b.refresh_from_db()
    assert a.state == CallState.ENQUEUED
    assert b.state == CallState.PENDING and "failed" in b.state_reason and b.enqueued_at is None


# 6. Exclusive waiting calls: the lost holder's end releases exactly one; passes at once.
def test_lost_exclusive_holder_under_passes_at_once_fails_once_and_loses_no_waiting_call(
    redis_connection: redis.Redis,
) -> None:
    ledger = Ledger.objects.create()
    holder = ledger.settle()
    waiters = [ledger.settle() for _ in range(4)]
    _lost(holder)
    MethodCall.objects.filter(pk__in=[w.pk for w in waiters]).update(state=CallState.WAITING, waits=1)
    redis_connection.flushdb()
    reports: list[RecoveryReport] = []
    barrier = threading.Barrier(3)

    def recover() -> None:
        barrier.wait()
        try:
            reports.append(recover_stranded_calls(["default"]))
        finally:
            connection.close()

    threads = [threading.Thread(target=recover) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = sum(reports, RecoveryReport())
    assert total.errors == 0 and total.failed_lost == 1, str(total)
    states = list(
        MethodCall.objects.filter(pk__in=[w.pk for w in waiters])
        .order_by("pk")
        .values_list("state", flat=True)
    )
    # Each pass may release one waiting call per key (and the holder's end releases one): how
    # many are released depends on how the passes interleave. Exclusivity itself is kept by the
    # claim (the running calls' unique index), so none may be lost or ended here.
    assert all(s in (CallState.WAITING, CallState.ENQUEUED, CallState.PENDING) for s in states), states


# 7. A task_finished receiver whose database write fails, inside the recovery transaction.
def test_a_failing_task_finished_receiver_does_not_undo_the_whole_batch_silently() -> None:

    try:
        from django.tasks.signals import task_finished
    except ImportError:
        from django_tasks.signals import task_finished
    from testproject.cloud import tasks as cloud_tasks

    existing = Echo.objects.create()
    result = cloud_tasks.add.enqueue(1, 1)
    task_call = MethodCall.objects.get(pk=int(result.id))
    plain = Echo.objects.create().bump()
    _lost(task_call)
    _lost(plain)
    MethodCall.objects.filter(pk=plain.pk).update(
        lease_expires_at=Now() - datetime.timedelta(milliseconds=500)
    )

    def audit(sender: object, task_result: object, **kwargs: object) -> None:
        # A user's receiver writing an audit row that happens to exist already.
        Echo.objects.create(pk=existing.pk)

    task_finished.connect(audit)
    try:
        reports = [recover_stranded_calls(["default"]) for _ in range(3)]
    finally:
        task_finished.disconnect(audit)
    # The first pass ends both attempts and commits before any follower (here, the receiver)
    # runs: the later passes find nothing left (before the fix, every pass "failed" both and
    # rolled them back in silence, so both stayed running for good).
    assert [(r.failed_lost, r.errors) for r in reports] == [(2, 0), (0, 0), (0, 0)], [str(r) for r in reports]
    task_call.refresh_from_db()
    plain.refresh_from_db()
    assert (task_call.state, plain.state) == (CallState.FAILED, CallState.FAILED)


# 8. The immediate backend: a pass runs due, pending, released calls and lost attempts' followers.
def test_immediate_backend_pass_runs_each_call_once(settings: object) -> None:
    echo = Echo.objects.create()
    due, pending, dep = echo.bump(), echo.bump(), echo.bump()
    follower = echo.bump.using(after=[dep])()
    MethodCall.objects.filter(pk=due.pk).update(state=CallState.SCHEDULED, run_after=Now())
    MethodCall.objects.filter(pk=pending.pk).update(state=CallState.PENDING, created_at=Now() - AGES_AGO)
    MethodCall.objects.filter(pk=dep.pk).update(state=CallState.SUCCEEDED, finished_at=Now())
    settings.ASYNCMODELS = {**settings.ASYNCMODELS, "BACKEND": "immediate"}  # type: ignore[attr-defined]
    report = recover_stranded_calls(["default"])
    assert report.errors == 0, str(report)
    for call in (due, pending, follower):
        call.refresh_from_db()
        assert (call.state, call.attempts) == (CallState.SUCCEEDED, 1), (call.pk, call.state)
    echo.refresh_from_db()
    assert echo.hits == 3
