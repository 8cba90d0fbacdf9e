"""The one generic job every call runs through: claim, reload, look up, run, record.

RQ delivers ``run_method_call(call_id, database)``; everything else is read from the row. The
claim is a compare-and-set (``pending``/``enqueued`` → ``running``), so a second delivery of the
same job, or a push that raced with a cancel, runs nothing (README, Guarantees: 3).
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
from typing import Any

from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.db import DatabaseError, close_old_connections
from django.db.models import F
from django.db.models.functions import Coalesce, Now

from . import registry, serialization
from .exceptions import DecodingError, EncodingError
from .models import CLAIMABLE_STATES, CallState, MethodCall

logger = logging.getLogger("asyncmodels.job")


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
    claimable (already running, finished, cancelled, or unknown) is logged and left alone.
    """
    in_worker = _running_under_rq()
    if in_worker:
        # RQ knows nothing of Django's request cycle: drop connections that broke or outlived
        # CONN_MAX_AGE (a database restart, say) before and after each job, as a request would.
        close_old_connections()
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


def _claim_and_run(call_id: int, database: str) -> None:
    manager = MethodCall.objects.using(database)
    claimed = manager.filter(pk=call_id, state__in=CLAIMABLE_STATES).update(
        state=CallState.RUNNING,
        attempts=F("attempts") + 1,
        worker=current_worker_name()[:255],
        started_at=Now(),
        enqueued_at=Coalesce(F("enqueued_at"), Now()),
    )
    if not claimed:
        logger.info(
            "Call %s on database %r is not claimable (not found, or not pending/enqueued); skipped.",
            call_id,
            database,
        )
        return
    try:
        call = manager.get(pk=call_id)
    except Exception as exc:  # a forged or corrupt row that cannot even be loaded
        manager.filter(pk=call_id, state=CallState.RUNNING).update(
            state=CallState.FAILED,
            finished_at=Now(),
            error_type="asyncmodels.RowUnreadable",
            error=_storable_text(f"The call's row could not be read, so nothing was run: {_message(exc)}"),
        )
        logger.warning("Call %s could not be read and was failed: %r", call_id, exc)
        return
    _run_claimed(call)


class _CannotRun(Exception):
    """The call cannot be run at all; nothing of the user's code was executed."""

    def __init__(self, error_type: str, error: str) -> None:
        super().__init__(error)
        self.error_type = error_type
        self.error = error


def _run_claimed(call: MethodCall) -> None:
    try:
        function, instance, args, kwargs = _prepare(call)
    except _CannotRun as refusal:
        _record_failure(call, error_type=refusal.error_type, error=refusal.error)
        return
    try:
        result = function(instance, *args, **kwargs)
    except BaseException as exc:
        _record_failure(
            call,
            error_type=_type_name(exc),
            error=_message(exc),
            trace="".join(traceback.format_exception(exc)),
        )
        if not isinstance(exc, Exception):
            raise  # SystemExit, KeyboardInterrupt: recorded; now let the worker do what it must
        return
    _record_success(call, result)


def _prepare(call: MethodCall) -> tuple[Any, Any, list[Any], dict[str, Any]]:
    """Find the method, reload the object and decode the arguments; raise ``_CannotRun`` if not."""
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
    try:
        instance = entry.model._base_manager.db_manager(database).get(pk=call.object_id)
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


def _finish(call: MethodCall, **changes: Any) -> None:
    """``running`` → terminal, only for the attempt this process claimed."""
    updated = (
        MethodCall.objects.using(call._state.db)
        .filter(pk=call.pk, state=CallState.RUNNING, attempts=call.attempts)
        .update(finished_at=Now(), **changes)
    )
    if not updated:
        logger.warning(
            "Call %s changed state while attempt %s ran; its outcome was not recorded.",
            call.pk,
            call.attempts,
        )


def _record_success(call: MethodCall, result: Any) -> None:
    note = ""
    try:
        encoded = serialization.encode(result, path="result")
    except EncodingError as exc:
        encoded = None
        note = _storable_text(f"The method returned normally, but its result could not be stored: {exc}")
    try:
        _finish(call, state=CallState.SUCCEEDED, result=encoded, result_note=note)
    except DatabaseError as exc:  # the database refused the result itself: keep the outcome
        _finish(
            call,
            state=CallState.SUCCEEDED,
            result=None,
            result_note=_storable_text(
                f"The method returned normally, but the database refused its result: {exc}"
            ),
        )
    logger.info("Call %s (%s on %s) succeeded.", call.pk, call.method, call.object_id)


def _record_failure(call: MethodCall, *, error_type: str, error: str, trace: str = "") -> None:
    error_type, error, trace = _storable_text(error_type)[:255], _storable_text(error), _storable_text(trace)
    try:
        _finish(call, state=CallState.FAILED, error_type=error_type, error=error, traceback=trace)
    except DatabaseError as exc:
        _finish(
            call,
            state=CallState.FAILED,
            error_type=error_type,
            error=_storable_text(f"The call failed, but the database refused its error message: {exc}"),
        )
    logger.warning(
        "Call %s (%s on %s) failed: %s: %s", call.pk, call.method, call.object_id, error_type, error
    )
