"""Real worker processes: recovery runs by itself, kill -9 mid-call, SIGTERM, atomic effects.

Every test here starts ``manage.py rqworker --worker-class asyncmodels.worker.Worker`` processes
against a Redis server they can reach (an embedded one in the fake mode), with leases of 2 s.
"""

from __future__ import annotations

import signal
import time

import pytest
import redis

from asyncmodels.models import CallState, MethodCall
from testproject.cloud.models import Account, Echo, Instance

from .conftest import SpawnWorker, wait_for

pytestmark = [pytest.mark.django_db(transaction=True, databases=["default", "other"]), pytest.mark.live_redis]


def _state(call: MethodCall) -> str:
    call.refresh_from_db()
    return str(call.state)


def _instance() -> Instance:
    return Instance.objects.create(account=Account.objects.create(name="acme"), name="web1")


def test_worker_runs_recovery_by_itself_after_redis_is_flushed(
    redis_connection: redis.Redis, spawn_worker: SpawnWorker
) -> None:
    echo = Echo.objects.create()
    call = echo.bump()
    redis_connection.flushdb()  # the push is lost after the commit
    worker = spawn_worker()
    wait_for(lambda: _state(call) == CallState.SUCCEEDED, message=f"recovery to run call {call.pk}\n{worker}")
    echo.refresh_from_db()
    assert echo.hits == 1
    assert call.attempts == 1


def test_kill_9_mid_call_without_retries_ends_failed_as_worker_lost(spawn_worker: SpawnWorker) -> None:
    call = _instance().backup(seconds=60)
    doomed = spawn_worker()
    wait_for(lambda: _state(call) == CallState.RUNNING, message="the call to start")
    doomed.kill_all()
    assert _state(call) == CallState.RUNNING  # nobody knows yet; the lease will tell
    spawn_worker()
    wait_for(lambda: _state(call) == CallState.FAILED, message="recovery to end the lost call")
    assert call.error_type == "asyncmodels.WorkerLost"
    assert "was lost" in call.error
    assert call.attempt_log[-1]["outcome"] == "lost"


def test_kill_9_after_an_atomic_methods_write_rolls_it_back_and_the_retry_counts_once(
    spawn_worker: SpawnWorker,
) -> None:
    echo = Echo.objects.create(note="pause")
    call = echo.bump_atomically(pause=60)  # writes hits + 1, then pauses before its bookkeeping
    doomed = spawn_worker()
    wait_for(lambda: _state(call) == CallState.RUNNING, message="the call to start")
    time.sleep(0.5)  # the method's UPDATE has run inside its transaction by now
    doomed.kill_all()
    Echo.objects.filter(pk=echo.pk).update(note="")  # the retry will not pause
    echo.refresh_from_db()
    assert echo.hits == 0  # the killed attempt's write died with its transaction
    spawn_worker()
    wait_for(lambda: _state(call) == CallState.SUCCEEDED, timeout=45, message="the retry to succeed")
    echo.refresh_from_db()
    assert echo.hits == 1
    assert call.return_value == 1
    assert [entry["outcome"] for entry in call.attempt_log] == ["lost", "succeeded"]


def test_sigterm_during_a_call_lets_it_finish(spawn_worker: SpawnWorker) -> None:
    call = _instance().backup(seconds=3)
    worker = spawn_worker()
    wait_for(lambda: _state(call) == CallState.RUNNING, message="the call to start")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert _state(call) == CallState.SUCCEEDED
    assert MethodCall.objects.filter(state=CallState.RUNNING).count() == 0


def test_second_sigterm_stops_hard_and_hands_the_call_back(spawn_worker: SpawnWorker) -> None:
    call = _instance().backup(seconds=60)
    # A long lease: only the hand-back, not the lease running out, can end the call quickly.
    worker = spawn_worker(ASYNCMODELS_LEASE_SECONDS="300", ASYNCMODELS_LEASE_RENEW_SECONDS="100")
    wait_for(lambda: _state(call) == CallState.RUNNING, message="the call to start")
    worker.signal(signal.SIGTERM)
    time.sleep(1.5)  # RQ ignores a second signal within one second of the first
    worker.signal(signal.SIGTERM)
    worker.wait(timeout=30)
    wait_for(lambda: _state(call) == CallState.FAILED, timeout=10, message="the hand-back")
    assert call.error_type == "asyncmodels.WorkerLost"
    assert "was stopped hard" in call.error


def test_kill_9_of_the_work_horse_alone_is_recovered_by_the_same_worker(spawn_worker: SpawnWorker) -> None:
    echo = Echo.objects.create(note="pause")
    call = echo.bump_atomically.using(retry_backoff=3)(pause=60)
    worker = spawn_worker()
    wait_for(lambda: _state(call) == CallState.RUNNING, message="the call to start")
    worker.kill_horse()
    # After the kill: on SQLite the paused attempt held the write lock until it died.
    Echo.objects.filter(pk=echo.pk).update(note="")  # the retry will not pause
    wait_for(lambda: _state(call) == CallState.SUCCEEDED, timeout=45, message="the surviving worker's retry")
    assert worker.process.poll() is None  # the worker itself lived on
    echo.refresh_from_db()
    assert echo.hits == 1
