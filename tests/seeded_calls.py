"""Calls written straight into the table, in any state and of any age, for the on-call commands'
tests (``asyncmodels_status``, ``asyncmodels_retry``, ``asyncmodels_prune``)."""

from __future__ import annotations

import datetime
from typing import Any

from django.contrib.contenttypes.models import ContentType
from django.db.models.functions import Now

from asyncmodels.models import MethodCall, MethodCallDependency, MethodCallTag
from testproject.cloud.models import Echo

FINISHED = ("succeeded", "failed", "cancelled")


def make_call(
    state: str,
    *,
    age: datetime.timedelta = datetime.timedelta(0),
    echo: Echo | None = None,
    method: str = "cloud.Echo.bump",
    queue: str = "default",
    database: str = "default",
    tags: tuple[str, ...] = (),
    after: tuple[MethodCall, ...] = (),
    **fields: Any,
) -> MethodCall:
    """A call of ``method`` on ``echo`` (a new Echo by default) in ``state``, created ``age`` ago
    on the database's clock; a finished one finished then too, a running one started then.
    ``fields`` override any column (expressions allowed)."""
    echo = echo or Echo.objects.using(database).create()
    moment = Now() - age
    values: dict[str, Any] = {
        "content_type": ContentType.objects.db_manager(database).get_for_model(Echo),
        "object_id": str(echo.pk),
        "method": method,
        "queue": queue,
        "state": state,
        "created_at": moment,
        "attempts": 0 if state in ("pending", "enqueued", "scheduled", "waiting") else 1,
    }
    if state in ("enqueued", "running", *FINISHED):
        values["enqueued_at"] = moment
    if state == "running" or state in FINISHED:
        values["started_at"] = moment
    if state in FINISHED:
        values["finished_at"] = moment
    if state == "failed":
        values.update(error_type="builtins.RuntimeError", error="boom")
    values.update(fields)
    call = MethodCall.objects.using(database).create(**values)
    for tag in tags:
        MethodCallTag.objects.using(database).create(call=call, tag=tag)
    for earlier in after:
        MethodCallDependency.objects.using(database).create(call=call, depends_on=earlier)
    call.refresh_from_db()
    return call
