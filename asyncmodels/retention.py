"""Retention: delete finished calls once they are older than a retention period, per state.

``prune_finished_calls({"succeeded": timedelta(days=7), "failed": timedelta(days=30)})`` deletes,
per state, the calls in that state that finished longer ago than its retention period, in
batches of at most ``batch_size`` calls, each batch its own short transaction:

1. ``SELECT id … ORDER BY finished_at, id LIMIT batch_size FOR UPDATE SKIP LOCKED``: the
   calls that finished longest ago, locked (on PostgreSQL) so that a retry or a new dependency
   on one of them waits for the batch, and rows another prune holds are skipped rather than
   waited for;
2. ``DELETE`` of their tags and dependency links, then of the calls, by primary key (three
   statements; no ``pre_delete``/``post_delete`` signal is sent for the calls).

The table is never locked for long: each batch touches ``batch_size`` rows by primary key.
The selection is one range of the index ``asyncmodels_call_finished`` (``state, finished_at``,
finished calls only): it reads the prunable calls of one state and nothing else, so a batch
that finds nothing (a recovery pass once the backlog is gone) reads a handful of index entries
however many younger calls, or calls of other states, the table holds. Each batch starts where
the previous one stopped. Every finished call has ``finished_at`` (each transition to a
finished state sets it), and that is the age a retention period is measured against.

Never deleted: unfinished calls, and a finished call that an unfinished call still depends on
(``MethodCallDependency``: a ``waiting`` call is settled by reading its dependencies' states).
A dependent call that has finished loses the link to a pruned call with it.

Retention can also be a setting, ``ASYNCMODELS["RETENTION_SECONDS"]`` (``conf.get_retention()``),
with which every recovery pass prunes one bounded batch by itself (``prune_batch()``).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from django.db import transaction
from django.db.models import Exists, OuterRef, Q, QuerySet

from . import conf
from .models import (
    TERMINAL_STATES,
    UNFINISHED_STATES,
    MethodCall,
    MethodCallDependency,
    MethodCallTag,
    database_now,
)

#: Calls deleted per batch (one transaction) by default.
DEFAULT_BATCH_SIZE = 1000
#: The order states are pruned in, and the only states that may be.
PRUNABLE_ORDER = ("succeeded", "failed", "cancelled")


@dataclass
class PruneReport:
    """What a prune deleted (or, with ``dry_run``, would delete): calls per state, and batches."""

    deleted: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    dry_run: bool = False

    @property
    def total(self) -> int:
        return sum(self.deleted.values())

    def __str__(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        per_state = ", ".join(f"{state} {n}" for state, n in self.deleted.items()) or "nothing"
        batches = "" if self.dry_run else f" in {self.batches} batch(es)"
        return f"{verb} {self.total} call(s){batches}: {per_state}"


def check_retention(retention: Mapping[str, datetime.timedelta]) -> dict[str, datetime.timedelta]:
    """``retention`` in prune order, checked: keys are finished states, values non-negative
    ``timedelta``. Raises ``ValueError`` naming the first problem (an unfinished state: those
    are never pruned)."""
    for state, period in retention.items():
        if state not in TERMINAL_STATES:
            raise ValueError(
                f"{state!r} is not a finished state; only {', '.join(PRUNABLE_ORDER)} calls can be pruned."
            )
        if not isinstance(period, datetime.timedelta) or period < datetime.timedelta(0):
            raise ValueError(
                f"the retention of {state} calls must be a timedelta of 0 or more, not {period!r}."
            )
    return {state: retention[state] for state in PRUNABLE_ORDER if state in retention}


def prunable_calls(database: str, state: str, cutoff: datetime.datetime) -> QuerySet[MethodCall]:
    """The calls on ``database`` in finished ``state`` that finished before ``cutoff`` (an aware
    ``datetime``) and that no unfinished call depends on."""
    awaited = MethodCallDependency.objects.using(database).filter(
        depends_on=OuterRef("pk"), call__state__in=UNFINISHED_STATES
    )
    return (
        MethodCall.objects.using(database)
        .filter(state=state, finished_at__lt=cutoff)
        .exclude(Exists(awaited))
    )


def count_prunable(retention: Mapping[str, datetime.timedelta], *, database: str = "default") -> PruneReport:
    """What ``prune_finished_calls`` would delete now, counted (one ``COUNT`` per state); changes
    nothing. Raises ``ValueError`` as ``check_retention``, and what the database raises."""
    periods = check_retention(retention)
    now = database_now(database)
    return PruneReport(
        deleted={
            state: prunable_calls(database, state, now - period).count() for state, period in periods.items()
        },
        dry_run=True,
    )


def prune_finished_calls(
    retention: Mapping[str, datetime.timedelta],
    *,
    database: str = "default",
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batches: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> PruneReport:
    """Delete the finished calls on ``database`` older than their state's retention period.

    ``retention`` maps a finished state (``"succeeded"``, ``"failed"``, ``"cancelled"``) to a
    ``timedelta``: calls of that state that finished longer ago are deleted, with their tags
    and dependency links; states left out are kept. The cutoffs are taken once, on the
    database's clock. At most ``batch_size`` calls per batch, each batch its own transaction
    (see the module docstring); at most ``max_batches`` batches in all (``None``: until done).
    ``progress`` is called with the number of calls each batch deleted.

    Raises ``ValueError`` for a bad ``retention`` or ``batch_size`` (nothing deleted), and what
    the database raises (the batches committed before stay deleted).
    """
    periods = check_retention(retention)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of at least 1, not {batch_size!r}.")
    now = database_now(database)
    report = PruneReport(deleted=dict.fromkeys(periods, 0))
    for state, period in periods.items():
        candidates = prunable_calls(database, state, now - period)
        resume_at: datetime.datetime | None = None
        while max_batches is None or report.batches < max_batches:
            deleted, resume_at = _delete_batch(database, candidates, resume_at, batch_size)
            if not deleted:
                break
            report.batches += 1
            report.deleted[state] += deleted
            if progress is not None:
                progress(deleted)
            if deleted < batch_size:
                break
    return report


def _delete_batch(
    database: str,
    candidates: QuerySet[MethodCall],
    resume_at: datetime.datetime | None,
    batch_size: int,
) -> tuple[int, datetime.datetime | None]:
    """Delete the next batch of ``candidates`` (finished at ``resume_at`` or later), in one
    transaction; return how many calls it deleted and where the next batch starts."""
    if resume_at is not None:
        candidates = candidates.filter(finished_at__gte=resume_at)
    with transaction.atomic(using=database):
        rows = list(
            candidates.order_by("finished_at", "id")
            .select_for_update(skip_locked=True)
            .values_list("pk", "finished_at")[:batch_size]
        )
        if not rows:
            return 0, resume_at
        ids = [pk for pk, _finished in rows]
        # Three DELETEs by key: tags and links (no model points at them: Django deletes them in
        # one statement each), then the calls. For the calls, QuerySet.delete() would first read
        # every column of the batch (tracebacks, arguments) into Python to cascade by hand, and
        # send those two DELETEs again: _raw_delete is the one statement it ends with (the same
        # call Django's own fast path makes). So no pre_delete/post_delete signal is sent.
        MethodCallTag.objects.using(database).filter(call__in=ids).delete()
        MethodCallDependency.objects.using(database).filter(Q(call__in=ids) | Q(depends_on__in=ids)).delete()
        MethodCall.objects.using(database).filter(pk__in=ids)._raw_delete(database)
    return len(ids), rows[-1][1]


def prune_batch(database: str) -> int:
    """One bounded batch of pruning by the setting ``ASYNCMODELS["RETENTION_SECONDS"]``, for a
    recovery pass: at most ``RECOVERY_BATCH_SIZE`` calls, in one transaction. Returns the calls
    deleted (0 when the setting is ``None``, the default). Raises ``ConfigurationError`` for a bad
    setting, and what the database raises."""
    retention = conf.get_retention()
    if not retention:
        return 0
    batch_size = int(conf.get_config()["RECOVERY_BATCH_SIZE"])
    return prune_finished_calls(retention, database=database, batch_size=batch_size, max_batches=1).total
