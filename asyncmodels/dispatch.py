"""Pushing committed calls to their queue: the "go" signal, never the truth.

``push()`` runs from ``transaction.on_commit`` once the call's row is committed. With the ``rq``
backend it enqueues the generic job (carrying only the call's id and database alias) through
django-rq and then marks the row ``enqueued``; with the ``immediate`` backend it runs the very
same job code in this process. A failed push leaves the row ``pending`` and is logged: the
caller's commit has already happened and must not fail because Redis is down.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from typing import TYPE_CHECKING

from . import conf

if TYPE_CHECKING:
    from rq.queue import Queue

    from .models import MethodCall

logger = logging.getLogger("asyncmodels.dispatch")

#: Dotted path of the one job function every call runs through.
JOB_FUNCTION = "asyncmodels.job.run_method_call"


def get_queue(name: str) -> Queue:
    """Return django-rq's queue ``name`` with its own on-commit deferral turned off.

    asyncmodels defers the push itself, on the call's own database; django-rq's ``on_db_commit``
    mode only watches the default connection and would make ``enqueue()`` return ``None``.
    """
    import django_rq

    return django_rq.get_queue(name, commit_mode="auto")


def push(call: MethodCall, *, raise_errors: bool = False) -> bool:
    """Push ``call`` to its queue (or run it, with the ``immediate`` backend); return success.

    A queue failure is logged and leaves the call ``pending`` (with the reason); it is raised
    again only with ``raise_errors=True`` (recovery stops a pass's pushes when Redis is down).
    """
    database = call._state.db or "default"
    if conf.get_backend_name() == "immediate":
        _run_immediately(call.pk, database)
        call.refresh_from_db()  # the caller may hold this very object: show it the outcome
        return True
    from rq.exceptions import DuplicateJobError

    if call.queue not in conf.get_rq_queue_names():
        _fail_for_unknown_queue(call)
        return False
    try:
        timeout = call.policy.get("timeout") if isinstance(call.policy, dict) else None
        queue = get_queue(call.queue)
        queue.enqueue(
            JOB_FUNCTION,
            call.pk,
            database,
            job_id=call.job_id,
            # One job per call and attempt: pushing again while RQ still holds the job is refused
            # (two workers running one RQ job id confuse RQ's own registries).
            unique=True,
            description=f"{call.method}(pk={call.object_id}) call #{call.pk}",
            # Our row keeps the outcome; RQ's copy of the (empty) return value need not linger.
            result_ttl=0,
            # None keeps the queue's DEFAULT_TIMEOUT (RQ's default: 180 s).
            job_timeout=math.ceil(timeout) if timeout else None,
        )
    except DuplicateJobError:
        logger.info("Call %s is already in RQ as job %s; not pushed again.", call.pk, call.job_id)
    except Exception as exc:
        logger.exception(
            "Could not push call %s (%s on object %s) to queue %r; it stays pending.",
            call.pk,
            call.method,
            call.object_id,
            call.queue,
        )
        _note_push_failure(call, exc)
        if raise_errors:
            raise
        return False
    call.mark_enqueued()
    return True


_immediate = threading.local()


def _run_immediately(call_id: int, database: str) -> None:
    """The ``immediate`` backend: run the call here. A call pushed while another runs in this
    thread (a workflow's next step, released as the previous one ends; a call the method made)
    is queued and run after it, as a worker would, not inside it: a chain of any length then
    needs no deeper stack."""
    from .job import run_method_call

    queue: collections.deque[tuple[int, str]] | None = getattr(_immediate, "queue", None)
    if queue is not None:
        queue.append((call_id, database))
        return
    queue = _immediate.queue = collections.deque([(call_id, database)])
    try:
        while queue:
            run_method_call(*queue.popleft())
    finally:
        _immediate.queue = None


def _fail_for_unknown_queue(call: MethodCall) -> None:
    """A call whose queue left ``RQ_QUEUES`` (renamed, removed) can never be pushed: end it, saying so."""
    from django.db.models.functions import Now

    from .models import CallState, MethodCall

    error = (
        f"Queue {call.queue!r} is no longer in settings.RQ_QUEUES, so the call could not be pushed; "
        "nothing was run. Restore the queue before making such calls again."
    )
    failed = (
        MethodCall.objects.using(call._state.db)
        .filter(pk=call.pk, state__in=[CallState.PENDING, CallState.ENQUEUED])
        .update(
            state=CallState.FAILED,
            finished_at=Now(),
            error_type="asyncmodels.UnknownQueue",
            error=error,
            state_reason="",
        )
    )
    if failed:
        call.state = CallState.FAILED
        logger.error("Call %s failed: %s", call.pk, error)
        from .dependencies import settle_dependents

        settle_dependents(call)


def _note_push_failure(call: MethodCall, exc: Exception) -> None:
    """Say on the row why it is still pending; never raise (Redis is down, the database may be too)."""
    from .models import PUSH_FAILURE_PREFIX, CallState, MethodCall

    reason = (
        f"{PUSH_FAILURE_PREFIX} {call.queue!r} failed ({type(exc).__name__}: {exc}); "
        "recovery will push it again."
    )
    try:
        MethodCall.objects.using(call._state.db).filter(pk=call.pk, state=CallState.PENDING).update(
            state_reason=reason[:2000]
        )
    except Exception:
        logger.exception("Could not record the failed push of call %s.", call.pk)


def push_on_commit(call: MethodCall, *, scheduled: bool = False) -> None:
    """Push ``call`` once the transaction on its database commits (at once outside a transaction).

    Registered with ``transaction.on_commit(..., robust=True)``: a failing push is logged and
    never breaks the commit; the row stays ``pending`` for recovery. With ``scheduled=True`` the
    call is pushed only if it is already due (``push_if_due``).
    """
    from django.db import transaction

    def push_committed_call() -> None:
        # A named function, not functools.partial: Django 5.2 logs a robust callback's failure
        # with func.__qualname__, and a partial has none (django ticket #36487).
        if scheduled:
            push_if_due(call)
        else:
            push(call)

    transaction.on_commit(push_committed_call, using=call._state.db or "default", robust=True)


def push_if_due(call: MethodCall, *, raise_errors: bool = False) -> bool:
    """Push a ``scheduled`` call if its ``run_after`` has come (by the database's clock).

    A compare-and-set ``scheduled`` → ``pending`` first, so of several processes only one pushes.
    Returns whether this process pushed it; a call not yet due is left for recovery.
    """
    from django.db.models.functions import Now

    from .models import CallState, MethodCall

    promoted = (
        MethodCall.objects.using(call._state.db)
        .filter(pk=call.pk, state=CallState.SCHEDULED, run_after__lte=Now())
        .update(state=CallState.PENDING, state_reason="")
    )
    if not promoted:
        return False
    call.state = CallState.PENDING
    return push(call, raise_errors=raise_errors)
