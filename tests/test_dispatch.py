"""On-commit push: rollbacks, nested atomics, Redis down, a second database, the immediate backend."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import connection, transaction
from django.db.models.functions import Now
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from asyncmodels import dispatch
from asyncmodels.models import CallState, MethodCall
from asyncmodels.recovery import recover_stranded_calls
from testproject.cloud.models import Account, Echo, Instance

from .conftest import RunWorker, dead_queue

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


class Rollback(Exception):
    pass


@pytest.fixture
def instance() -> Instance:
    return Instance.objects.create(account=Account.objects.create(name="acme"), name="web1")


def test_rolled_back_call_leaves_no_row_and_enqueues_nothing(
    instance: Instance, queued_jobs: Callable[..., int], run_worker: RunWorker
) -> None:
    with pytest.raises(Rollback), transaction.atomic():
        instance.provision(size="large")
        raise Rollback
    assert MethodCall.objects.count() == 0
    assert queued_jobs() == 0
    run_worker()
    instance.refresh_from_db()
    assert instance.status == "new"


def test_outer_rollback_wins_over_committed_inner_atomic(
    instance: Instance, queued_jobs: Callable[..., int]
) -> None:
    with pytest.raises(Rollback), transaction.atomic():
        with transaction.atomic():
            instance.provision(size="large")
        assert queued_jobs() == 0  # a released savepoint is not a commit
        raise Rollback
    assert MethodCall.objects.count() == 0
    assert queued_jobs() == 0


def test_rolled_back_inner_atomic_drops_only_its_own_call(
    instance: Instance, queued_jobs: Callable[..., int], run_worker: RunWorker
) -> None:
    with transaction.atomic():
        kept = instance.describe()
        with pytest.raises(Rollback), transaction.atomic():
            instance.provision(size="large")
            raise Rollback
    assert list(MethodCall.objects.values_list("pk", flat=True)) == [kept.pk]
    assert queued_jobs() == 1
    run_worker()
    kept.refresh_from_db()
    assert kept.state == CallState.SUCCEEDED
    instance.refresh_from_db()
    assert instance.status == "new"


def test_call_is_pushed_only_when_the_transaction_commits(
    instance: Instance, queued_jobs: Callable[..., int]
) -> None:
    with transaction.atomic():
        call = instance.provision(size="large")
        # Written `enqueued` (its push is certain at the commit: no UPDATE after the push), yet
        # nothing is in Redis before the commit.
        assert call.state == CallState.ENQUEUED
        assert queued_jobs() == 0
    assert queued_jobs("provisioning") == 1
    call.refresh_from_db()
    assert call.state == CallState.ENQUEUED
    assert call.enqueued_at == call.created_at


def test_a_call_made_in_a_savepoint_is_pending_until_its_push(
    instance: Instance, queued_jobs: Callable[..., int]
) -> None:
    with transaction.atomic():
        with transaction.atomic():  # a savepoint: it may roll back without its transaction
            call = instance.provision(size="large")
            assert call.state == CallState.PENDING
        assert queued_jobs() == 0
    assert queued_jobs("provisioning") == 1
    call.refresh_from_db()
    assert call.state == CallState.ENQUEUED
    assert call.enqueued_at is not None


def test_redis_down_at_commit_leaves_call_pending_and_logs(
    instance: Instance, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Port 1 on loopback: nothing listens there, so every command raises ConnectionError.
    dead = dead_queue("provisioning")
    monkeypatch.setattr(dispatch, "get_queue", lambda name: dead)
    with caplog.at_level(logging.ERROR, logger="asyncmodels"), transaction.atomic():
        call = instance.provision(size="large")
        Account.objects.create(name="written in the same transaction")
    assert Account.objects.filter(name="written in the same transaction").exists()
    call.refresh_from_db()
    assert call.state == CallState.PENDING
    assert f"Could not push call {call.pk}" in caplog.text
    assert "ConnectionError" in caplog.text


def test_call_on_second_database_lands_there_and_is_pushed_on_its_commit(
    queued_jobs: Callable[..., int], run_worker: RunWorker
) -> None:
    echo = Echo.objects.using("other").create(note="elsewhere")
    with transaction.atomic(using="other"):
        with transaction.atomic(using="default"):
            call = echo.echo("hi")
        assert queued_jobs() == 0  # default committed; the row is on "other", still open
        assert call._state.db == "other"
    assert queued_jobs() == 1
    assert MethodCall.objects.using("default").count() == 0
    run_worker()
    stored = MethodCall.objects.using("other").get(pk=call.pk)
    assert stored.state == CallState.SUCCEEDED
    assert stored.result == {"args": ["hi"], "kwargs": {}, "types": ["str"]}


def test_rollback_on_other_database_does_not_drop_a_default_call(queued_jobs: Callable[..., int]) -> None:
    echo = Echo.objects.create()
    with pytest.raises(Rollback), transaction.atomic(using="other"):
        call = echo.echo("kept")
        raise Rollback
    assert MethodCall.objects.filter(pk=call.pk).exists()
    assert queued_jobs() == 1


@override_settings(ASYNCMODELS={"BACKEND": "immediate"})
def test_immediate_backend_runs_on_commit_through_the_job(
    instance: Instance, queued_jobs: Callable[..., int]
) -> None:
    with transaction.atomic():
        call = instance.provision(size="medium")
        instance.refresh_from_db()
        assert instance.status == "new"  # never inline inside the caller's transaction
    call.refresh_from_db()
    assert call.state == CallState.SUCCEEDED
    assert call.result == {"name": "web1", "size": "medium", "status": "running"}
    assert call.attempts == 1
    assert call.worker
    assert queued_jobs() == 0


@override_settings(ASYNCMODELS={"BACKEND": "immediate"})
def test_immediate_backend_records_failures_like_a_worker() -> None:
    call = Echo.objects.create().fail("boom")  # outside a transaction: runs at once
    assert call.state == CallState.FAILED
    assert call.error == "boom"
    assert call.error_type == "builtins.ValueError"


def test_a_failing_push_does_not_break_the_commit_or_drop_other_hooks(
    monkeypatch: pytest.MonkeyPatch, queued_jobs: Callable[..., int], caplog: pytest.LogCaptureFixture
) -> None:
    # Whatever goes wrong in the on-commit push (here: an unexpected error), Django's robust
    # on_commit must log it and still run the next hook. Django 5.2 crashed on a
    # functools.partial callback here (ticket #36487), so the callback must be a function.
    def broken_push_many(calls: list[MethodCall]) -> int:
        raise RuntimeError("unexpected failure inside push")

    real_push_many = dispatch.push_many
    monkeypatch.setattr(dispatch, "push_many", broken_push_many)
    ran: list[str] = []
    first, second = Echo.objects.create(), Echo.objects.create()
    with caplog.at_level(logging.ERROR), transaction.atomic():
        lost = first.bump()
        also_lost = second.bump()
        transaction.on_commit(lambda: ran.append("the caller's own hook"))
    assert "unexpected failure inside push" in caplog.text
    assert ran == ["the caller's own hook"]
    lost.refresh_from_db()
    also_lost.refresh_from_db()
    # Written `enqueued` at the top of the transaction, and their push died: Redis holds nothing,
    # which recovery finds once the grace has passed (as after a process killed at the commit).
    assert (lost.state, also_lost.state) == (CallState.ENQUEUED, CallState.ENQUEUED)
    assert queued_jobs() == 0
    monkeypatch.setattr(dispatch, "push_many", real_push_many)
    MethodCall.objects.update(enqueued_at=Now() - datetime.timedelta(minutes=5))
    assert recover_stranded_calls().repushed_enqueued == 2
    assert queued_jobs() == 2


def test_calls_of_one_transaction_are_pushed_in_one_pipeline_and_marked_in_one_update(
    monkeypatch: pytest.MonkeyPatch,
    queued_jobs: Callable[..., int],
    run_worker: RunWorker,
) -> None:
    import redis.client

    executed: list[int] = []
    real_execute = redis.client.Pipeline.execute

    def counting_execute(self: redis.client.Pipeline, *args: Any, **kwargs: Any) -> Any:
        executed.append(len(self.command_stack))
        return real_execute(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", counting_execute)
    echoes = [Echo.objects.create() for _ in range(20)]
    instance = Instance.objects.create(account=Account.objects.create(name="a"), name="web")
    ContentType.objects.get_for_models(Echo, Instance)  # cached, as in any running process
    with CaptureQueriesContext(connection) as queries, transaction.atomic():
        calls = [echo.bump() for echo in echoes]
        with transaction.atomic():  # made in a savepoint: written pending, checked and marked
            calls.append(instance.provision())
    statements = [
        q["sql"].split()[0] for q in queries.captured_queries if "asyncmodels_methodcall" in q["sql"]
    ]
    # 21 INSERTs; on commit the one written pending (in the savepoint) is checked to be still
    # pending (SELECT) and marked (UPDATE); the 20 written enqueued need neither.
    assert statements == ["INSERT"] * 21 + ["SELECT", "UPDATE"]
    for query in queries.captured_queries[-2:]:  # about that one call only
        assert f"IN ({calls[-1].pk})" in query["sql"]
    assert len(executed) == 2  # one pipeline asks which job ids RQ holds, one enqueues the rest
    assert {call.state for call in calls} == {CallState.ENQUEUED}
    assert set(MethodCall.objects.values_list("state", flat=True)) == {CallState.ENQUEUED}
    assert queued_jobs("default") == 20 and queued_jobs("provisioning") == 1
    run_worker()
    assert set(MethodCall.objects.values_list("state", flat=True)) == {CallState.SUCCEEDED}
    assert all(hits == 1 for hits in Echo.objects.values_list("hits", flat=True))


def test_a_batch_skips_calls_rolled_back_with_a_savepoint(queued_jobs: Callable[..., int]) -> None:
    echo = Echo.objects.create()
    with transaction.atomic():
        kept = echo.bump()
        try:
            with transaction.atomic():
                echo.bump()
                echo.bump()
                raise RuntimeError("roll the savepoint back")
        except RuntimeError:
            pass
        also_kept = echo.bump()
    assert MethodCall.objects.count() == 2
    assert set(MethodCall.objects.values_list("state", flat=True)) == {CallState.ENQUEUED}
    assert {kept.state, also_kept.state} == {CallState.ENQUEUED}
    assert queued_jobs() == 2


def test_a_batch_keeps_each_calls_job_options_and_skips_jobs_rq_holds(
    queued_jobs: Callable[..., int], redis_connection: Any
) -> None:
    from rq.job import Job

    echo = Echo.objects.create()
    with transaction.atomic():
        sleepy = echo.sleepy(0)
        plain = echo.bump()
        # A transaction held open past the grace: recovery may have pushed this attempt after the
        # commit, before this hook (enqueued here, as if it had): the batch must not push it twice.
        setattr(plain, dispatch.WRITTEN_AT, getattr(plain, dispatch.WRITTEN_AT) - 3600)
        dispatch.get_queue("default").enqueue(dispatch.JOB_FUNCTION, plain.pk, "default", job_id=plain.job_id)
    fetched = Job.fetch(f"asyncmodels-default-{sleepy.pk}-1", connection=redis_connection)
    assert fetched.timeout == 1 and fetched.args == [sleepy.pk, "default"] and fetched.result_ttl == 0
    assert queued_jobs() == 2  # not 3
    assert {sleepy.state, plain.state} == {CallState.ENQUEUED}


def test_a_batch_with_redis_down_stays_pending_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = dead_queue("default")
    monkeypatch.setattr(dispatch, "get_queue", lambda name: dead)
    echo = Echo.objects.create()
    with transaction.atomic():
        calls = [echo.bump() for _ in range(3)]
    for call in calls:
        call.refresh_from_db()
        assert call.state == CallState.PENDING
        assert call.state_reason.startswith("The push to queue") and "recovery" in call.state_reason


def test_queues_are_kept_between_pushes_until_their_settings_change(settings: Any) -> None:
    first = dispatch.get_queue("default")
    assert dispatch.get_queue("default") is first  # one Redis client (and pool), not one per push
    assert dispatch.get_queue("urgent") is not first
    settings.RQ_QUEUES = {**settings.RQ_QUEUES, "default": {**settings.RQ_QUEUES["default"], "DB": 3}}
    assert dispatch.get_queue("default") is not first
