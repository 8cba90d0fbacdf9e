"""Dependencies between calls: ``instance.configure.using(after=[call_a, call_b])(...)``.

A call made with ``after=`` is stored ``waiting``, with one ``MethodCallDependency`` row per call
it waits for, in the caller's transaction. It is *settled* (``settle()``) whenever one of those
calls ends, once its own transaction commits, and by every recovery pass:

- if a call it waits for ``failed`` or was ``cancelled``, it is ``cancelled``, its reason naming
  that call, and so is every call waiting for it in turn (nothing of it ran);
- once all of them ``succeeded`` (and, for an exclusive method, no call holds its object), it
  is released: ``pending`` and pushed, or ``scheduled`` if its ``run_after`` is still ahead;
- otherwise it keeps waiting.

Every step is a compare-and-set from ``waiting``, so the finishing job, the caller's on-commit
hook and recovery may all settle the same call at once: one of them moves it. Dependencies are
fixed when the call is made and must already exist, so a cycle cannot be formed.

``result_of(call)`` passed as an argument gives the step the earlier call's result (its
``return_value``) when it runs, and adds ``call`` to ``after`` by itself.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from django.db import models, transaction
from django.db.models.functions import Now

from . import signals
from .exceptions import InvalidDependencyError

if TYPE_CHECKING:
    from .models import MethodCall

logger = logging.getLogger("asyncmodels.dependencies")

#: A call waits for at most this many calls (each is a row, read whenever the call is settled).
MAX_DEPENDENCIES = 1000


@dataclasses.dataclass(frozen=True)
class ResultOf:
    """An argument standing for the result of an earlier call; see ``result_of()``."""

    call_id: int
    database: str


def result_of(call: MethodCall) -> ResultOf:
    """Pass as an argument (or inside one) to give a step the result of ``call`` when it runs.

    ``instance.assemble.using(after=[...])(parts=[result_of(a), result_of(b)])``. ``call`` is
    added to the step's ``after`` by itself. Stored as a reference, not a copy: the worker reads
    the result when the step runs (``MethodCall.return_value``). Raises ``InvalidDependencyError``
    if ``call`` is not a saved ``MethodCall``.
    """
    from .models import MethodCall

    if not isinstance(call, MethodCall) or call.pk is None:
        raise InvalidDependencyError(f"result_of() takes a saved MethodCall, not {call!r}.")
    return ResultOf(call.pk, call._state.db or "default")


def check_dependencies(after: Iterable[Any], database: str, label: str) -> list[int]:
    """The ids of the calls in ``after``, in order and without repeats, checked for a new call on
    ``database``. Raises ``InvalidDependencyError`` for a value that is not a saved ``MethodCall``,
    a call on another database (a dependency is kept, and settled, in one database), or a call
    that no longer exists. One query (the existence check) when ``after`` is not empty.
    """
    from .models import MethodCall

    if isinstance(after, (str, bytes)) or not isinstance(after, Iterable):
        raise InvalidDependencyError(f"{label}(): after= must be a list of MethodCall, not {after!r}.")
    ids: list[int] = []
    for item in after:
        if isinstance(item, ResultOf):
            call_id, call_database = item.call_id, item.database
        elif isinstance(item, MethodCall) and item.pk is not None and not item._state.adding:
            call_id, call_database = item.pk, item._state.db or "default"
        else:
            raise InvalidDependencyError(
                f"{label}(): after= holds {item!r}; each item must be a saved MethodCall "
                "(the value an async method call returns)."
            )
        if call_database != database:
            raise InvalidDependencyError(
                f"{label}(): call #{call_id} is on database {call_database!r}, but this call goes to "
                f"{database!r}; a call can only wait for calls on its own database."
            )
        if call_id not in ids:
            ids.append(call_id)
    if len(ids) > MAX_DEPENDENCIES:
        raise InvalidDependencyError(f"{label}(): {len(ids)} dependencies; at most {MAX_DEPENDENCIES}.")
    if ids:
        found = set(MethodCall.objects.using(database).filter(pk__in=ids).values_list("pk", flat=True))
        missing = [str(call_id) for call_id in ids if call_id not in found]
        if missing:
            raise InvalidDependencyError(
                f"{label}(): after= names call(s) #{', #'.join(missing)}, which do not exist on "
                f"database {database!r}."
            )
    return ids


def result_references(encoded: Any) -> list[ResultOf]:
    """The ``result_of()`` references inside encoded arguments (see ``asyncmodels.serialization``)."""
    from .serialization import TAG

    found: list[ResultOf] = []
    stack = [encoded]
    while stack:  # depth first, in the order the arguments were given
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(reversed(value))
        elif isinstance(value, dict):
            tag = value.get(TAG)
            if tag is None:
                stack.extend(reversed(list(value.values())))
            elif tag == "result_of":
                found.append(ResultOf(int(value["call"]), str(value["db"])))
            elif tag in ("dict", "tuple"):  # containers: a user's dict holding "__type__" is one
                items = value["items"]
                stack.extend(reversed(list(items.values()) if isinstance(items, dict) else items))
            # any other tag is a leaf (datetime, model reference, ...)
    return found


def waiting_reason(ids: list[int]) -> str:
    shown = ", ".join(f"#{call_id}" for call_id in ids[:10]) + (" ..." if len(ids) > 10 else "")
    return f"Waiting for call(s) {shown} to succeed."


def settle_on_commit(call: MethodCall) -> None:
    """Settle the waiting ``call`` once the transaction on its database commits (at once outside
    one), so a dependency that ended before the commit is not missed."""
    database = call._state.db or "default"

    def settle_committed_call() -> None:
        settle(call.pk, database)

    transaction.on_commit(settle_committed_call, using=database, robust=True)


def settle(call_id: int, database: str) -> str | None:
    """Move the ``waiting`` call ``call_id`` on if it can; return its new state, or ``None`` if
    it was not waiting (or another process moved it first). Cancels the calls waiting for it in
    turn when it is cancelled. See the module docstring for the rules."""
    state = _settle_one(call_id, database)
    if state == "cancelled":
        settle_dependents_of([call_id], database)
    return state


def settle_dependents(call: MethodCall) -> None:
    """Settle every ``waiting`` call that waits for ``call`` (after ``call`` ended). One query
    when there are none."""
    settle_dependents_of([call.pk], call._state.db or "default")


def settle_dependents_of(call_ids: list[int], database: str) -> None:
    """Settle every ``waiting`` call that waits for one of ``call_ids`` (calls on ``database``
    that ended), and in turn those waiting for a call cancelled here. One query when there are
    none."""
    from .models import CallState, MethodCallDependency

    todo = list(call_ids)
    seen: set[int] = set()
    while todo:
        batch, todo = todo[:500], todo[500:]
        waiting = list(
            MethodCallDependency.objects.using(database)
            .filter(depends_on__in=batch, call__state=CallState.WAITING)
            .order_by("call_id")
            .values_list("call_id", flat=True)
            .distinct()
        )
        for waiting_id in waiting:
            if waiting_id in seen:
                continue
            seen.add(waiting_id)
            if _settle_one(waiting_id, database) == CallState.CANCELLED:
                todo.append(waiting_id)


def doomed_reasons(doomed: dict[int, int], database: str) -> dict[int, str]:
    """For waiting calls whose dependency failed or was cancelled (``doomed`` maps each call's id
    to that dependency's id): the reason each is cancelled with, naming the dependency. One query.
    A dependency that no longer exists is left out."""
    from .models import MethodCall

    ended = {
        pk: (method, state)
        for pk, method, state in MethodCall.objects.using(database)
        .filter(pk__in=set(doomed.values()))
        .values_list("pk", "method", "state")
    }
    return {
        call_id: f"Call #{depends_on} ({ended[depends_on][0]}), which this call waited for, "
        f"{ended[depends_on][1]}; this call never ran."
        for call_id, depends_on in doomed.items()
        if depends_on in ended
    }


def cancel_doomed(reasons: dict[int, str], database: str) -> list[int]:
    """Cancel waiting calls whose dependency failed or was cancelled, all in one ``UPDATE``, each
    with its reason (``doomed_reasons``). A compare-and-set from ``waiting``; returns the ids
    cancelled here. (``settle()`` does one call and reads its dependencies itself.) The caller
    settles the calls waiting for these in turn (``settle_dependents_of``), once committed. Needs
    ``UPDATE … RETURNING`` (``updates_return_rows``)."""
    from .models import CallState, MethodCall, all_columns_sql, returned_calls, update_returning_sql

    if not reasons:
        return []
    rows = update_returning_sql(
        MethodCall.objects.using(database).filter(pk__in=list(reasons), state=CallState.WAITING),
        {
            "state": CallState.CANCELLED,
            "finished_at": Now(),
            "state_reason": models.Case(
                *(
                    models.When(pk=call_id, then=models.Value(reason[:2000]))
                    for call_id, reason in reasons.items()
                ),
                output_field=models.TextField(),
            ),
        },
        all_columns_sql(database),  # the calls, for their signals: no query per call
    )
    calls = returned_calls(database, rows)
    for call in calls:
        signals.send(signals.call_cancelled, call, previous_state=CallState.WAITING, reason=call.state_reason)
    return [call.pk for call in calls]


def _cancel_waiting(call_id: int, database: str, reason: str) -> bool:
    """Cancel the ``waiting`` call ``call_id`` (a compare-and-set) and send ``call_cancelled``;
    return whether this did. The row comes back with the ``UPDATE`` where the database can; else
    it is read afterwards (one query)."""
    from .models import CallState, MethodCall, update_returning, updates_return_rows

    waiting = MethodCall.objects.using(database).filter(pk=call_id, state=CallState.WAITING)
    changes = {"state": CallState.CANCELLED, "finished_at": Now(), "state_reason": reason}
    if updates_return_rows(database):
        count, rows = update_returning(waiting, changes)
    else:
        count = waiting.update(**changes)
        rows = list(MethodCall.objects.using(database).filter(pk=call_id)) if count else []
    for call in rows:
        signals.send(signals.call_cancelled, call, previous_state=CallState.WAITING, reason=reason)
    return bool(count)


def _settle_one(call_id: int, database: str) -> str | None:
    from .models import CallState, MethodCall, MethodCallDependency

    manager = MethodCall.objects.using(database)
    row = manager.filter(pk=call_id, state=CallState.WAITING).values("exclusive_key").first()
    if row is None:
        return None
    dependencies = list(
        MethodCallDependency.objects.using(database)
        .filter(call=call_id)
        .order_by("id")
        .values_list("depends_on_id", "depends_on__state", "depends_on__method")
    )
    for depends_on, state, method in dependencies:
        if state in (CallState.FAILED, CallState.CANCELLED):
            reason = (
                f"Call #{depends_on} ({method}), which this call waited for, {state}; this call never ran."
            )
            if _cancel_waiting(call_id, database, reason[:2000]):
                return CallState.CANCELLED
            return None
    unfinished = [depends_on for depends_on, state, _ in dependencies if state != CallState.SUCCEEDED]
    if unfinished:
        return CallState.WAITING
    key = row["exclusive_key"]
    if key is not None:
        holder = (
            manager.filter(exclusive_key=key, state=CallState.RUNNING).values_list("pk", flat=True).first()
        )
        if holder is not None:
            return CallState.WAITING
    released = manager.filter(pk=call_id, state=CallState.WAITING).update(
        state=models.Case(
            models.When(run_after__gt=Now(), then=models.Value(CallState.SCHEDULED)),
            default=models.Value(CallState.PENDING),
            output_field=models.CharField(),
        ),
        state_reason="",
    )
    if not released:
        return None
    from . import dispatch

    call = manager.get(pk=call_id)
    if call.state == CallState.SCHEDULED:
        dispatch.push_if_due(call)
    else:
        dispatch.push(call)
    return str(call.state)
