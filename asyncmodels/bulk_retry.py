"""Retry many finished calls at once, selected by method, model, object, tag, error text or time.

The on-call engineer's ``manage.py asyncmodels_retry``. Each selected call goes through
``MethodCall.retry()``, the path the admin's retry action takes: a compare-and-set back to
``pending`` (or ``waiting`` for a call with dependencies), the push registered on commit on the
call's database, ``attempts`` counting on. Each call is its own transaction: a retry of many
never holds a lock on many rows, and one refused call does not undo the others.

Failed calls are selected by default; cancelled calls only when asked (``states``): a cancel was
usually someone's decision, and a bulk retry should not quietly overturn it.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from django.apps import apps
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q, QuerySet

from .exceptions import DuplicateCallError, SelectionTooLargeError, UnknownQueueError
from .models import RETRYABLE_STATES, CallState, MethodCall, MethodCallTag, database_now
from .tags import object_tag, tag_for

#: A bulk retry refuses (and changes nothing) above this many calls unless given a higher limit.
DEFAULT_LIMIT = 1000

#: A point in time: an aware ``datetime``, or a ``timedelta`` meaning that long before the
#: database's now.
Moment = datetime.datetime | datetime.timedelta


@dataclass(frozen=True)
class CallSelection:
    """Which finished calls to retry; every given criterion must hold (a list: any of its values).

    - ``states``: ``"failed"`` and/or ``"cancelled"`` (default: failed only);
    - ``methods``: registry names, ``"cloud.Instance.provision"``;
    - ``models``: model labels, ``"cloud.Instance"``: calls made on objects of that model;
    - ``objects``: ``"cloud.Account:121"``: calls made on that object or tagged with it (as
      ``MethodCall.objects.for_object()``), even if the object is gone;
    - ``tags``: tag text, ``"region:eu"`` or ``"cloud.account:121"``;
    - ``error``: text found in the error message or the error's type, case-insensitively;
    - ``finished_after`` / ``finished_before``: a ``Moment``, on the call's ``finished_at``.
    """

    states: tuple[str, ...] = (CallState.FAILED,)
    methods: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    objects: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    error: str = ""
    finished_after: Moment | None = None
    finished_before: Moment | None = None

    @property
    def is_narrowed(self) -> bool:
        """Whether any criterion beyond ``states`` is given."""
        return bool(
            self.methods
            or self.models
            or self.objects
            or self.tags
            or self.error
            or self.finished_after is not None
            or self.finished_before is not None
        )

    def queryset(self, database: str = "default") -> QuerySet[MethodCall]:
        """The selected calls on ``database``, oldest first. Raises ``ValueError`` (and reads
        nothing) for a state that cannot be retried, an unknown model, a malformed object or
        primary key, or a bad tag."""
        for state in self.states:
            if state not in RETRYABLE_STATES:
                raise ValueError(f"{state!r} calls cannot be retried; only failed and cancelled ones can.")
        calls = MethodCall.objects.using(database).filter(state__in=self.states or (CallState.FAILED,))
        if self.methods:
            calls = calls.filter(method__in=self.methods)
        if self.models:
            types = [_content_type(label, database) for label in self.models]
            calls = calls.filter(content_type__in=types)
        if self.objects:
            calls = calls.filter(_objects_filter(self.objects, database))
        for tag in self.tags:
            try:
                key = tag_for(tag)
            except Exception as exc:  # InvalidTagError: its message says what is wrong
                raise ValueError(str(exc)) from None
            calls = calls.filter(
                id__in=MethodCallTag.objects.using(database).filter(tag=key).values("call_id")
            )
        if self.error:
            calls = calls.filter(Q(error__icontains=self.error) | Q(error_type__icontains=self.error))
        if self.finished_after is not None or self.finished_before is not None:
            now = database_now(database)
            if self.finished_after is not None:
                calls = calls.filter(finished_at__gte=_at(self.finished_after, now))
            if self.finished_before is not None:
                calls = calls.filter(finished_at__lt=_at(self.finished_before, now))
        return calls.order_by("id")


def _at(moment: Moment, now: datetime.datetime) -> datetime.datetime:
    return now - moment if isinstance(moment, datetime.timedelta) else moment


def _model(label: str) -> type[models.Model]:
    try:
        return apps.get_model(label)
    except (LookupError, ValueError):
        raise ValueError(
            f"{label!r} is not an installed model; use app_label.ModelName, e.g. cloud.Instance."
        ) from None


def _content_type(label: str, database: str) -> ContentType:
    model = _model(label)
    return ContentType.objects.db_manager(database).get_for_model(model, for_concrete_model=True)


def _objects_filter(objects: Sequence[str], database: str) -> Q:
    """Calls made on, or tagged with, any of ``objects`` (``"app_label.Model:pk"`` each)."""
    condition = Q()
    for text in objects:
        label, sep, raw_pk = text.partition(":")
        if not sep or not raw_pk:
            raise ValueError(
                f"{text!r} is not an object; use app_label.ModelName:pk, e.g. cloud.Account:121."
            )
        model = _model(label)
        try:
            pk = model._meta.pk.to_python(raw_pk) if model._meta.pk is not None else raw_pk
        except ValidationError:
            raise ValueError(f"{raw_pk!r} is not a valid primary key of {model._meta.label}.") from None
        instance = model(pk=pk)
        tagged = MethodCallTag.objects.using(database).filter(tag=object_tag(instance)).values("call_id")
        condition |= Q(content_type=_content_type(label, database), object_id=str(pk)) | Q(id__in=tagged)
    return condition


@dataclass
class RetryReport:
    """What a bulk retry did: calls retried, calls left alone (moved on meanwhile: their state
    now), and calls refused with the reason (a unique key taken, a queue gone)."""

    retried: list[MethodCall] = field(default_factory=list)
    skipped: list[MethodCall] = field(default_factory=list)
    refused: list[tuple[MethodCall, str]] = field(default_factory=list)


def select_calls(
    selection: CallSelection, *, database: str = "default", limit: int = DEFAULT_LIMIT
) -> list[MethodCall]:
    """The calls ``selection`` picks on ``database``, oldest first, read once.

    Raises ``ValueError`` for a bad selection, and ``SelectionTooLargeError`` if more than
    ``limit`` calls match (nothing is acted on: narrow the selection or raise the limit).
    """
    calls = list(selection.queryset(database)[: limit + 1])
    if len(calls) > limit:
        raise SelectionTooLargeError(
            f"More than {limit} calls match; nothing was retried. Narrow the selection, or raise the limit."
        )
    return calls


def retry_calls(
    calls: Sequence[MethodCall],
    *,
    reason: str = "Retried in bulk.",
    progress: Callable[[int], object] | None = None,
) -> RetryReport:
    """``MethodCall.retry(reason=reason)`` each of ``calls`` (each its own transaction; its push
    on commit); ``progress`` is called with 1 after each. Never raises for one call's refusal
    (``DuplicateCallError``, ``UnknownQueueError``: in ``refused``); raises what the database raises."""
    report = RetryReport()
    for call in calls:
        try:
            if call.retry(reason=reason):
                report.retried.append(call)
            else:
                report.skipped.append(call)
        except (DuplicateCallError, UnknownQueueError) as exc:
            report.refused.append((call, str(exc)))
        if progress is not None:
            progress(1)
    return report
