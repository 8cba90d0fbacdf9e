"""MethodCall's querysets and its compare-and-set transitions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db import transaction

from asyncmodels import current_call
from asyncmodels.exceptions import UnknownQueueError
from asyncmodels.models import CallState, MethodCall
from testproject.cloud.models import Account, Echo, Instance

from .conftest import RunWorker

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def instance() -> Instance:
    return Instance.objects.create(account=Account.objects.create(name="acme"), name="web1")


def test_state_filters_and_for_object(instance: Instance, run_worker: RunWorker) -> None:
    other = Instance.objects.create(account=instance.account, name="web2")
    ok = instance.provision(size="large")
    bad = instance.resize("huge")
    elsewhere = other.describe()
    run_worker()
    with transaction.atomic(), transaction.atomic():  # in a savepoint: written pending
        waiting = instance.describe()
        calls = MethodCall.objects.for_object(instance)
        assert set(calls.pending()) == {waiting}
    assert set(calls.succeeded()) == {ok}
    assert set(calls.failed()) == {bad}
    assert set(calls.finished()) == {ok, bad}
    assert set(MethodCall.objects.for_object(other)) == {elsewhere}
    assert set(MethodCall.objects.for_object(instance.account)) == set()
    waiting.refresh_from_db()
    assert set(calls.unfinished()) == {waiting}
    assert set(calls.enqueued()) == {waiting}
    assert set(MethodCall.objects.for_method("cloud.Instance.provision")) == {ok}


def test_for_object_distinguishes_models_with_the_same_pk(instance: Instance) -> None:
    echo = Echo.objects.create(pk=instance.pk)
    echo_call = echo.bump()
    instance_call = instance.describe()
    assert list(MethodCall.objects.for_object(echo)) == [echo_call]
    assert list(MethodCall.objects.for_object(instance)) == [instance_call]


def test_cancel_wins_only_before_a_worker_claims_the_call(instance: Instance, run_worker: RunWorker) -> None:
    pending = instance.describe()
    assert pending.cancel() is True
    assert pending.state == CallState.CANCELLED
    assert pending.finished_at is not None
    assert pending.cancel() is False  # already terminal

    done = instance.describe()
    run_worker()
    assert done.cancel() is False
    assert done.state == CallState.SUCCEEDED


def test_cancel_inside_the_callers_transaction(instance: Instance, queued_jobs: object) -> None:
    with transaction.atomic():
        call = instance.describe()
        assert call.cancel() is True
    call.refresh_from_db()
    # The push still happened on commit, but mark_enqueued lost the compare-and-set.
    assert call.state == CallState.CANCELLED


def test_cancel_of_a_running_call_only_asks_it_to_stop(instance: Instance) -> None:
    call = instance.describe()
    MethodCall.objects.filter(pk=call.pk).update(state=CallState.RUNNING)
    assert call.cancel() is True
    assert call.state == CallState.RUNNING  # nothing interrupts the method
    assert call.cancel_requested_at is not None
    assert call.state_reason == "Asked to stop while running."


def test_str_duration_and_job_id(instance: Instance, run_worker: RunWorker) -> None:
    call = instance.describe()
    assert call.job_id == f"asyncmodels-default-{call.pk}-1"
    assert call.duration is None
    run_worker()
    call.refresh_from_db()
    assert call.duration is not None and call.duration.total_seconds() >= 0
    assert str(call) == f"cloud.Instance.describe({instance.pk}) #{call.pk} [succeeded]"


def test_retry_gives_a_failed_call_one_more_attempt_pushed_on_commit(
    run_worker: RunWorker, queued_jobs: Callable[..., int]
) -> None:
    echo = Echo.objects.create()
    call = echo.flaky.using(retries=0)(failures=1)
    run_worker()
    call.refresh_from_db()
    assert call.state == CallState.FAILED and call.attempts == 1
    with transaction.atomic():
        assert call.retry(reason="operator retried it") is True
        assert call.state == CallState.PENDING
        assert call.finished_at is None
        assert call.state_reason == "operator retried it"
        assert queued_jobs() == 0  # not before the commit
    assert queued_jobs() == 1
    call.refresh_from_db()
    assert call.state == CallState.ENQUEUED
    assert call.error  # the last error stays until the new attempt ends
    run_worker()
    call.refresh_from_db()
    assert call.state == CallState.SUCCEEDED
    assert call.attempts == 2
    assert call.return_value == 2
    assert call.error == "" and call.state_reason == ""
    assert [entry["outcome"] for entry in call.attempt_log] == ["failed", "succeeded"]


def test_retry_of_a_cancelled_call_runs_it(run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    call = echo.bump()
    assert call.cancel(reason="not now") is True
    assert call.state_reason == "not now"
    run_worker()  # the job already in RQ finds the call cancelled and does nothing
    echo.refresh_from_db()
    assert echo.hits == 0
    assert call.retry() is True
    run_worker()
    call.refresh_from_db()
    echo.refresh_from_db()
    assert (call.state, call.attempts, echo.hits) == (CallState.SUCCEEDED, 1, 1)


def test_retry_refuses_succeeded_and_unfinished_calls(run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    done = echo.bump()
    run_worker()
    assert done.retry() is False
    assert done.state == CallState.SUCCEEDED
    with transaction.atomic():
        waiting = echo.bump()
        assert waiting.retry() is False
        assert waiting.state == CallState.ENQUEUED  # written so: pushed at the commit
    running = echo.bump()
    MethodCall.objects.filter(pk=running.pk).update(state=CallState.RUNNING)
    assert running.retry() is False
    assert running.state == CallState.RUNNING
    run_worker()
    echo.refresh_from_db()
    assert echo.hits == 2  # done and waiting ran once each; nothing ran twice


def test_retry_rolled_back_leaves_the_call_failed_and_pushes_nothing(
    run_worker: RunWorker, queued_jobs: Callable[..., int]
) -> None:
    call = Echo.objects.create().fail("boom")
    run_worker()
    call.refresh_from_db()
    with pytest.raises(RuntimeError), transaction.atomic():
        assert call.retry() is True
        raise RuntimeError("the caller's transaction fails")
    call.refresh_from_db()
    assert call.state == CallState.FAILED
    assert queued_jobs() == 0


def test_retry_on_a_removed_queue_raises_and_changes_nothing_even_from_a_stale_object(
    run_worker: RunWorker, settings: Any
) -> None:
    call = Echo.objects.create().fail.using(queue="urgent")("boom")
    stale = MethodCall.objects.get(pk=call.pk)  # read while still enqueued
    run_worker()
    settings.RQ_QUEUES = {name: config for name, config in settings.RQ_QUEUES.items() if name != "urgent"}
    with pytest.raises(
        UnknownQueueError, match=r"queue 'urgent' of call #\d+ is no longer in settings\.RQ_QUEUES"
    ):
        stale.retry()
    call.refresh_from_db()
    assert (call.state, call.error, call.attempts) == (CallState.FAILED, "boom", 1)


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_retry_on_another_database_is_pushed_when_that_database_commits(
    run_worker: RunWorker, queued_jobs: Callable[..., int]
) -> None:
    call = Echo.objects.using("other").create().fail("boom")
    run_worker()
    with transaction.atomic(using="other"):
        assert call.retry() is True
        assert queued_jobs() == 0
    assert queued_jobs() == 1
    with transaction.atomic(using="other"):
        MethodCall.objects.using("other").filter(pk=call.pk).update(state=CallState.FAILED)
    with pytest.raises(RuntimeError), transaction.atomic(using="other"):
        assert call.retry() is True
        raise RuntimeError("rolled back")
    call.refresh_from_db()
    assert call.state == CallState.FAILED
    assert queued_jobs() == 1


def test_a_running_call_asked_to_stop_ends_cancelled_when_its_attempt_fails(run_worker: RunWorker) -> None:
    call = Echo.objects.create().asked_to_stop("fail")  # retries=3 on ConnectionError
    run_worker()
    call.refresh_from_db()
    assert call.state == CallState.CANCELLED  # no retry followed the failed attempt
    assert call.attempts == 1
    assert call.state_reason == "operator: stop this"
    assert call.error == "a retryable failure, after the cancel request"  # the attempt's error is kept
    assert call.cancel_requested_at is not None and call.finished_at is not None
    assert call.run_after is None
    assert [entry["outcome"] for entry in call.attempt_log] == ["failed"]


def test_a_running_call_asked_to_stop_that_returns_first_succeeds_saying_so(run_worker: RunWorker) -> None:
    call = Echo.objects.create().asked_to_stop("return")
    run_worker()
    call.refresh_from_db()
    assert (call.state, call.return_value) == (CallState.SUCCEEDED, "finished anyway")
    assert call.state_reason == "A cancel was requested while the attempt ran, but the method finished first."


def test_cancel_of_a_running_call_is_a_request_made_once_and_cleared_by_retry(run_worker: RunWorker) -> None:
    call = Echo.objects.create().bump()
    MethodCall.objects.filter(pk=call.pk).update(state=CallState.RUNNING, attempts=1)
    call.refresh_from_db()
    assert call.can_cancel
    assert call.cancel(reason="stop") is True
    assert (call.state, call.state_reason) == (CallState.RUNNING, "stop")
    assert call.cancel_requested_at is not None and not call.can_cancel
    assert call.cancel() is False  # asked already
    MethodCall.objects.filter(pk=call.pk).update(state=CallState.FAILED)
    call.refresh_from_db()
    assert call.retry() is True
    assert call.cancel_requested_at is None


def test_a_method_sees_its_current_call_and_stops_at_a_safe_point_when_asked(run_worker: RunWorker) -> None:
    assert current_call() is None  # outside a running method
    echo = Echo.objects.create()
    call = echo.steps(count=5, stop_after=2)
    run_worker()
    call.refresh_from_db()
    echo.refresh_from_db()
    assert echo.hits == 2  # two steps ran; it stopped before the third
    assert (call.state, call.attempts) == (CallState.CANCELLED, 1)  # retries=3, yet no retry
    assert call.error_type == "asyncmodels.exceptions.CallCancelledError"
    assert call.state_reason == "operator: stop between steps"
    assert [entry["outcome"] for entry in call.attempt_log] == ["cancelled"]
    assert current_call() is None


def test_a_method_not_asked_to_stop_runs_every_step(run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    call = echo.steps(count=3, stop_after=99)
    run_worker()
    call.refresh_from_db()
    echo.refresh_from_db()
    assert (call.state, call.return_value, echo.hits) == (CallState.SUCCEEDED, 3, 3)
