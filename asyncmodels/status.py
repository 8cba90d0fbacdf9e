"""The on-call health report behind ``manage.py asyncmodels_status``: what is queued, what is stuck.

``read_status(database)`` reads, on a table of any size, a handful of indexed queries:

- unfinished calls per queue and state, all of them (the ``(state, -id)`` index: few rows);
- finished calls per queue and state created within ``window`` (the ``created_at`` index);
- the oldest ``pending`` and ``enqueued`` call, the longest ``running`` one, the running calls
  whose lease expired and the overdue ``scheduled`` calls, each through its partial index
  (``asyncmodels_call_pending``, ``_enqueued``, ``_lease``, ``_due``: they hold only the rows in
  one state);
- how many of those are *stuck* by ``Thresholds``.

Ages are measured on the database's clock, the one every timestamp is written with.
``Status.as_json()`` is the stable machine-readable shape (``JSON_VERSION``), documented in the
README's "Operate from the shell".
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from django.db.models import Count

from .durations import format_duration
from .models import FINISHED_ORDER, UNFINISHED_ORDER, CallState, MethodCall, database_now

#: Bumped whenever a key of ``Status.as_json()`` changes meaning or goes away (keys may be added).
JSON_VERSION = 1
STATE_ORDER = tuple(str(state) for state in (*UNFINISHED_ORDER, *FINISHED_ORDER))
#: How far back finished calls are counted by default (and the failure rate computed).
DEFAULT_WINDOW = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class Thresholds:
    """When a call is *stuck*, i.e. needs a human; each a ``timedelta`` of the database's clock.

    - ``pending``: committed but not pushed for this long. Recovery pushes a lost push after
      ``PUSH_GRACE_SECONDS`` (30 s): five minutes means no recovery runs, or Redis is down.
    - ``enqueued``: pushed but not claimed by a worker for this long: no worker serves the queue,
      or the backlog is that long.
    - ``lease_grace``: a running call's lease expired this long ago and recovery has not ended its
      attempt (it does so within ``RECOVERY_INTERVAL_SECONDS``, 10 s, of the expiry).
    - ``overdue``: a ``scheduled`` call's ``run_after`` passed this long ago and it was not pushed.
    - ``failure_rate``: a fraction (0 to 1) of the calls finished in the window that failed,
      above which the report asks for a human too; ``None`` (the default) never does.
    """

    pending: datetime.timedelta = datetime.timedelta(minutes=5)
    enqueued: datetime.timedelta = datetime.timedelta(minutes=30)
    lease_grace: datetime.timedelta = datetime.timedelta(minutes=1)
    overdue: datetime.timedelta = datetime.timedelta(minutes=5)
    failure_rate: float | None = None


@dataclass
class CallSummary:
    """One call the report points at, and how long it has been in its state (``age``)."""

    id: int
    method: str
    queue: str
    object: str
    age: datetime.timedelta
    worker: str = ""
    lease_expires_at: datetime.datetime | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "method": self.method,
            "queue": self.queue,
            "object": self.object,
            "age_seconds": round(self.age.total_seconds(), 3),
            "worker": self.worker,
            "lease_expires_at": self.lease_expires_at.isoformat() if self.lease_expires_at else None,
        }


@dataclass
class Status:
    """What ``read_status()`` found on one database; ``problems`` is empty when all is well."""

    database: str
    now: datetime.datetime
    window: datetime.timedelta
    thresholds: Thresholds
    #: (queue, state) -> calls: every unfinished call, and finished ones created within the window.
    counts: dict[tuple[str, str], int]
    oldest_pending: CallSummary | None
    oldest_enqueued: CallSummary | None
    longest_running: CallSummary | None
    expired_leases: int
    stuck_pending: int
    stuck_enqueued: int
    stuck_leases: int
    overdue_scheduled: int
    problems: list[str] = field(default_factory=list)

    @property
    def queues(self) -> list[str]:
        return sorted({queue for queue, _state in self.counts})

    def total(self, state: str) -> int:
        """Calls in ``state`` over every queue (finished states: created within the window)."""
        return sum(n for (_queue, s), n in self.counts.items() if s == state)

    @property
    def finished(self) -> int:
        """Calls created within the window that have finished."""
        return sum(self.total(state) for state in FINISHED_ORDER)

    @property
    def failure_rate(self) -> float | None:
        """The fraction of the window's finished calls that failed; ``None`` if none finished."""
        return self.total(CallState.FAILED) / self.finished if self.finished else None

    @property
    def healthy(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        """The report as JSON-ready data; its shape is documented in the README (``version``)."""

        def summary(call: CallSummary | None) -> dict[str, Any] | None:
            return call.as_json() if call else None

        return {
            "version": JSON_VERSION,
            "database": self.database,
            "now": self.now.isoformat(),
            "window_seconds": self.window.total_seconds(),
            "thresholds": {
                "pending_seconds": self.thresholds.pending.total_seconds(),
                "enqueued_seconds": self.thresholds.enqueued.total_seconds(),
                "lease_grace_seconds": self.thresholds.lease_grace.total_seconds(),
                "overdue_seconds": self.thresholds.overdue.total_seconds(),
                "failure_rate": self.thresholds.failure_rate,
            },
            "queues": {
                queue: {state: self.counts.get((queue, state), 0) for state in STATE_ORDER}
                for queue in self.queues
            },
            "totals": {state: self.total(state) for state in STATE_ORDER},
            "oldest_pending": summary(self.oldest_pending),
            "oldest_enqueued": summary(self.oldest_enqueued),
            "longest_running": summary(self.longest_running),
            "expired_leases": self.expired_leases,
            "failures": {
                "finished": self.finished,
                "failed": self.total(CallState.FAILED),
                "rate": self.failure_rate,
            },
            "stuck": {
                "pending": self.stuck_pending,
                "enqueued": self.stuck_enqueued,
                "expired_leases": self.stuck_leases,
                "overdue_scheduled": self.overdue_scheduled,
            },
            "healthy": self.healthy,
            "problems": list(self.problems),
        }


def _object_of(call: MethodCall) -> str:
    if not call.object_id:
        return f"task via {call.task_backend}" if call.task_backend else ""
    kind = call.content_type  # read with the call (select_related)
    label = f"{kind.app_label}.{kind.model}" if kind is not None else "?"
    return f"{label}:{call.object_id}"


def read_status(
    database: str = "default",
    *,
    window: datetime.timedelta = DEFAULT_WINDOW,
    thresholds: Thresholds | None = None,
) -> Status:
    """Read the health report of the calls on ``database`` (an alias of ``settings.DATABASES``).

    ``window`` (a ``timedelta``): finished calls created this long ago or since are counted, and
    their failure rate computed. ``thresholds``: when a call is stuck (``Thresholds()``).
    Raises what the database raises (``django.db.DatabaseError``: unreachable, not migrated).
    """
    thresholds = thresholds or Thresholds()
    calls = MethodCall.objects.using(database)
    now = database_now(database)
    counts: dict[tuple[str, str], int] = {}
    for selection in (
        calls.filter(state__in=UNFINISHED_ORDER),
        calls.filter(state__in=FINISHED_ORDER, created_at__gte=now - window),
    ):
        for row in selection.values("queue", "state").annotate(n=Count("id")).order_by():
            counts[(row["queue"], row["state"])] = row["n"]

    def first(state: str, moment: str) -> CallSummary | None:
        call = (
            calls.filter(state=state, **{f"{moment}__isnull": False})
            .select_related("content_type")
            .only(
                "id",
                "method",
                "queue",
                "object_id",
                "task_backend",
                "worker",
                "lease_expires_at",
                moment,
                "content_type__app_label",
                "content_type__model",
            )
            .order_by(moment, "id")
            .first()
        )
        if call is None:
            return None
        return CallSummary(
            id=call.pk,
            method=call.method,
            queue=call.queue,
            object=_object_of(call),
            age=max(now - getattr(call, moment), datetime.timedelta(0)),
            worker=call.worker,
            lease_expires_at=call.lease_expires_at,
        )

    running = calls.filter(state=CallState.RUNNING)
    status = Status(
        database=database,
        now=now,
        window=window,
        thresholds=thresholds,
        counts=counts,
        oldest_pending=first(CallState.PENDING, "created_at"),
        oldest_enqueued=first(CallState.ENQUEUED, "enqueued_at"),
        longest_running=first(CallState.RUNNING, "started_at"),
        expired_leases=running.filter(lease_expires_at__lt=now).count(),
        stuck_pending=calls.filter(state=CallState.PENDING, created_at__lt=now - thresholds.pending).count(),
        stuck_enqueued=calls.filter(
            state=CallState.ENQUEUED, enqueued_at__lt=now - thresholds.enqueued
        ).count(),
        stuck_leases=running.filter(lease_expires_at__lt=now - thresholds.lease_grace).count(),
        overdue_scheduled=calls.filter(
            state=CallState.SCHEDULED, run_after__lt=now - thresholds.overdue
        ).count(),
    )
    status.problems = _problems(status)
    return status


def _problems(status: Status) -> list[str]:
    age = format_duration
    t = status.thresholds
    problems = []
    if status.stuck_pending:
        problems.append(
            f"{status.stuck_pending} pending call(s) older than {age(t.pending)}: not pushed to Redis "
            "(is Redis reachable? does a worker or asyncmodels_recover run recovery?)"
        )
    if status.stuck_enqueued:
        problems.append(
            f"{status.stuck_enqueued} enqueued call(s) waiting longer than {age(t.enqueued)} for a worker "
            "(does a worker serve their queue? is the backlog that long?)"
        )
    if status.stuck_leases:
        problems.append(
            f"{status.stuck_leases} running call(s) whose lease expired more than {age(t.lease_grace)} ago: "
            "their worker is gone and recovery has not ended them (does recovery run?)"
        )
    if status.overdue_scheduled:
        problems.append(
            f"{status.overdue_scheduled} scheduled call(s) overdue by more than {age(t.overdue)} "
            "(does recovery run?)"
        )
    rate = status.failure_rate
    if t.failure_rate is not None and rate is not None and rate > t.failure_rate:
        problems.append(
            f"{rate:.1%} of the calls finished in the last {age(status.window)} failed "
            f"(more than {t.failure_rate:.1%})"
        )
    return problems


def format_status(status: Status) -> str:
    """The report as a plain-text table and a few lines, for a human at a terminal."""
    age = format_duration
    states = list(STATE_ORDER)
    header = ["queue", *states]
    rows = [[queue, *(str(status.counts.get((queue, s), 0)) for s in states)] for queue in status.queues]
    rows.append(["(all)", *(str(status.total(s)) for s in states)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first, *rest = cells
        return "  ".join(
            [first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))]
        )

    out = [
        f"asyncmodels status of database {status.database!r} at {status.now:%Y-%m-%d %H:%M:%S %Z}",
        f"(unfinished calls: all; finished calls: created in the last {age(status.window)})",
        "",
        line(header),
        *(line(row) for row in rows),
        "",
    ]

    def described(call: CallSummary | None, verb: str) -> str:
        if call is None:
            return "none"
        where = f" ({call.object})" if call.object else ""
        text = f"#{call.id} {call.method}{where} on {call.queue}, {verb} {age(call.age)} ago"
        if call.worker:
            text += f" on worker {call.worker}"
        return text

    rate = status.failure_rate
    rate_text = (
        f"{status.total(CallState.FAILED)} of {status.finished} finished calls failed ({rate:.1%})"
        if rate is not None
        else "no call finished"
    )
    t = status.thresholds
    out += [
        f"oldest pending:     {described(status.oldest_pending, 'created')}",
        f"oldest enqueued:    {described(status.oldest_enqueued, 'enqueued')}",
        f"longest running:    {described(status.longest_running, 'started')}",
        f"expired leases:     {status.expired_leases} "
        f"(stuck: {status.stuck_leases}, expired more than {age(t.lease_grace)} ago)",
        f"stuck pending:      {status.stuck_pending} (older than {age(t.pending)})",
        f"stuck enqueued:     {status.stuck_enqueued} (older than {age(t.enqueued)})",
        f"overdue scheduled:  {status.overdue_scheduled} (due more than {age(t.overdue)} ago)",
        f"failure rate:       {rate_text} in the last {age(status.window)}",
        "",
    ]
    if status.healthy:
        out.append("OK: nothing needs a human.")
    else:
        out.append("NEEDS ATTENTION:")
        out += [f"- {problem}" for problem in status.problems]
    return "\n".join(out)
