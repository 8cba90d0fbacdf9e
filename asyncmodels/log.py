"""asyncmodels' own log lines: one per transition of a call, from receivers of its signals.

Logger ``asyncmodels.calls``; one line per signal of ``asyncmodels.signals``, saying the call's
id, method, object, the state just saved and the attempt, then what the transition adds (the
queue, the worker, the duration, the error type and message, the reason)::

    Call 12 enqueued: cloud.Instance.provision on pk 5, state enqueued, attempt 1; queue default
    Call 12 failed: cloud.Instance.provision on pk 5, state scheduled, attempt 1; failed: …

Levels (``LEVELS``): ``INFO`` for enqueued, started, succeeded and retried; ``WARNING`` for
failed, cancelled and recovered. Each record also carries ``asyncmodels_call`` (the id),
``asyncmodels_transition`` and ``asyncmodels_state`` as attributes, for filters and formatters.
Route or silence them with ``LOGGING`` (``"asyncmodels.calls": {"level": "WARNING"}`` keeps
failures only). Connected by the app's ``ready()``.
"""

from __future__ import annotations

import logging
from typing import Any

from . import signals

logger = logging.getLogger("asyncmodels.calls")

#: The level of each transition's line.
LEVELS: dict[str, int] = {
    "enqueued": logging.INFO,
    "started": logging.INFO,
    "succeeded": logging.INFO,
    "retried": logging.INFO,
    "failed": logging.WARNING,
    "cancelled": logging.WARNING,
    "recovered": logging.WARNING,
}

#: How much of an error message or reason goes into a line (characters).
MAX_TEXT = 1000


def _short(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "…"


def _details(transition: str, kwargs: dict[str, Any]) -> str:
    """What a transition's line adds after the state and attempt."""
    call = kwargs["call"]
    reason = kwargs.get("reason") or ""
    if transition == "enqueued":
        return f"; queue {call.queue}"
    if transition == "started":
        return f"; worker {kwargs.get('worker') or call.worker}"
    if transition == "succeeded":
        duration = kwargs.get("duration")
        return f"; {duration:.3f} s" if duration is not None else ""
    if transition == "failed":
        error = _short(kwargs.get("error", ""))
        return f"; {kwargs.get('outcome', 'failed')}: {kwargs.get('error_type')}: {error}"
    if transition == "retried":
        return f"; {'automatic' if kwargs.get('automatic') else 'by hand'}" + (
            f": {_short(reason)}" if reason else ""
        )
    if transition == "recovered":
        return f"; {kwargs.get('action')}" + (f": {_short(reason)}" if reason else "")
    return f"; {_short(reason)}" if reason else ""


def _receiver(transition: str) -> Any:
    level = LEVELS[transition]

    def log_transition(sender: Any, **kwargs: Any) -> None:
        if not logger.isEnabledFor(level):
            return
        call = kwargs["call"]
        state = kwargs.get("state", call.state)
        logger.log(
            level,
            "Call %s %s: %s, state %s, attempt %s%s",
            call.pk,
            transition,
            # a task has no object: its dotted path and arguments say what it runs
            call.subject if call.task_backend else f"{call.method} on pk {call.object_id}",
            state,
            kwargs.get("attempt", call.attempts),
            _details(transition, kwargs),
            extra={
                "asyncmodels_call": call.pk,
                "asyncmodels_transition": transition,
                "asyncmodels_state": state,
            },
        )

    log_transition.__name__ = f"log_{transition}"
    return log_transition


#: The receivers, kept here: signals hold them weakly.
RECEIVERS = {transition: _receiver(transition) for transition in signals.TRANSITIONS}


def connect() -> None:
    """Connect the log receivers to the signals (idempotent: ``dispatch_uid``)."""
    for transition, signal in signals.TRANSITIONS.items():
        signal.connect(RECEIVERS[transition], dispatch_uid=f"asyncmodels.log.{transition}")
