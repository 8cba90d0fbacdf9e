"""Exclusive methods: ``@async_method(exclusive=True)`` runs one call per object at a time.

Each call of an exclusive method stores an ``exclusive_key`` naming its group (the method, or
the group name given, for several methods that must not overlap) and its object. A partial
unique index (``exclusive_key`` where ``state = 'running'``) lets at most one such call be
``running``: the claim of a second one fails in the database, on PostgreSQL even when two
workers claim at the same instant. That call is then parked ``waiting`` (no attempt is counted,
no worker is held) and released when the running one leaves ``running``: by its own worker,
by recovery when its lease expires, or by the next recovery pass should both miss each other.

The key is only as good as the lease: a worker presumed lost (its lease expired without
renewal) frees the key, so keep ``LEASE_SECONDS`` well above a worker's worst pause.
"""

from __future__ import annotations

import hashlib
import logging

from django.db import models

logger = logging.getLogger("asyncmodels.exclusive")


def exclusive_key(group: str, instance: models.Model) -> str:
    """The stored key of one group on one object: ``"<group>@<app_label.model>:<pk>"``, or its
    SHA-256 when longer than the column's 255 characters."""
    key = f"{group}@{instance._meta.label_lower}:{instance.pk}"
    if len(key) > 255:
        return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return key


def wait_turn(call_id: int, database: str, *, may_claim_now: bool = True) -> bool:
    """Park the call whose claim found its key busy: ``waiting`` until the holder leaves ``running``.

    Returns ``True`` when the call is parked (or moved on elsewhere): the job is done with it.
    Returns ``False`` when the holder ended between the failed claim and the parking, and the
    call is claimable again (``may_claim_now``): the job should claim it once more.
    """
    from . import dependencies
    from .models import CLAIMABLE_STATES, CallState, MethodCall

    manager = MethodCall.objects.using(database)
    key = manager.filter(pk=call_id).values_list("exclusive_key", flat=True).first()
    holder = manager.filter(exclusive_key=key, state=CallState.RUNNING).values_list("pk", flat=True).first()
    reason = (
        f"Waiting for call #{holder} to finish: calls of an exclusive method run one at a time per object."
        if holder is not None
        else "Waiting its turn: calls of an exclusive method run one at a time per object."
    )
    parked = manager.filter(pk=call_id, state__in=CLAIMABLE_STATES).update(
        state=CallState.WAITING, state_reason=reason, waits=models.F("waits") + 1
    )
    if not parked:
        return True
    logger.info("Call %s waits: %s", call_id, reason)
    # The holder may have finished between our failed claim and our parking, and found no one
    # waiting: look again, now that we are visible.
    if manager.filter(exclusive_key=key, state=CallState.RUNNING).exists():
        return True
    if not may_claim_now:
        dependencies.settle(call_id, database)  # pushed again, for another worker
        return True
    # Back to pending (unless the holder's release moved it already): claimable by this job.
    manager.filter(pk=call_id, state=CallState.WAITING).update(state=CallState.PENDING, state_reason="")
    return False


def release_next(key: str, database: str) -> None:
    """Release the oldest call waiting for ``key`` whose dependencies are done (after the holder
    left ``running``). Calls still waiting for dependencies are skipped."""
    from . import dependencies
    from .models import CallState, MethodCall

    waiting = list(
        MethodCall.objects.using(database)
        .filter(exclusive_key=key, state=CallState.WAITING)
        .order_by("id")
        .values_list("pk", flat=True)[:20]
    )
    for call_id in waiting:
        state = dependencies.settle(call_id, database)
        if state in (None, CallState.CANCELLED, CallState.SCHEDULED):
            continue  # moved elsewhere, doomed by a dependency, or not due yet: the next one
        if state != CallState.WAITING or _held(key, database):
            return  # released (pushed, or already run by the immediate backend), or busy again


def _held(key: str, database: str) -> bool:
    from .models import CallState, MethodCall

    return MethodCall.objects.using(database).filter(exclusive_key=key, state=CallState.RUNNING).exists()
