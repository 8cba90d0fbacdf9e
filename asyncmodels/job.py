"""The one generic job every call runs through: claim, reload, look up, run, record.

RQ delivers ``run_method_call(call_id, database)``; everything else is read from the row. The
claim is a compare-and-set (``pending``/``enqueued`` → ``running``), so a second delivery of the
same job, or a push that raced with a cancel, runs nothing (README, Guarantees: 3). A claimed
call holds a lease (``lease_expires_at``) that a thread renews while the method runs; if the
worker dies, the lease runs out and recovery ends or retries the call.

Every record of an outcome is itself a compare-and-set on (state ``running``, this attempt), so
an attempt that recovery already declared lost cannot overwrite what happened since.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.db import (
    DatabaseError,
    DataError,
    IntegrityError,
    InterfaceError,
    NotSupportedError,
    OperationalError,
    ProgrammingError,
    close_old_connections,
    connections,
    transaction,
)
from django.db.models import Case, DurationField, F, Model, QuerySet, TextField, Value, When
from django.db.models.expressions import RawSQL
from django.db.models.functions import Coalesce, Now

from . import conf, exclusive, registry, serialization, signals
from .context import running
from .exceptions import CallCancelledError, DecodingError, EncodingError
from .models import (
    CLAIMABLE_STATES,
    CallState,
    CompiledGet,
    CompiledSelect,
    CompiledUpdate,
    MethodCall,
    Slot,
    all_columns_sql,
    has_dependents_sql,
    honour_cancel_request,
    returned_calls,
    run_with_slots,
    update_returning_sql,
    updates_return_rows,
)
from .options import retry_policy_from_row

logger = logging.getLogger("asyncmodels.job")
T = TypeVar("T")


def current_worker_name() -> str:
    """Name of the RQ worker running this job, or ``"<host>:<pid>"`` outside RQ."""
    try:
        from rq import get_current_job

        job = get_current_job()
    except Exception:  # no RQ context at all (immediate backend, tests)
        job = None
    if job is not None and job.worker_name:
        return str(job.worker_name)
    return f"{socket.gethostname()}:{os.getpid()}"


def run_method_call(call_id: int, database: str = "default") -> None:
    """Run the call ``call_id`` stored on ``database`` if this process can claim it.

    Returns ``None`` in every case: the outcome is on the row, not in RQ. A call that is not
    claimable (already running, finished, cancelled, scheduled, or unknown) is left alone.
    ``SystemExit`` and ``KeyboardInterrupt`` raised by the method are recorded, then re-raised.
    """
    in_worker = _running_under_rq()
    if in_worker:
        # RQ knows nothing of Django's request cycle: drop connections that broke or outlived
        # CONN_MAX_AGE (a database restart, say) before and after each job, as a request would.
        close_old_connections()
        # With CONN_HEALTH_CHECKS, that would also send a `SELECT 1` before the job's first
        # statement (~0.2 ms a call). That statement, the claim, already runs again on a new
        # connection if the old one is dead (_claim_and_run): the check would only repeat it.
        connections[database].health_check_done = True  # type: ignore[attr-defined]  # Django >= 4.1, not in the stubs
    try:
        _claim_and_run(call_id, database)
    finally:
        if in_worker:
            close_old_connections()


def _running_under_rq() -> bool:
    from rq import get_current_job

    try:
        return get_current_job() is not None
    except Exception:  # outside any RQ worker context
        return False


#: What ``_claim`` returns when the call's exclusive key is held by a running call.
BUSY = -1


def _claim(call_id: int, database: str) -> int | MethodCall:
    """Claim the call: the claimed row (as it is now, ``running``) or 1 if this process won it,
    0 if it is not claimable, ``BUSY`` if its exclusive key is held (the partial unique index on
    running calls refused the UPDATE).

    Where the database can return the rows an ``UPDATE`` changed (PostgreSQL; SQLite 3.35+), the
    claim and the read of the call are one statement (``UPDATE … RETURNING``); elsewhere the
    caller reads the row after the claim.
    """
    try:
        if connections[database].in_atomic_block:  # the immediate backend inside a test's transaction
            with transaction.atomic(using=database):
                return _claim_update(call_id, database)
        return _claim_update(call_id, database)
    except IntegrityError:
        return BUSY


def _claim_changes(worker: Any, lease: Any) -> dict[str, Any]:
    """The changes that claim a call for ``worker`` (its name) with a lease of ``lease``."""
    return {
        "state": CallState.RUNNING,
        "attempts": F("attempts") + 1,
        "worker": worker,
        "started_at": Now(),
        "finished_at": None,
        "lease_expires_at": Now() + lease,
        "cancel_requested_at": None,
        "progress": None,
        "progress_message": "",
        "progress_at": None,
        "state_reason": "",
        "enqueued_at": Coalesce(F("enqueued_at"), Now()),
    }


def _claimable(database: str, pk: Any) -> QuerySet[MethodCall]:
    return MethodCall.objects.using(database).filter(pk=pk, state__in=CLAIMABLE_STATES)


#: The claim as one ``UPDATE … RETURNING`` every column, compiled once per database.
_CLAIM = CompiledUpdate(
    lambda database: (
        _claimable(database, Slot("pk", MethodCall._meta.get_field("id"))),
        _claim_changes(Slot("worker", MethodCall._meta.get_field("worker")), Slot("lease", DurationField())),
        all_columns_sql(database),
    )
)


def _claim_update(call_id: int, database: str) -> int | MethodCall:
    lease = conf.get_duration("LEASE_SECONDS")
    worker = current_worker_name()[:255]
    if not updates_return_rows(database):
        return _claimable(database, call_id).update(**_claim_changes(worker, lease))
    model = _LAST_MODEL.get(database)
    if model is not None and not connections[database].in_atomic_block:
        claimed = _CLAIM_WITH_OBJECT.run(database, model, pk=call_id, worker=worker, lease=lease)
        if claimed is not None:
            return claimed
    rows = _CLAIM.run(database, pk=call_id, worker=worker, lease=lease)
    try:
        return returned_calls(database, rows)[0] if rows else 0
    except Exception:
        return len(rows)  # a value that would not load (a forged row): the caller's read fails it


#: Per database, the model of the object the last call there ran on: the next claim there reads
#: an object of that model in the same statement (``_ClaimWithObject``).
_LAST_MODEL: dict[str, type[Model]] = {}

#: Set on a call by ``_ClaimWithObject``: its object, read in the claim's own statement.
PRELOADED_OBJECT = "_asyncmodels_object"


class _ClaimWithObject:
    """The claim and the object's reload in one statement, on PostgreSQL, for one model at a time.

    A queue mostly runs many calls of one method in a row, so the job guesses that the call it
    claims is on an object of the same model as the last one (``_LAST_MODEL``), and reads that
    object with the claim (``WITH claimed AS (UPDATE … RETURNING …) SELECT … LEFT JOIN
    LATERAL (<the ORM's pk lookup>)``): a database round trip less per call. The object is read
    only if the row's content type is that model's, and its stored id is cast only where it has
    the pk's form (digits, a UUID), so no stored value can make the claim itself fail. A wrong
    guess, a missing object, a pk of another type or a base manager that loads more than the
    model's own columns reads the object as before (``CompiledGet``); so does a statement the
    database refuses, from then on for that model.
    """

    #: Pk field types whose stored id is cast, with the pattern a castable id matches; text
    #: pks are compared as they are stored.
    CASTS: ClassVar[dict[str, tuple[str, str]]] = {
        **dict.fromkeys(
            (
                "AutoField",
                "BigAutoField",
                "SmallAutoField",
                "IntegerField",
                "BigIntegerField",
                "SmallIntegerField",
                "PositiveIntegerField",
                "PositiveBigIntegerField",
                "PositiveSmallIntegerField",
            ),
            ("bigint", "^-?[0-9]{1,18}$"),
        ),
        "UUIDField": (
            "uuid",
            "^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$",
        ),
    }
    TEXT_PKS: ClassVar[frozenset[str]] = frozenset({"CharField", "TextField", "SlugField"})

    def __init__(self) -> None:
        self._compiled: dict[
            tuple[str, type[Model]], tuple[str, tuple[Any, ...], CompiledSelect, int] | None
        ] = {}

    def _compile(
        self, database: str, model: type[Model]
    ) -> tuple[str, tuple[Any, ...], CompiledSelect, int] | None:
        connection = connections[database]
        if connection.vendor != "postgresql":
            return None
        quote = connection.ops.quote_name
        stored_id = f"{quote('claimed')}.{quote(str(MethodCall._meta.get_field('object_id').column))}"
        kind = model._meta.pk.get_internal_type()
        if kind in self.TEXT_PKS:
            pk = RawSQL(stored_id, (), output_field=model._meta.pk)  # noqa: S611  # quoted names only
        elif kind in self.CASTS:
            cast_to, pattern = self.CASTS[kind]
            pk = RawSQL(  # noqa: S611  # quoted names and a type name; the pattern is a parameter
                f"CASE WHEN {stored_id} ~ %s THEN CAST({stored_id} AS {cast_to}) END",
                (pattern,),
                output_field=model._meta.pk,
            )
        else:
            return None
        select = CompiledSelect.of(model, database, pk=pk)
        if select is None:
            return None
        claim, claim_params = _CLAIM.compiled(database)
        content_type = f"{quote('claimed')}.{quote(str(MethodCall._meta.get_field('content_type').column))}"
        # Quoted names and SQL compiled by the ORM; every value is a parameter.
        sql = (
            f"WITH {quote('claimed')} AS ({claim}) "  # noqa: S608
            f"SELECT {quote('claimed')}.*, {quote('loaded')}.* FROM {quote('claimed')} "
            f"LEFT JOIN LATERAL ({select.sql}) {quote('loaded')} ON {content_type} = %s"
        )
        params = (
            *claim_params,
            *select.params,
            Slot("content_type", MethodCall._meta.get_field("content_type_id")),
        )
        return sql, params, select, select.names.index(model._meta.pk.attname)

    def run(self, database: str, model: type[Model], **values: Any) -> int | MethodCall | None:
        """Claim the call as ``_claim_update`` does, reading its object if it is a ``model``
        (then set on the call as ``PRELOADED_OBJECT``); ``None`` if this cannot be done for
        ``model`` here (the caller claims as before). Raises what the claim raises."""
        key = (database, model)
        if key not in self._compiled:
            self._compiled[key] = self._compile(database, model)
        compiled = self._compiled[key]
        if compiled is None:
            return None
        sql, params, select, pk_index = compiled
        content_type = ContentType.objects.db_manager(database).get_for_model(model).pk
        try:
            rows = run_with_slots(database, sql, params, {**values, "content_type": content_type})
        except (ProgrammingError, DataError, NotSupportedError):
            logger.warning(
                "The claim that also reads a %s could not run on %r; claiming as before.",
                model._meta.label,
                database,
                exc_info=True,
            )
            self._compiled[key] = None
            return None
        if not rows:
            return 0
        width = len(MethodCall._meta.concrete_fields)
        try:
            [call] = returned_calls(database, [row[:width] for row in rows])
        except Exception:
            return len(rows)  # a value that would not load (a forged row): the caller's read fails it
        loaded = rows[0][width:]
        if loaded[pk_index] is not None:
            try:
                setattr(call, PRELOADED_OBJECT, select.load(database, model, loaded))
            except Exception:  # a value that would not load: the usual reload reports it
                logger.debug("The object read with call %s would not load.", call.pk, exc_info=True)
        return call


_CLAIM_WITH_OBJECT = _ClaimWithObject()


def _reconnecting(database: str, operation: Callable[[], T]) -> T:
    """Run a database ``operation``; if the connection died under it, run it once more on a new one.

    For the job's own bookkeeping only (claim, reads, compare-and-set records), which is safe to
    repeat; never inside a transaction, where the work before the failure is gone with it.
    """
    try:
        return operation()
    except (OperationalError, InterfaceError):
        connection = connections[database]
        if connection.in_atomic_block:
            raise
        logger.warning(
            "Database connection %r failed; retrying on a new connection.", database, exc_info=True
        )
        connection.close()
        return operation()


def _claim_and_run(call_id: int, database: str) -> None:
    try:
        claimed = _claim(call_id, database)
    except (OperationalError, InterfaceError):
        connections[database].close()
        # The first claim may have committed with its reply lost: then the row is ours already.
        claimed = _claim(call_id, database) or (
            MethodCall.objects.using(database)
            .filter(pk=call_id, state=CallState.RUNNING, worker=current_worker_name()[:255], finished_at=None)
            .count()
        )
    for turn in range(3):
        if claimed != BUSY:
            break
        # Parked waiting; if the holder ended meanwhile, claim again right here (pushing it
        # anew would race with this very job, still running under the same RQ job id).
        if exclusive.wait_turn(call_id, database, may_claim_now=turn < 2):
            return
        claimed = _claim(call_id, database)
    else:
        return
    if not claimed:
        logger.info("Call %s on database %r is not claimable; skipped.", call_id, database)
        return
    try:
        call = (
            claimed
            if isinstance(claimed, MethodCall)
            else _reconnecting(database, lambda: MethodCall.objects.using(database).get(pk=call_id))
        )
    except (OperationalError, InterfaceError):
        raise  # the database is unreachable: the lease runs out and recovery takes over
    except Exception as exc:  # a forged or corrupt row that cannot even be loaded
        MethodCall.objects.using(database).filter(pk=call_id, state=CallState.RUNNING).update(
            state=CallState.FAILED,
            finished_at=Now(),
            lease_expires_at=None,
            error_type="asyncmodels.RowUnreadable",
            error=_storable_text(f"The call's row could not be read, so nothing was run: {_message(exc)}"),
        )
        logger.warning("Call %s could not be read and was failed: %r", call_id, exc)
        return
    signals.send(signals.call_started, call, worker=call.worker)
    try:
        _run_claimed(call)
    finally:
        after_attempt(call)


def after_attempt(call: MethodCall) -> None:
    """What follows the end of a running attempt (job or recovery): the next call waiting for
    the same exclusive key is released, and calls waiting for this one are settled (released
    if it succeeded, cancelled if it failed or was cancelled). Never raises: recovery finds
    whatever this misses (a database failure, a killed process)."""
    from . import dependencies

    database = call._state.db or "default"
    try:
        if call.exclusive_key is not None:
            exclusive.release_next(call.exclusive_key, database)
        if getattr(call, HAS_DEPENDENTS, True):  # unknown (recovery, no RETURNING): look
            dependencies.settle_dependents(call)
    except Exception:
        logger.exception("Could not release the calls that follow call %s; recovery will.", call.pk)
    _task_attempt_ended(call)


def _task_attempt_ended(call: MethodCall) -> None:
    """For a django.tasks task: send ``task_finished`` if this attempt ended the task (once per
    attempt: a failed attempt sends it from the job's ``except`` block, where the framework's
    log receiver finds the exception in ``sys.exc_info()``). Never raises."""
    if not call.task_backend:
        return
    try:
        from .backends.tasks import task_attempt_ended
    except ImportError:  # no tasks framework on this worker: nobody to tell (TasksUnavailable)
        return
    task_attempt_ended(call)


class _CannotRun(Exception):
    """The call cannot be run at all; nothing of the user's code was executed. Never retried."""

    def __init__(self, error_type: str, error: str) -> None:
        super().__init__(error)
        self.error_type = error_type
        self.error = error


class _AttemptTakenOver(Exception):
    """Recording success found the attempt no longer ours: roll the method's writes back."""


class LeaseKeeper:
    """Keep a running call's lease renewed for the ``with`` block.

    Renewal happens on the process's one lease thread (``_LeaseRenewer``), started by the first
    call that needs it and kept for the next ones: a thread started per call cost ~0.3-0.6 ms of
    every call, most of which end long before their first renewal is due.
    """

    def __init__(self, call: MethodCall) -> None:
        self.call = call
        self.interval = conf.get_duration("LEASE_RENEW_SECONDS").total_seconds()
        self.length = conf.get_duration("LEASE_SECONDS")
        self.due = time.monotonic() + self.interval  # when the renewal thread next renews it

    def __enter__(self) -> LeaseKeeper:
        _renewer.add(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _renewer.remove(self)

    def renew(self) -> bool:
        """Push the lease ``self.length`` past the database's clock; return whether the row is still
        this attempt's (``running``, same attempt). Raises what the database raises."""
        database = self.call._state.db or "default"
        return bool(
            MethodCall.objects.using(database)
            .filter(pk=self.call.pk, state=CallState.RUNNING, attempts=self.call.attempts)
            .update(lease_expires_at=Now() + self.length)
        )


class _LeaseRenewer:
    """The thread that renews the leases of the calls running in this process, each when due.

    A daemon thread with its own database connections (Django's are per thread), closed whenever
    no call is running. It stops renewing a call whose row is no longer its attempt's (cancelled,
    or declared lost by recovery). A blocked renewal delays the others by as long: one process
    runs one call at a time in an RQ worker, and a lease outlasts two renewal intervals.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._leases: dict[int, LeaseKeeper] = {}
        self._thread: threading.Thread | None = None
        self._wakes_at = 0.0  # when the thread next wakes by itself (monotonic seconds)

    def add(self, lease: LeaseKeeper) -> None:
        with self._changed:
            self._leases[id(lease)] = lease
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="asyncmodels-leases", daemon=True)
                self._thread.start()
            elif lease.due < self._wakes_at:
                # Woken only when it would otherwise sleep past this lease's renewal: a thread
                # woken for every call costs the call the time it waits for the GIL back.
                self._changed.notify()

    def remove(self, lease: LeaseKeeper) -> None:
        with self._changed:
            self._leases.pop(id(lease), None)

    def _holds(self, lease: LeaseKeeper) -> bool:
        with self._changed:
            return self._leases.get(id(lease)) is lease

    def _next_due(self) -> list[LeaseKeeper]:
        """Wait until some lease is due; return those that are (called without the lock)."""
        with self._changed:
            while True:
                now = time.monotonic()
                due = [lease for lease in self._leases.values() if lease.due <= now]
                if due:
                    return due
                # With no lease to renew, wake after one renewal interval anyway: a call that
                # starts meanwhile is due no earlier, so it need not wake the thread (add()).
                idle = now + conf.get_duration("LEASE_RENEW_SECONDS").total_seconds()
                self._wakes_at = min((lease.due for lease in self._leases.values()), default=idle)
                self._changed.wait(self._wakes_at - now)

    def _run(self) -> None:
        try:
            while True:
                for lease in self._next_due():
                    self._renew(lease)
                with self._changed:
                    idle = not self._leases
                if idle:
                    connections.close_all()  # this thread's own: hold none while no call runs
        finally:
            connections.close_all()

    def _renew(self, lease: LeaseKeeper) -> None:
        lease.due = time.monotonic() + lease.interval
        try:
            renewed = lease.renew()
        except Exception:
            # A dropped connection (database restart, pg_terminate_backend): reconnect at the
            # next tick rather than let the lease run out under a live method.
            logger.exception("Renewing the lease of call %s failed; will retry.", lease.call.pk)
            connections[lease.call._state.db or "default"].close()
            return
        if not renewed and self._holds(lease):  # else the attempt ended while this renewal ran
            logger.warning(
                "Call %s attempt %s is no longer ours; lease not renewed.", lease.call.pk, lease.call.attempts
            )
            self.remove(lease)


_renewer = _LeaseRenewer()


def _new_renewer_after_fork() -> None:
    # A forked child (RQ's work horse) has none of the parent's threads, and may have copied the
    # lock held: it starts afresh.
    global _renewer
    _renewer = _LeaseRenewer()


os.register_at_fork(after_in_child=_new_renewer_after_fork)


def _run_claimed(call: MethodCall) -> None:
    started = time.monotonic()
    database = call._state.db or "default"
    try:
        function, instance, args, kwargs = _reconnecting(database, lambda: _prepare(call))
    except _CannotRun as refusal:
        _record_failure(call, refusal.error_type, refusal.error, "", started, retryable=False)
        return
    entry = None if call.task_backend else registry.get_method(call.method)
    atomic = bool((call.policy or {}).get("atomic"))
    try:
        with LeaseKeeper(call), running(call):
            if atomic:
                with transaction.atomic(using=call._state.db):
                    result = function(instance, *args, **kwargs)
                    if not _record_success(call, result, started):
                        raise _AttemptTakenOver
            else:
                result = function(instance, *args, **kwargs)
                _cancel_rq_timeout()
    except _AttemptTakenOver:
        logger.warning(
            "Call %s attempt %s was taken over while it ran; its writes were rolled back.",
            call.pk,
            call.attempts,
        )
        return
    except BaseException as exc:
        # A task (no @async_method to say) retries on any error, while its backend's RETRIES allow.
        retry_on = entry.options.retry_on if entry is not None else (Exception,) if call.task_backend else ()
        _record_failure(
            call,
            _type_name(exc),
            _message(exc),
            "".join(traceback.format_exception(exc)),
            started,
            retryable=isinstance(exc, retry_on) or _is_timeout(exc) or not isinstance(exc, Exception),
            outcome=_outcome_of(exc),
        )
        _task_attempt_ended(call)  # inside the except block: receivers see the exception
        if not isinstance(exc, Exception):
            raise  # SystemExit, KeyboardInterrupt: recorded; now let the worker do what it must
        return
    if not atomic:
        _record_success(call, result, started)


def _cancel_rq_timeout() -> None:
    """Stop RQ's job timer once the method has returned: it bounds the method, not our records.

    RQ's default death penalty is a SIGALRM timer in the job's thread; a timeout firing while the
    outcome is recorded would lose a success. (The atomic path records inside the method's
    transaction, so there the timer bounds both, and a timeout rolls both back.)
    """
    if threading.current_thread() is threading.main_thread() and _running_under_rq():
        signal.alarm(0)


def _is_timeout(exc: BaseException) -> bool:
    from rq.timeouts import JobTimeoutException

    return isinstance(exc, JobTimeoutException)


def _outcome_of(exc: BaseException) -> str:
    if _is_timeout(exc):
        return "timed out"
    if isinstance(exc, CallCancelledError):
        return "cancelled"
    return "failed" if isinstance(exc, Exception) else "interrupted"


def _prepare_task(call: MethodCall) -> tuple[Any, Any, list[Any], dict[str, Any]]:
    """A django.tasks task has no object: its runner is called with ``None`` in the object's place."""
    try:
        from .backends.tasks import TaskCannotRun, prepare_task_call
    except ImportError as exc:  # neither django.tasks nor the django-tasks backport is installed here
        raise _CannotRun("asyncmodels.TasksUnavailable", f"{exc} Nothing was run.") from exc
    try:
        runner, args, kwargs = prepare_task_call(call)
    except TaskCannotRun as refusal:
        raise _CannotRun(refusal.error_type, refusal.error) from None
    return runner, None, args, kwargs


#: The object's reload, compiled once per model and database.
_OBJECTS = CompiledGet()


def _prepare(call: MethodCall) -> tuple[Any, Any, list[Any], dict[str, Any]]:
    """Find the method, reload the object and decode the arguments; raise ``_CannotRun`` if not."""
    if call.task_backend:
        return _prepare_task(call)
    entry = registry.get_method(call.method)
    if entry is None:
        raise _CannotRun(
            "asyncmodels.MethodNotRegistered",
            f"No @async_method is registered as {call.method!r}; nothing was run.",
        )
    database = call._state.db or "default"
    label = entry.model._meta.label
    expected = ContentType.objects.db_manager(database).get_for_model(entry.model)
    if call.content_type_id != expected.pk:
        raise _CannotRun(
            "asyncmodels.ContentTypeMismatch",
            f"The row points at content type {call.content_type_id}, but {call.method} is a method of "
            f"{label} (content type {expected.pk}); nothing was run.",
        )
    preloaded = getattr(call, PRELOADED_OBJECT, None)
    try:
        instance = (
            preloaded
            if type(preloaded) is entry.model
            else _OBJECTS.get(entry.model, database, call.object_id)
        )
    except ObjectDoesNotExist:
        raise _CannotRun(
            "asyncmodels.ObjectDoesNotExist",
            f"The object is gone: {label} with pk={call.object_id!r} no longer exists.",
        ) from None
    except (ValueError, TypeError, ValidationError) as exc:
        raise _CannotRun(
            "asyncmodels.InvalidObjectId",
            f"Stored object id {call.object_id!r} is not a valid {label} pk: {exc}",
        ) from exc
    _LAST_MODEL[database] = entry.model
    if str(instance.pk) != call.object_id:
        raise _CannotRun(
            "asyncmodels.InvalidObjectId",
            f"Stored object id {call.object_id!r} is not the canonical form of {label} pk {instance.pk!r}.",
        )
    try:
        args, kwargs = serialization.decode_arguments(call.args, call.kwargs)
    except DecodingError as exc:
        raise _CannotRun("asyncmodels.ArgumentsUnavailable", str(exc)) from exc
    return entry.function, instance, args, kwargs


def _type_name(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def _message(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # an exception whose __str__ itself fails
        text = ""
    return text or f"{type(exc).__qualname__} (no message)"


def _storable_text(text: str) -> str:
    """Text any database can store: NUL and lone surrogates replaced by escapes."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


#: Set on a call by ``_finish``: whether calls wait for it, read in the finishing statement
#: (``after_attempt`` skips looking for them when none did).
HAS_DEPENDENTS = "_asyncmodels_has_dependents"
#: Set on a task call by ``_finish``: the row as the finishing statement left it (a
#: ``MethodCall``), so ``task_finished``'s ``TaskResult`` is built without reading it again.
FINISHED_ROW = "_asyncmodels_finished_row"


def _running_attempt(database: str, pk: Any, attempt: Any) -> QuerySet[MethodCall]:
    return MethodCall.objects.using(database).filter(pk=pk, state=CallState.RUNNING, attempts=attempt)


def _finish(call: MethodCall, *, compiled: CompiledUpdate | None = None, **changes: Any) -> bool:
    """Apply ``changes`` if the row is still this attempt's; return whether it was.

    Where the database returns updated rows, the same statement says whether any call waits
    for this one (``HAS_DEPENDENTS``), sparing ``after_attempt`` a query for the usual call that
    none waits for. A dependent committed while this very statement runs may be missed by both
    sides (its own on-commit check read this call still running): it stays ``waiting`` until the
    next recovery pass settles it, never lost. Inside a transaction (``atomic=True``) the answer
    is not used: the window would last until that transaction commits.

    ``compiled``, if given, is the same statement compiled once (``_SUCCEEDED``, or for a task
    ``_SUCCEEDED_TASK``), its slots named like the ``changes`` that vary from call to call; it
    runs where rows can be returned. For a task call the statement also returns the whole row
    (``FINISHED_ROW``): whether the task is final, and its ``TaskResult``, come from it.
    """
    database = call._state.db or "default"
    values = {"lease_expires_at": None, **changes}
    whole_row = bool(call.task_backend)

    def update() -> int:
        if not updates_return_rows(database):
            return _running_attempt(database, call.pk, call.attempts).update(**values)
        if compiled is not None:
            rows = compiled.run(database, pk=call.pk, attempt=call.attempts, **changes)
        else:
            queryset = _running_attempt(database, call.pk, call.attempts)
            rows = update_returning_sql(queryset, values, _finish_returning(database, whole_row=whole_row))
        # Inside a transaction (atomic=True) a dependent may commit after this statement and
        # before ours: its check reads this call still running, and this answer predates it.
        # Only an autocommit statement's answer holds at its own commit; otherwise, look after.
        if rows:  # the state the record left (a retry, or a cancel requested meanwhile)
            call.state, call.state_reason = rows[0][1], rows[0][2]
        if rows and not connections[database].in_atomic_block:
            setattr(call, HAS_DEPENDENTS, bool(rows[0][0]))
        if rows and whole_row:
            try:
                setattr(call, FINISHED_ROW, returned_calls(database, [rows[0][3:]])[0])
            except Exception:  # a value that would not load: task_finished reads the row instead
                logger.exception("Could not load call %s from its finishing statement.", call.pk)
        return len(rows)

    updated = _reconnecting(database, update)
    if not updated:
        logger.warning(
            "Call %s changed state while attempt %s ran; its outcome was not recorded.",
            call.pk,
            call.attempts,
        )
    return bool(updated)


def _finish_returning(database: str, *, whole_row: bool) -> str:
    """What a finishing ``UPDATE`` returns (``_finish``): whether calls wait for this one, the
    ``state`` and ``state_reason`` it left (a retry, or a cancel requested meanwhile, decides them
    in SQL), then, for a task, every column of the row."""
    quote = connections[database].ops.quote_name
    table = quote(MethodCall._meta.db_table)
    returning = f"{has_dependents_sql(database)}, {table}.{quote('state')}, {table}.{quote('state_reason')}"
    if whole_row:
        return f"{returning}, {all_columns_sql(database)}"
    return returning


def attempt_entry(call: MethodCall, outcome: str, duration: float | None, error: str = "") -> dict[str, Any]:
    """One entry of ``MethodCall.attempt_log``: who ran which attempt, when, how long, how it ended."""
    return {
        "attempt": call.attempts,
        "worker": call.worker,
        "started_at": call.started_at.isoformat() if call.started_at else None,
        "duration": round(duration, 3) if duration is not None else None,
        "outcome": outcome,
        "error": _storable_text(error)[:500],
    }


def _record_success(call: MethodCall, result: Any, started: float) -> bool:
    note = ""
    try:
        encoded = serialization.encode(result, path="result")
    except EncodingError as exc:
        encoded = None
        note = _storable_text(f"The method returned normally, but its result could not be stored: {exc}")
    duration = time.monotonic() - started
    log = [*call.attempt_log, attempt_entry(call, "succeeded", duration)]
    statement = _SUCCEEDED_TASK if call.task_backend else _SUCCEEDED
    try:
        recorded = _finish(call, compiled=statement, **_succeeded(encoded, note, log))
    except DatabaseError as exc:  # the database refused the result itself: keep the outcome
        if transaction.get_connection(call._state.db).in_atomic_block:
            raise  # atomic=True: the transaction is broken; the attempt fails and rolls back
        note = _storable_text(f"The method returned normally, but the database refused its result: {exc}")
        recorded = _finish(call, compiled=statement, **_succeeded(None, note, log))
    if recorded:
        call.state = CallState.SUCCEEDED
        signals.send(signals.call_succeeded, call, previous_state=CallState.RUNNING, duration=duration)
    return recorded


#: ``state_reason`` of a call that succeeded although it was asked to stop while it ran.
TOO_LATE_TO_CANCEL = "A cancel was requested while the attempt ran, but the method finished first."


#: ``state_reason`` recorded with a success (the ORM copies an expression where it uses it).
_REASON_AFTER_SUCCESS = Case(
    When(cancel_requested_at__isnull=False, then=Value(TOO_LATE_TO_CANCEL)),
    default=Value(""),
    output_field=TextField(),
)


def _succeeded(result: Any, note: Any, log: Any) -> dict[str, Any]:
    """The changes that record a success: the encoded ``result``, its ``note``, the attempt ``log``."""
    return {
        "state": CallState.SUCCEEDED,
        "finished_at": Now(),
        "result": result,
        "result_note": note,
        "attempt_log": log,
        # The work was done: a cancel requested meanwhile came too late, and the row says so.
        "state_reason": _REASON_AFTER_SUCCESS,
        # Earlier attempts' errors stay in attempt_log; the call itself no longer has an error.
        "error_type": "",
        "error": "",
        "traceback": "",
    }


def _field(name: str) -> Any:
    return MethodCall._meta.get_field(name)


def _success_statement(*, whole_row: bool) -> CompiledUpdate:
    """The success record (``_succeeded``, ``_finish``), compiled once per database; returning
    the whole row too if ``whole_row`` (``_finish_returning``)."""
    return CompiledUpdate(
        lambda database: (
            _running_attempt(database, Slot("pk", _field("id")), Slot("attempt", _field("attempts"))),
            {
                "lease_expires_at": None,
                **_succeeded(
                    Slot("result", _field("result")),
                    Slot("result_note", _field("result_note")),
                    Slot("attempt_log", _field("attempt_log")),
                ),
            },
            _finish_returning(database, whole_row=whole_row),
        )
    )


#: The success record of a method call.
_SUCCEEDED = _success_statement(whole_row=False)
#: The same for a task call, also returning its whole row (``FINISHED_ROW``).
_SUCCEEDED_TASK = _success_statement(whole_row=True)


def read_state(call: MethodCall) -> bool:
    """Read the call's ``state`` and ``state_reason`` as the end of its attempt left them (a retry,
    or a cancel requested meanwhile), where the finishing ``UPDATE`` could not return them;
    return whether the row is still there."""
    row = (
        MethodCall.objects.using(call._state.db)
        .filter(pk=call.pk)
        .values_list("state", "state_reason")
        .first()
    )
    if row is None:
        return False
    call.state, call.state_reason = row
    return True


def _record_failure(
    call: MethodCall,
    error_type: str,
    error: str,
    trace: str,
    started: float,
    *,
    retryable: bool,
    outcome: str = "failed",
) -> None:
    error_type, error, trace = _storable_text(error_type)[:255], _storable_text(error), _storable_text(trace)
    policy = retry_policy_from_row(call.policy)
    duration = time.monotonic() - started
    entry = attempt_entry(call, outcome, duration, f"{error_type}: {error}")
    if call.task_backend:  # a task's result lists every failed attempt with its traceback
        entry.update(error_type=error_type, traceback=trace[-20000:])
    log = [*call.attempt_log, entry]
    errors: dict[str, Any] = {
        "error_type": error_type,
        "error": error,
        "traceback": trace,
        "attempt_log": log,
    }
    changes: dict[str, Any]
    delay = None
    if retryable and policy.allows_another_attempt(call.attempts):
        delay = policy.delay_after(call.attempts)
        reason = (
            f"Attempt {call.attempts} {outcome} ({error_type}); attempt {call.attempts + 1} of "
            f"{policy.retries + 1} is due in {delay.total_seconds():.1f} s."
        )
        changes = {"state": CallState.SCHEDULED, "run_after": Now() + delay, "state_reason": reason}
    else:
        changes = {"state": CallState.FAILED, "finished_at": Now(), "state_reason": ""}
    changes = honour_cancel_request(changes)
    try:
        recorded = _finish(call, **errors, **changes)
    except DatabaseError as exc:
        errors["error"] = _storable_text(
            f"The call failed, but the database refused its error message: {exc}"
        )
        errors["traceback"] = ""
        recorded = _finish(call, **errors, **changes)
    if recorded:
        if call.state == CallState.RUNNING:  # no RETURNING here (_finish): a retry or a cancel follows?
            read_state(call)
        signals.attempt_failed(
            call,
            error_type,
            errors["error"],
            outcome,
            duration,
            None if delay is None else delay.total_seconds(),
        )
