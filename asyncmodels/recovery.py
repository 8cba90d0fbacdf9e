"""Recovery: find calls that the database says are stuck, and move each one on.

One pass (``recover_stranded_calls()``), on every database that holds ``MethodCall`` rows:

1. ``scheduled`` calls that are due (``run_after`` ≤ the database's now) are pushed;
2. ``pending`` calls older than ``PUSH_GRACE_SECONDS`` are pushed (the commit happened, the push
   was lost: Redis down, process killed between commit and push);
3. ``enqueued`` calls older than the grace whose RQ job is gone or dead (Redis flushed,
   restarted, a work horse killed before the claim) are pushed again;
4. ``running`` calls whose lease expired lost their worker: they are retried (a new attempt,
   after the backoff) if their policy allows another attempt, else ``failed`` with a reason.

Every transition is a compare-and-set and every push of one attempt uses one RQ job id that RQ
refuses to hold twice, so any number of processes may run passes at the same time. Each step
reads at most ``RECOVERY_BATCH_SIZE`` rows through a partial index holding only rows in that
state, so a pass over a table of millions of finished calls costs a few index lookups.

Each step writes its rows in one transaction (with the ``rq`` backend): one commit, one flush
of the database's log, for the whole batch instead of one per call, which is what a call cost
(a hundred stranded calls: about a second on PostgreSQL, one per commit). A job pushed before
its row is marked may reach a worker first: the worker's claim waits for the commit (the row is
locked), or claims the row while it is still ``pending``, as it may (the mark then does nothing).
A step that fails part-way rolls back its marks, never a push: those calls are found again by
the next pass, and the job of one already pushed is refused as a duplicate.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import redis
from django.conf import settings
from django.db import router, transaction
from django.db.models import Q
from django.db.models.functions import Now
from rq.exceptions import StopRequested

from . import conf, dispatch
from .job import attempt_entry
from .models import CallState, MethodCall, honour_cancel_request
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
            f"errors {self.errors}"
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
        for step in (_push_due, _push_pending, _repush_lost_jobs, _end_lost_attempts, _settle_waiting):
            try:
                report += step(database)
            except StopRequested:
                raise  # RQ's warm shutdown, raised by its SIGTERM handler
            except Exception:  # a database or Redis failure, or a bug: the next step still runs
                logger.exception("Recovery step %s failed on database %r.", step.__name__, database)
                report.errors += 1
    if report.total or report.errors:
        logger.info("Recovery pass: %s.", report)
    return report


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


def _batch_size() -> int:
    return int(conf.get_config()["RECOVERY_BATCH_SIZE"])


def _push_each(calls: Iterable[MethodCall], push: Callable[..., bool]) -> tuple[int, int]:
    """Push calls; return (pushed, errors). Stop at the first sign that Redis is down."""
    calls = list(calls)
    if not calls:
        return 0, 0
    with _one_commit(calls[0]._state.db or "default"):
        return _push_all(calls, push)


def _push_all(calls: list[MethodCall], push: Callable[..., bool]) -> tuple[int, int]:
    pushed = errors = 0
    for call in calls:
        try:
            pushed += push(call, raise_errors=True)
        except StopRequested:
            raise  # RQ's warm shutdown arrived during the pass
        except REDIS_UNAVAILABLE:
            return pushed, 1  # already logged by dispatch; the rest would fail (and wait) too
        except Exception:  # this row's problem only: logged by dispatch, go on with the others
            errors += 1
    return pushed, errors


def _push_due(database: str) -> RecoveryReport:
    due = (
        MethodCall.objects.using(database)
        .filter(state=CallState.SCHEDULED, run_after__lte=Now())
        .order_by("run_after", "id")[: _batch_size()]
    )
    pushed, errors = _push_each(due, dispatch.push_if_due)
    return RecoveryReport(pushed_due=pushed, errors=errors)


def _push_pending(database: str) -> RecoveryReport:
    grace = conf.get_duration("PUSH_GRACE_SECONDS")
    stale = (
        MethodCall.objects.using(database)
        .filter(state=CallState.PENDING, created_at__lt=Now() - grace)
        .order_by("created_at", "id")[: _batch_size()]
    )
    pushed, errors = _push_each(stale, dispatch.push)
    return RecoveryReport(pushed_pending=pushed, errors=errors)


def _repush_lost_jobs(database: str) -> RecoveryReport:
    """Push again the enqueued calls whose RQ job no longer exists or will never run."""
    from rq.job import Job

    grace = conf.get_duration("PUSH_GRACE_SECONDS")
    calls = list(
        MethodCall.objects.using(database)
        .filter(state=CallState.ENQUEUED, enqueued_at__lt=Now() - grace)
        .order_by("enqueued_at", "id")[: _batch_size()]
    )
    by_queue: dict[str, list[MethodCall]] = defaultdict(list)
    for call in calls:
        by_queue[call.queue].append(call)
    report = RecoveryReport()
    if not calls:
        return report
    with _one_commit(database):
        for queue_name, queued in by_queue.items():
            try:
                connection = dispatch.get_queue(queue_name).connection
                queue_key = dispatch.get_queue(queue_name).key
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
                if status == "queued" and in_list:
                    continue
                logger.warning(
                    "Call %s is enqueued but its RQ job %s is %s; pushing it again.",
                    call.pk,
                    call.job_id,
                    status or "gone",
                )
                try:
                    if status is not None:  # a dead job (failed, stopped...) would block a push under its id
                        Job(call.job_id, connection=connection).delete(remove_from_queue=True)
                    report.repushed_enqueued += dispatch.push(call, raise_errors=True)
                except StopRequested:
                    raise
                except REDIS_UNAVAILABLE:
                    report.errors += 1
                    break
                except Exception:
                    report.errors += 1
    return report


def _end_lost_attempts(database: str) -> RecoveryReport:
    """Retry or fail running calls whose lease expired: their worker is gone."""
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
    with _one_commit(database):
        for call in lost:
            try:
                outcome = end_lost_attempt(call, expired)
            except StopRequested:
                raise
            except Exception:  # this row's problem only
                logger.exception("Could not end the lost attempt of call %s.", call.pk)
                report.errors += 1
                continue
            if outcome == CallState.SCHEDULED:
                report.retried_lost += 1
            elif outcome == CallState.FAILED:
                report.failed_lost += 1
            elif outcome == CallState.CANCELLED:
                report.cancelled_lost += 1
    return report


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
        .values_list("id", "exclusive_key")[: _batch_size()]
    )
    report = RecoveryReport()
    released_keys: set[str] = set()
    if not movable:
        return report
    with _one_commit(database):
        for call_id, key in movable:
            if key is not None and key in released_keys:
                continue  # one turn per key and pass: the others would only find it busy
            try:
                state = dependencies.settle(call_id, database)
            except StopRequested:
                raise
            except Exception:
                logger.exception("Could not settle waiting call %s.", call_id)
                report.errors += 1
                continue
            if state == CallState.CANCELLED:
                report.cancelled_waiting += 1
            elif state in (CallState.PENDING, CallState.SCHEDULED, CallState.ENQUEUED):
                report.released_waiting += 1
                if key is not None:
                    released_keys.add(key)
    return report


def end_lost_attempt(call: MethodCall, still_lost: Q, reason: str | None = None) -> str | None:
    """Retry or fail ``call``, whose running attempt lost its worker; return the new state, if any.

    A compare-and-set on (running, this attempt, ``still_lost``): if the attempt moved on since
    ``call`` was read, nothing changes and ``None`` is returned. ``reason`` defaults to the
    lease having expired.
    """
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
        changes = {
            "state": CallState.SCHEDULED,
            "run_after": Now() + delay,
            "state_reason": f"{reason} Attempt {call.attempts + 1} of {policy.retries + 1} is due in "
            f"{delay.total_seconds():.1f} s.",
            # The row's error is this attempt's, not an earlier one's (and says why, should a
            # cancel request end the call here).
            "error_type": "asyncmodels.WorkerLost",
            "error": reason,
            "traceback": "",
        }
    else:
        changes = {
            "state": CallState.FAILED,
            "finished_at": Now(),
            "state_reason": "",
            "error_type": "asyncmodels.WorkerLost",
            "error": f"{reason} The method does not retry (retries={policy.retries}); the call failed.",
            "traceback": "",
        }
    won = (
        MethodCall.objects.using(call._state.db)
        .filter(still_lost, pk=call.pk, state=CallState.RUNNING, attempts=call.attempts)
        .update(lease_expires_at=None, attempt_log=log, **honour_cancel_request(changes))
    )
    if not won:
        return None
    from .job import after_attempt

    after_attempt(call)
    # A cancel requested while the attempt ran turns a retry or a failure into "cancelled".
    state = (
        MethodCall.objects.using(call._state.db).filter(pk=call.pk).values_list("state", flat=True).first()
    )
    logger.warning(
        "Call %s (now %s): %s", call.pk, state, changes.get("state_reason") or changes.get("error")
    )
    return state
