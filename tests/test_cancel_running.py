"""Cancel of a running call (cancel_requested_at, honour_cancel_request), against real workers.

Real worker processes (``manage.py rqworker --worker-class asyncmodels.worker.Worker``) run slow
test-only methods (Echo.probe_*), which count their executions in ``Echo.hits``; the test asks the
running call to stop, then ends the attempt in every way it can end.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection, connections
from django.test import Client

from asyncmodels import job
from asyncmodels.job import TOO_LATE_TO_CANCEL
from asyncmodels.models import CallState, MethodCall
from asyncmodels.recovery import recover_stranded_calls
from testproject.cloud.models import Echo

from .conftest import RunWorker, SpawnWorker, wait_for

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])
live = pytest.mark.live_redis

ENDED_AFTER_STOP = {CallState.SUCCEEDED, CallState.CANCELLED}


def _state(call: MethodCall) -> str:
    call.refresh_from_db()
    return str(call.state)


def _hits(echo: Echo) -> int:
    echo.refresh_from_db()
    return echo.hits


def _ask_to_stop(call: MethodCall, reason: str = "probe: stop") -> None:
    wait_for(lambda: _state(call) == CallState.RUNNING, message=f"call {call.pk} to start")
    assert call.cancel(reason=reason) is True, (call.state, call.cancel_requested_at)
    assert call.state == CallState.RUNNING and call.cancel_requested_at is not None


def _assert_stays(call: MethodCall, echo: Echo, state: str, hits: int, seconds: float = 4.0) -> None:
    """With workers (and their recovery) alive, nothing more happens for ``seconds``."""
    time.sleep(seconds)
    assert _state(call) == state, (call.state, call.state_reason, call.attempt_log)
    assert _hits(echo) == hits, f"the method ran {echo.hits} times, expected {hits}"


# ------------------------------------------------------------------------------------------------
# (a) the method returns after the request
# ------------------------------------------------------------------------------------------------


@live
# ------------------------------------------------------------------------------------------------
# (b) the method raises a retryable error with retries left / a non-retryable error
# ------------------------------------------------------------------------------------------------


@live
def test_a_retryable_failure_with_retries_left_ends_cancelled_and_never_runs_again(
    spawn_worker: SpawnWorker,
) -> None:
    echo = Echo.objects.create()
    call = echo.probe_plan(["slowfail", "return"], seconds=3)  # retries=3 on ConnectionError
    spawn_worker()
    _ask_to_stop(call, "probe: stop (b)")
    wait_for(lambda: _state(call) != CallState.RUNNING, message="the attempt to end")
    assert call.state == CallState.CANCELLED, (call.state, call.state_reason)
    assert call.state_reason == "probe: stop (b)"
    assert call.error_type == "builtins.ConnectionError" and call.error == "run 1 failed"
    assert call.run_after is None and call.finished_at is not None and call.lease_expires_at is None
    assert call.attempts == 1
    assert [entry["outcome"] for entry in call.attempt_log] == ["failed"]
    _assert_stays(call, echo, CallState.CANCELLED, 1)


@live
# ------------------------------------------------------------------------------------------------
# (c) the attempt times out
# ------------------------------------------------------------------------------------------------


@live
def test_echo_sleepy_timeout_after_the_request_ends_cancelled(spawn_worker: SpawnWorker) -> None:
    call = Echo.objects.create().sleepy(seconds=10)  # timeout=1, no retries
    spawn_worker()
    wait_for(lambda: _state(call) != CallState.ENQUEUED and call.state != CallState.PENDING)
    if not call.cancel(reason="probe: stop sleepy"):
        pytest.skip(f"the 1 s timeout beat the request: {call.state}")
    wait_for(lambda: _state(call) != CallState.RUNNING, timeout=20, message="the timeout")
    assert call.state == CallState.CANCELLED
    assert "JobTimeoutException" in call.error_type
    assert call.state_reason == "probe: stop sleepy"


# ------------------------------------------------------------------------------------------------
# (d) the work horse is kill -9'd; recovery ends the lost attempt (lease expiry)
# ------------------------------------------------------------------------------------------------


@live
def test_horse_killed_after_the_request_retries_left_ends_cancelled_not_retried(
    spawn_worker: SpawnWorker,
) -> None:
    echo = Echo.objects.create()
    call = echo.probe_plan(["slowreturn"], seconds=60)  # retries=3: a lost worker would be retried
    worker = spawn_worker()
    _ask_to_stop(call, "probe: stop (d)")
    worker.kill_horse()
    wait_for(lambda: _state(call) != CallState.RUNNING, timeout=30, message="recovery of the lost attempt")
    assert call.state == CallState.CANCELLED, (call.state, call.state_reason)
    assert call.state_reason == "probe: stop (d)"
    assert call.attempt_log[-1]["outcome"] == "lost"
    assert call.run_after is None and call.lease_expires_at is None and call.finished_at is not None
    _assert_stays(call, echo, CallState.CANCELLED, 1)


@live
def test_lost_attempt_with_retries_left_keeps_its_own_error_not_an_earlier_attempts(
    spawn_worker: SpawnWorker,
) -> None:
    """Attempt 1 fails (ConnectionError, retried); attempt 2 is asked to stop and its horse dies.
    The cancelled call's error should say why attempt 2 ended (the lost worker), not attempt 1's."""
    echo = Echo.objects.create()
    call = echo.probe_plan(["fail", "slowreturn"], seconds=60)
    worker = spawn_worker()
    wait_for(lambda: _state(call) == CallState.RUNNING and call.attempts == 2, message="attempt 2")
    assert call.cancel(reason="probe: stop attempt 2") is True
    worker.kill_horse()
    wait_for(lambda: _state(call) != CallState.RUNNING, timeout=30, message="recovery of the lost attempt")
    assert call.state == CallState.CANCELLED
    assert [entry["outcome"] for entry in call.attempt_log] == ["failed", "lost"]
    assert call.error_type == "asyncmodels.WorkerLost", (
        f"cancelled after a lost attempt, but the row's error is {call.error_type!r}: {call.error!r}"
    )


# ------------------------------------------------------------------------------------------------
# (e) two SIGTERMs: hard stop, hand_back
# ------------------------------------------------------------------------------------------------


@live
def test_hard_stop_after_the_request_hands_back_as_cancelled(spawn_worker: SpawnWorker) -> None:
    echo = Echo.objects.create()
    call = echo.probe_plan(["slowreturn"], seconds=60)  # retries=3
    # A long lease: only the hand-back can end the call quickly.
    worker = spawn_worker(ASYNCMODELS_LEASE_SECONDS="300", ASYNCMODELS_LEASE_RENEW_SECONDS="100")
    _ask_to_stop(call, "probe: stop (e)")
    worker.signal(signal.SIGTERM)
    time.sleep(1.5)
    worker.signal(signal.SIGTERM)
    worker.wait(timeout=30)
    wait_for(lambda: _state(call) != CallState.RUNNING, timeout=10, message="the hand-back")
    assert call.state == CallState.CANCELLED, (call.state, call.state_reason)
    assert call.state_reason == "probe: stop (e)"
    assert call.attempt_log[-1]["outcome"] == "lost" and "stopped hard" in call.attempt_log[-1]["error"]
    spawn_worker()  # a live worker must not run it again
    _assert_stays(call, echo, CallState.CANCELLED, 1)


@live
# ------------------------------------------------------------------------------------------------
# atomic=True
# ------------------------------------------------------------------------------------------------


@live
def test_atomic_method_asked_to_stop_that_fails_is_cancelled_and_its_write_rolled_back(
    spawn_worker: SpawnWorker,
) -> None:
    echo = Echo.objects.create()
    call = echo.probe_atomic(seconds=3, then="fail")  # retries=3 on ConnectionError
    spawn_worker()
    wait_for(lambda: _state(call) == CallState.RUNNING, message="the call to start")
    time.sleep(0.3)  # its write is inside the transaction by now (on SQLite: the write lock)
    t0 = time.monotonic()
    won = call.cancel(reason="probe: stop atomic")
    blocked = time.monotonic() - t0
    print(f"\n[probe] {connection.vendor}: cancel() -> {won} after {blocked:.2f} s")
    wait_for(lambda: _state(call) not in {CallState.RUNNING}, timeout=20, message="the attempt to end")
    assert call.state == CallState.CANCELLED, (won, blocked, call.state, call.state_reason)
    if connection.vendor == "postgresql":
        assert won is True and blocked < 1.0
    assert call.attempts == 1
    _assert_stays(call, echo, CallState.CANCELLED, 0)  # the one write rolled back; no rerun


@live
# ------------------------------------------------------------------------------------------------
# the admin's "Ask to stop" button on a call a real worker runs
# ------------------------------------------------------------------------------------------------


def _superuser_client() -> Client:
    user = User.objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


@live
# ------------------------------------------------------------------------------------------------
# retry after a cancelled-while-running call
# ------------------------------------------------------------------------------------------------


@live
def test_a_claim_clears_a_stale_request(run_worker: RunWorker) -> None:
    """A request somehow left on a not-started row (forged) is cleared by the claim: the attempt
    fails and is retried per its policy, then succeeds."""
    echo = Echo.objects.create()
    call = echo.probe_plan(["fail", "return"], seconds=0)
    MethodCall.objects.filter(pk=call.pk).update(cancel_requested_at=call.created_at)
    run_worker()
    call.refresh_from_db()
    assert call.state == CallState.SCHEDULED, call.state
    assert call.cancel_requested_at is None


# ------------------------------------------------------------------------------------------------
# concurrency: two cancels at once; cancel racing the finish
# ------------------------------------------------------------------------------------------------


def _running_call(echo: Echo, database: str = "default") -> MethodCall:
    call = echo.probe_plan(["return"], seconds=0)
    MethodCall.objects.using(database).filter(pk=call.pk).update(
        state=CallState.RUNNING, attempts=1, worker="probe", started_at=call.created_at
    )
    return MethodCall.objects.using(database).get(pk=call.pk)


def _in_threads(*functions: Any) -> list[Any]:
    barrier = threading.Barrier(len(functions))
    results: list[Any] = [None] * len(functions)

    def run(index: int, function: Any) -> None:
        try:
            barrier.wait()
            results[index] = function()
        except BaseException as exc:
            results[index] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i, f)) for i, f in enumerate(functions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_two_concurrent_cancels_of_a_running_call_exactly_one_wins() -> None:
    echo = Echo.objects.create()
    for _ in range(40):
        call = _running_call(echo)
        a = MethodCall.objects.get(pk=call.pk)
        b = MethodCall.objects.get(pk=call.pk)
        results = _in_threads(lambda a=a: a.cancel(reason="A"), lambda b=b: b.cancel(reason="B"))
        assert sorted(results, key=str) == [False, True], results
        call.refresh_from_db()
        assert call.state == CallState.RUNNING
        assert call.state_reason == ("A" if results[0] else "B")


def test_cancel_racing_a_success_always_ends_succeeded_and_says_so_iff_it_won() -> None:
    echo = Echo.objects.create()
    for _ in range(60):
        call = _running_call(echo)
        canceller = MethodCall.objects.get(pk=call.pk)
        results = _in_threads(
            lambda canceller=canceller: canceller.cancel(),
            lambda call=call: job._record_success(call, 7, time.monotonic()),
        )
        call.refresh_from_db()
        assert call.state == CallState.SUCCEEDED and results[1] is True, results
        assert call.state_reason == (TOO_LATE_TO_CANCEL if results[0] else ""), (results, call.state_reason)


def test_cancel_racing_a_retryable_failure_always_ends_cancelled() -> None:
    """Whatever the interleaving, a cancel that meets a retryable failure must leave the call
    cancelled: either it asked first (honoured) or the failure scheduled a retry first (cancelled
    as not started). Ending scheduled means the retry runs although the user asked to stop."""
    echo = Echo.objects.create()
    outcomes: list[tuple[Any, str]] = []
    for _ in range(150):
        call = _running_call(echo)
        canceller = MethodCall.objects.get(pk=call.pk)
        results = _in_threads(
            lambda canceller=canceller: canceller.cancel(reason="race"),
            lambda call=call: job._record_failure(
                call, "builtins.ConnectionError", "boom", "", time.monotonic(), retryable=True
            ),
        )
        call.refresh_from_db()
        outcomes.append((results[0], str(call.state)))
    bad = [o for o in outcomes if o[1] != CallState.CANCELLED]
    assert not bad, f"{len(bad)} of {len(outcomes)} races left the call not cancelled: {bad[:5]}"


# ------------------------------------------------------------------------------------------------
# other database; the recovery pass's report
# ------------------------------------------------------------------------------------------------


def test_request_on_the_other_database_is_honoured_by_the_failure_record() -> None:
    echo = Echo.objects.using("other").create()
    call = echo.probe_plan(["return"], seconds=0)
    MethodCall.objects.using("other").filter(pk=call.pk).update(state=CallState.RUNNING, attempts=1)
    call = MethodCall.objects.using("other").get(pk=call.pk)
    assert call.cancel(reason="other db") is True
    job._record_failure(call, "builtins.ConnectionError", "boom", "", time.monotonic(), retryable=True)
    call.refresh_from_db()
    assert (call.state, call.state_reason, call.run_after) == (CallState.CANCELLED, "other db", None)


def test_recovery_report_counts_a_lost_attempt_it_ended_cancelled() -> None:
    """A pass that ended a lost, asked-to-stop call moved one call on: its report should say so
    (total, and the 'Recovery pass: ...' log line that only appears when total or errors > 0)."""
    echo = Echo.objects.create()
    call = _running_call(echo)
    assert call.cancel() is True
    MethodCall.objects.filter(pk=call.pk).update(lease_expires_at=call.created_at)
    report = recover_stranded_calls()
    call.refresh_from_db()
    assert call.state == CallState.CANCELLED
    assert report.total == 1, f"the pass ended call {call.pk} cancelled but reports: {report}"
