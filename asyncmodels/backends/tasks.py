"""A backend for Django's tasks framework: plain ``@task`` functions become durable calls.

```python
TASKS = {
    "default": {
        "BACKEND": "asyncmodels.backends.tasks.AsyncModelsBackend",
        "QUEUES": ["default", "urgent"],          # each must be a key of RQ_QUEUES
        "OPTIONS": {"RETRIES": 3, "TIMEOUT": 600},
    }
}
```

``Task.enqueue()`` writes a ``MethodCall`` row with no object (``task_backend`` names the
``TASKS`` alias, ``method`` the task's dotted path) inside the caller's transaction on the
backend's database, and pushes the generic job once that database commits: the same row, job,
claim, lease, retries and recovery as a decorated method's call. The worker imports the stored
path and runs it only if it is a ``Task`` (README, Guarantees: 4, for tasks).

Django 6 ships the framework as ``django.tasks``; on Django 5.2 the ``django-tasks`` backport
provides the same classes (asyncmodels' ``tasks`` extra: ``pip install "/path/to/asyncmodels[tasks]"``
from a checkout, see the README's Install). This module imports whichever
exists and raises ``ImportError`` naming both when neither does.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.conf import settings
from django.core import checks
from django.db import router, transaction
from django.db.models.functions import Now
from django.utils.module_loading import import_string

from .. import conf, dispatch, serialization
from ..exceptions import (
    ConfigurationError,
    DecodingError,
    EncodingError,
    InvalidOptionError,
    UnsupportedArgumentError,
)
from ..options import MethodOptions, build_options

if TYPE_CHECKING:
    from django.dispatch import Signal
    from django.tasks import Task, TaskContext, TaskResult, TaskResultStatus, task_backends
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import TaskError
    from django.tasks.exceptions import InvalidTask, InvalidTaskBackend, TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started
    from django.utils.json import normalize_json

    from ..models import MethodCall
else:
    try:  # Django 6
        from django.tasks import Task, TaskContext, TaskResult, TaskResultStatus, task_backends
        from django.tasks.backends.base import BaseTaskBackend
        from django.tasks.base import TaskError
        from django.tasks.exceptions import InvalidTask, InvalidTaskBackend, TaskResultDoesNotExist
        from django.tasks.signals import task_enqueued, task_finished, task_started
        from django.utils.json import normalize_json
    except ImportError:
        try:  # Django 5.2 with the django-tasks backport
            from django_tasks import TaskContext, TaskResult, TaskResultStatus, task_backends
            from django_tasks.backends.base import BaseTaskBackend
            from django_tasks.base import Task, TaskError
            from django_tasks.exceptions import InvalidTaskBackendError as InvalidTaskBackend
            from django_tasks.exceptions import InvalidTaskError as InvalidTask
            from django_tasks.exceptions import TaskResultDoesNotExist
            from django_tasks.signals import task_enqueued, task_finished, task_started
            from django_tasks.utils import normalize_json
        except ImportError as exc:
            raise ImportError(
                "asyncmodels.backends.tasks needs Django's tasks framework: Django 6 (django.tasks), "
                "or on Django 5.2 the django-tasks backport (asyncmodels' extra 'tasks': "
                'pip install "/path/to/asyncmodels[tasks]" from a checkout).'
            ) from exc

logger = logging.getLogger("asyncmodels.tasks")

__all__ = ["AsyncModelsBackend", "TaskCannotRun", "prepare_task_call", "task_attempt_ended"]

#: ``OPTIONS`` keys of a ``TASKS`` entry, and the ``@async_method`` option each one sets.
RETRY_OPTIONS = {
    "RETRIES": "retries",
    "RETRY_BACKOFF": "retry_backoff",
    "RETRY_BACKOFF_MAX": "retry_backoff_max",
    "TIMEOUT": "timeout",
}
OPTION_KEYS = frozenset({*RETRY_OPTIONS, "DATABASE"})

#: ``MethodCall.policy`` key holding the task's own ``run_after`` (ISO 8601, or ``None``): the
#: ``run_after`` column also holds retry backoffs, and ``TaskResult.task`` must come back as given.
TASK_RUN_AFTER = "task_run_after"

E004 = "asyncmodels.E004"  # a TASKS entry's OPTIONS are invalid
E005 = "asyncmodels.E005"  # a TASKS entry's queue is not in RQ_QUEUES
E006 = "asyncmodels.E006"  # a TASKS entry's DATABASE is not in DATABASES
E007 = "asyncmodels.E007"  # the asyncmodels app is not installed


def _status_of(state: str) -> TaskResultStatus:
    """Our state as the framework's status: every state before ``running`` is ``READY`` (a
    scheduled retry is "ready to be executed again"); ``cancelled`` is ``FAILED`` (the
    framework has no such status, and a cancelled task will not run)."""
    from ..models import CallState

    if state == CallState.RUNNING:
        return TaskResultStatus.RUNNING
    if state == CallState.SUCCEEDED:
        return TaskResultStatus.SUCCESSFUL
    if state in (CallState.FAILED, CallState.CANCELLED):
        return TaskResultStatus.FAILED
    return TaskResultStatus.READY


def _read_options(alias: str, options: Any) -> tuple[str | None, MethodOptions, list[str]]:
    """A ``TASKS`` entry's ``OPTIONS``: (database alias or ``None`` for the router's choice, the
    retry options, every problem found). Never raises: ``check()`` reports the problems."""
    where = f"TASKS[{alias!r}]['OPTIONS']"
    if not isinstance(options, dict):
        return None, MethodOptions(), [f"{where} must be a dict, not {type(options).__name__}."]
    problems = []
    unknown = sorted(str(key) for key in set(options) - OPTION_KEYS)
    if unknown:
        problems.append(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(OPTION_KEYS))}."
        )
    database = options.get("DATABASE")
    if database is not None and (not isinstance(database, str) or database not in settings.DATABASES):
        problems.append(f"{where}['DATABASE'] is {database!r}, which is not a key of DATABASES.")
        database = None
    given = {name: options[key] for key, name in RETRY_OPTIONS.items() if key in options}
    try:
        call_options = build_options(where, **given)
    except InvalidOptionError as exc:
        problems.append(str(exc))
        call_options = MethodOptions()
    return database, call_options, problems


class AsyncModelsBackend(BaseTaskBackend):
    """Django tasks run as asyncmodels calls: durable rows, pushed to RQ on commit, leased,
    retried (``OPTIONS``), recovered, shown in the admin.

    ``QUEUES``: the task queue names allowed (default ``["default"]``); each is the RQ queue the
    task is pushed to, so it must be a key of ``RQ_QUEUES``. ``OPTIONS``: ``DATABASE`` (the alias
    the rows are written to and read from; default: the routers' choice for ``MethodCall``,
    ``"default"`` without routers), and the retry options every task of this backend gets,
    as ``@async_method`` takes them: ``RETRIES`` (int, further attempts after a failed one),
    ``RETRY_BACKOFF`` and ``RETRY_BACKOFF_MAX`` (seconds), ``TIMEOUT`` (seconds, one attempt).
    """

    supports_defer = True  # run_after: the call is written ``scheduled`` and pushed once due
    supports_async_task = True  # a coroutine function is run to completion on the worker
    supports_get_result = True  # any process reads the row
    # RQ runs a queue's jobs in the order they were pushed; nothing would honour a priority.
    supports_priority = False

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self._database, self.call_options, self.option_problems = _read_options(alias, self.options)

    @property
    def database(self) -> str:
        """The database alias this backend's rows live on (``OPTIONS["DATABASE"]`` or the router's)."""
        if self._database is not None:
            return self._database
        from ..models import MethodCall

        return router.db_for_write(MethodCall) or "default"

    def enqueue(self, task: Task[Any, Any], args: Any, kwargs: Any) -> TaskResult[Any, Any]:
        """Write the task's row in the caller's transaction on ``database``; push it on commit.

        Returns the ``TaskResult`` (``READY``; its ``id`` is the row's primary key as text).
        Raises, writing nothing: ``InvalidTask`` for what ``validate_task`` refuses, for a task
        that the worker could not import as a ``Task`` from its dotted path, and for a queue not
        in ``RQ_QUEUES``; ``UnsupportedArgumentError`` (a ``TypeError``, its message starting as
        Django's ``"Unsupported type"`` where that is the reason) for an argument that is not
        JSON or cannot be stored; ``ConfigurationError`` for invalid ``OPTIONS`` or
        ``ASYNCMODELS``. ``task_enqueued`` is sent once the row is committed (at once outside a
        transaction); a rollback leaves no row, pushes nothing and sends nothing.
        """
        from ..models import CallState, MethodCall

        self.validate_task(task)
        self._check_runnable(task)
        if self.option_problems:
            raise ConfigurationError(" ".join(self.option_problems))
        configured = conf.get_rq_queue_names()
        if task.queue_name not in configured:
            raise InvalidTask(
                f"Queue '{task.queue_name}' is not in RQ_QUEUES (configured: "
                f"{', '.join(sorted(configured)) or 'none'}), so no worker would ever run the task."
            )
        encoded_args, encoded_kwargs = _storable_arguments(task, args, kwargs)
        conf.get_backend_name()  # a misconfigured ASYNCMODELS setting fails here, before the INSERT
        database = self.database
        if task.run_after is not None:
            state = CallState.SCHEDULED
        elif dispatch.enqueued_at_insert(database):
            state = CallState.ENQUEUED
        else:
            state = CallState.PENDING
        call = MethodCall(
            method=task.module_path,
            task_backend=self.alias,
            queue=task.queue_name,
            args=encoded_args,
            kwargs=encoded_kwargs,
            policy={
                **self.call_options.to_policy(),
                TASK_RUN_AFTER: task.run_after.isoformat() if task.run_after is not None else None,
            },
            state=state,
            enqueued_at=Now() if state == CallState.ENQUEUED else None,
            run_after=task.run_after,
        )
        setattr(call, dispatch.WRITTEN_AT, time.monotonic())  # before the INSERT takes enqueued_at
        call.save(using=database, force_insert=True)
        if state == CallState.ENQUEUED:
            call.enqueued_at = call.created_at  # both the INSERT's Now(), returned with the row
        dispatch.push_on_commit(call, scheduled=state == CallState.SCHEDULED)
        if call.state not in (CallState.PENDING, CallState.ENQUEUED, CallState.SCHEDULED):
            call.refresh_from_db()  # pushed at once outside a transaction, and already taken further
        result = task_result_for(call, task)

        def send_enqueued() -> None:
            _send(task_enqueued, self, result)

        transaction.on_commit(send_enqueued, using=database, robust=True)
        return result

    def get_result(self, result_id: str) -> TaskResult[Any, Any]:
        """The task's ``TaskResult`` as its row says now: one query.

        Raises ``TaskResultDoesNotExist`` for an id that is not one of this backend's rows (a
        malformed id, a method call's id, another backend's task), or whose task can no longer
        be imported as a ``Task``.
        """
        from ..models import MethodCall

        call_id = _call_id(result_id)
        call = (
            MethodCall.objects.using(self.database).filter(pk=call_id, task_backend=self.alias).first()
            if call_id is not None
            else None
        )
        if call is None:
            raise TaskResultDoesNotExist(result_id)
        task = task_of(call)
        if task is None:
            raise TaskResultDoesNotExist(f"{result_id}: {call.method} is no longer a Task.")
        return task_result_for(call, task)

    def check(self, **kwargs: Any) -> list[Any]:
        """Wiring mistakes, with ids: E004 invalid ``OPTIONS``, E005 a queue not in ``RQ_QUEUES``,
        E006 an unknown ``DATABASE`` (within E004's message), E007 ``asyncmodels`` not installed."""
        messages: list[checks.CheckMessage] = []
        hint = "See the README, section 'Using asyncmodels with Django's tasks framework'."
        if not apps.is_installed("asyncmodels"):
            messages.append(
                checks.Error(
                    f"TASKS[{self.alias!r}] uses asyncmodels' backend, but 'asyncmodels' is not in "
                    "INSTALLED_APPS, so its table does not exist.",
                    hint="Add 'django_rq' and 'asyncmodels' to INSTALLED_APPS and migrate.",
                    id=E007,
                )
            )
        messages.extend(checks.Error(problem, hint=hint, id=E004) for problem in self.option_problems)
        configured = conf.get_rq_queue_names()
        messages.extend(
            checks.Error(
                f"TASKS[{self.alias!r}] lists queue {queue!r}, which is not in RQ_QUEUES.",
                hint=f"Add {queue!r} to RQ_QUEUES (a task is pushed to the RQ queue of its queue_name).",
                id=E005,
            )
            for queue in sorted(self.queues - configured)
        )
        return messages

    def _check_runnable(self, task: Task[Any, Any]) -> None:
        """Refuse a task the worker could not find: its dotted path must import as a ``Task``
        of the same function (``@task`` at module level binds its name to the ``Task``)."""
        found = _import_task(task.module_path)
        if found is None or found.func is not task.func:
            raise InvalidTask(
                f"{task.module_path} does not import as this Task, so a worker could not run it; "
                "decorate a module-level function with @task and enqueue that."
            )


def _send(signal: Signal, backend: BaseTaskBackend, result: TaskResult[Any, Any]) -> None:
    """Send a task signal; a failing receiver is logged and never fails the task or its caller."""
    for receiver, response in signal.send_robust(sender=type(backend), task_result=result):
        if isinstance(response, Exception):
            logger.error(
                "Receiver %r of a task signal failed for task %s.", receiver, result.id, exc_info=response
            )


def _call_id(result_id: object) -> int | None:
    """The row id a result id names, or ``None`` if it is not the canonical text of one."""
    if not isinstance(result_id, str) or not (result_id.isascii() and result_id.isdigit()):
        return None
    if len(result_id) > 19 or str(int(result_id)) != result_id:
        return None
    value = int(result_id)
    return value if 0 < value <= 2**63 - 1 else None


def _import_task(path: str) -> Task[Any, Any] | None:
    """The ``Task`` at dotted ``path``, or ``None`` if there is none (or no such module)."""
    try:
        found = import_string(path)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if isinstance(found, Task) else None


def task_of(call: MethodCall) -> Task[Any, Any] | None:
    """The task of a task call, as it was enqueued (queue, ``run_after``, backend alias), from
    the ``Task`` its dotted path imports now; ``None`` if it no longer imports as one."""
    found = _import_task(call.method)
    if found is None:
        return None
    stored = (call.policy or {}).get(TASK_RUN_AFTER) if isinstance(call.policy, dict) else None
    run_after = datetime.datetime.fromisoformat(stored) if isinstance(stored, str) else None
    return found.using(queue_name=call.queue, run_after=run_after, backend=call.task_backend)


def _storable_arguments(task: Task[Any, Any], args: Any, kwargs: Any) -> tuple[list[Any], Any]:
    """The arguments, normalised to JSON as the framework does, in their stored form (typed JSON).

    Raises ``UnsupportedArgumentError`` naming the argument: not JSON (the framework's message,
    ``"Unsupported type: ..."``, is kept), or JSON that no database stores faithfully.
    """

    def plain(value: Any, path: str) -> Any:
        try:
            return normalize_json(value)
        except (TypeError, ValueError) as exc:
            raise UnsupportedArgumentError(f"{exc} ({task.module_path}, {path}: must be JSON).") from exc

    plain_args = [plain(value, f"args[{index}]") for index, value in enumerate(args)]
    plain_kwargs = {key: plain(value, f"kwargs[{key!r}]") for key, value in dict(kwargs).items()}
    try:
        encoded_args, encoded_kwargs = serialization.encode_arguments(plain_args, plain_kwargs)
    except EncodingError as exc:
        raise UnsupportedArgumentError(f"{task.module_path}(): {exc}") from exc
    return encoded_args, encoded_kwargs


def _parse_time(value: Any) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _error_type_of(entry: dict[str, Any]) -> str:
    """The exception path of a failed attempt in ``attempt_log``: stored for a task's attempts;
    for a lost worker's (recovery's entry) ``asyncmodels.WorkerLost``; else read off the error
    text, which the job writes as ``"<type>: <message>"``."""
    if entry.get("error_type"):
        return str(entry["error_type"])
    if entry.get("outcome") == "lost":
        return "asyncmodels.WorkerLost"
    return str(entry.get("error", "")).partition(": ")[0]


#: The exception path of a cancelled task's last error (``TaskError.exception_class`` imports it).
CANCELLED_ERROR = "asyncmodels.exceptions.CallCancelledError"


def _cancelled_text(call: MethodCall) -> str:
    """What a cancelled task's last error says: that it was cancelled, and the reason if any."""
    when = "before it ran" if not call.attempts else f"after attempt {call.attempts}"
    reason = call.state_reason.strip()
    return f"{CANCELLED_ERROR.rsplit('.', 1)[1]}: the task was cancelled {when}" + (
        f": {reason}" if reason else "."
    )


def task_result_for(call: MethodCall, task: Task[Any, Any]) -> TaskResult[Any, Any]:
    """The framework's ``TaskResult`` for a task call, every field from the row as read.

    ``enqueued_at`` is when the row was written (``created_at``: a push repeated by recovery does
    not change it); ``started_at`` the start of the first attempt and ``last_attempted_at`` of
    the latest; ``finished_at`` is set once the call is final; ``worker_ids`` holds one entry
    per attempt started (so ``attempts`` and ``TaskContext.attempt`` are ``call.attempts``);
    ``errors`` one per failed attempt (exception path, traceback). Raises ``DecodingError`` for
    arguments or a result that no longer decode.
    """
    from ..models import TERMINAL_STATES, CallState

    log = [entry for entry in (call.attempt_log or []) if isinstance(entry, dict)]
    by_attempt = {entry.get("attempt"): entry for entry in log}
    worker_ids = []
    for number in range(1, call.attempts + 1):
        entry = by_attempt.get(number)
        worker = entry.get("worker") if entry is not None else None
        if worker is None and number == call.attempts:
            worker = call.worker
        worker_ids.append(str(worker or ""))
    first = by_attempt.get(1)
    started_at = (_parse_time(first.get("started_at")) if first is not None else None) or call.started_at
    errors = [
        TaskError(
            exception_class_path=_error_type_of(entry),
            traceback=str(entry.get("traceback") or entry.get("error") or ""),
        )
        for entry in log
        if entry.get("outcome") != "succeeded"
    ]
    if call.state == CallState.CANCELLED:
        # The framework has no cancelled status: the task reads FAILED, and its last error says
        # it was cancelled (an attempt stopped by its cancel request already says so).
        if not errors or errors[-1].exception_class_path != CANCELLED_ERROR:
            errors.append(TaskError(exception_class_path=CANCELLED_ERROR, traceback=_cancelled_text(call)))
    elif not errors and call.state == CallState.FAILED:
        # Ended without an attempt: failed before it ran (its queue left RQ_QUEUES, say).
        errors.append(
            TaskError(
                exception_class_path=call.error_type or "asyncmodels.exceptions.AsyncModelsError",
                traceback=call.traceback or call.error or call.state_reason,
            )
        )
    args, kwargs = serialization.decode_arguments(call.args, call.kwargs)
    result: TaskResult[Any, Any] = TaskResult(
        task=task,
        id=str(call.pk),
        status=_status_of(call.state),
        enqueued_at=call.created_at,
        started_at=started_at if call.attempts else None,
        finished_at=call.finished_at if call.state in TERMINAL_STATES else None,
        last_attempted_at=call.started_at if call.attempts else None,
        args=args,
        kwargs=kwargs,
        backend=call.task_backend,
        errors=errors,
        worker_ids=worker_ids,
    )
    if call.state == CallState.SUCCEEDED:
        object.__setattr__(result, "_return_value", serialization.decode(call.result))
    return result


class TaskCannotRun(Exception):
    """A task call's row cannot be run (its task or backend is gone); nothing was run."""

    def __init__(self, error_type: str, error: str) -> None:
        super().__init__(error)
        self.error_type = error_type
        self.error = error


def _backend_of(call: MethodCall) -> AsyncModelsBackend:
    """The backend of ``call`` (``TASKS[call.task_backend]``); raises ``TaskCannotRun`` unless it
    is still configured, and is asyncmodels' backend."""
    try:
        backend = task_backends[call.task_backend]
    except InvalidTaskBackend as exc:
        raise TaskCannotRun(
            "asyncmodels.TaskBackendUnknown",
            f"TASKS has no backend {call.task_backend!r} any more ({exc}); nothing was run.",
        ) from exc
    if not isinstance(backend, AsyncModelsBackend):
        raise TaskCannotRun(
            "asyncmodels.TaskBackendUnknown",
            f"TASKS[{call.task_backend!r}] is no longer asyncmodels' backend; nothing was run.",
        )
    return backend


def prepare_task_call(call: MethodCall) -> tuple[Callable[..., Any], list[Any], dict[str, Any]]:
    """What the generic job runs for a claimed task call: ``(runner, args, kwargs)``, where
    ``runner(None, *args, **kwargs)`` sends ``task_started``, runs the task (with a
    ``TaskContext`` first when it ``takes_context``; a coroutine to completion) and returns its
    value normalised to JSON.

    Raises ``TaskCannotRun`` if the backend is gone, the stored path does not import as a
    ``Task`` (only ``Task`` objects are ever run), or the arguments do not decode. The runner
    raises ``TypeError`` for a return value that is not JSON, which fails the attempt.
    """
    backend = _backend_of(call)
    task = task_of(call)
    if task is None:
        raise TaskCannotRun(
            "asyncmodels.TaskNotFound",
            f"{call.method!r} does not import as a django.tasks Task; nothing was run.",
        )
    try:
        args, kwargs = serialization.decode_arguments(call.args, call.kwargs)
    except DecodingError as exc:
        raise TaskCannotRun("asyncmodels.ArgumentsUnavailable", str(exc)) from exc

    def run_task(_no_object: None, *args: Any, **kwargs: Any) -> Any:
        result: TaskResult[Any, Any] = task_result_for(call, task)
        _send(task_started, backend, result)
        if task.takes_context:
            value = task.call(TaskContext(task_result=result), *args, **kwargs)
        else:
            value = task.call(*args, **kwargs)
        return _storable_return_value(task, value)

    return run_task, args, kwargs


def _storable_return_value(task: Task[Any, Any], value: Any) -> Any:
    """``value`` normalised to JSON as the framework does; raises ``TypeError`` saying why not."""
    try:
        plain = normalize_json(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{task.module_path} returned a value that is not JSON ({exc}); a task must return "
            "None, a bool, int, float, str, or a list or dict of them."
        ) from exc
    try:
        serialization.encode(plain, path="result")
    except EncodingError as exc:
        raise TypeError(f"{task.module_path} returned a value that cannot be stored: {exc}") from exc
    return plain


def task_attempt_ended(call: MethodCall) -> None:
    """After an attempt of a task call ended (the job, or recovery ending a lost one): send
    ``task_finished`` if the call is now final, at most once per attempt. No query when the
    job's finishing ``UPDATE`` returned the row (``job.FINISHED_ROW``: PostgreSQL, SQLite
    3.35+); else one, to read it. Never raises.

    The job calls this inside its ``except`` block for a failed attempt, so the framework's log
    receiver (``sys.exc_info()``) logs the traceback; receivers run after the attempt was
    recorded, and one that raises is logged (``_send``), so none can change that record.
    """
    from ..job import FINISHED_ROW
    from ..models import TERMINAL_STATES, MethodCall

    if getattr(call, _FINISHED_SENT, None) == call.attempts:
        return
    setattr(call, _FINISHED_SENT, call.attempts)
    try:
        row = getattr(call, FINISHED_ROW, None)
        if row is None:
            row = MethodCall.objects.using(call._state.db).filter(pk=call.pk).first()
        if row is None or row.state not in TERMINAL_STATES:
            return
        backend = _backend_of(row)
        task = task_of(row)
        if task is not None:
            _send(task_finished, backend, task_result_for(row, task))
    except Exception:
        logger.exception("Could not send task_finished for call %s.", call.pk)


#: Set on a call by ``task_attempt_ended``: the attempt whose end it has handled.
_FINISHED_SENT = "_asyncmodels_task_finished_sent"
