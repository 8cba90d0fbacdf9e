"""Retries, backoff, timeouts, scheduling and per-call options."""

from __future__ import annotations

import datetime
import random

import pytest
from django.db import transaction
from django.db.models.functions import Now
from django.utils import timezone

from asyncmodels.exceptions import InvalidOptionError
from asyncmodels.models import CallState, MethodCall
from asyncmodels.recovery import recover_stranded_calls
from asyncmodels.retries import RetryPolicy
from testproject.cloud.models import Echo

from .conftest import RunWorker

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


def _make_due(call: MethodCall) -> None:
    """Move a scheduled call's run_after into the past (the database's clock decides)."""
    MethodCall.objects.filter(pk=call.pk).update(run_after=Now() - datetime.timedelta(seconds=1))


@pytest.mark.parametrize("attempt", range(1, 12))
def test_backoff_doubles_with_jitter_and_never_exceeds_the_maximum(attempt: int) -> None:
    policy = RetryPolicy(
        retries=20, backoff=datetime.timedelta(seconds=2), backoff_max=datetime.timedelta(minutes=1)
    )
    cap = min(60.0, 2.0 * 2 ** (attempt - 1))
    rng = random.Random(attempt)
    delays = [policy.delay_after(attempt, rng).total_seconds() for _ in range(200)]
    assert all(cap / 2 <= delay <= cap for delay in delays)
    assert max(delays) - min(delays) > cap / 4  # the jitter really spreads them


def test_huge_attempt_numbers_do_not_overflow() -> None:
    policy = RetryPolicy(
        retries=10**6, backoff=datetime.timedelta(seconds=1), backoff_max=datetime.timedelta(hours=1)
    )
    assert policy.delay_after(10**6) <= datetime.timedelta(hours=1)


def test_retries_n_means_n_plus_one_attempts() -> None:
    policy = RetryPolicy(retries=2)
    assert [policy.allows_another_attempt(made) for made in (1, 2, 3)] == [True, True, False]


def test_failed_attempt_is_rescheduled_then_succeeds(run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    # A long backoff, so only _make_due() makes the retry due (burst workers run recovery too).
    call = echo.flaky.using(retry_backoff=60, retry_backoff_max=120)(failures=2)
    run_worker()
    call.refresh_from_db()
    assert call.state == CallState.SCHEDULED
    assert call.attempts == 1
    assert call.run_after is not None and call.run_after > timezone.now()
    assert call.error_type == "builtins.ConnectionError"
    assert "attempt 2 of 3" in call.state_reason
    assert [entry["outcome"] for entry in call.attempt_log] == ["failed"]

    run_worker()  # not due yet: nothing is pushed early
    assert recover_stranded_calls().pushed_due == 0
    call.refresh_from_db()
    assert call.attempts == 1

    for _ in range(2):
        _make_due(call)
        assert recover_stranded_calls().pushed_due == 1
        run_worker()
    call.refresh_from_db()
    assert call.state == CallState.SUCCEEDED
    assert call.return_value == 3
    assert call.attempts == 3
    assert [entry["outcome"] for entry in call.attempt_log] == ["failed", "failed", "succeeded"]
    assert all(entry["worker"] and entry["started_at"] for entry in call.attempt_log)
    assert "run 2 of a flaky dependency failed" in call.attempt_log[1]["error"]
    echo.refresh_from_db()
    assert echo.hits == 3


def test_last_failure_is_terminal_and_keeps_every_attempts_error(run_worker: RunWorker) -> None:
    call = Echo.objects.create().flaky.using(retry_backoff=60, retry_backoff_max=120)(failures=10)
    run_worker()
    for _ in range(2):
        _make_due(call)
        recover_stranded_calls()
        run_worker()
    call.refresh_from_db()
    assert call.state == CallState.FAILED
    assert call.attempts == 3
    assert call.state_reason == ""
    assert [entry["attempt"] for entry in call.attempt_log] == [1, 2, 3]
    assert call.finished_at is not None


def test_error_not_in_retry_on_is_not_retried(run_worker: RunWorker) -> None:
    call = Echo.objects.create().wrong_kind_of_error()
    run_worker()
    call.refresh_from_db()
    assert (call.state, call.attempts, call.error_type) == (CallState.FAILED, 1, "builtins.KeyError")


def test_default_is_no_retry(run_worker: RunWorker) -> None:
    call = Echo.objects.create().fail("once")
    run_worker()
    call.refresh_from_db()
    assert (call.state, call.attempts, call.policy["retries"]) == (CallState.FAILED, 1, 0)


def test_timed_out_attempt_is_recorded_as_such(run_worker: RunWorker) -> None:
    call = Echo.objects.create().sleepy(5)
    run_worker()
    call.refresh_from_db()
    assert call.state == CallState.FAILED
    assert call.error_type == "rq.timeouts.JobTimeoutException"
    assert call.attempt_log[-1]["outcome"] == "timed out"
    assert call.policy["timeout"] == 1.0


def test_per_call_retries_are_stored_on_the_row_and_applied(run_worker: RunWorker) -> None:
    call = Echo.objects.create().fail.using(retries=1, retry_backoff=datetime.timedelta(seconds=5))("x")
    assert call.policy["retries"] == 1 and call.policy["retry_backoff"] == 5.0
    run_worker()
    call.refresh_from_db()
    assert call.state == CallState.SCHEDULED
    assert "attempt 2 of 2" in call.state_reason


def test_scheduled_call_is_not_pushed_early_and_runs_once_due(
    run_worker: RunWorker, queued_jobs: object
) -> None:
    echo = Echo.objects.create()
    call = echo.bump.using(run_after=datetime.timedelta(minutes=5))()
    assert call.state == CallState.SCHEDULED
    assert call.run_after is not None and call.run_after > timezone.now() + datetime.timedelta(minutes=4)
    run_worker()
    assert recover_stranded_calls().pushed_due == 0
    call.refresh_from_db()
    assert call.state == CallState.SCHEDULED
    _make_due(call)
    assert recover_stranded_calls().pushed_due == 1
    run_worker()
    call.refresh_from_db()
    assert call.state == CallState.SUCCEEDED


def test_run_after_a_past_datetime_is_pushed_on_commit(run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    with transaction.atomic():
        call = echo.bump.using(run_after=timezone.now() - datetime.timedelta(minutes=1))()
        assert call.state == CallState.SCHEDULED
    call.refresh_from_db()
    assert call.state == CallState.ENQUEUED
    run_worker()
    call.refresh_from_db()
    assert call.state == CallState.SUCCEEDED


def test_cancelled_scheduled_call_is_never_pushed(run_worker: RunWorker) -> None:
    call = Echo.objects.create().bump.using(run_after=datetime.timedelta(seconds=30))()
    assert call.cancel() is True
    _make_due(call)
    assert recover_stranded_calls().total == 0
    call.refresh_from_db()
    assert call.state == CallState.CANCELLED


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"run_after": datetime.datetime(2030, 1, 1)}, "naive datetime"),
        ({"run_after": datetime.timedelta(seconds=-1)}, "from 0 to 3650 days"),
        ({"run_after": datetime.timedelta(days=10**8)}, "from 0 to 3650 days"),
        ({"retry_backoff_max": datetime.timedelta.max}, "at most 365 days"),
        ({"timeout": 1e300}, "at most 365 days"),
        ({"retry_backoff": float("nan")}, "finite number of seconds"),
        ({"run_after": 5}, "timedelta or an aware datetime"),
        ({"retries": -1}, "retries must be an int"),
        ({"retries": True}, "retries must be an int"),
        ({"retry_backoff": 0}, "more than 0"),
        ({"retry_backoff": 10, "retry_backoff_max": 5}, "shorter than retry_backoff"),
        ({"timeout": 0.5}, "at least one second"),
        ({"atomic": "yes"}, "atomic must be True or False"),
        ({"retry_on": (ValueError,)}, "set per method"),
        ({"priority": 1}, "unknown option"),
    ],
)
def test_bad_per_call_options_are_refused_and_write_nothing(options: dict[str, object], message: str) -> None:
    echo = Echo.objects.create()
    with pytest.raises(InvalidOptionError, match=message):
        echo.bump.using(**options)()
    assert MethodCall.objects.count() == 0
