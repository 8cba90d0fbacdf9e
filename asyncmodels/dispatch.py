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
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import conf, signals

if TYPE_CHECKING:
    from rq.queue import EnqueueData, Queue

    from .models import MethodCall

logger = logging.getLogger("asyncmodels.dispatch")

#: Dotted path of the one job function every call runs through.
JOB_FUNCTION = "asyncmodels.job.run_method_call"

#: Set on a call by ``send_jobs``: whether RQ held its job already (pushed by another process,
#: which sends its ``call_enqueued``), so this push sent nothing.
HELD_ALREADY = "_asyncmodels_held_already"


#: Queues by name, with what they were made from (see ``get_queue``).
_queues: dict[str, tuple[str, object, Queue]] = {}


def get_queue(name: str) -> Queue:
    """Return django-rq's queue ``name`` with its own on-commit deferral turned off.

    asyncmodels defers the push itself, on the call's own database; django-rq's ``on_db_commit``
    mode only watches the default connection and would make ``enqueue()`` return ``None``.

    The queue (and so its Redis client and connection pool) is kept for the next push: django-rq
    makes a new client, and so a new TCP connection, on every call. It is made again when the
    queue's ``RQ_QUEUES`` settings change (``override_settings``) or django-rq's connection
    factory is replaced (tests). redis-py's pool opens fresh connections in a forked process.
    """
    import django_rq
    import django_rq.queues
    from django.conf import settings

    config = repr(sorted((str(key), repr(value)) for key, value in settings.RQ_QUEUES.get(name, {}).items()))
    factory = getattr(django_rq.queues, "get_connection", None)  # replaced by tests with fakeredis
    cached = _queues.get(name)
    if cached is not None and cached[0] == config and cached[1] is factory:
        return cached[2]
    queue = django_rq.get_queue(name, commit_mode="auto")
    _queues[name] = (config, factory, queue)  # holds the factory: its id cannot be reused
    return queue


def push(call: MethodCall, *, raise_errors: bool = False) -> bool:
    """Push ``call`` to its queue (or run it, with the ``immediate`` backend); return success.

    A queue failure is logged and leaves the call ``pending`` (with the reason); it is raised
    again only with ``raise_errors=True`` (recovery stops a pass's pushes when Redis is down).
    """
    from .models import CallState

    database = call._state.db or "default"
    if conf.get_backend_name() == "immediate":
        signals.pushed([call], previous_state=None if call.state == CallState.ENQUEUED else call.state)
        _run_immediately(call.pk, database)
        call.refresh_from_db()  # the caller may hold this very object: show it the outcome
        return True
    from rq.exceptions import DuplicateJobError

    if call.queue not in conf.get_rq_queue_names():
        _fail_for_unknown_queue(call)
        return False
    held = False
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
            description=call.job_description,
            # Our row keeps the outcome; RQ's copy of the (empty) return value need not linger.
            result_ttl=0,
            # None keeps the queue's DEFAULT_TIMEOUT (RQ's default: 180 s).
            job_timeout=math.ceil(timeout) if timeout else None,
        )
    except DuplicateJobError:
        logger.info("Call %s is already in RQ as job %s; not pushed again.", call.pk, call.job_id)
        held = True
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
    previous = call.state
    if call.state == CallState.PENDING and not call.mark_enqueued():
        call.refresh_from_db(fields=["state"])  # a worker claimed it already, or another push marked it
    elif not held:  # pushed, and marked enqueued (now, or when written)
        signals.pushed([call], previous_state=previous if previous != call.state else None)
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
        previous, call.state, call.state_reason = call.state, CallState.FAILED, ""
        signals.send(
            signals.call_failed,
            call,
            previous_state=previous,
            error_type="asyncmodels.UnknownQueue",
            error=error,
            outcome="failed",
            duration=None,
        )
        from .dependencies import settle_dependents

        settle_dependents(call)


def _note_push_failure(call: MethodCall, exc: Exception) -> None:
    """Say on the row why it is (back to) pending; never raise (Redis is down, the database may be too)."""
    from .models import PUSH_FAILURE_PREFIX

    reason = (
        f"{PUSH_FAILURE_PREFIX} {call.queue!r} failed ({type(exc).__name__}: {exc}); "
        "recovery will push it again."
    )
    _back_to_pending([call], reason)


def _back_to_pending(calls: list[MethodCall], reason: str) -> None:
    """After a failed push: ``calls`` still ``pending`` get the reason; those written ``enqueued``
    (``enqueued_at_insert``) go back to ``pending`` with it. A call a worker claimed meanwhile
    (the push reached Redis after all) is left alone. Never raises.

    A call set back to ``pending`` loses its ``enqueued_at`` (the INSERT's, or an earlier push's
    whose job is gone): Redis does not hold it, and the admin must not say it was enqueued."""
    from django.db.models import Case, DateTimeField, F, Value, When

    from .models import CallState, MethodCall

    try:
        MethodCall.objects.using(calls[0]._state.db).filter(
            pk__in=[call.pk for call in calls], state__in=[CallState.PENDING, CallState.ENQUEUED]
        ).update(
            state=CallState.PENDING,
            state_reason=reason[:2000],
            enqueued_at=Case(
                When(state=CallState.ENQUEUED, then=Value(None, output_field=DateTimeField())),
                default=F("enqueued_at"),
                output_field=DateTimeField(),
            ),
        )
    except Exception:
        logger.exception("Could not record the failed push of %s call(s).", len(calls))
        return
    for call in calls:
        if call.state == CallState.ENQUEUED:
            call.state = CallState.PENDING
            call.enqueued_at = None


def enqueued_at_insert(database: str) -> bool:
    """Whether a call written now on ``database`` may be written ``enqueued`` rather than ``pending``.

    True with the ``rq`` backend when no savepoint is open on ``database`` (autocommit, or the
    outermost ``atomic()`` block): the call's commit hook then runs exactly when its row commits,
    so the push is certain to be tried and the extra ``UPDATE`` (and commit) marking the row
    after the push is spared. Should that push fail, ``push()`` sets the call back to ``pending``
    with the reason; should the process die between the commit and the push, the call is
    ``enqueued`` but unknown to Redis, which recovery handles after ``PUSH_GRACE_SECONDS`` like a
    flushed Redis. Inside a savepoint (a nested ``atomic()``, and so in every Django
    ``TestCase``) a call is written ``pending`` and marked ``enqueued`` once pushed: it may be
    rolled back without its transaction, and in a test that never commits it must stay
    ``pending`` (DESIGN.md: "in Django's TestCase nothing commits, so a call stays pending").
    That includes a call made in ``setUpTestData``: no savepoint is open there, but the
    outermost block is the TestCase's own, which is rolled back, never committed.
    """
    from django.db import transaction

    if conf.get_backend_name() != "rq":
        return False
    connection = transaction.get_connection(database)
    if connection.savepoint_ids:
        return False
    # Django marks the atomic blocks a TestCase opens around its class (and its tests).
    return not any(getattr(block, "_from_testcase", False) for block in connection.atomic_blocks)


#: Set on a call written ``enqueued``: ``time.monotonic()`` taken just before its row was written.
WRITTEN_AT = "_asyncmodels_written_at"


def _unpushed_for_sure(call: MethodCall) -> bool:
    """Whether nobody can have pushed ``call`` before its own commit hook: it was written
    ``enqueued`` less than half of ``PUSH_GRACE_SECONDS`` ago, and recovery pushes an ``enqueued``
    call again only once its ``enqueued_at`` (taken after ``WRITTEN_AT``) is older than the grace.
    A transaction held open longer than that must ask RQ first, like any other push."""
    from .models import CallState

    written: float | None = getattr(call, WRITTEN_AT, None)
    if call.state != CallState.ENQUEUED or written is None:
        return False
    return time.monotonic() - written < conf.get_duration("PUSH_GRACE_SECONDS").total_seconds() / 2


def push_on_commit(call: MethodCall, *, scheduled: bool = False) -> None:
    """Push ``call`` once the transaction on its database commits (at once outside a transaction).

    Registered with ``transaction.on_commit(..., robust=True)``: a failing push is logged and
    never breaks the commit; the row stays ``pending`` for recovery. With ``scheduled=True`` the
    call is pushed only if it is already due (``push_if_due``).

    Calls made in one transaction are pushed together (``CommitBatch``): one Redis pipeline per
    connection and one ``UPDATE`` marking them ``enqueued``, not a round trip each.
    """
    from django.db import transaction

    database = call._state.db or "default"
    connection = transaction.get_connection(database)
    if scheduled or not connection.in_atomic_block:

        def push_committed_call() -> None:
            # A named function, not functools.partial: Django 5.2 logs a robust callback's failure
            # with func.__qualname__, and a partial has none (django ticket #36487).
            if scheduled:
                push_if_due(call)
            else:
                push(call)

        transaction.on_commit(push_committed_call, using=database, robust=True)
        return
    batch = getattr(connection, "_asyncmodels_batch", None)
    # Django replaces its list of commit hooks when the transaction ends (or a savepoint rolls
    # back): a batch belongs to the list that was current when it was started.
    if batch is None or batch.hooks is not connection.run_on_commit:
        batch = CommitBatch(database, connection.run_on_commit)
        connection._asyncmodels_batch = batch
    batch.calls.append(call)

    def push_committed_calls() -> None:
        batch.flush()  # the first of the batch's hooks to run pushes them all; the others find none

    transaction.on_commit(push_committed_calls, using=database, robust=True)


def push_all_on_commit(calls: list[MethodCall], database: str) -> None:
    """Push ``calls`` (rows written together, on ``database``) once its transaction commits, in
    one batch (``push_many``); at once outside a transaction. One commit hook for them all:
    they were written in one statement, so they commit or roll back together."""
    from django.db import transaction

    if not calls:
        return

    def push_committed_calls() -> None:
        if len(calls) == 1 or conf.get_backend_name() == "immediate":
            for call in calls:
                push(call)
        else:
            push_many(calls)

    transaction.on_commit(push_committed_calls, using=database, robust=True)


class CommitBatch:
    """The calls made in one transaction on one database, pushed together once it commits.

    Each call registers its own commit hook, so a call made in a savepoint that rolls back loses
    its hook the Django way; the first hook to run pushes every call of the batch that is still
    ``pending`` in the database (rows rolled back with a savepoint are not, and are skipped).
    """

    def __init__(self, database: str, hooks: object) -> None:
        self.database = database
        self.hooks = hooks
        self.calls: list[MethodCall] = []

    def flush(self) -> None:
        calls, self.calls = self.calls, []
        if len(calls) <= 1 or conf.get_backend_name() == "immediate":
            for call in calls:  # one call's own hook ran, so its row committed
                push(call)
            return
        push_many(calls)


def push_many(calls: list[MethodCall]) -> int:
    """Push committed calls of one database together; return how many were pushed.

    Calls written ``pending`` are first checked still to be (one ``SELECT``: rows rolled back
    with a savepoint are gone); calls written ``enqueued`` (``enqueued_at_insert``) committed
    with their hook and need no check. Then per Redis connection one pipeline asking which job
    ids RQ holds already (not for calls just written ``enqueued``: ``_unpushed_for_sure``) and
    one pipeline enqueueing the others, and one ``UPDATE`` marking the
    ``pending`` ones ``enqueued``. A Redis failure leaves them ``pending`` with the reason (those
    written ``enqueued`` go back to ``pending``), for recovery, like ``push()``. Never raises.
    """
    from django.db.models.functions import Now

    from .models import CallState, MethodCall, reason_after_push

    database = calls[0]._state.db or "default"
    manager = MethodCall.objects.using(database)
    written_pending = [call.pk for call in calls if call.state == CallState.PENDING]
    try:
        still_pending = (
            set(manager.filter(pk__in=written_pending, state=CallState.PENDING).values_list("pk", flat=True))
            if written_pending
            else set()
        )
    except Exception:
        logger.exception("Could not read %s committed calls to push them; recovery will.", len(calls))
        return 0
    candidates = [call for call in calls if call.state != CallState.PENDING or call.pk in still_pending]
    pushed, failures = send_jobs(candidates, ask_first=lambda call: not _unpushed_for_sure(call))
    for failed, reason in failures:
        _back_to_pending(failed, reason)
    to_mark = [call for call in pushed if call.state == CallState.PENDING]
    # Written enqueued (with their push bound to the commit): pushed now, by this process.
    marking = {id(call) for call in to_mark}
    signals.pushed(
        call for call in pushed if id(call) not in marking and not getattr(call, HELD_ALREADY, False)
    )
    if not to_mark:
        return len(pushed)
    try:
        manager.filter(pk__in=[call.pk for call in to_mark], state=CallState.PENDING).update(
            state=CallState.ENQUEUED,
            enqueued_at=Now(),
            state_reason=reason_after_push(),
        )
    except Exception:  # pushed, not marked: the job's claim accepts pending calls too
        logger.exception("Could not mark %s pushed calls enqueued.", len(to_mark))
        return len(pushed)
    for call in to_mark:
        call.state = CallState.ENQUEUED
    signals.pushed(
        (call for call in to_mark if not getattr(call, HELD_ALREADY, False)), previous_state=CallState.PENDING
    )
    return len(pushed)


def send_jobs(
    calls: list[MethodCall], *, ask_first: Callable[[MethodCall], bool]
) -> tuple[list[MethodCall], list[tuple[list[MethodCall], str]]]:
    """Enqueue the generic job of each of ``calls`` (committed, or locked by the caller's
    transaction; one database), with the ``rq`` backend: per Redis server, one pipeline asking
    which of the job ids RQ holds already (only for calls where ``ask_first(call)`` is true; such
    a job is not enqueued again) and one pipeline enqueueing the others. A call whose queue left
    ``RQ_QUEUES`` is failed (``asyncmodels.UnknownQueue``) and is in neither list.

    Returns ``(sent, failures)``: the calls now held by RQ, and per Redis server that failed, its
    calls and the reason to record on them (``_back_to_pending`` does, for ``push_many``; recovery
    does inside its step's transaction). Never raises for a Redis failure; the exception is logged.
    """
    from rq.job import Job

    from .models import PUSH_FAILURE_PREFIX

    queues = conf.get_rq_queue_names()
    by_connection: dict[str, tuple[Queue, list[tuple[Queue, MethodCall]]]] = {}
    by_name: dict[str, Queue] = {}
    seen: set[int] = set()
    for call in calls:
        if call.pk in seen:
            continue
        seen.add(call.pk)
        if call.queue not in queues:
            _fail_for_unknown_queue(call)
            continue
        if call.queue not in by_name:
            by_name[call.queue] = get_queue(call.queue)
        queue = by_name[call.queue]
        by_connection.setdefault(_server_of(call.queue), (queue, []))[1].append((queue, call))
    sent: list[MethodCall] = []
    failures: list[tuple[list[MethodCall], str]] = []
    for first_queue, entries in by_connection.values():
        connection = first_queue.connection
        try:
            asked = [call for _, call in entries if ask_first(call)]
            held_ids: set[int] = set()
            if asked:
                with connection.pipeline(transaction=False) as pipeline:
                    for call in asked:
                        pipeline.exists(Job.key_for(call.job_id))
                    held_ids = {
                        call.pk for call, exists in zip(asked, pipeline.execute(), strict=True) if exists
                    }
            per_queue: dict[str, tuple[Queue, list[EnqueueData]]] = {}
            for queue, call in entries:
                if call.pk in held_ids:  # RQ holds this attempt's job already (pushed by another process)
                    logger.info("Call %s is already in RQ as job %s; not pushed again.", call.pk, call.job_id)
                    setattr(call, HELD_ALREADY, True)  # its pusher sends call_enqueued, not us
                else:
                    setattr(call, HELD_ALREADY, False)
                    per_queue.setdefault(queue.name, (queue, []))[1].append(_job_data(queue, call))
            with connection.pipeline(transaction=False) as pipeline:
                for queue, datas in per_queue.values():
                    queue.enqueue_many(datas, pipeline=pipeline)
                pipeline.execute()
        except Exception as exc:
            names = sorted({call.queue for _, call in entries})
            logger.exception(
                "Could not push %s call(s) to queue(s) %s; they stay pending for recovery.",
                len(entries),
                ", ".join(map(repr, names)),
            )
            failures.append(
                (
                    [call for _, call in entries],
                    f"{PUSH_FAILURE_PREFIX} {', '.join(map(repr, names))} failed ({type(exc).__name__}: "
                    f"{exc}); recovery will push it again.",
                )
            )
            continue
        sent.extend(call for _, call in entries)
    return sent, failures


#: Keys of a django-rq queue's settings that shape its jobs, not the Redis it talks to.
_JOB_OPTIONS = frozenset({"DEFAULT_TIMEOUT", "DEFAULT_RESULT_TTL", "ASYNC", "DEFAULT_JOB_CLASS"})


def _server_of(queue_name: str) -> str:
    """Which Redis a queue talks to, from its ``RQ_QUEUES`` settings: queues configured alike
    share one pipeline (django-rq gives each queue a client object of its own)."""
    from django.conf import settings

    config = settings.RQ_QUEUES.get(queue_name, {})
    return repr(sorted((str(key), repr(value)) for key, value in config.items() if key not in _JOB_OPTIONS))


def _job_data(queue: Queue, call: MethodCall) -> EnqueueData:
    """RQ's description of the generic job for ``call`` (as ``push()`` enqueues it)."""
    timeout = call.policy.get("timeout") if isinstance(call.policy, dict) else None
    return queue.prepare_data(
        JOB_FUNCTION,
        [call.pk, call._state.db or "default"],
        job_id=call.job_id,
        description=call.job_description,
        result_ttl=0,
        timeout=math.ceil(timeout) if timeout else None,
    )


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
