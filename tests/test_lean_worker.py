"""``asyncmodels.worker.LeanSimpleWorker``: asyncmodels' jobs without RQ's per-job bookkeeping.

Real ``manage.py rqworker --worker-class asyncmodels.worker.LeanSimpleWorker`` processes against a
Redis server they can reach (an embedded one in the fake mode), with leases of 2 s; and the
worker in process on fakeredis for what needs no second process.
"""

from __future__ import annotations

import itertools
import signal
import time
from typing import Any

import django_rq
import pytest
import redis
from django.db.models.functions import Now
from rq import Queue
from rq.job import Job
from rq.worker import Worker as RQWorker
from rq.worker.base import BaseWorker

from asyncmodels import dispatch
from asyncmodels.models import CallState, MethodCall
from asyncmodels.recovery import recover_stranded_calls
from asyncmodels.worker import CallAnnouncer, LeanSimpleWorker, is_plain_call_job
from testproject.cloud.models import Account, Echo, Instance

from .conftest import RunWorker, SpawnWorker, wait_for

LEAN = "asyncmodels.worker.LeanSimpleWorker"


def _state(call: MethodCall) -> str:
    call.refresh_from_db()
    return str(call.state)


def _instance() -> Instance:
    return Instance.objects.create(account=Account.objects.create(name="acme"), name="web1")


def _leftovers(connection: redis.Redis) -> list[str]:
    """Keys of jobs, and entries of the default queue's intermediate list, left in Redis."""
    keys = [_text(key) for key in connection.keys("rq:job:*")]
    intermediate = connection.lrange(dispatch.get_queue("default").key + ":intermediate", 0, -1)
    return keys + [f"intermediate: {_text(job_id)}" for job_id in intermediate]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
@pytest.mark.live_redis
def test_calls_succeed_fail_retry_and_time_out_with_their_records(
    run_worker: RunWorker, redis_connection: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One recovery pass, as the worker starts: the retry waits for the second run.
    monkeypatch.setenv("ASYNCMODELS_RECOVERY_INTERVAL_SECONDS", "3600")
    echo, flaky_echo = Echo.objects.create(), Echo.objects.create()  # flaky counts its runs in hits
    ok, failed, sleepy = echo.bump(), echo.fail("no"), echo.sleepy(seconds=3)
    flaky = flaky_echo.flaky(failures=1)
    run_worker("default", worker_class=LEAN)
    for call in (ok, failed, flaky, sleepy):
        call.refresh_from_db()
    assert (ok.state, ok.return_value, ok.attempts) == (CallState.SUCCEEDED, 1, 1)
    assert ok.worker and ok.worker != "" and ":" not in ok.worker  # RQ's worker name, not host:pid
    assert ok.attempt_log[-1]["outcome"] == "succeeded"
    assert (failed.state, failed.error_type, failed.error) == (CallState.FAILED, "builtins.ValueError", "no")
    assert "Traceback" in failed.traceback
    assert flaky.state == CallState.SCHEDULED  # attempt 1 failed; attempt 2 waits out its backoff
    assert flaky.attempt_log[-1]["outcome"] == "failed"
    assert "attempt 2 of 3" in flaky.state_reason
    # RQ's job timeout (1 s, the method's) still applies, and the row says the attempt timed out.
    assert sleepy.state == CallState.FAILED
    assert sleepy.error_type == "rq.timeouts.JobTimeoutException"
    assert sleepy.attempt_log[-1]["outcome"] == "timed out"
    echo.refresh_from_db()
    assert echo.hits == 1
    assert _leftovers(redis_connection) == []
    # The worker kept its statistics in RQ (its hash outlives it for a minute).
    stats = redis_connection.hgetall(f"rq:worker:{ok.worker}")
    assert int(stats[b"successful_job_count"]) == 4  # every job ran; the rows hold the outcomes
    assert float(stats[b"total_working_time"]) >= 1
    MethodCall.objects.filter(pk=flaky.pk).update(run_after=Now())  # its backoff is over
    recover_stranded_calls()  # pushes the due retry
    run_worker("default", worker_class=LEAN)
    flaky.refresh_from_db()
    assert (flaky.state, flaky.attempts, flaky.return_value) == (CallState.SUCCEEDED, 2, 2)


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
@pytest.mark.live_redis
def test_another_rq_job_takes_rqs_own_path(run_worker: RunWorker, redis_connection: redis.Redis) -> None:
    queue = django_rq.get_queue("default", commit_mode="auto")
    job = queue.enqueue("testproject.cloud.bench_jobs.noop", result_ttl=600)
    call = Echo.objects.create().bump()
    run_worker("default", worker_class=LEAN)
    job = Job.fetch(job.id, connection=redis_connection)
    assert job.get_status() == "finished"  # recorded by RQ, result kept: its full bookkeeping
    assert job.worker_name
    assert _state(call) == CallState.SUCCEEDED
    assert _leftovers(redis_connection) == [f"rq:job:{job.id}"]  # only the plain job's record


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
@pytest.mark.live_redis
def test_a_long_call_is_announced_and_a_sigterm_lets_it_finish(
    spawn_worker: SpawnWorker, redis_connection: redis.Redis
) -> None:
    call = _instance().backup(seconds=4)
    worker = spawn_worker("default", worker_class=LEAN)
    wait_for(lambda: _state(call) == CallState.RUNNING, message="the call to start")

    def busy() -> bool:
        return [w.get_state() for w in RQWorker.all(connection=redis_connection)] == ["busy"]

    wait_for(busy, timeout=10, message="rqinfo to show the worker busy")
    assert _leftovers(redis_connection) == []  # announced: the job is off Redis while it runs
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert _state(call) == CallState.SUCCEEDED
    assert RQWorker.all(connection=redis_connection) == []  # it registered its death


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
@pytest.mark.live_redis
def test_a_second_sigterm_records_the_interrupted_attempt_and_stops(spawn_worker: SpawnWorker) -> None:
    call = _instance().backup(seconds=60)
    worker = spawn_worker("default", worker_class=LEAN, ASYNCMODELS_LEASE_SECONDS="300")
    wait_for(lambda: _state(call) == CallState.RUNNING, message="the call to start")
    worker.signal(signal.SIGTERM)
    time.sleep(1.5)  # RQ ignores a second signal within one second of the first
    worker.signal(signal.SIGTERM)
    worker.wait(timeout=30)
    assert _state(call) == CallState.FAILED  # at once, not when the 300 s lease runs out
    assert call.error_type == "builtins.SystemExit"
    assert call.attempt_log[-1]["outcome"] == "interrupted"


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
@pytest.mark.live_redis
def test_kill_9_mid_call_is_ended_by_recovery(spawn_worker: SpawnWorker) -> None:
    call = _instance().backup(seconds=60)
    doomed = spawn_worker("default", worker_class=LEAN)
    wait_for(lambda: _state(call) == CallState.RUNNING, message="the call to start")
    doomed.kill_all()
    assert _state(call) == CallState.RUNNING  # nobody knows yet; the lease will tell
    spawn_worker("default", worker_class=LEAN)
    wait_for(lambda: _state(call) == CallState.FAILED, message="recovery to end the lost call")
    assert call.error_type == "asyncmodels.WorkerLost"


# --- in process, on fakeredis -------------------------------------------------------------------


def _worker(connection: redis.Redis) -> LeanSimpleWorker:
    return LeanSimpleWorker([django_rq.get_queue("default", commit_mode="auto")], connection=connection)


def test_routine_heartbeats_are_sent_once_per_interval_and_others_always(
    redis_connection: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = _worker(redis_connection)
    sent: list[int | None] = []
    original = BaseWorker.heartbeat

    def counted(self: BaseWorker, timeout: int | None = None, pipeline: Any = None) -> None:
        sent.append(timeout)
        original(self, timeout, pipeline)

    monkeypatch.setattr(BaseWorker, "heartbeat", counted)
    worker.heartbeat()
    worker.heartbeat()  # skipped: the last routine one is fresh
    worker.heartbeat(900)  # explicit: always sent, and the next routine one goes again
    worker.heartbeat()
    worker._routine_heartbeat_at = time.monotonic() - worker.ROUTINE_REDIS_SECONDS
    worker.heartbeat()  # the interval has passed
    assert sent == [None, 900, None, None]
    assert redis_connection.ttl(worker.key) > 0


def test_an_unchanged_state_is_not_written_again(redis_connection: redis.Redis) -> None:
    worker = _worker(redis_connection)
    worker.set_state("idle")
    redis_connection.hset(worker.key, "state", "marker")
    worker.set_state("idle")  # already idle here: nothing written
    assert redis_connection.hget(worker.key, "state") == b"marker"
    worker.set_state("busy")
    assert redis_connection.hget(worker.key, "state") == b"busy"


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_only_calls_longer_than_the_delay_are_announced(redis_connection: redis.Redis) -> None:
    echo = Echo.objects.create()
    quick, slow = echo.bump(), echo.sleepy(seconds=0.6)
    worker = _worker(redis_connection)
    worker.ANNOUNCE_AFTER_SECONDS = 0.2
    announced: list[str] = []
    real_announce = worker.announce

    def announce(job: Job, queue: Queue) -> None:
        assert redis_connection.exists(job.key)  # in Redis until announced
        real_announce(job, queue)
        announced.append(job.id)

    worker.announce = announce  # type: ignore[method-assign]
    worker.work(burst=True)
    assert announced == [slow.job_id]
    assert (_state(quick), _state(slow)) == (CallState.SUCCEEDED, CallState.SUCCEEDED)
    assert _leftovers(redis_connection) == []
    assert isinstance(worker._announcer, CallAnnouncer)


def test_only_jobs_as_dispatch_pushes_them_take_the_lean_path(redis_connection: redis.Redis) -> None:
    queue = Queue("default", connection=redis_connection)
    assert is_plain_call_job(queue.enqueue("asyncmodels.job.run_method_call", 1, "default", result_ttl=0))
    assert not is_plain_call_job(
        queue.enqueue("asyncmodels.job.run_method_call", 1, "default", result_ttl=60)
    )
    assert not is_plain_call_job(queue.enqueue("testproject.cloud.bench_jobs.noop", result_ttl=0))


def _count_round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the requests sent to Redis (one per command, or per pipeline) from now on."""
    sent: list[int] = []
    original = redis.connection.AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, check_health: bool = True) -> None:
        sent.append(1)
        original(self, command, check_health)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    return sent


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
@pytest.mark.live_redis
def test_each_further_call_costs_one_redis_round_trip(
    redis_connection: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The take of the next job (its id and hash, in one script) carries the last call's
    # bookkeeping: between the starts of two calls, one request to Redis.
    monkeypatch.setattr(LeanSimpleWorker, "ROUTINE_REDIS_SECONDS", 3600)  # no routine heartbeat midway
    echo = Echo.objects.create()
    made = [echo.bump() for _ in range(8)]
    sent = _count_round_trips(monkeypatch)
    at_start: list[int] = []
    run_call_job = LeanSimpleWorker.run_call_job

    def counted(self: LeanSimpleWorker, job: Job, queue: Queue) -> None:
        at_start.append(len(sent))
        run_call_job(self, job, queue)

    monkeypatch.setattr(LeanSimpleWorker, "run_call_job", counted)
    worker = _worker(redis_connection)
    worker.work(burst=True)
    assert [later - earlier for earlier, later in itertools.pairwise(at_start)] == [1] * 7
    assert {_state(call) for call in made} == {CallState.SUCCEEDED}
    assert int(redis_connection.hget(worker.key, "successful_job_count") or 0) == 8
    assert _leftovers(redis_connection) == []  # the last call's bookkeeping went at teardown


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
@pytest.mark.live_redis
def test_a_job_id_whose_hash_is_gone_is_passed_over(redis_connection: redis.Redis) -> None:
    call = Echo.objects.create().bump()
    queue = django_rq.get_queue("default", commit_mode="auto")
    redis_connection.lpush(queue.key, "asyncmodels-default-999999-1")  # ahead of the call, no hash
    _worker(redis_connection).work(burst=True)
    assert _state(call) == CallState.SUCCEEDED
    assert redis_connection.llen(queue.key) == 0


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
@pytest.mark.live_redis
def test_a_worker_on_several_queues_takes_jobs_as_rq_does_and_still_records_them(
    redis_connection: redis.Redis,
) -> None:
    echo, instance = Echo.objects.create(), _instance()
    calls = [echo.bump(), instance.provision(size="large"), echo.bump()]  # default, provisioning
    queues = [django_rq.get_queue(name, commit_mode="auto") for name in ("provisioning", "default")]
    worker = LeanSimpleWorker(queues, connection=redis_connection)
    worker.work(burst=True)
    assert [_state(call) for call in calls] == [CallState.SUCCEEDED] * 3
    assert int(redis_connection.hget(worker.key, "successful_job_count") or 0) == 3
    assert _leftovers(redis_connection) == []


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
@pytest.mark.live_redis
def test_a_redis_that_refuses_scripts_falls_back_to_rqs_pop_once(
    redis_connection: redis.Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    echo = Echo.objects.create()
    calls = [echo.bump() for _ in range(3)]
    monkeypatch.setattr(LeanSimpleWorker, "TAKE_NEXT_JOB", "return redis.error_reply('scripting is off')")
    worker = _worker(redis_connection)
    worker.work(burst=True)
    assert [_state(call) for call in calls] == [CallState.SUCCEEDED] * 3
    assert worker._scripting is False
    assert int(redis_connection.hget(worker.key, "successful_job_count") or 0) == 3
    warnings = [record for record in caplog.records if "refused the one-round-trip take" in record.message]
    assert len(warnings) == 1 and "scripting is off" in warnings[0].message
