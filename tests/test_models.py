"""MethodCall's querysets and its compare-and-set transitions."""

from __future__ import annotations

import pytest
from django.db import transaction

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
    with transaction.atomic():
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


def test_running_call_cannot_be_cancelled_or_claimed_again(instance: Instance) -> None:
    call = instance.describe()
    MethodCall.objects.filter(pk=call.pk).update(state=CallState.RUNNING)
    assert call.cancel() is False
    assert call.state == CallState.RUNNING


def test_str_duration_and_job_id(instance: Instance, run_worker: RunWorker) -> None:
    call = instance.describe()
    assert call.job_id == f"asyncmodels-default-{call.pk}-1"
    assert call.duration is None
    run_worker()
    call.refresh_from_db()
    assert call.duration is not None and call.duration.total_seconds() >= 0
    assert str(call) == f"cloud.Instance.describe({instance.pk}) #{call.pk} [succeeded]"
