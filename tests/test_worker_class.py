"""asyncmodels' worker classes, in process: when recovery runs, and that it never blocks a stop."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

import pytest
import redis
from django.db import connection
from rq.exceptions import StopRequested

from asyncmodels import dispatch
from asyncmodels import worker as worker_module
from asyncmodels.models import CallState, MethodCall
from asyncmodels.worker import SimpleWorker, Worker
from testproject.cloud.models import Echo

from .conftest import SpawnWorker, wait_for


@pytest.mark.parametrize("worker_class", [Worker, SimpleWorker])
def test_recovery_is_due_at_start_then_once_per_interval(worker_class: type[Worker]) -> None:
    rq_worker = worker_class.__new__(worker_class)  # the timing logic needs no Redis
    assert rq_worker._recovery_due()  # never ran: due at once
    rq_worker._asyncmodels_last_recovery = time.monotonic()
    assert not rq_worker._recovery_due()
    rq_worker._asyncmodels_last_recovery = time.monotonic() - rq_worker._recovery_interval()
    assert rq_worker._recovery_due()


def test_a_warm_shutdown_during_a_recovery_pass_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def stop_requested_mid_pass() -> None:
        raise StopRequested

    monkeypatch.setattr(worker_module, "recover_stranded_calls", stop_requested_mid_pass)
    rq_worker = Worker.__new__(Worker)
    with pytest.raises(StopRequested):
        rq_worker.run_recovery()


def test_other_recovery_errors_never_stop_the_worker(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_pass() -> None:
        raise RuntimeError("recovery bug")

    monkeypatch.setattr(worker_module, "recover_stranded_calls", broken_pass)
    Worker.__new__(Worker).run_recovery()
    assert "Recovery pass failed" in caplog.text


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_with_debug_on_each_job_starts_with_empty_query_logs(
    settings: Any, redis_connection: redis.Redis
) -> None:
    """A worker has no requests to clear Django's query log: without this, 10,000 calls grew a
    worker by ~10 MiB (bench/scale.py)."""
    settings.DEBUG = True  # Django logs every query while DEBUG is on
    echo = Echo.objects.create()
    calls = [echo.noop() for _ in range(20)]
    worker = SimpleWorker([dispatch.get_queue("default")], connection=redis_connection)
    worker.work(burst=True)
    assert MethodCall.objects.filter(pk__in=[c.pk for c in calls], state=CallState.SUCCEEDED).count() == 20
    # What is left is the last job's queries (and the count above), not twenty jobs' worth.
    assert 0 < len(connection.queries_log) < 20, [q["sql"] for q in connection.queries_log]


@pytest.mark.live_redis
@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_a_stopping_worker_exits_at_once_not_after_rqs_pubsub_read(spawn_worker: SpawnWorker) -> None:
    """RQ stops its pub/sub listener after sending UNSUBSCRIBE; with redis-py 8 that waited for
    the listener's read of up to 60 s, about one stop in two (and so every ``--burst`` worker's
    exit in this suite). Each of these warm shutdowns must end within seconds."""
    echo = Echo.objects.create()
    for round_number in range(6):
        call = echo.noop()
        worker = spawn_worker("default")
        # Once it ran a call it is up, subscribed and idle: the stop below is an idle one.
        wait_for(MethodCall.objects.filter(pk=call.pk, state=CallState.SUCCEEDED).exists)
        worker.signal(signal.SIGTERM)
        try:
            assert worker.wait(timeout=15) == 0
        except subprocess.TimeoutExpired:
            pytest.fail(f"stop {round_number + 1}: the worker was still running 15 s after SIGTERM")
