"""Signals of each transition, sent after the commit, in order; their log lines; robust receivers."""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Iterator
from typing import Any

import django_rq
import pytest
import redis
from django.db import connections, transaction
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext
from rq import SimpleWorker

from asyncmodels import signals
from asyncmodels.models import CallState, MethodCall
from asyncmodels.recovery import recover_stranded_calls
from testproject.cloud.models import Echo

from .conftest import ALL_QUEUES
from .test_recovery import _claimed_then_lost, _strand

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


class Recorder:
    """Every signal of ``asyncmodels.signals`` sent in this process, in order, with its kwargs."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, dict[str, Any]]] = []
        self.receivers = {name: self._receiver(name) for name in signals.TRANSITIONS}

    def _receiver(self, name: str) -> Any:
        def record(sender: Any, **kwargs: Any) -> None:
            assert sender is MethodCall
            kwargs["in_atomic_block"] = connections["default"].in_atomic_block
            self.sent.append((name, kwargs["call"].pk, kwargs))

        return record

    def of(self, call: MethodCall) -> list[str]:
        return [name for name, pk, _ in self.sent if pk == call.pk]

    def kwargs(self, call: MethodCall, name: str) -> list[dict[str, Any]]:
        return [kwargs for sent, pk, kwargs in self.sent if pk == call.pk and sent == name]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    recording = Recorder()
    for name, signal in signals.TRANSITIONS.items():
        signal.connect(recording.receivers[name])
    yield recording
    for name, signal in signals.TRANSITIONS.items():
        signal.disconnect(recording.receivers[name])


def work_here(redis_connection: redis.Redis) -> None:
    """Drain every queue with a burst worker in this process (whatever Redis the mode uses), so
    that the signals the job sends reach this test's receivers."""
    queues = [django_rq.get_queue(name, commit_mode="auto") for name in ALL_QUEUES]
    SimpleWorker(queues, connection=redis_connection).work(burst=True)


def _due_now(call: MethodCall) -> None:
    MethodCall.objects.filter(pk=call.pk).update(run_after=Now() - datetime.timedelta(seconds=1))


def test_a_success_sends_enqueued_started_succeeded(
    recorder: Recorder, redis_connection: redis.Redis
) -> None:
    call = Echo.objects.create().noop()
    assert recorder.of(call) == ["enqueued"]
    work_here(redis_connection)
    assert recorder.of(call) == ["enqueued", "started", "succeeded"]
    [enqueued], [started], [succeeded] = (recorder.kwargs(call, name) for name in recorder.of(call))
    assert (enqueued["state"], enqueued["attempt"]) == (CallState.ENQUEUED, 1)
    assert (started["state"], started["attempt"], started["worker"]) == (
        CallState.RUNNING,
        1,
        started["call"].worker,
    )
    assert started["worker"]
    assert (succeeded["state"], succeeded["previous_state"], succeeded["attempt"]) == (
        CallState.SUCCEEDED,
        CallState.RUNNING,
        1,
    )
    assert 0 <= succeeded["duration"] < 30
    assert succeeded["call"].state == CallState.SUCCEEDED


def test_a_failure_with_a_retry_sends_failed_retried_then_runs_again(
    recorder: Recorder, redis_connection: redis.Redis
) -> None:
    call = Echo.objects.create().flaky(failures=1)  # retries=2 on ConnectionError
    work_here(redis_connection)
    assert recorder.of(call) == ["enqueued", "started", "failed", "retried"]
    [failed] = recorder.kwargs(call, "failed")
    assert (failed["state"], failed["error_type"], failed["outcome"]) == (
        CallState.SCHEDULED,
        "builtins.ConnectionError",
        "failed",
    )
    assert failed["error"] == "run 1 of a flaky dependency failed"
    [retried] = recorder.kwargs(call, "retried")
    assert (retried["automatic"], retried["attempt"], retried["state"]) == (True, 2, CallState.SCHEDULED)
    assert 0.5 <= retried["delay"] <= 1.0
    assert "attempt 2 of 3 is due" in retried["reason"]
    _due_now(call)
    assert recover_stranded_calls(["default"]).pushed_due == 1
    work_here(redis_connection)
    assert recorder.of(call) == [
        "enqueued",
        "started",
        "failed",
        "retried",
        "enqueued",
        "started",
        "succeeded",
    ]
    assert [kwargs["attempt"] for kwargs in recorder.kwargs(call, "started")] == [1, 2]
    assert recorder.kwargs(call, "enqueued")[1]["previous_state"] == CallState.SCHEDULED


def test_a_failure_without_retries_sends_failed_with_state_failed(
    recorder: Recorder, redis_connection: redis.Redis
) -> None:
    call = Echo.objects.create().fail("disk full")
    work_here(redis_connection)
    assert recorder.of(call) == ["enqueued", "started", "failed"]
    [failed] = recorder.kwargs(call, "failed")
    assert (failed["state"], failed["error_type"], failed["error"]) == (
        CallState.FAILED,
        "builtins.ValueError",
        "disk full",
    )


def test_a_cancel_sends_cancelled_and_the_call_never_starts(
    recorder: Recorder, redis_connection: redis.Redis
) -> None:
    call = Echo.objects.create().bump()
    assert call.cancel(reason="operator: not needed") is True
    work_here(redis_connection)
    assert recorder.of(call) == ["enqueued", "cancelled"]
    [cancelled] = recorder.kwargs(call, "cancelled")
    assert (cancelled["state"], cancelled["reason"]) == (CallState.CANCELLED, "operator: not needed")


def test_a_running_call_asked_to_stop_sends_failed_then_cancelled_when_it_fails(
    recorder: Recorder, redis_connection: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    call = Echo.objects.create().flaky(failures=5)  # would be retried, but is asked to stop first
    from asyncmodels import job

    real = job._record_failure

    def cancel_then_record(*args: Any, **kwargs: Any) -> None:
        assert MethodCall.objects.get(pk=call.pk).cancel(reason="stop it") is True
        assert recorder.of(call) == ["enqueued", "started"]  # asked to stop: nothing sent yet
        real(*args, **kwargs)

    monkeypatch.setattr(job, "_record_failure", cancel_then_record)
    work_here(redis_connection)
    assert recorder.of(call) == ["enqueued", "started", "failed", "cancelled"]
    assert recorder.kwargs(call, "failed")[0]["state"] == CallState.CANCELLED
    assert recorder.kwargs(call, "cancelled")[0]["reason"] == "stop it"


def test_a_manual_retry_sends_retried_then_enqueued(
    recorder: Recorder, redis_connection: redis.Redis
) -> None:
    call = Echo.objects.create().fail("once")
    work_here(redis_connection)
    call.refresh_from_db()
    assert call.retry(reason="fixed the disk") is True
    assert recorder.of(call) == ["enqueued", "started", "failed", "retried", "enqueued"]
    retried = recorder.kwargs(call, "retried")[0]
    assert (retried["automatic"], retried["delay"], retried["attempt"]) == (False, None, 2)
    assert (retried["state"], retried["previous_state"], retried["reason"]) == (
        CallState.PENDING,
        CallState.FAILED,
        "fixed the disk",
    )
    work_here(redis_connection)
    assert recorder.of(call)[-2:] == ["started", "failed"]


def test_a_retry_in_a_transaction_is_signalled_at_its_commit_and_never_after_a_rollback(
    recorder: Recorder, redis_connection: redis.Redis
) -> None:
    call = Echo.objects.create().fail("once")
    work_here(redis_connection)
    call.refresh_from_db()
    with transaction.atomic():
        assert call.retry() is True
        assert recorder.of(call) == ["enqueued", "started", "failed"]  # not committed yet
    assert recorder.of(call) == ["enqueued", "started", "failed", "retried", "enqueued"]
    assert all(not kwargs["in_atomic_block"] for _, _, kwargs in recorder.sent)
    other = Echo.objects.create().fail("once")
    work_here(redis_connection)
    other.refresh_from_db()
    with pytest.raises(RuntimeError), transaction.atomic():
        assert other.retry() is True
        raise RuntimeError("roll the retry back")
    assert recorder.of(other) == ["enqueued", "started", "failed"]


def test_a_receiver_reading_the_row_on_another_connection_sees_the_new_state(
    redis_connection: redis.Redis,
) -> None:
    """Sent after the commit, also where the record is inside the method's transaction
    (``atomic=True``): another connection (another thread's) already reads the state sent."""
    seen: dict[str, str | None] = {}

    def read_elsewhere(name: str) -> Any:
        def receiver(sender: Any, call: MethodCall, state: str, **kwargs: Any) -> None:
            def read() -> None:
                try:
                    seen[name] = MethodCall.objects.filter(pk=call.pk).values_list("state", flat=True).first()
                finally:
                    connections.close_all()

            thread = threading.Thread(target=read)
            thread.start()
            thread.join(10)
            assert seen[name] == state

        return receiver

    receivers = {name: read_elsewhere(name) for name in ("enqueued", "started", "succeeded")}
    for name, receiver in receivers.items():
        signals.TRANSITIONS[name].connect(receiver)
    try:
        call = Echo.objects.create().bump_atomically()
        work_here(redis_connection)
    finally:
        for name, receiver in receivers.items():
            signals.TRANSITIONS[name].disconnect(receiver)
    assert seen == {"enqueued": "enqueued", "started": "running", "succeeded": "succeeded"}
    call.refresh_from_db()
    assert call.state == CallState.SUCCEEDED


def test_a_raising_receiver_breaks_neither_the_call_nor_the_job(
    recorder: Recorder, redis_connection: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("a receiver with a bug")

    for signal in signals.TRANSITIONS.values():
        signal.connect(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="asyncmodels.signals"):
            call = Echo.objects.create().bump()
            work_here(redis_connection)
    finally:
        for signal in signals.TRANSITIONS.values():
            signal.disconnect(broken)
    call.refresh_from_db()
    assert (call.state, call.attempts, call.result) == (CallState.SUCCEEDED, 1, 1)
    assert recorder.of(call) == ["enqueued", "started", "succeeded"]  # the others still got theirs
    errors = [record for record in caplog.records if record.name == "asyncmodels.signals"]
    assert len(errors) == 3
    assert all(record.exc_info and "a receiver with a bug" in str(record.exc_info[1]) for record in errors)


def test_a_recovery_pass_sends_one_signal_per_call_after_its_commit(recorder: Recorder) -> None:
    made = _strand(3)
    report = recover_stranded_calls(["default"])
    assert report.total == 18 and report.errors == 0
    expected = {
        "pending": ["recovered", "enqueued"],
        "enqueued": ["recovered", "enqueued"],
        "lost": ["recovered", "failed"],
        "due": ["enqueued"],
        "released": ["enqueued"],
        "doomed": ["cancelled"],
    }
    for kind, calls in made.items():
        for call in calls:
            assert recorder.of(call)[-len(expected[kind]) :] == expected[kind], kind
            made_enqueued = kind not in ("released", "doomed")  # pushed when made, before being stranded
            assert len(recorder.of(call)) == len(expected[kind]) + made_enqueued, kind
    # Set-based steps: every signal comes once the step's transaction committed.
    assert not any(kwargs["in_atomic_block"] for _, _, kwargs in recorder.sent)
    lost = recorder.kwargs(made["lost"][0], "recovered")[0]
    assert (lost["action"], lost["previous_state"], lost["state"]) == (
        "ended_lost_attempt",
        CallState.RUNNING,
        CallState.FAILED,
    )
    assert "was lost" in lost["reason"]
    failed = recorder.kwargs(made["lost"][0], "failed")[0]
    assert (failed["outcome"], failed["error_type"], failed["duration"]) == (
        "lost",
        "asyncmodels.WorkerLost",
        None,
    )
    repushed = recorder.kwargs(made["enqueued"][0], "recovered")[0]
    assert repushed["action"] == "repushed" and "is gone" in repushed["reason"]
    assert "waited for, failed" in recorder.kwargs(made["doomed"][0], "cancelled")[0]["reason"]


def test_signals_add_no_query_per_call_to_a_recovery_pass(recorder: Recorder) -> None:
    """The existing pin (a pass's statements do not grow with its calls) holds with receivers
    connected: the signals are built from what the pass has, never read per call."""
    _strand(1)
    with CaptureQueriesContext(connections["default"]) as one_each:
        assert recover_stranded_calls(["default"]).total == 6
    MethodCall.objects.all().delete()
    _strand(4)
    recorder.sent.clear()
    with CaptureQueriesContext(connections["default"]) as many:
        assert recover_stranded_calls(["default"]).total == 24
    assert len(recorder.sent) == 4 * (2 + 2 + 2 + 1 + 1 + 1)
    assert len(many.captured_queries) == len(one_each.captured_queries)


def test_a_lost_attempt_that_is_retried_sends_recovered_failed_retried(recorder: Recorder) -> None:
    call = Echo.objects.create().flaky(failures=0)  # retries=2
    _claimed_then_lost(call)
    assert recover_stranded_calls(["default"]).retried_lost == 1
    assert recorder.of(call)[-3:] == ["recovered", "failed", "retried"]
    retried = recorder.kwargs(call, "retried")[0]
    assert (retried["automatic"], retried["attempt"], retried["state"]) == (True, 2, CallState.SCHEDULED)
    assert 0.5 <= retried["delay"] <= 1.0


def test_log_lines_come_from_the_named_logger_one_per_transition(
    redis_connection: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asyncmodels.calls")  # the test project's LOGGING says WARNING
    call = Echo.objects.create().fail("disk full")
    work_here(redis_connection)
    lines = [
        (record.levelno, record.getMessage())
        for record in caplog.records
        if record.name == "asyncmodels.calls"
    ]
    method = "cloud.Echo.fail"
    assert [level for level, _ in lines] == [logging.INFO, logging.INFO, logging.WARNING]
    enqueued, started, failed = (message for _, message in lines)
    assert enqueued.startswith(
        f"Call {call.pk} enqueued: {method} on pk {call.object_id}, state enqueued, attempt 1"
    )
    assert started.startswith(
        f"Call {call.pk} started: {method} on pk {call.object_id}, state running, attempt 1"
    )
    assert failed == (
        f"Call {call.pk} failed: {method} on pk {call.object_id}, state failed, attempt 1; "
        "failed: builtins.ValueError: disk full"
    )
    record = next(record for record in caplog.records if record.name == "asyncmodels.calls")
    assert (record.__dict__["asyncmodels_call"], record.__dict__["asyncmodels_transition"]) == (
        call.pk,
        "enqueued",
    )


@pytest.mark.parametrize(("level", "kept"), [("WARNING", ["failed"]), ("ERROR", [])])
def test_log_lines_can_be_silenced_by_their_level(
    redis_connection: redis.Redis, caplog: pytest.LogCaptureFixture, level: str, kept: list[str]
) -> None:
    """What ``LOGGING = {..., "loggers": {"asyncmodels.calls": {"level": level}}}`` sets."""
    caplog.set_level(logging.INFO)
    calls_logger = logging.getLogger("asyncmodels.calls")
    before = calls_logger.level
    calls_logger.setLevel(level)
    try:
        Echo.objects.create().fail("disk full")
        Echo.objects.create().noop()
        work_here(redis_connection)
    finally:
        calls_logger.setLevel(before)
    logged = [
        record.__dict__["asyncmodels_transition"]
        for record in caplog.records
        if record.name == "asyncmodels.calls"
    ]
    assert logged == kept
    assert MethodCall.objects.filter(state=CallState.FAILED).count() == 1  # they did run


def test_a_waiting_call_is_cancelled_or_released_with_its_signals_as_its_dependency_ends(
    recorder: Recorder, redis_connection: redis.Redis
) -> None:
    echo = Echo.objects.create()
    broken, fine = echo.fail("broken"), echo.noop()
    doomed, released = echo.bump.using(after=[broken])(), echo.bump.using(after=[fine])()
    assert recorder.of(doomed) == recorder.of(released) == []  # waiting: not pushed
    work_here(redis_connection)
    assert recorder.of(doomed) == ["cancelled"]
    [cancelled] = recorder.kwargs(doomed, "cancelled")
    assert cancelled["previous_state"] == CallState.WAITING
    assert "which this call waited for, failed" in cancelled["reason"]
    assert recorder.of(released) == ["enqueued", "started", "succeeded"]
