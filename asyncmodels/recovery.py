"""Recovery: find calls that the database says are stuck, and move each one on.

One pass (``recover_stranded_calls()``), on every database that holds ``MethodCall`` rows:

1. ``scheduled`` calls that are due (``run_after`` ≤ the database's now) are pushed;
2. ``pending`` calls older than ``PUSH_GRACE_SECONDS`` are pushed (the commit happened, the push
   was lost: Redis down, process killed between commit and push);
3. ``enqueued`` calls older than the grace whose RQ job is gone or dead (Redis flushed,
   restarted, a work horse killed before the claim) are pushed again;
4. ``running`` calls whose lease expired lost their worker: they are retried (a new attempt,
   after the backoff) if their policy allows another attempt, else ``failed`` with a reason;
5. ``waiting`` calls that can move are settled: cancelled if a call they wait for failed or was
   cancelled, released (pushed) once all succeeded and their exclusive key is free;
6. with ``RETENTION_SECONDS`` set (off by default), one batch of finished calls older than their
   retention period is deleted (``asyncmodels.retention.prune_batch``).

Every transition is a compare-and-set and every push of one attempt uses one RQ job id, so any
number of processes may run passes at the same time. Each step reads at most
``RECOVERY_BATCH_SIZE`` ids through a partial index holding only rows in that state (an idle pass
is five such reads and nothing else), so a pass over a table of millions of finished calls costs
a few index lookups.

A step that found rows moves them as a set, in one transaction (with the ``rq`` backend): one
``UPDATE … RETURNING`` takes the rows that still match its filter (marking them ``enqueued``, or
ending their lost attempts, each row's own values in a ``CASE`` on its id), one Redis pipeline
per server pushes their jobs, and one commit ends it: a hundred stranded calls cost a handful of
statements, not a few per call. The taken rows stay locked until the commit, so a pass running at
the same time waits and then finds them moved, and a worker whose claim reaches a row before the
commit waits for it. A push that fails sets its calls back to ``pending`` with the reason, in the
same transaction; a step that fails part-way rolls back its marks, never a push: those calls are
found again by the next pass, and a job that RQ holds already is not pushed twice. Databases that
cannot return the rows an ``UPDATE`` changed lock them with ``SELECT … FOR UPDATE`` instead, and
end lost attempts and settle waiting calls one call at a time.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, cast

import redis
from django.conf import settings
from django.db import DatabaseError, connections, router, transaction
from django.db.models import Case, CharField, F, Field, Q, QuerySet, Value, When
from django.db.models.functions import Now
from rq.exceptions import StopRequested

from . import conf, dispatch, signals
from .job import HAS_DEPENDENTS, after_attempt, attempt_entry, read_state
from .models import (
    CallState,
    MethodCall,
    has_dependents_sql,
    honour_cancel_request,
    reason_after_push,
    update_returning,
    update_returning_sql,
    updates_return_rows,
)
from .options import retry_policy_from_row

logger = logging.getLogger("asyncmodels.recovery")

#: Errors that mean Redis itself is unreachable: no point pushing the rest of a batch.
REDIS_UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
#: Above this many waiting jobs, a queue's list is not scanned for each enqueued call (LPOS is
#: O(length)); the job's "queued" status is trusted instead.
MAX_SCANNED_QUEUE_LENGTH = 10_000


@dataclass
class RecoveryReport:
    """What one pass did: calls moved on, per kind of action, and ``errors``, the steps, queues or
    rows that failed (logged; the pass went on without them)."""

    pushed_due: int = 0
    pushed_pending: int = 0
    repushed_enqueued: int = 0
    retried_lost: int = 0
    failed_lost: int = 0
    cancelled_lost: int = 0  # lost while asked to stop (MethodCall.cancel() on a running call)
    released_waiting: int = 0  # waiting calls whose dependencies succeeded / whose turn came
    cancelled_waiting: int = 0  # waiting calls whose dependency failed or was cancelled
    errors: int = 0
    pruned: int = 0  # finished calls deleted by retention (RETENTION_SECONDS); not in ``total``

    def __add__(self, other: RecoveryReport) -> RecoveryReport:
        return RecoveryReport(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def total(self) -> int:
        """Calls moved on by this pass (errors not counted)."""
        return (
            self.pushed_due
            + self.pushed_pending
            + self.repushed_enqueued
            + self.retried_lost
            + self.failed_lost
            + self.cancelled_lost
            + self.released_waiting
            + self.cancelled_waiting
        )

    def __str__(self) -> str:
        return (
            f"due pushed {self.pushed_due}, pending pushed {self.pushed_pending}, "
            f"enqueued re-pushed {self.repushed_enqueued}, lost retried {self.retried_lost}, "
            f"lost failed {self.failed_lost}, lost cancelled {self.cancelled_lost}, "
            f"waiting released {self.released_waiting}, waiting cancelled {self.cancelled_waiting}, "
            f"errors {self.errors}" + (f", pruned {self.pruned}" if self.pruned else "")
        )


def recovery_databases() -> list[str]:
    """The database aliases that may hold ``MethodCall`` rows (the router allows its migration)."""
    return [alias for alias in settings.DATABASES if router.allow_migrate_model(alias, MethodCall)]


def recover_stranded_calls(databases: Iterable[str] | None = None) -> RecoveryReport:
    """Run one recovery pass over ``databases`` (default: ``recovery_databases()``).

    Never raises for a database or Redis failure: it logs it, counts it in ``errors`` and goes on
    with the next step, so a worker running passes keeps working.
    """
    report = RecoveryReport()
    for database in databases if databases is not None else recovery_databases():
        for step in (
            _push_due,
            _push_pending,
            _repush_lost_jobs,
            _end_lost_attempts,
            _settle_waiting,
            _prune_finished,
        ):
            try:
                report += step(database)
            except StopRequested:
                raise  # RQ's warm shutdown, raised by its SIGTERM handler
            except Exception:  # a database or Redis failure, or a bug: the next step still runs
                logger.exception("Recovery step %s failed on database %r.", step.__name__, database)
                report.errors += 1
    if report.total or report.errors or report.pruned:
        logger.info("Recovery pass: %s.", report)
    return report


def _prune_finished(database: str) -> RecoveryReport:
    """Delete one batch of finished calls past their retention (``RETENTION_SECONDS``; off by
    default, when this is one settings read and no query)."""
    from .retention import prune_batch

    return RecoveryReport(pruned=prune_batch(database))


@contextmanager
def _one_commit(database: str) -> Iterator[None]:
    """One transaction around a step's writes on ``database`` (see the module docstring), opened
    once the step has found rows to move (an idle pass sends no BEGIN nor COMMIT); none with the
    ``immediate`` backend, which runs a call inside ``push()`` (never in a transaction)."""
    if conf.get_backend_name() == "immediate":
        yield
        return
    with transaction.atomic(using=database):
        yield
        if transaction.get_connection(database).needs_rollback:
            # An error was caught and swallowed inside the transaction (a "never raises" helper, a
            # signal receiver): Django would now roll it back in silence, and the pass would count
            # as moved calls that did not move. Fail the step instead: the next pass finds them.
            raise DatabaseError(
                f"A statement of this recovery step failed on {database!r}; the step was rolled back."
            )


def _batch_size() -> int:
    return int(conf.get_config()["RECOVERY_BATCH_SIZE"])


def _take(database: str, ids: list[int], still: Q, changes: dict[str, Any]) -> list[MethodCall]:
    """Compare-and-set: apply ``changes`` to the rows of ``ids`` that still match ``still`` and
    return them as they are now (inside the step's transaction, their locks held until it ends:
    another pass waits, then finds them moved). One ``UPDATE … RETURNING`` where the database
    can; elsewhere the rows are locked (``SELECT … FOR UPDATE``) and read again after the
    ``UPDATE``. Raises ``DatabaseError`` if a changed row cannot be loaded (the step rolls back)."""
    manager = MethodCall.objects.using(database)
    candidates = manager.filter(still, pk__in=ids)
    if updates_return_rows(database):
        count, rows = update_returning(candidates, changes)
        if count != len(rows):
            raise DatabaseError(f"{count - len(rows)} of the rows {ids} could not be loaded after an update.")
        return rows
    locked = list(candidates.select_for_update().values_list("pk", flat=True))
    if not locked:
        return []
    manager.filter(pk__in=locked).update(**changes)
    return list(manager.filter(pk__in=locked))


def _send(
    calls: list[MethodCall],
    *,
    ask_first: bool,
    previous_state: str | None,
    recovered: dict[int, str] | None = None,
) -> tuple[int, int]:
    """Push calls just marked ``enqueued`` by this step (its transaction still open): per Redis
    server one pipeline (``dispatch.send_jobs``; with ``ask_first``, one more asking which jobs RQ
    holds already). Calls whose push failed go back to ``pending`` with the reason, in the same
    transaction. Returns (pushed, errors: one per Redis server that failed). With the
    ``immediate`` backend each call is run here instead.

    Each call pushed here gets ``call_enqueued`` (from ``previous_state``) once the step commits,
    after ``call_recovered`` (``"repushed"``, with its reason) if it is in ``recovered`` (call id
    → what was wrong). A job RQ held already sends neither."""
    if not calls:
        return 0, 0
    if conf.get_backend_name() == "immediate":
        pushed = errors = 0
        for call in calls:
            if recovered is not None:
                _signal_repushed(call, recovered[call.pk], previous_state)
            try:
                pushed += dispatch.push(call, raise_errors=True)
            except StopRequested:
                raise
            except Exception:  # logged by dispatch; the call is back to pending
                errors += 1
        return pushed, errors
    sent, failures = dispatch.send_jobs(calls, ask_first=lambda call: ask_first)
    for failed, reason in failures:
        dispatch._back_to_pending(failed, reason)
    pushed_here = [call for call in sent if not getattr(call, dispatch.HELD_ALREADY, False)]
    if recovered is not None:
        for call in pushed_here:
            _signal_repushed(call, recovered[call.pk], previous_state)
    signals.pushed(pushed_here, previous_state=previous_state)  # sent at the step's commit
    return len(sent), len(failures)


def _signal_repushed(call: MethodCall, reason: str, previous_state: str | None) -> None:
    signals.send(
        signals.call_recovered,
        call,
        previous_state=previous_state,
        attempt=call.attempts + 1,
        action="repushed",
        reason=reason,
    )


def _oldest_ids(queryset: QuerySet[MethodCall], *order: str) -> list[int]:
    """The ids of the first ``RECOVERY_BATCH_SIZE`` rows of ``queryset`` by ``order`` (one
    partial-index read; no lock, no transaction: an idle pass stops here)."""
    return list(queryset.order_by(*order).values_list("pk", flat=True)[: _batch_size()])


def _push_due(database: str) -> RecoveryReport:
    """Push ``scheduled`` calls whose ``run_after`` has come: ``scheduled`` → ``enqueued``."""
    due = Q(state=CallState.SCHEDULED, run_after__lte=Now())
    ids = _oldest_ids(MethodCall.objects.using(database).filter(due), "run_after", "id")
    if not ids:
        return RecoveryReport()
    # A retry's "attempt 2 of 4 is due in ..." reason is obsolete once it is pushed.
    changes = {"state": CallState.ENQUEUED, "enqueued_at": Now(), "state_reason": ""}
    with _one_commit(database):
        pushed, errors = _send(
            _take(database, ids, due, changes), ask_first=True, previous_state=CallState.SCHEDULED
        )
    return RecoveryReport(pushed_due=pushed, errors=errors)


def _push_pending(database: str) -> RecoveryReport:
    """Push ``pending`` calls older than the grace: their commit's push was lost."""
    stale = Q(state=CallState.PENDING, created_at__lt=Now() - conf.get_duration("PUSH_GRACE_SECONDS"))
    ids = _oldest_ids(MethodCall.objects.using(database).filter(stale), "created_at", "id")
    if not ids:
        return RecoveryReport()
    changes = {"state": CallState.ENQUEUED, "enqueued_at": Now(), "state_reason": reason_after_push()}
    with _one_commit(database):
        # Its own commit hook may be pushing it this very moment (a slow process): ask RQ first.
        taken = _take(database, ids, stale, changes)
        lost = "Its push was lost: it was pending for longer than PUSH_GRACE_SECONDS."
        pushed, errors = _send(
            taken,
            ask_first=True,
            previous_state=CallState.PENDING,
            recovered=dict.fromkeys((call.pk for call in taken), lost),
        )
    return RecoveryReport(pushed_pending=pushed, errors=errors)


def _repush_lost_jobs(database: str) -> RecoveryReport:
    """Push again the enqueued calls whose RQ job no longer exists or will never run."""
    from rq.job import Job

    stale = Q(state=CallState.ENQUEUED, enqueued_at__lt=Now() - conf.get_duration("PUSH_GRACE_SECONDS"))
    calls = list(
        MethodCall.objects.using(database)
        .filter(stale)
        .order_by("enqueued_at", "id")
        .only("id", "queue", "attempts", "waits")[: _batch_size()]
    )
    by_queue: dict[str, list[MethodCall]] = defaultdict(list)
    for call in calls:
        by_queue[call.queue].append(call)
    report = RecoveryReport()
    dead: dict[int, tuple[str | None, Any]] = {}  # call id -> (its job's status, the Redis holding it)
    known = conf.get_rq_queue_names()
    for queue_name, queued in by_queue.items():
        if queue_name not in known:  # never pushable again: taken below, and failed by _send
            dead.update((call.pk, (None, None)) for call in queued)
            continue
        try:
            queue = dispatch.get_queue(queue_name)
            connection, queue_key = queue.connection, queue.key
            scan = connection.llen(queue_key) <= MAX_SCANNED_QUEUE_LENGTH
            with connection.pipeline(transaction=False) as pipeline:
                for call in queued:
                    pipeline.hget(Job.key_for(call.job_id), "status")
                    if scan:
                        pipeline.lpos(queue_key, call.job_id)  # Redis >= 6.0.6
                    else:
                        pipeline.exists(Job.key_for(call.job_id))
                replies = pipeline.execute()
        except StopRequested:
            raise
        except Exception:
            logger.exception(
                "Could not ask Redis about %s enqueued call(s) of queue %r.", len(queued), queue_name
            )
            report.errors += 1
            continue
        for index, call in enumerate(queued):
            status, listed = replies[2 * index], replies[2 * index + 1]
            status = status.decode() if isinstance(status, bytes) else status
            # "queued" is only true while the job is in the queue's list: a worker killed after
            # taking it off the list, before claiming the call, leaves it "queued" (or "started")
            # for good. The row says enqueued for longer than the grace: no live worker has it.
            # On a very long queue the list is not scanned: the job's status is trusted instead.
            in_list = listed is not None if scan else bool(listed)  # LPOS position / EXISTS
            if not (status == "queued" and in_list):
                dead[call.pk] = (status, connection)
    if not dead:
        return report
    with _one_commit(database):
        # Taken (enqueued_at moves to now) so that a pass running at the same time does not push
        # them too; a row moved on meanwhile (a worker claimed it after all) is left alone.
        taken = _take(database, list(dead), stale, {"enqueued_at": Now()})
        reasons: dict[int, str] = {}
        for call in taken:
            status, connection = dead[call.pk]
            reasons[call.pk] = f"It was enqueued, but its RQ job {call.job_id} is {status or 'gone'}."
            if status is not None:  # a dead job (failed, stopped...) would block a push under its id
                Job(call.job_id, connection=connection).delete(remove_from_queue=True)
        pushed, errors = _send(taken, ask_first=False, previous_state=CallState.ENQUEUED, recovered=reasons)
    report.repushed_enqueued += pushed
    report.errors += errors
    return report


def _end_lost_attempts(database: str) -> RecoveryReport:
    """Retry or fail running calls whose lease expired: their worker is gone. One ``UPDATE`` for
    the batch (each row's own changes as a ``CASE`` on its id) where the database returns the
    changed rows; elsewhere one compare-and-set per call (``end_lost_attempt``)."""
    # A running row without a lease was claimed before leases existed (an upgrade): judge it by
    # its start instead.
    expired = Q(lease_expires_at__lt=Now()) | Q(
        lease_expires_at__isnull=True, started_at__lt=Now() - conf.get_duration("LEASE_SECONDS")
    )
    lost = list(
        MethodCall.objects.using(database)
        .filter(expired, state=CallState.RUNNING)
        .order_by("lease_expires_at", "id")[: _batch_size()]
    )
    report = RecoveryReport()
    if not lost:
        return report
    if not updates_return_rows(database):
        with _one_commit(database):
            for call in lost:
                try:
                    report += _count_lost(end_lost_attempt(call, expired))
                except StopRequested:
                    raise
                except Exception:  # this row's problem only
                    logger.exception("Could not end the lost attempt of call %s.", call.pk)
                    report.errors += 1
        return report
    per_call: dict[int, tuple[MethodCall, dict[str, Any]]] = {}
    for call in lost:
        try:
            per_call[call.pk] = (call, lost_attempt_changes(call))
        except Exception:  # this row's problem only (a policy or log that cannot be read)
            logger.exception("Could not end the lost attempt of call %s.", call.pk)
            report.errors += 1
    if not per_call:
        return report
    this_attempt = Q()
    for call, _ in per_call.values():
        this_attempt |= Q(pk=call.pk, attempts=call.attempts)
    changes = {name: _per_row(name, per_call) for name in next(iter(per_call.values()))[1]}
    changes["lease_expires_at"] = None
    queryset = MethodCall.objects.using(database).filter(expired, this_attempt, state=CallState.RUNNING)
    with _one_commit(database):
        ended = update_returning_sql(
            queryset,
            honour_cancel_request(changes),
            ", ".join(
                [
                    *(_column(database, name) for name in ("id", "state", "exclusive_key")),
                    has_dependents_sql(database),
                    _column(database, "state_reason"),
                ]
            ),
        )
    # Committed: what follows each ended attempt (the next exclusive call, dependents, a task's
    # signal) runs outside the step's transaction, as after a job, so that nothing it does (or
    # swallows) can undo the batch.
    for call_id, state, key, has_dependents, reason in ended:
        call = per_call[call_id][0]
        call.state, call.exclusive_key, call.state_reason = state, key, reason
        setattr(call, HAS_DEPENDENTS, bool(has_dependents))
        report += _count_lost(state)
        _signal_lost(call, per_call[call_id][1])
        after_attempt(call)
    return report


def _signal_lost(call: MethodCall, changes: dict[str, Any]) -> None:
    """``call_recovered`` for a lost attempt recovery ended (``call.state`` as it left it), then
    what follows a failed attempt (``signals.attempt_failed``, outcome ``"lost"``)."""
    signals.send(
        signals.call_recovered,
        call,
        previous_state=CallState.RUNNING,
        action="ended_lost_attempt",
        reason=changes["error"],
    )
    signals.attempt_failed(
        call, changes["error_type"], changes["error"], "lost", None, getattr(call, _RETRY_DELAY, None)
    )


def _count_lost(state: str | None) -> RecoveryReport:
    return RecoveryReport(
        retried_lost=int(state == CallState.SCHEDULED),
        failed_lost=int(state == CallState.FAILED),
        cancelled_lost=int(state == CallState.CANCELLED),
    )


def _column(database: str, name: str) -> str:
    quote = connections[database].ops.quote_name
    return f"{quote(MethodCall._meta.db_table)}.{quote(name)}"


def _per_row(name: str, per_call: dict[int, tuple[MethodCall, dict[str, Any]]]) -> Any:
    """The value of field ``name`` for an ``UPDATE`` of the rows of ``per_call``: the same for
    all (a value, so that a NULL keeps its column's type), or a ``CASE`` on the row's id."""
    values = {pk: each[name] for pk, (_, each) in per_call.items()}
    first = next(iter(values.values()))
    if all(value == first for value in values.values()):
        return first
    return Case(
        *(When(pk=pk, then=_expression(value, name)) for pk, value in values.items()),
        output_field=_field(name),
    )


def _field(name: str) -> Field[Any, Any]:
    return cast("Field[Any, Any]", MethodCall._meta.get_field(name))


def _expression(value: Any, name: str) -> Any:
    """``value`` for ``MethodCall.<name>`` inside a ``CASE`` (a plain ``str`` would be taken for
    a field name)."""
    return value if hasattr(value, "resolve_expression") else Value(value, output_field=_field(name))


def _settle_waiting(database: str) -> RecoveryReport:
    """Settle waiting calls that can move: a dependency failed or was cancelled (cancel them), or
    all succeeded and the exclusive key is free (release them). The job does this as each call
    ends; this catches what a killed process or a lost race left behind."""
    from django.db.models import OuterRef, Subquery

    from . import dependencies
    from .models import MethodCallDependency

    # Correlated scalar subqueries with LIMIT 1, read per waiting call through the dependency
    # pair index: EXISTS under OR lets PostgreSQL hash a subplan over every failed call instead.
    links = MethodCallDependency.objects.using(database).filter(call=OuterRef("pk")).order_by()
    movable = list(
        MethodCall.objects.using(database)
        .filter(state=CallState.WAITING)
        .annotate(
            doomed_by=Subquery(
                links.filter(depends_on__state__in=[CallState.FAILED, CallState.CANCELLED]).values(
                    "depends_on"
                )[:1]
            ),
            blocked_by=Subquery(
                links.exclude(depends_on__state=CallState.SUCCEEDED).values("depends_on")[:1]
            ),
            held_by=Subquery(
                MethodCall.objects.using(database)
                .filter(exclusive_key=OuterRef("exclusive_key"), state=CallState.RUNNING)
                .order_by()
                .values("pk")[:1]
            ),
        )
        .filter(Q(doomed_by__isnull=False) | Q(blocked_by__isnull=True, held_by__isnull=True))
        .order_by("id")
        .values_list("id", "exclusive_key", "doomed_by")[: _batch_size()]
    )
    report = RecoveryReport()
    if not movable:
        return report
    doomed = {call_id: doomed_by for call_id, _, doomed_by in movable if doomed_by is not None}
    released: list[int] = []
    keys: set[str] = set()
    for call_id, key, doomed_by in movable:
        if doomed_by is None and (key is None or key not in keys):  # one turn per key and pass
            released.append(call_id)
            if key is not None:
                keys.add(key)
    if not updates_return_rows(database):
        with _one_commit(database):
            for call_id in [*doomed, *released]:
                try:
                    state = dependencies.settle(call_id, database)
                except StopRequested:
                    raise
                except Exception:
                    logger.exception("Could not settle waiting call %s.", call_id)
                    report.errors += 1
                    continue
                report += _count_settled(state)
        return report
    # Read before the transaction, so that its first statement is a write: SQLite refuses at once
    # (no busy wait) to turn a transaction's read lock into a write lock another pass holds.
    reasons = dependencies.doomed_reasons(doomed, database) if doomed else {}
    cancelled: list[int] = []
    with _one_commit(database):
        if reasons:
            cancelled = dependencies.cancel_doomed(reasons, database)
            report.cancelled_waiting += len(cancelled)
        if released:
            not_yet = Q(run_after__gt=Now())
            rows = _take(
                database,
                released,
                Q(state=CallState.WAITING),
                {
                    "state": Case(
                        When(not_yet, then=Value(CallState.SCHEDULED)),
                        default=Value(CallState.ENQUEUED),
                        output_field=CharField(),
                    ),
                    "enqueued_at": Case(When(not_yet, then=F("enqueued_at")), default=Now()),
                    "state_reason": "",
                },
            )
            report.released_waiting += len(rows)
            _, errors = _send(
                [row for row in rows if row.state == CallState.ENQUEUED],
                ask_first=True,
                previous_state=CallState.WAITING,
            )
            report.errors += errors
    if cancelled:
        dependencies.settle_dependents_of(cancelled, database)  # cancelled in turn, once committed
    return report


def _count_settled(state: str | None) -> RecoveryReport:
    return RecoveryReport(
        cancelled_waiting=int(state == CallState.CANCELLED),
        released_waiting=int(state in (CallState.PENDING, CallState.SCHEDULED, CallState.ENQUEUED)),
    )


#: Set on a call by ``lost_attempt_changes``: the retry's delay (seconds), for ``call_retried``.
_RETRY_DELAY = "_asyncmodels_retry_delay"


def lost_attempt_changes(call: MethodCall, reason: str | None = None) -> dict[str, Any]:
    """The changes that end ``call``'s running attempt, whose worker was lost: a retry
    (``scheduled`` after the backoff) if its policy allows another attempt, else ``failed``;
    the attempt is added to ``attempt_log``. ``reason`` defaults to the lease having expired.
    Before ``honour_cancel_request``. Raises what reading the row's policy raises."""
    policy = retry_policy_from_row(call.policy)
    if reason is None:
        expiry = f"{call.lease_expires_at:%Y-%m-%d %H:%M:%S} UTC" if call.lease_expires_at else "(no lease)"
        reason = (
            f"The worker running attempt {call.attempts} ({call.worker or 'unknown'}) was lost: its lease "
            f"expired at {expiry} without being renewed."
        )
    log = [*call.attempt_log, attempt_entry(call, "lost", None, reason)]
    if policy.allows_another_attempt(call.attempts):
        delay = policy.delay_after(call.attempts)
        setattr(call, _RETRY_DELAY, delay.total_seconds())  # for call_retried
        return {
            "state": CallState.SCHEDULED,
            "run_after": Now() + delay,
            "finished_at": None,
            "state_reason": f"{reason} Attempt {call.attempts + 1} of {policy.retries + 1} is due in "
            f"{delay.total_seconds():.1f} s.",
            # The row's error is this attempt's, not an earlier one's (and says why, should a
            # cancel request end the call here).
            "error_type": "asyncmodels.WorkerLost",
            "error": reason,
            "traceback": "",
            "attempt_log": log,
        }
    return {
        "state": CallState.FAILED,
        "run_after": F("run_after"),
        "finished_at": Now(),
        "state_reason": "",
        "error_type": "asyncmodels.WorkerLost",
        "error": f"{reason} {_no_retry_left(call.attempts, policy.retries)}",
        "traceback": "",
        "attempt_log": log,
    }


def _no_retry_left(attempt: int, retries: int) -> str:
    """Why a lost attempt ends its call: the method takes no retries, or it used them all."""
    if retries <= 0:
        return "The method does not retry (retries=0); the call failed."
    return f"No retry left (attempt {attempt} of {retries + 1}, retries={retries}); the call failed."


def end_lost_attempt(call: MethodCall, still_lost: Q, reason: str | None = None) -> str | None:
    """Retry or fail ``call``, whose running attempt lost its worker; return the new state, if any.

    A compare-and-set on (running, this attempt, ``still_lost``): if the attempt moved on since
    ``call`` was read, nothing changes and ``None`` is returned. ``reason`` defaults to the
    lease having expired. (A recovery pass ends a batch of lost attempts in one ``UPDATE``.)
    """
    changes = lost_attempt_changes(call, reason)
    won = (
        MethodCall.objects.using(call._state.db)
        .filter(still_lost, pk=call.pk, state=CallState.RUNNING, attempts=call.attempts)
        .update(lease_expires_at=None, **honour_cancel_request(changes))
    )
    if not won:
        return None
    # A cancel requested while the attempt ran turns a retry or a failure into "cancelled".
    found = read_state(call)
    if found:
        _signal_lost(call, changes)
    after_attempt(call)
    return str(call.state) if found else None
