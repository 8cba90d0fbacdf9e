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

from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.db import close_old_connections
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
    call = manager.get(pk=call_id)
    _run_claimed(call)


def _run_claimed(call: MethodCall) -> None:
    entry = registry.get_method(call.method)
    if entry is None:
        _record_failure(
            call,
            error_type="asyncmodels.MethodNotRegistered",
            error=f"No @async_method is registered as {call.method!r}; nothing was run.",
        )
        return
    database = call._state.db or "default"
    try:
        instance = entry.model._base_manager.db_manager(database).get(pk=call.object_id)
    except ObjectDoesNotExist:
        _record_failure(
            call,
            error_type="asyncmodels.ObjectDoesNotExist",
            error=f"The object is gone: {entry.model._meta.label} with pk={call.object_id!r} "
            "no longer exists.",
        )
        return
    except (ValueError, TypeError, ValidationError) as exc:
        _record_failure(
            call,
            error_type="asyncmodels.InvalidObjectId",
            error=f"Stored object id {call.object_id!r} is not a valid {entry.model._meta.label} pk: {exc}",
        )
        return
    try:
        args = serialization.decode(call.args)
        kwargs = serialization.decode(call.kwargs)
    except DecodingError as exc:
        _record_failure(call, error_type="asyncmodels.ArgumentsUnavailable", error=str(exc))
        return
    try:
        result = entry.function(instance, *args, **kwargs)
    except Exception as exc:
        _record_failure(
            call,
            error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            error=str(exc) or repr(exc),
            trace="".join(traceback.format_exception(exc)),
        )
        return
    _record_success(call, result)


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
    try:
        encoded = serialization.encode(result, path="result")
        note = ""
    except EncodingError as exc:
        encoded = None
        note = f"The method returned normally, but its result could not be stored: {exc}"
    _finish(call, state=CallState.SUCCEEDED, result=encoded, result_note=note)
    logger.info("Call %s (%s on %s) succeeded.", call.pk, call.method, call.object_id)


def _record_failure(call: MethodCall, *, error_type: str, error: str, trace: str = "") -> None:
    _finish(call, state=CallState.FAILED, error_type=error_type[:255], error=error, traceback=trace)
    logger.warning(
        "Call %s (%s on %s) failed: %s: %s", call.pk, call.method, call.object_id, error_type, error
    )
