"""Signals sent as a call moves from state to state, once the move is committed.

Every signal is sent with ``sender=MethodCall`` and these keyword arguments:

``call`` (``MethodCall``)
    The call, as the code that moved it holds it: ``call.state`` is the state just saved; other
    fields may be as they were read before the move (``refresh_from_db()`` for the row itself).
``state`` (``str``)
    The state just saved (a ``CallState`` value).
``previous_state`` (``str | None``)
    The state it left, where the code that moved it knows it without a query; else ``None``.
``attempt`` (``int``)
    The attempt the transition is about: for ``call_enqueued`` and ``call_retried``, the attempt
    that runs next (``call.attempts + 1``); otherwise the attempt that started or ended last
    (``call.attempts``; 0 for a call that never started).
``reason`` (``str``)
    Why, in words, where there is a why (a cancel's or a retry's reason, what recovery found);
    else ``""``.

and, per signal:

================== ===================================================================================
``call_enqueued``  pushed to its RQ queue (or handed to the ``immediate`` backend); also after a
                   re-push by recovery (then ``call_recovered`` comes first).
``call_started``   claimed by a worker; the method is about to run. ``worker`` (``str``).
``call_succeeded`` the method returned and the outcome is recorded. ``duration`` (``float``,
                   seconds, the attempt's wall time on the worker).
``call_failed``    an attempt failed. ``error_type`` (``str``, e.g. ``"builtins.ValueError"``),
                   ``error`` (``str``), ``outcome`` (``"failed"``, ``"timed out"``,
                   ``"interrupted"``, ``"cancelled"``, ``"lost"``), ``duration`` (``float`` seconds,
                   or ``None`` when unknown: a lost worker). ``state`` says what follows:
                   ``failed`` (no further attempt), ``scheduled`` (``call_retried`` follows),
                   ``cancelled`` (asked to stop; ``call_cancelled`` follows).
``call_retried``   a new attempt was given: ``automatic`` (``bool``) is ``True`` for a retry
                   scheduled by the method's policy after a failed or lost attempt (``state``
                   ``scheduled``; ``delay``, ``float`` seconds until it is due), ``False`` for a
                   retry by hand (``MethodCall.retry()``, the admin; ``delay`` ``None``).
``call_cancelled`` the call ended ``cancelled`` (a cancel, a failed dependency, an attempt that
                   ended while asked to stop). A running call asked to stop sends nothing
                   yet: ``call_cancelled`` (or ``call_succeeded``) follows when its attempt ends.
``call_recovered`` recovery moved a stranded call on. ``action`` (``str``): ``"ended_lost_attempt"``
                   (a running call whose worker was lost; ``call_retried``, ``call_failed`` or
                   ``call_cancelled`` follows) or ``"repushed"`` (a pending call whose push was
                   lost, an enqueued call whose RQ job is gone; ``call_enqueued`` follows).
================== ===================================================================================

Sent after the commit: where the move happened inside a transaction (a step of recovery, a
``retry()`` in your ``atomic()`` block, a method with ``atomic=True``), the signal waits for that
transaction's commit (``transaction.on_commit``) and is never sent if it rolls back. Receivers are
called with ``send_robust``: one that raises is logged (logger ``asyncmodels.signals``, with the
traceback) and changes nothing for the call or the job. Receivers run in the process that moved
the call (the worker, the web process, recovery), on the job's path: keep them quick.

asyncmodels' own log lines (``asyncmodels.log``) and metrics (``asyncmodels.metrics``) are
receivers of these signals.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from django.db import connections, transaction
from django.dispatch import Signal

if TYPE_CHECKING:
    from .models import MethodCall

logger = logging.getLogger("asyncmodels.signals")

call_enqueued = Signal(use_caching=True)
call_started = Signal(use_caching=True)
call_succeeded = Signal(use_caching=True)
call_failed = Signal(use_caching=True)
call_retried = Signal(use_caching=True)
call_cancelled = Signal(use_caching=True)
call_recovered = Signal(use_caching=True)

#: Each signal by the name of its transition (the ``transition`` label of the metrics, the verb
#: of the log lines).
TRANSITIONS: dict[str, Signal] = {
    "enqueued": call_enqueued,
    "started": call_started,
    "succeeded": call_succeeded,
    "failed": call_failed,
    "retried": call_retried,
    "cancelled": call_cancelled,
    "recovered": call_recovered,
}


def send(signal: Signal, call: MethodCall, **kwargs: Any) -> None:
    """Send ``signal`` for ``call`` once its state change is committed; never raises.

    ``kwargs`` are the signal's arguments besides ``call`` and ``state`` (``state`` is
    ``call.state``). Outside a transaction on the call's database the signal is sent now (the
    change was committed by its own statement); inside one, at its commit, and never if it rolls
    back. Without receivers nothing is done.
    """
    if not signal.receivers:
        return
    try:
        database = call._state.db or "default"
        kwargs.setdefault("previous_state", None)
        kwargs.setdefault("reason", "")
        kwargs.setdefault("attempt", call.attempts)
        kwargs["state"] = str(call.state)
        if connections[database].in_atomic_block:
            transaction.on_commit(lambda: _deliver(signal, call, kwargs), using=database)
        else:
            _deliver(signal, call, kwargs)
    except Exception:  # a bug of ours must not break the caller's record
        logger.exception("Could not send a signal for call %s.", getattr(call, "pk", None))


def send_each(signal: Signal, calls: Iterable[MethodCall], **kwargs: Any) -> None:
    """``send(signal, call, **kwargs)`` for each of ``calls`` (one signal per call; no query)."""
    if not signal.receivers:
        return
    for call in calls:
        send(signal, call, **kwargs)


def _deliver(signal: Signal, call: MethodCall, kwargs: dict[str, Any]) -> None:
    from .models import MethodCall

    try:
        responses = signal.send_robust(sender=MethodCall, call=call, **kwargs)
    except Exception:
        logger.exception("Could not send a signal for call %s.", call.pk)
        return
    for receiver, response in responses:
        if isinstance(response, Exception):
            logger.error(
                "A receiver (%r) of a signal for call %s raised; the call is not affected.",
                receiver,
                call.pk,
                exc_info=response,
            )


def attempt_failed(
    call: MethodCall,
    error_type: str,
    error: str,
    outcome: str,
    duration: float | None,
    delay: float | None,
) -> None:
    """Send what follows a failed attempt, once its record is saved (``call.state`` the state it
    left): ``call_failed``, then ``call_retried`` if a retry was scheduled (``delay`` seconds
    ahead) or ``call_cancelled`` if the call was asked to stop meanwhile. Never raises."""
    from .models import CallState

    reason = call.state_reason or ""
    send(
        call_failed,
        call,
        previous_state=CallState.RUNNING,
        reason=reason,
        error_type=error_type,
        error=error,
        outcome=outcome,
        duration=duration,
    )
    if call.state == CallState.SCHEDULED:
        send(
            call_retried,
            call,
            previous_state=CallState.RUNNING,
            attempt=call.attempts + 1,
            reason=reason,
            automatic=True,
            delay=delay,
        )
    elif call.state == CallState.CANCELLED:
        send(call_cancelled, call, previous_state=CallState.RUNNING, reason=reason)


def pushed(calls: Iterable[MethodCall], *, previous_state: str | None = None, reason: str = "") -> None:
    """Send ``call_enqueued`` for each of ``calls``, just pushed (``call.state`` as it is now)."""
    if not call_enqueued.receivers:
        return
    for call in calls:
        send(
            call_enqueued,
            call,
            previous_state=previous_state,
            attempt=call.attempts + 1,
            reason=reason,
        )
