"""Plain functions of Django's tasks framework, run by asyncmodels' backend (settings.TASKS).

Imported only where a tasks framework is installed: ``django.tasks`` (Django 6), else the
django-tasks backport (Django 5.2).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from django.db.models import F

from asyncmodels import current_call

from .models import Echo

if TYPE_CHECKING:
    from django.tasks import TaskContext, task
else:
    try:
        from django.tasks import TaskContext, task
    except ImportError:
        from django_tasks import TaskContext, task


class TaskFailure(Exception):
    """Raised by the failing tasks below."""


@task()
def add(a: int, b: int) -> int:
    return a + b


@task(queue_name="urgent")
def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Return what it was given, so tests can check what the worker received."""
    return {"args": list(args), "kwargs": kwargs}


@task()
def bump(echo_id: int) -> int:
    """Count runs in the database, so tests can see that a task ran, and how often."""
    Echo.objects.filter(pk=echo_id).update(hits=F("hits") + 1)
    return Echo.objects.get(pk=echo_id).hits


@task()
def fail(message: str) -> None:
    raise TaskFailure(message)


@task()
def return_not_json() -> Any:
    return {"when": time}  # a module: no JSON for that


@task(takes_context=True)
def which_attempt(context: TaskContext[Any, Any]) -> dict[str, Any]:
    call = current_call()
    return {
        "attempt": context.attempt,
        "id": context.task_result.id,
        "status": str(context.task_result.status),
        "call_attempts": call.attempts if call is not None else None,
    }


@task(takes_context=True, backend="retrying")
def flaky(context: TaskContext[Any, Any], fail_before: int) -> int:
    """Fail until attempt ``fail_before``; then return the attempt's number."""
    if context.attempt < fail_before:
        raise TaskFailure(f"attempt {context.attempt} fails on purpose")
    return context.attempt


@task()
async def add_slowly(a: int, b: int) -> int:
    await asyncio.sleep(0.01)
    return a + b


@task()
def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@task(takes_context=True, backend="retrying")
def sleep_on_first_attempt(context: TaskContext[Any, Any], seconds: float) -> int:
    """Sleep ``seconds`` on attempt 1 (long enough to be killed); return at once on the next."""
    if context.attempt == 1:
        time.sleep(seconds)
    return context.attempt


@task()
def cancel_itself() -> None:
    """Ask for its own call to be cancelled, then stop at the next safe point."""
    call = current_call()
    if call is not None:  # always, on a worker
        call.cancel(reason="changed its mind")
        call.raise_if_cancel_requested()
