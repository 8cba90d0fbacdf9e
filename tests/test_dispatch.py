"""On-commit push: rollbacks, nested atomics, Redis down, a second database, the immediate backend."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from django.db import transaction
from django.test import override_settings

from asyncmodels import dispatch
from asyncmodels.models import CallState, MethodCall
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


def test_a_failing_push_does_not_break_the_commit_or_drop_other_pushes(
    monkeypatch: pytest.MonkeyPatch, queued_jobs: Callable[..., int], caplog: pytest.LogCaptureFixture
) -> None:
    # Whatever goes wrong in one on-commit push (here: an unexpected error), Django's robust
    # on_commit must log it and still run the next call's push. Django 5.2 crashed on a
    # functools.partial callback here (ticket #36487), so the callback must be a function.
    real_push = dispatch.push
    first, second = Echo.objects.create(), Echo.objects.create()

    def flaky_push(call: MethodCall) -> bool:
        if call.object_id == str(first.pk):
            raise RuntimeError("unexpected failure inside push")
        return real_push(call)

    monkeypatch.setattr(dispatch, "push", flaky_push)
    with caplog.at_level(logging.ERROR), transaction.atomic():
        lost = first.bump()
        kept = second.bump()
    assert "unexpected failure inside push" in caplog.text
    lost.refresh_from_db()
    kept.refresh_from_db()
    assert (lost.state, kept.state) == (CallState.PENDING, CallState.ENQUEUED)
    assert queued_jobs() == 1
