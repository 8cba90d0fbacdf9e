"""asyncmodels as a backend of Django's tasks framework (``asyncmodels.backends.tasks``).

The tasks live in ``testproject/cloud/tasks.py``; ``settings.TASKS`` points ``default`` and
``retrying`` at the backend. Skipped where no tasks framework is installed (Django 5.2 without
the django-tasks backport). On-commit behaviour needs real commits: every test here runs in a
``transaction=True`` database test.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

import pytest
from asgiref.sync import async_to_sync
from django.db import transaction
from django.db.models.functions import Now
from django.test import Client
from django.utils import timezone

from asyncmodels import WorkerLost, job
from asyncmodels.exceptions import CallCancelledError, ConfigurationError
from asyncmodels.models import CallState, MethodCall
from asyncmodels.recovery import recover_stranded_calls
from testproject.cloud.models import Echo

from .conftest import REPO, SERVICES, RunWorker, SpawnWorker, _worker_env, wait_for

if TYPE_CHECKING or find_spec("django.tasks") is not None:
    from django.tasks import Task, TaskResult, TaskResultStatus, task, task_backends
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started
else:
    pytest.importorskip("django_tasks", reason="no tasks framework: Django 5.2 without django-tasks")
    from django_tasks import TaskResult, TaskResultStatus, task, task_backends
    from django_tasks.base import Task
    from django_tasks.exceptions import InvalidTaskError as InvalidTask
    from django_tasks.exceptions import TaskResultDoesNotExist
    from django_tasks.signals import task_enqueued, task_finished, task_started

from asyncmodels.backends.tasks import AsyncModelsBackend
from testproject.cloud import tasks as cloud_tasks

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

BACKEND = "asyncmodels.backends.tasks.AsyncModelsBackend"
#: The framework's own in-memory backend (Django 6, or the backport).
DUMMY_BACKEND = (
    "django.tasks" if find_spec("django.tasks") else "django_tasks"
) + ".backends.dummy.DummyBackend"


def plain_function() -> None:
    """Module level, but its name is bound to the function, not to a Task."""


def _row(result: TaskResult[Any, Any]) -> MethodCall:
    return MethodCall.objects.get(pk=int(result.id))


def _make_due(result: TaskResult[Any, Any]) -> None:
    """Move a scheduled task's run_after into the past (the database's clock decides)."""
    MethodCall.objects.filter(pk=int(result.id)).update(run_after=Now() - datetime.timedelta(seconds=1))


@pytest.fixture
def signals() -> Iterator[list[tuple[str, TaskResult[Any, Any]]]]:
    """The task signals sent in this process, as (name, a copy of the result)."""
    sent: list[tuple[str, TaskResult[Any, Any]]] = []
    receivers = []
    for name, signal in (("enqueued", task_enqueued), ("started", task_started), ("finished", task_finished)):

        def receive(sender: Any, task_result: TaskResult[Any, Any], _name: str = name, **kwargs: Any) -> None:
            sent.append((_name, copy.copy(task_result)))

        signal.connect(receive, weak=False)
        receivers.append((signal, receive))
    yield sent
    for signal, receive in receivers:
        signal.disconnect(receive)


# Validation: refused at enqueue (or at decoration), nothing written.


def test_a_function_that_is_not_module_level_is_refused() -> None:
    def local() -> None: ...

    with pytest.raises(InvalidTask, match="Task function must be defined at a module level"):
        task()(local)


def test_a_naive_run_after_is_refused() -> None:
    with pytest.raises(InvalidTask, match="run_after must be an aware datetime"):
        cloud_tasks.add.using(run_after=datetime.datetime(2030, 1, 1))


def test_a_queue_the_backend_does_not_list_is_refused() -> None:
    with pytest.raises(InvalidTask, match="Queue 'provisioning' is not valid for backend"):
        cloud_tasks.add.using(queue_name="provisioning")


def test_a_priority_is_refused_since_rq_would_not_honour_it() -> None:
    assert AsyncModelsBackend.supports_priority is False
    with pytest.raises(InvalidTask, match="does not support setting priority"):
        cloud_tasks.add.using(priority=10)


def test_a_listed_queue_missing_from_rq_queues_is_refused_at_enqueue_and_by_check(settings: Any) -> None:
    settings.TASKS = {"default": {"BACKEND": BACKEND, "QUEUES": ["default", "ghost"]}}
    with pytest.raises(InvalidTask, match="'ghost' is not in RQ_QUEUES"):
        cloud_tasks.add.using(queue_name="ghost").enqueue(1, 2)
    assert not MethodCall.objects.exists()
    assert [message.id for message in task_backends["default"].check()] == ["asyncmodels.E005"]


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        (datetime.datetime.now(tz=datetime.UTC), "Unsupported type"),
        ({1, 2}, "Unsupported type"),
        (object(), "Unsupported type"),
        ({1: "int key"}, "keys must be str"),
        (math.nan, "finite"),
    ],
)
def test_an_argument_that_cannot_be_stored_raises_type_error_and_writes_nothing(
    argument: Any, message: str, signals: list[Any]
) -> None:
    with pytest.raises(TypeError, match=message):
        cloud_tasks.echo.enqueue(argument)
    with pytest.raises(TypeError, match=message):
        cloud_tasks.echo.enqueue(value=argument)
    assert not MethodCall.objects.exists()
    assert signals == []


def test_a_task_whose_path_does_not_import_as_that_task_is_refused() -> None:
    unbound = task()(plain_function)  # the module's name still holds the function, not this Task
    with pytest.raises(InvalidTask, match="does not import as this Task"):
        unbound.enqueue()
    assert not MethodCall.objects.exists()


def test_check_reports_invalid_options_with_ids(settings: Any) -> None:
    settings.TASKS = {
        "default": {"BACKEND": BACKEND, "OPTIONS": {"RETRIES": -1, "COLOUR": "red", "DATABASE": "nowhere"}}
    }
    backend = task_backends["default"]
    messages = backend.check()
    assert {message.id for message in messages} == {"asyncmodels.E004"}
    text = " ".join(message.msg for message in messages)
    assert "COLOUR" in text and "nowhere" in text and "retries" in text
    with pytest.raises(ConfigurationError, match="COLOUR"):
        cloud_tasks.add.enqueue(1, 2)
    assert not MethodCall.objects.exists()


@pytest.mark.parametrize(
    "with_backport_app",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                find_spec("django.tasks") is not None, reason="the backport's app is for Django 5.2"
            ),
        ),
    ],
)
def test_manage_py_check_reports_the_backends_errors_once(with_backport_app: bool) -> None:
    """Django 6 registers its tasks check only when django.tasks is imported, the backport only
    from its app: asyncmodels' app makes sure it is registered, and once."""
    completed = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO,
        env={
            **_worker_env(),
            "DJANGO_SETTINGS_MODULE": "tests.settings_tasks_check",
            "ASYNCMODELS_TEST_DJANGO_TASKS_APP": "1" if with_backport_app else "0",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 1, output
    assert output.count("(asyncmodels.E005) TASKS['default'] lists queue 'nowhere'") == 1, output


def test_check_is_clean_for_the_test_projects_backends() -> None:
    assert task_backends["default"].check() == []
    assert task_backends["retrying"].check() == []


# Enqueue: the row in the caller's transaction, the push on its commit.


def test_enqueue_returns_a_ready_result_equal_to_get_result(queued_jobs: Callable[..., int]) -> None:
    result = cloud_tasks.echo.enqueue(1, (2, 3), word="x")
    assert result.status == TaskResultStatus.READY
    assert result.task == cloud_tasks.echo
    assert result.backend == "default"
    assert result.args == [1, [2, 3]]
    assert result.kwargs == {"word": "x"}
    assert result.enqueued_at is not None
    assert (result.started_at, result.last_attempted_at, result.finished_at) == (None, None, None)
    assert (result.errors, result.worker_ids) == ([], [])
    assert result == cloud_tasks.echo.get_result(result.id)
    assert result == task_backends["default"].get_result(result.id)
    row = _row(result)
    assert (row.method, row.task_backend, row.queue, row.content_type_id) == (
        "testproject.cloud.tasks.echo",
        "default",
        "urgent",
        None,
    )
    assert queued_jobs("urgent") == 1


def test_refresh_keeps_an_unchanged_result_equal() -> None:
    result = cloud_tasks.add.enqueue(1, 2)
    before = dataclasses.asdict(result)
    result.refresh()
    assert dataclasses.asdict(result) == before


def test_async_enqueue_and_get_result() -> None:
    result = async_to_sync(cloud_tasks.add.aenqueue)(1, 2)
    assert async_to_sync(cloud_tasks.add.aget_result)(result.id) == result


def test_a_rolled_back_enqueue_leaves_nothing_and_runs_nothing(
    run_worker: RunWorker, queued_jobs: Callable[..., int], signals: list[Any]
) -> None:
    echo = Echo.objects.create()
    with pytest.raises(RuntimeError), transaction.atomic():
        result = cloud_tasks.bump.enqueue(echo.pk)
        assert cloud_tasks.bump.get_result(result.id).status == TaskResultStatus.READY  # seen inside
        raise RuntimeError("roll back")
    assert not MethodCall.objects.exists()
    with pytest.raises(TaskResultDoesNotExist):
        cloud_tasks.bump.get_result(result.id)
    assert queued_jobs() == 0
    run_worker()
    echo.refresh_from_db()
    assert echo.hits == 0
    assert signals == []


def test_nothing_is_pushed_or_signalled_before_the_commit(
    queued_jobs: Callable[..., int], signals: list[tuple[str, TaskResult[Any, Any]]]
) -> None:
    with transaction.atomic():
        result = cloud_tasks.add.enqueue(1, 2)
        assert queued_jobs() == 0
        assert signals == []
    assert queued_jobs() == 1
    assert signals == [("enqueued", result)]


def test_a_task_enqueued_in_a_rolled_back_savepoint_is_not_pushed(queued_jobs: Callable[..., int]) -> None:
    with transaction.atomic():
        kept = cloud_tasks.add.enqueue(1, 2)
        with pytest.raises(RuntimeError), transaction.atomic():
            cloud_tasks.add.enqueue(3, 4)
            raise RuntimeError("roll back the savepoint")
    assert queued_jobs() == 1
    assert list(MethodCall.objects.tasks().values_list("pk", flat=True)) == [int(kept.id)]


@pytest.mark.parametrize(
    "result_id",
    ["{id}9", "abc", "", "-{id}", "0{id}", " {id}", "{id}.0", "{id}" * 30, "-0", "0"],
)
def test_an_unknown_or_malformed_id_does_not_exist(result_id: str) -> None:
    existing = cloud_tasks.add.enqueue(1, 2)  # "0<id>" or " <id>" must not find it
    assert task_backends["default"].get_result(existing.id) == existing
    with pytest.raises(TaskResultDoesNotExist):
        task_backends["default"].get_result(result_id.format(id=existing.id))


def test_a_method_calls_id_or_another_backends_task_does_not_exist() -> None:
    method_call = Echo.objects.create().bump()
    with pytest.raises(TaskResultDoesNotExist):
        task_backends["default"].get_result(str(method_call.pk))
    result = cloud_tasks.add.enqueue(1, 2)
    with pytest.raises(TaskResultDoesNotExist):
        task_backends["retrying"].get_result(result.id)


# Execution: the generic job runs Task objects, and only those.


def test_the_worker_runs_a_task_ready_running_successful(
    run_worker: RunWorker, signals: list[tuple[str, TaskResult[Any, Any]]]
) -> None:
    result = cloud_tasks.add.enqueue(2, 3)
    run_worker()
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == 5
    assert result.started_at is not None and result.finished_at is not None
    assert result.enqueued_at is not None and result.enqueued_at <= result.started_at <= result.finished_at
    assert result.last_attempted_at == result.started_at
    assert len(result.worker_ids) == 1 and result.worker_ids[0]
    assert result.errors == []
    assert result == cloud_tasks.add.get_result(result.id)
    if SERVICES == "fake":  # the worker ran in this process, so its signals reached us
        assert [name for name, _ in signals] == ["enqueued", "started", "finished"]
        assert signals[1][1].status == TaskResultStatus.RUNNING
        assert signals[2][1] == result


def test_a_failing_task_is_failed_with_its_exception_path_and_traceback(run_worker: RunWorker) -> None:
    result = cloud_tasks.fail.enqueue("boom")
    run_worker()
    result.refresh()
    assert result.status == TaskResultStatus.FAILED
    assert result.finished_at is not None
    [error] = result.errors
    assert error.exception_class_path == "testproject.cloud.tasks.TaskFailure"
    assert error.exception_class is cloud_tasks.TaskFailure
    assert "raise TaskFailure(message)" in error.traceback
    assert "TaskFailure: boom" in error.traceback
    with pytest.raises(ValueError, match="Task failed"):
        _ = result.return_value
    assert result == cloud_tasks.fail.get_result(result.id)


def test_a_tasks_rq_job_and_log_lines_read_like_the_task(caplog: pytest.LogCaptureFixture) -> None:
    import django_rq

    result = cloud_tasks.echo.enqueue(1, "x", flag=True)
    [queued] = django_rq.get_queue("urgent", commit_mode="auto").get_jobs()
    assert queued.description == f"testproject.cloud.tasks.echo(1, 'x', flag=True) task #{result.id}"
    failing = cloud_tasks.fail.enqueue("boom")
    with caplog.at_level("INFO", logger="asyncmodels.calls"):
        job.run_method_call(int(result.id))
        job.run_method_call(int(failing.id))
    lines = [record.getMessage() for record in caplog.records if record.name == "asyncmodels.calls"]
    echoed = "testproject.cloud.tasks.echo(1, 'x', flag=True)"
    assert any(
        line.startswith(f"Call {result.id} succeeded: {echoed}, state succeeded, attempt 1") for line in lines
    ), lines
    assert any(
        line.startswith(
            f"Call {failing.id} failed: testproject.cloud.tasks.fail('boom'), state failed, attempt 1"
        )
        for line in lines
    ), lines


def test_a_method_calls_rq_job_still_names_its_object() -> None:
    import django_rq

    echo = Echo.objects.create()
    call = echo.noop()
    [queued] = django_rq.get_queue("default", commit_mode="auto").get_jobs()
    assert queued.description == f"cloud.Echo.noop(pk={echo.pk}) call #{call.pk}"
    assert call.subject == f"cloud.Echo.noop on {echo.pk}"


def test_a_tasks_subject_cuts_long_arguments() -> None:
    result = cloud_tasks.echo.enqueue("y" * 1000)
    subject = _row(result).subject
    assert subject.startswith("testproject.cloud.tasks.echo('yyy") and subject.endswith("…)")
    assert len(subject) < 250


#: The logger of the framework's own signal receivers (Django 6, or the backport).
FRAMEWORK_LOGGER = "django.tasks" if find_spec("django.tasks") else "django_tasks"


def test_a_failed_tasks_finished_signal_carries_its_exception_to_the_frameworks_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The framework's log receiver logs ``sys.exc_info()``: task_finished is sent inside the
    job's except block, so the log line holds the task's traceback, not ``NoneType: None``."""
    seen: list[Any] = []

    def receive(sender: Any, task_result: TaskResult[Any, Any], **kwargs: Any) -> None:
        seen.append(sys.exc_info()[1])

    task_finished.connect(receive, weak=False)
    try:
        result = cloud_tasks.fail.enqueue("logged")
        with caplog.at_level("INFO", logger=FRAMEWORK_LOGGER):
            job.run_method_call(int(result.id))
    finally:
        task_finished.disconnect(receive)
    assert [type(exc) for exc in seen] == [cloud_tasks.TaskFailure]
    [record] = [r for r in caplog.records if r.name == FRAMEWORK_LOGGER and "state=FAILED" in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is cloud_tasks.TaskFailure
    assert "raise TaskFailure(message)" in caplog.text


def test_a_raising_task_finished_receiver_changes_nothing_recorded(caplog: pytest.LogCaptureFixture) -> None:
    def explode(sender: Any, task_result: TaskResult[Any, Any], **kwargs: Any) -> None:
        raise RuntimeError("receiver broke")

    task_finished.connect(explode, weak=False)
    try:
        failing = cloud_tasks.fail.enqueue("boom")
        job.run_method_call(int(failing.id))
        working = cloud_tasks.add.enqueue(1, 2)
        job.run_method_call(int(working.id))
    finally:
        task_finished.disconnect(explode)
    failing.refresh()
    working.refresh()
    assert failing.status == TaskResultStatus.FAILED
    assert failing.errors[0].exception_class is cloud_tasks.TaskFailure
    assert working.status == TaskResultStatus.SUCCESSFUL and working.return_value == 3
    broken = [
        r for r in caplog.records if r.name == "asyncmodels.tasks" and "signal failed" in r.getMessage()
    ]
    assert len(broken) == 2


@pytest.mark.parametrize(("task_name", "args"), [("add", (1, 2)), ("fail", ("boom",))])
def test_a_task_attempt_reads_its_row_only_to_claim_it(
    task_name: str,
    args: tuple[Any, ...],
    signals: list[tuple[str, TaskResult[Any, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """task_finished's TaskResult (and the failure's log line) come from the finishing UPDATE's
    RETURNING: two statements in all, the claim and the finish, where the database returns rows."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from asyncmodels.models import updates_return_rows

    if not updates_return_rows("default"):
        pytest.skip("this database cannot return updated rows")
    # A worker whose last call was a task's (on PostgreSQL, after a method call, the claim also
    # looks for an object of that method's model: tests/test_claim_with_object.py).
    monkeypatch.setattr(job, "_LAST_MODEL", {})
    result = getattr(cloud_tasks, task_name).enqueue(*args)
    with CaptureQueriesContext(connection) as queries:
        job.run_method_call(int(result.id))
    statements = [query["sql"].split()[0].upper() for query in queries.captured_queries]
    assert statements == ["UPDATE", "UPDATE"], queries.captured_queries
    assert [name for name, _ in signals][-1] == "finished"
    assert signals[-1][1] == getattr(cloud_tasks, task_name).get_result(result.id)


def test_a_return_value_that_is_not_json_fails_the_task_readably(run_worker: RunWorker) -> None:
    result = cloud_tasks.return_not_json.enqueue()
    run_worker()
    result.refresh()
    assert result.status == TaskResultStatus.FAILED
    [error] = result.errors
    assert error.exception_class is TypeError
    assert "Unsupported type" in error.traceback
    assert "returned a value that is not JSON" in error.traceback
    assert _row(result).error.startswith("testproject.cloud.tasks.return_not_json returned a value")


def test_a_task_taking_context_sees_its_attempt_from_one(run_worker: RunWorker) -> None:
    result = cloud_tasks.which_attempt.enqueue()
    run_worker()
    result.refresh()
    assert result.return_value == {"attempt": 1, "id": result.id, "status": "RUNNING", "call_attempts": 1}


def test_a_coroutine_task_runs_to_completion(run_worker: RunWorker) -> None:
    result = cloud_tasks.add_slowly.enqueue(20, 22)
    run_worker()
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL
    value: Any = result.return_value  # the stubs type it as the coroutine the function returns
    assert value == 42


def test_retries_come_from_the_backends_options_and_every_failed_attempt_is_listed(
    run_worker: RunWorker,
) -> None:
    result = cloud_tasks.flaky.enqueue(fail_before=3)
    assert _row(result).policy["retries"] == 2
    for attempt in (1, 2):
        run_worker()
        result.refresh()
        assert result.status == TaskResultStatus.READY, attempt  # a retry is ready to run again
        assert len(result.errors) == attempt and result.finished_at is None
        assert _row(result).state == CallState.SCHEDULED
        _make_due(result)
        assert recover_stranded_calls().pushed_due == 1
    run_worker()
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == 3  # context.attempt on the third attempt
    assert len(result.worker_ids) == 3
    assert [error.exception_class for error in result.errors] == [cloud_tasks.TaskFailure] * 2
    assert "attempt 1 fails on purpose" in result.errors[0].traceback
    assert "attempt 2 fails on purpose" in result.errors[1].traceback
    assert result.started_at is not None and result.last_attempted_at is not None
    assert result.started_at < result.last_attempted_at
    assert result == cloud_tasks.flaky.get_result(result.id)


def test_a_task_cancelled_before_it_ran_is_failed_with_an_importable_cancel_error() -> None:
    result = cloud_tasks.add.enqueue(1, 2)
    assert _row(result).cancel(reason="no longer needed")
    fresh = cloud_tasks.add.get_result(result.id)
    assert fresh.status == TaskResultStatus.FAILED  # the framework has no cancelled status
    [error] = fresh.errors
    assert error.exception_class is CallCancelledError
    assert "cancelled before it ran: no longer needed" in error.traceback


def test_a_task_cancelled_while_waiting_for_its_retry_says_so_after_its_failed_attempt(
    run_worker: RunWorker,
) -> None:
    result = cloud_tasks.flaky.enqueue(fail_before=3)
    run_worker()
    assert _row(result).state == CallState.SCHEDULED
    assert _row(result).cancel()
    fresh = cloud_tasks.flaky.get_result(result.id)
    assert fresh.status == TaskResultStatus.FAILED
    assert [error.exception_class for error in fresh.errors] == [cloud_tasks.TaskFailure, CallCancelledError]
    assert "cancelled after attempt 1" in fresh.errors[-1].traceback


def test_a_task_stopped_by_its_cancel_request_lists_the_cancel_once(run_worker: RunWorker) -> None:
    result = cloud_tasks.cancel_itself.enqueue()
    run_worker()
    fresh = cloud_tasks.cancel_itself.get_result(result.id)
    assert _row(result).state == CallState.CANCELLED
    assert fresh.status == TaskResultStatus.FAILED
    assert [error.exception_class for error in fresh.errors] == [CallCancelledError]
    assert "raise_if_cancel_requested" in fresh.errors[0].traceback


def test_a_deferred_task_waits_for_its_run_after(run_worker: RunWorker) -> None:
    assert AsyncModelsBackend.supports_defer is True
    when = timezone.now() + datetime.timedelta(hours=1)
    result = cloud_tasks.add.using(run_after=when).enqueue(1, 1)
    assert result.task.run_after == when
    assert _row(result).state == CallState.SCHEDULED
    run_worker()
    assert recover_stranded_calls().pushed_due == 0
    result.refresh()
    assert result.status == TaskResultStatus.READY
    _make_due(result)
    recover_stranded_calls()
    run_worker()
    fresh = cloud_tasks.add.get_result(result.id)
    assert fresh.status == TaskResultStatus.SUCCESSFUL
    assert fresh.task.run_after == when  # the task comes back as it was enqueued


def test_only_task_objects_are_run_from_a_row() -> None:
    forged = MethodCall.objects.create(
        method="os.getcwd", task_backend="default", queue="default", state=CallState.ENQUEUED
    )
    job.run_method_call(forged.pk)
    forged.refresh_from_db()
    assert forged.state == CallState.FAILED
    assert forged.error_type == "asyncmodels.TaskNotFound"
    assert forged.result is None


def test_a_task_whose_backend_left_tasks_is_failed_without_running(settings: Any) -> None:
    echo = Echo.objects.create()
    result = cloud_tasks.bump.enqueue(echo.pk)
    settings.TASKS = {"default": {"BACKEND": DUMMY_BACKEND}}
    job.run_method_call(int(result.id))  # the job in this process, which sees the new TASKS
    row = _row(result)
    assert row.state == CallState.FAILED
    assert row.error_type == "asyncmodels.TaskBackendUnknown"
    echo.refresh_from_db()
    assert echo.hits == 0


def test_the_immediate_backend_runs_a_task_on_commit(settings: Any) -> None:
    settings.ASYNCMODELS = {"BACKEND": "immediate"}
    with transaction.atomic():
        result = cloud_tasks.add.enqueue(4, 5)
        assert cloud_tasks.add.get_result(result.id).status == TaskResultStatus.READY
    assert cloud_tasks.add.get_result(result.id).return_value == 9


@pytest.mark.live_redis
def test_a_real_rqworker_burst_runs_tasks() -> None:
    results: list[TaskResult[Any, Any]] = [
        cloud_tasks.add.enqueue(1, 2),
        cloud_tasks.echo.enqueue("x"),
        cloud_tasks.fail.enqueue("no"),
    ]
    completed = subprocess.run(
        [sys.executable, "manage.py", "rqworker", "--burst", "default", "urgent"],
        cwd=REPO,
        env=_worker_env(),  # with the live Redis's URL, set by the redis_connection fixture
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    for result in results:
        result.refresh()
    assert [result.status for result in results] == [
        TaskResultStatus.SUCCESSFUL,
        TaskResultStatus.SUCCESSFUL,
        TaskResultStatus.FAILED,
    ]
    assert results[0].return_value == 3
    assert results[1].return_value == {"args": ["x"], "kwargs": {}}
    assert results[2].errors[0].exception_class is cloud_tasks.TaskFailure


@pytest.mark.live_redis
def test_a_task_whose_worker_is_killed_is_recovered(spawn_worker: SpawnWorker) -> None:
    result = cloud_tasks.sleep_for.enqueue(60)

    def status() -> TaskResultStatus:
        result.refresh()
        return result.status

    doomed = spawn_worker()
    wait_for(lambda: status() == TaskResultStatus.RUNNING, message="the task to start")
    doomed.kill_all()
    spawn_worker()
    wait_for(lambda: status() == TaskResultStatus.FAILED, message="recovery to end the lost task")
    assert result.errors[-1].exception_class_path == "asyncmodels.WorkerLost"
    assert result.errors[-1].exception_class is WorkerLost
    assert "was lost" in result.errors[-1].traceback
    assert result.finished_at is not None


@pytest.mark.live_redis
def test_a_retrying_task_whose_worker_is_killed_runs_again_and_succeeds(spawn_worker: SpawnWorker) -> None:
    """kill -9 of the worker and its work horse mid-task: recovery retries the task (its
    backend's RETRIES), a second worker runs attempt 2, and the lost attempt is in its errors."""
    result = cloud_tasks.sleep_on_first_attempt.enqueue(60)

    def status() -> TaskResultStatus:
        result.refresh()
        return result.status

    doomed = spawn_worker()
    wait_for(lambda: status() == TaskResultStatus.RUNNING, message="the task to start")
    doomed.kill_all()
    spawn_worker()
    wait_for(lambda: status() == TaskResultStatus.SUCCESSFUL, message="the retried task to succeed")
    assert result.return_value == 2  # context.attempt of the attempt that ran to the end
    assert len(result.worker_ids) == 2
    [lost] = result.errors
    assert lost.exception_class is WorkerLost
    assert "was lost" in lost.traceback
    assert result == cloud_tasks.sleep_on_first_attempt.get_result(result.id)


# Beside method calls: the queryset and the admin.


def test_tasks_and_method_calls_are_told_apart(client: Client) -> None:
    from django.contrib.auth.models import User

    method_call = Echo.objects.create().bump()
    result = cloud_tasks.add.enqueue(1, 2)
    assert list(MethodCall.objects.tasks().values_list("pk", flat=True)) == [int(result.id)]
    assert list(MethodCall.objects.method_calls().values_list("pk", flat=True)) == [method_call.pk]
    client.force_login(User.objects.create_superuser("admin", "admin@example.com", "pw"))
    page = client.get("/admin/asyncmodels/methodcall/?kind=task").content.decode()
    assert "testproject.cloud.tasks.add" in page and "task · default" in page
    assert f"/admin/asyncmodels/methodcall/{result.id}/change/" in page
    assert f"/admin/asyncmodels/methodcall/{method_call.pk}/change/" not in page
    page = client.get("/admin/asyncmodels/methodcall/?kind=method").content.decode()
    assert f"/admin/asyncmodels/methodcall/{result.id}/change/" not in page
    assert f"/admin/asyncmodels/methodcall/{method_call.pk}/change/" in page
    detail = client.get(f"/admin/asyncmodels/methodcall/{result.id}/change/")
    assert detail.status_code == 200
    assert "all calls of the task testproject.cloud.tasks.add" in detail.content.decode()


def test_a_row_with_both_an_object_and_a_task_backend_is_refused_by_the_database() -> None:
    from django.db import IntegrityError

    call = Echo.objects.create().bump()
    with pytest.raises(IntegrityError), transaction.atomic():
        MethodCall.objects.filter(pk=call.pk).update(task_backend="default")


def test_the_backend_is_a_subclass_of_the_frameworks_base() -> None:
    backend = task_backends["default"]
    assert isinstance(backend, AsyncModelsBackend)
    assert (backend.supports_defer, backend.supports_async_task, backend.supports_get_result) == (
        True,
        True,
        True,
    )
    assert isinstance(cloud_tasks.add, Task)
