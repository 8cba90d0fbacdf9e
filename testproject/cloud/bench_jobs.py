"""Bare RQ jobs that bench/throughput.py compares asyncmodels' generic job with.

Module-level functions, importable by ``manage.py rqworker`` processes; no asyncmodels job code.
"""

from __future__ import annotations

import os

from django.db.models import F
from django.db.models.functions import Now

from asyncmodels.models import CallState, MethodCall


def noop() -> None:
    """An RQ job that does nothing: the floor of executing a job at all."""


def claim_and_finish(call_id: int, database: str = "default") -> None:
    """The database work of a call, done by hand: a compare-and-set claim, then a finish.

    One ``UPDATE`` taking the row (``pending``/``enqueued`` -> ``running``) and one recording
    its success, on a row of the same table; no method lookup, no lease, no connection hygiene.
    """
    manager = MethodCall.objects.using(database)
    claimed = manager.filter(pk=call_id, state__in=[CallState.PENDING, CallState.ENQUEUED]).update(
        state=CallState.RUNNING,
        attempts=F("attempts") + 1,
        worker=f"bench:{os.getpid()}",
        started_at=Now(),
    )
    if claimed:
        manager.filter(pk=call_id, state=CallState.RUNNING).update(
            state=CallState.SUCCEEDED, finished_at=Now(), result=None
        )
