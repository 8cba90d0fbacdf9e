"""``MethodCall``: the durable record of one async method call, and its states.

The row is the truth: every state change is a compare-and-set, a conditional
``UPDATE ... WHERE state IN (...)`` whose row count says whether this process won. That is the
lock; ``select_for_update`` would do nothing on SQLite and an RQ-delivered job holds no lock.
Timestamps come from the database clock (``Now()``), never from the worker's.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, cast

from django.contrib.contenttypes.fields import GenericForeignKey
from django.contrib.contenttypes.models import ContentType
from django.db import IntegrityError, models, transaction
from django.db.models.functions import Now
from django.utils.translation import gettext_lazy as _

from .tags import object_tag, tag_for


class CallState(models.TextChoices):
    """Where a call is in its life. ``succeeded``, ``failed`` and ``cancelled`` are terminal."""

    PENDING = "pending", _("pending")  # committed, not yet pushed to the queue
    SCHEDULED = "scheduled", _("scheduled")  # to be pushed when due (run_after, retry backoff)
    WAITING = "waiting", _("waiting")  # to be pushed when its dependencies have finished
    ENQUEUED = "enqueued", _("enqueued")  # pushed to RQ; a worker has not claimed it yet
    RUNNING = "running", _("running")  # claimed by a worker; the method is executing
    SUCCEEDED = "succeeded", _("succeeded")  # the method returned
    FAILED = "failed", _("failed")  # the method raised, or it could not be run; see error
    CANCELLED = "cancelled", _("cancelled")  # stopped before it ran


#: The most characters of a task's arguments ``MethodCall.subject`` shows (a log line, RQ's job
#: description); the row keeps them all.

#: Unfinished states in the order a call moves through them, then the finished ones: the column
#: order of the admin overview and of ``asyncmodels_status``.
UNFINISHED_ORDER = (
    CallState.PENDING,
    CallState.SCHEDULED,
    CallState.WAITING,
    CallState.ENQUEUED,
    CallState.RUNNING,
)
FINISHED_ORDER = (CallState.SUCCEEDED, CallState.FAILED, CallState.CANCELLED)

SUBJECT_ARGUMENTS_LENGTH = 200

TERMINAL_STATES = frozenset({CallState.SUCCEEDED, CallState.FAILED, CallState.CANCELLED})
UNFINISHED_STATES = frozenset(set(CallState) - TERMINAL_STATES)
#: States from which a worker may claim a call. ``pending`` is included because the push to
#: RQ happens before the row is marked ``enqueued``, and a fast worker can win that race.
CLAIMABLE_STATES = frozenset({CallState.PENDING, CallState.ENQUEUED})
CANCELLABLE_STATES = frozenset(
    {CallState.PENDING, CallState.SCHEDULED, CallState.WAITING, CallState.ENQUEUED}
)
#: How ``state_reason`` starts when a push failed (dispatch); a successful push clears it.
PUSH_FAILURE_PREFIX = "The push to queue"
#: States from which a call may be retried by hand (``MethodCall.retry()``, the admin's action).
RETRYABLE_STATES = frozenset({CallState.FAILED, CallState.CANCELLED})


def honour_cancel_request(changes: dict[str, Any]) -> dict[str, Any]:
    """``changes`` that end a running attempt, made to end the call ``cancelled`` (no further
    attempt) if a cancel was requested while it ran (``MethodCall.cancel()``).

    Each changed field becomes a ``CASE`` on ``cancel_requested_at`` inside the same finishing
    ``UPDATE``, so a request that lands at any moment before it is honoured. ``state_reason``
    then keeps the request's reason.
    """
    requested = models.Q(cancel_requested_at__isnull=False)

    def unless(value: Any, if_requested: Any, field: models.Field[Any, Any]) -> models.Case:
        def expression(v: Any) -> Any:  # a plain str would be taken for a field name
            return v if hasattr(v, "resolve_expression") else models.Value(v, output_field=field)

        return models.Case(
            models.When(requested, then=expression(if_requested)),
            default=expression(value),
            output_field=field,
        )

    ended = dict(changes)
    ended["state"] = unless(changes["state"], models.Value(CallState.CANCELLED), models.CharField())
    ended["finished_at"] = unless(changes.get("finished_at"), Now(), models.DateTimeField())
    ended["run_after"] = unless(changes.get("run_after", models.F("run_after")), None, models.DateTimeField())
    ended["state_reason"] = unless(
        changes.get("state_reason", ""), models.F("state_reason"), models.TextField()
    )
    return ended


def reason_after_push() -> models.Case:
    """The ``state_reason`` of a call once pushed, as an ``UPDATE`` expression: a failed push's
    reason (``PUSH_FAILURE_PREFIX``) is obsolete and cleared; another (a retry by hand) still holds."""
    return models.Case(
        models.When(state_reason__startswith=PUSH_FAILURE_PREFIX, then=models.Value("")),
        default=models.F("state_reason"),
        output_field=models.TextField(),
    )


def _content_type_of(instance: models.Model, database: str) -> Any:
    """The content type of ``instance``'s concrete model on ``database``: from Django's cache if
    it is there, else as a subquery, so a queryset filtering by object stays one query."""
    opts = (instance._meta.concrete_model or type(instance))._meta
    manager = ContentType.objects.db_manager(database)
    cached = getattr(manager, "_cache", {}).get(database, {}).get((opts.app_label, opts.model_name))
    if cached is not None:
        return cached
    return models.Subquery(manager.filter(app_label=opts.app_label, model=opts.model_name).values("pk")[:1])


class MethodCallQuerySet(models.QuerySet["MethodCall"]):
    """Filters named after states and objects: ``MethodCall.objects.for_object(acct).failed()``."""

    def for_object(self, instance: models.Model) -> MethodCallQuerySet:
        """Calls made on ``instance`` (a saved model instance) and calls tagged with it, on this
        queryset's database: ``MethodCall.objects.for_object(account).failed()``.

        One query, whatever is chained after it: the ids come from a ``UNION`` of two index
        scans (the call's own object columns, and the tag table), so the database never reads
        the whole table. Use ``own_calls()`` for the object's own calls only.
        """
        own = (
            MethodCall._default_manager.using(self.db)
            .filter(content_type=_content_type_of(instance, self.db), object_id=str(instance.pk))
            .order_by()
            .values("id")
        )
        tagged = (
            MethodCallTag._default_manager.using(self.db)
            .filter(tag=object_tag(instance))
            .order_by()
            .values("call_id")
        )
        return self.filter(id__in=own.union(tagged))

    def own_calls(self, instance: models.Model) -> MethodCallQuerySet:
        """Calls made on ``instance`` itself (not those only tagged with it)."""
        return self.filter(content_type=_content_type_of(instance, self.db), object_id=str(instance.pk))

    def tagged(self, tag: models.Model | str) -> MethodCallQuerySet:
        """Calls carrying ``tag``: a saved model instance or a string (``"region:eu"``).

        Raises ``asyncmodels.exceptions.InvalidTagError`` for anything else.
        """
        key = tag_for(tag)
        return self.filter(
            id__in=MethodCallTag._default_manager.using(self.db).filter(tag=key).values("call_id")
        )

    def for_method(self, name: str) -> MethodCallQuerySet:
        """Calls of the method registered as ``name`` (``"app_label.Model.method"``)."""
        return self.filter(method=name)

    def tasks(self) -> MethodCallQuerySet:
        """Tasks of Django's tasks framework (``asyncmodels.backends.tasks``): calls with no object."""
        return self.exclude(task_backend="")

    def method_calls(self) -> MethodCallQuerySet:
        """Calls of ``@async_method`` methods (not tasks)."""
        return self.filter(task_backend="")

    def pending(self) -> MethodCallQuerySet:
        return self.filter(state=CallState.PENDING)

    def waiting(self) -> MethodCallQuerySet:
        return self.filter(state=CallState.WAITING)

    def scheduled(self) -> MethodCallQuerySet:
        return self.filter(state=CallState.SCHEDULED)

    def enqueued(self) -> MethodCallQuerySet:
        return self.filter(state=CallState.ENQUEUED)

    def running(self) -> MethodCallQuerySet:
        return self.filter(state=CallState.RUNNING)

    def succeeded(self) -> MethodCallQuerySet:
        return self.filter(state=CallState.SUCCEEDED)

    def failed(self) -> MethodCallQuerySet:
        return self.filter(state=CallState.FAILED)

    def cancelled(self) -> MethodCallQuerySet:
        return self.filter(state=CallState.CANCELLED)

    def unfinished(self) -> MethodCallQuerySet:
        """Calls not yet in a terminal state."""
        return self.filter(state__in=UNFINISHED_STATES)

    def finished(self) -> MethodCallQuerySet:
        """Calls in a terminal state: succeeded, failed or cancelled."""
        return self.filter(state__in=TERMINAL_STATES)


class MethodCall(models.Model):
    """One call of an ``@async_method`` (which object, which method), or one task of Django's tasks
    framework (``task_backend`` set, no object): its arguments and its fate."""

    # NULL for a task of Django's tasks framework (``task_backend``): a function has no object.
    content_type = models.ForeignKey(
        ContentType,
        on_delete=models.PROTECT,
        related_name="+",
        null=True,
        blank=True,
        help_text=_("The model of the object; empty for a task."),
    )
    # Text, so integer, UUID and string primary keys all fit; no cascading foreign key, so the
    # history outlives the object (README, States).
    object_id = models.CharField(
        max_length=255, blank=True, help_text=_("The object's primary key, as text; empty for a task.")
    )
    content_object = GenericForeignKey("content_type", "object_id")
    method = models.CharField(
        max_length=255,
        help_text=_("Registry name of the decorated method, or the dotted path of a task function."),
    )
    task_backend = models.CharField(
        max_length=100,
        blank=True,
        default="",
        help_text=_("For a task of Django's tasks framework: the TASKS alias it was enqueued on."),
    )
    queue = models.CharField(max_length=100, help_text=_("RQ queue the call is pushed to."))
    state = models.CharField(max_length=20, choices=CallState.choices, default=CallState.PENDING)

    args = models.JSONField(default=list, blank=True, help_text=_("Positional arguments, typed JSON."))
    kwargs = models.JSONField(default=dict, blank=True, help_text=_("Keyword arguments, typed JSON."))
    result = models.JSONField(null=True, blank=True, help_text=_("The method's return value, typed JSON."))
    result_note = models.TextField(blank=True, help_text=_("Why the result could not be stored, if so."))

    error_type = models.CharField(max_length=255, blank=True, help_text=_("Exception class, dotted path."))
    error = models.TextField(blank=True, help_text=_("The error message, or why the call could not run."))
    traceback = models.TextField(blank=True)

    attempts = models.PositiveIntegerField(default=0, help_text=_("Attempts started so far."))
    worker = models.CharField(max_length=255, blank=True, help_text=_("Name of the worker that ran it."))
    policy = models.JSONField(
        default=dict, blank=True, help_text=_("This call's retry and timeout options (seconds).")
    )
    attempt_log = models.JSONField(
        default=list,
        blank=True,
        help_text=_("One entry per finished attempt: worker, start, duration, outcome."),
    )
    state_reason = models.TextField(
        blank=True, help_text=_("Why the call is in its state: a failed push, a retry, a lost worker.")
    )
    run_after = models.DateTimeField(null=True, blank=True, help_text=_("When a scheduled call becomes due."))
    lease_expires_at = models.DateTimeField(
        null=True, blank=True, help_text=_("A running call whose lease expired has lost its worker.")
    )
    cancel_requested_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text=_("When a running call was asked to stop: it ends cancelled unless it succeeds."),
    )

    # NULL, not "": the partial unique constraints below must ignore calls without a key.
    unique_key = models.CharField(  # noqa: DJ001
        max_length=64,
        null=True,
        blank=True,
        editable=False,
        help_text=_("For @async_method(unique=...): at most one unfinished call holds each key."),
    )
    exclusive_key = models.CharField(  # noqa: DJ001
        max_length=255,
        null=True,
        blank=True,
        editable=False,
        help_text=_("For @async_method(exclusive=...): at most one running call holds each key."),
    )
    waits = models.PositiveIntegerField(
        default=0, help_text=_("Times a claim found the exclusive key busy, so the call waited its turn.")
    )
    progress = models.FloatField(
        null=True, blank=True, help_text=_("The running method's own report: a fraction from 0 to 1.")
    )
    progress_message = models.CharField(max_length=200, blank=True)
    progress_at = models.DateTimeField(null=True, blank=True, help_text=_("When progress was last stored."))

    created_at = models.DateTimeField(db_default=Now())
    enqueued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects: ClassVar[MethodCallQuerySet] = MethodCallQuerySet.as_manager()  # type: ignore[assignment]

    class Meta:
        verbose_name = _("method call")
        verbose_name_plural = _("method calls")
        ordering = ("-id",)
        indexes = (
            # An object's calls (for_object, the admin's object filter and its search by object id).
            models.Index(fields=["object_id", "content_type", "method"], name="asyncmodels_call_object_id"),
            # The admin's error-text search reads only calls that have an error, newest first.
            models.Index(fields=["-id"], condition=~models.Q(error=""), name="asyncmodels_call_has_error"),
            # The admin's list, newest first, filtered by state or by method.
            models.Index(fields=["state", "-id"], name="asyncmodels_call_state_id"),
            models.Index(fields=["method", "-id"], name="asyncmodels_call_method_id"),
            models.Index(fields=["queue", "-id"], name="asyncmodels_call_queue_id"),
            models.Index(fields=["created_at"], name="asyncmodels_call_created"),
            # Partial indexes for recovery: each holds only the few rows in one state, so a pass
            # over a table of millions of finished calls reads a handful of index entries.
            models.Index(
                fields=["created_at"], condition=models.Q(state="pending"), name="asyncmodels_call_pending"
            ),
            models.Index(
                fields=["enqueued_at"], condition=models.Q(state="enqueued"), name="asyncmodels_call_enqueued"
            ),
            models.Index(
                fields=["run_after"], condition=models.Q(state="scheduled"), name="asyncmodels_call_due"
            ),
            models.Index(
                fields=["lease_expires_at"],
                condition=models.Q(state="running"),
                name="asyncmodels_call_lease",
            ),
            # Retention (asyncmodels.retention): a state's calls that finished before a cutoff are one
            # range. Partial: a call enters it when it finishes (one index write), not before.
            models.Index(
                fields=["state", "finished_at"],
                condition=models.Q(finished_at__isnull=False),
                name="asyncmodels_call_finished",
            ),
            # Waiting calls: recovery's sweep, and the next turn on a busy exclusive key.
            models.Index(
                fields=["exclusive_key", "id"],
                condition=models.Q(state="waiting"),
                name="asyncmodels_call_waiting",
            ),
        )
        constraints = (
            # unique=...: a duplicate call finds the unfinished one instead of writing its own;
            # two callers racing on PostgreSQL cannot both insert (README, Unique calls).
            models.UniqueConstraint(
                fields=["unique_key"],
                condition=models.Q(state__in=sorted(UNFINISHED_STATES)),
                name="asyncmodels_call_unique_unfinished",
            ),
            # exclusive=...: the claim of a second call on a busy object fails here, and that
            # call waits its turn (README, Exclusive methods).
            models.UniqueConstraint(
                fields=["exclusive_key"],
                condition=models.Q(state="running"),
                name="asyncmodels_call_exclusive_running",
            ),
            # A call is either a method call (an object, no task backend) or a task of Django's
            # tasks framework (a task backend, no object): never both, never neither.
            models.CheckConstraint(
                condition=(
                    models.Q(content_type__isnull=False, task_backend="")
                    | (models.Q(content_type__isnull=True, object_id="") & ~models.Q(task_backend=""))
                ),
                name="asyncmodels_call_method_or_task",
            ),
        )
        permissions = (
            ("retry_methodcall", _("Can retry method calls")),
            ("cancel_methodcall", _("Can cancel method calls")),
        )

    def __str__(self) -> str:
        return f"{self.method}({self.object_id}) #{self.pk} [{self.state}]"

    @property
    def is_finished(self) -> bool:
        """Whether the call is in a terminal state."""
        return self.state in TERMINAL_STATES

    @property
    def duration(self) -> datetime.timedelta | None:
        """Time from the start of the last attempt to the end, or ``None`` if not both known."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    @property
    def return_value(self) -> Any:
        """The method's result as Python (``result`` holds its typed JSON encoding).

        Model instances in it are reloaded from the database on each access. Raises
        ``asyncmodels.exceptions.DecodingError`` if a referenced row is gone.
        """
        from .serialization import decode

        return decode(self.result)

    def get_arguments(self) -> tuple[list[Any], dict[str, Any]]:
        """The call's ``(args, kwargs)`` as Python, as the method receives them on the worker."""
        from .serialization import decode_arguments

        return decode_arguments(self.args, self.kwargs)

    @property
    def subject(self) -> str:
        """What the call runs, for log lines: ``"<app.Model.method> on <pk>"`` for a method call;
        for a task (no object) its dotted path and arguments, ``"<module.function>(1, key='x')"``
        (the arguments cut at ``SUBJECT_ARGUMENTS_LENGTH`` characters)."""
        if not self.task_backend:
            return f"{self.method} on {self.object_id}"
        from .exceptions import DecodingError

        try:
            args, kwargs = self.get_arguments()
            shown = [repr(value) for value in args] + [f"{key}={value!r}" for key, value in kwargs.items()]
        except DecodingError:  # a row that no longer decodes: show it as stored
            shown = [repr(self.args), repr(self.kwargs)]
        text = ", ".join(shown)
        if len(text) > SUBJECT_ARGUMENTS_LENGTH:
            text = text[: SUBJECT_ARGUMENTS_LENGTH - 1] + "…"
        return f"{self.method}({text})"

    @property
    def job_description(self) -> str:
        """RQ's description of the call's job (shown by RQ's worker log and dashboards):
        ``"<app.Model.method>(pk=<pk>) call #<id>"``, or for a task ``"<subject> task #<id>"``."""
        if self.task_backend:
            return f"{self.subject} task #{self.pk}"
        return f"{self.method}(pk={self.object_id}) call #{self.pk}"

    @property
    def job_id(self) -> str:
        """The RQ job id for the next push of this call: one id per database, call, attempt and
        turn waited (an exclusive call pushed again after waiting gets a new id, so the push never
        collides with the job that found the key busy, still finishing)."""
        database = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in (self._state.db or "default"))
        turn = f"-w{self.waits}" if self.waits else ""
        return f"asyncmodels-{database}-{self.pk}-{self.attempts + 1}{turn}"

    def _compare_and_set(self, from_states: frozenset[str], **changes: Any) -> bool:
        """Apply ``changes`` only if the row is still in one of ``from_states``; return whether it was."""
        rows = (
            type(self)
            ._default_manager.using(self._state.db)
            .filter(pk=self.pk, state__in=from_states)
            .update(**changes)
        )
        return rows == 1

    def mark_enqueued(self) -> bool:
        """``pending`` → ``enqueued`` after a successful push; return whether this process won."""
        won = self._compare_and_set(
            frozenset({CallState.PENDING}),
            state=CallState.ENQUEUED,
            enqueued_at=Now(),
            state_reason=reason_after_push(),
        )
        if won:
            self.state = CallState.ENQUEUED
        return won

    @property
    def can_cancel(self) -> bool:
        """Whether ``cancel()`` would act on the call as last read: it has not finished, and a
        running call has not been asked to stop already."""
        if self.state == CallState.RUNNING:
            return self.cancel_requested_at is None
        return self.state in CANCELLABLE_STATES

    @property
    def can_retry(self) -> bool:
        """Whether ``retry()`` would act on the call as last read: it ``failed`` or was ``cancelled``."""
        return self.state in RETRYABLE_STATES

    def cancel(self, *, reason: str = "") -> bool:
        """Cancel the call, or ask it to stop if it is running; return ``True`` if this did either.

        A call that has not started (``pending``, ``scheduled``, ``waiting``, ``enqueued``) is
        cancelled at once, by a compare-and-set; a job already in RQ then finds it cancelled and
        does nothing. A ``running`` call is asked to stop: ``cancel_requested_at`` is set, and
        nothing interrupts the method, but no further attempt follows. When the running attempt
        ends, the call is ``cancelled`` if the attempt failed, timed out or lost its worker (its
        error is kept), and ``succeeded`` if the method returned first (the work was done). A
        finished call, or a running one already asked to stop, is left alone: ``False``.

        ``reason`` (str, cut at 2,000 characters) replaces ``state_reason`` (a push failure's or a
        backoff's reason no longer applies). The object is refreshed from the database either way.
        """
        reason = reason[:2000]
        # One UPDATE for both cases: an attempt that fails meanwhile (running -> scheduled) is
        # then cancelled, not missed between two statements. PostgreSQL re-checks the WHERE and
        # the CASEs on the row as the attempt left it.
        not_started = models.Q(state__in=CANCELLABLE_STATES)
        running = models.Q(state=CallState.RUNNING, cancel_requested_at__isnull=True)

        def per_case(if_not_started: Any, if_running: Any, field: models.Field[Any, Any]) -> models.Case:
            return models.Case(
                models.When(not_started, then=if_not_started), default=if_running, output_field=field
            )

        won = (
            type(self)
            ._default_manager.using(self._state.db)
            .filter(not_started | running, pk=self.pk)
            .update(
                state=per_case(models.Value(CallState.CANCELLED), models.F("state"), models.CharField()),
                finished_at=per_case(Now(), models.F("finished_at"), models.DateTimeField()),
                cancel_requested_at=per_case(models.F("cancel_requested_at"), Now(), models.DateTimeField()),
                state_reason=per_case(
                    models.Value(reason or "Cancelled before it started."),
                    models.Value(reason or "Asked to stop while running."),
                    models.TextField(),
                ),
            )
            == 1
        )
        self.refresh_from_db()
        if won and self.state == CallState.CANCELLED:
            from . import dependencies, signals

            signals.send(signals.call_cancelled, self, reason=self.state_reason)
            dependencies.settle_dependents(self)
        return won

    def cancel_requested(self) -> bool:
        """Whether this running call was asked to stop (``cancel()``): one query, reading
        ``cancel_requested_at`` afresh from the database. For the method to check at safe points."""
        self.cancel_requested_at = (
            type(self)
            ._default_manager.using(self._state.db)
            .filter(pk=self.pk)
            .values_list("cancel_requested_at", flat=True)
            .first()
        )
        return self.cancel_requested_at is not None

    def raise_if_cancel_requested(self) -> None:
        """Raise ``asyncmodels.exceptions.CallCancelledError`` if the call was asked to stop.

        Call it inside the method (``asyncmodels.current_call().raise_if_cancel_requested()``)
        between steps: the attempt ends there, recorded as ``cancelled``, and the call ends
        ``cancelled`` with no retry. One query per check.
        """
        if self.cancel_requested():
            from .exceptions import CallCancelledError

            raise CallCancelledError(f"Call #{self.pk} was asked to stop; it stopped at a safe point.")

    def retry(self, *, reason: str = "") -> bool:
        """Give a ``failed`` or ``cancelled`` call a new attempt; return ``True`` if this did.

        A compare-and-set to ``pending``; the push is registered with ``transaction.on_commit``
        on the call's database, as for a new call, so a rollback undoes the retry and pushes
        nothing. A ``succeeded`` call, or one not finished, is left alone and ``False`` is
        returned (running a succeeded method twice is what this library exists to prevent).

        The retry is one more attempt: ``attempts`` keeps counting, and automatic retries
        (``retries=``) follow it only while the method's budget of attempts is not used up. The
        last error stays on the row until the new attempt ends; every earlier attempt stays in
        ``attempt_log``. ``reason`` (str, cut at 2,000 characters) is kept in ``state_reason``
        until a worker claims the call. The object is refreshed from the database either way.
        ``created_at`` stays the first call's: recovery may push the retried call again right
        away, which its unique job id and the claim's compare-and-set make harmless.

        Raises ``asyncmodels.exceptions.UnknownQueueError`` (and changes nothing) if the call's
        queue is no longer in ``settings.RQ_QUEUES``: the retry could only fail again.
        """
        from . import conf, dispatch, signals
        from .exceptions import DuplicateCallError, UnknownQueueError

        # Retryable states are terminal: a row that was one when read is still it if the retry wins.
        previous = self.state if self.state in RETRYABLE_STATES else None
        queues = conf.get_rq_queue_names()
        database = self._state.db or "default"
        # A call with dependencies waits for them again (they may have been retried too).
        has_dependencies = MethodCallDependency._default_manager.using(database).filter(call=self.pk).exists()
        try:
            with transaction.atomic(using=database):  # a savepoint: the IntegrityError stays ours
                won = (
                    type(self)
                    ._default_manager.using(database)
                    .filter(pk=self.pk, state__in=RETRYABLE_STATES, queue__in=queues)
                    .update(
                        state=CallState.WAITING if has_dependencies else CallState.PENDING,
                        finished_at=None,
                        run_after=None,
                        lease_expires_at=None,
                        cancel_requested_at=None,
                        progress=None,
                        progress_message="",
                        state_reason=(reason or "Retried by hand.")[:2000],
                    )
                    == 1
                )
        except IntegrityError:
            duplicate = (
                type(self)
                ._default_manager.using(database)
                .filter(unique_key=self.unique_key, state__in=UNFINISHED_STATES)
                .exclude(pk=self.pk)
                .values_list("pk", flat=True)
                .first()
            )
            if self.unique_key is None or duplicate is None:
                raise
            raise DuplicateCallError(
                f"Call #{self.pk} is unique per object and arguments, and call #{duplicate} with the same "
                "key is not finished; it was not retried."
            ) from None
        self.refresh_from_db()
        if not won and self.state in RETRYABLE_STATES and self.queue not in queues:
            raise UnknownQueueError(
                f"queue {self.queue!r} of call #{self.pk} is no longer in settings.RQ_QUEUES; restore it "
                "before retrying the call."
            )
        if won:
            signals.send(
                signals.call_retried,
                self,
                previous_state=previous,
                attempt=self.attempts + 1,
                reason=self.state_reason,
                automatic=False,
                delay=None,
            )
        if won and self.state == CallState.WAITING:
            from . import dependencies

            dependencies.settle_on_commit(self)
        elif won:
            dispatch.push_on_commit(self)
        return won

    @property
    def tags(self) -> list[str]:
        """This call's tags as stored text (``"cloud.account:121"``, ``"region:eu"``); one query."""
        return list(
            MethodCallTag._default_manager.using(self._state.db)
            .filter(call=self.pk)
            .order_by("id")
            .values_list("tag", flat=True)
        )

    def report_progress(self, fraction: float, message: str = "") -> bool:
        """Store how far the running method is: ``fraction`` from 0.0 to 1.0, and a short message.

        For the method itself, through ``asyncmodels.current_call().report_progress(0.5, "half")``.
        Throttled: at most one write per ``PROGRESS_INTERVAL_SECONDS`` (setting, default 1 s) per
        call object, except the first report and ``fraction == 1.0``, which are always stored, so a
        loop may report on every item. Returns whether this report was written. ``message`` is cut
        at 200 characters. Raises ``ValueError`` for a fraction outside 0..1 (or not a number).
        Written only while this attempt is the running one (a compare-and-set like the job's).
        """
        import math
        import time

        from . import conf
        from .job import _storable_text

        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ValueError(f"progress must be a number from 0 to 1, not {fraction!r}.")
        try:
            value = float(fraction)
        except OverflowError:
            value = math.inf
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise ValueError(f"progress must be from 0 to 1, not {str(fraction)[:40]}.")
        fraction = value
        message = _storable_text(str(message))[:200]  # NUL and lone surrogates escaped
        now = time.monotonic()
        last = getattr(self, "_progress_written", None)
        interval = conf.get_duration("PROGRESS_INTERVAL_SECONDS").total_seconds()
        if last is not None and now - last < interval and fraction < 1:
            return False
        self._progress_written = now
        self.progress, self.progress_message = float(fraction), message
        return (
            type(self)
            ._default_manager.using(self._state.db)
            .filter(pk=self.pk, state=CallState.RUNNING, attempts=self.attempts)
            .update(progress=float(fraction), progress_message=message, progress_at=Now())
            == 1
        )


class MethodCallTag(models.Model):
    """One tag of one call (``@async_method(tags=...)``); see ``asyncmodels.tags``."""

    call = models.ForeignKey(MethodCall, on_delete=models.CASCADE, related_name="tag_set")
    tag = models.CharField(max_length=255, help_text=_("A model as 'app_label.model:pk', or any text."))

    class Meta:
        verbose_name = _("method call tag")
        verbose_name_plural = _("method call tags")
        constraints = (
            # Also the index for_object() and tagged() read: tag first, then the call's id.
            models.UniqueConstraint(fields=["tag", "call"], name="asyncmodels_tag_call"),
        )

    def __str__(self) -> str:
        return self.tag


class MethodCallDependency(models.Model):
    """``call`` waits for ``depends_on`` to succeed (``using(after=[...])``); see ``dependencies``."""

    call = models.ForeignKey(MethodCall, on_delete=models.CASCADE, related_name="dependency_set")
    depends_on = models.ForeignKey(MethodCall, on_delete=models.CASCADE, related_name="dependent_set")

    class Meta:
        verbose_name = _("method call dependency")
        verbose_name_plural = _("method call dependencies")
        constraints = (
            # Also the index of a call's own dependencies; depends_on has its foreign-key index.
            models.UniqueConstraint(fields=["call", "depends_on"], name="asyncmodels_dependency_pair"),
        )

    def __str__(self) -> str:
        return f"#{self.call_id} after #{self.depends_on_id}"


def updates_return_rows(database: str) -> bool:
    """Whether ``database`` can return the rows an ``UPDATE`` changed (``UPDATE … RETURNING``):
    PostgreSQL, and SQLite from 3.35 (the release that added ``RETURNING``, for ``INSERT`` and
    ``UPDATE`` alike, which Django reports as ``can_return_columns_from_insert``)."""
    from django.db import connections

    connection = connections[database]
    return (
        connection.vendor in {"postgresql", "sqlite"} and connection.features.can_return_columns_from_insert
    )


M = TypeVar("M", bound=models.Model)


def update_returning(queryset: models.QuerySet[M], changes: dict[str, Any]) -> tuple[int, list[M]]:
    """``queryset.update(**changes)`` that also returns the changed rows, as instances, in the
    same statement (``UPDATE … RETURNING`` every concrete column; see ``updates_return_rows``).

    Returns ``(rows changed, instances)``. The instances are empty, with the count still right,
    if a returned value cannot be converted (a forged or corrupt row): the caller reads the row
    again to say why. Raises what ``update()`` raises (``IntegrityError`` and so on).
    """
    from django.db import connections

    model = queryset.model
    database = queryset.db
    quote = connections[database].ops.quote_name
    fields = list(model._meta.concrete_fields)
    rows = update_returning_sql(queryset, changes, ", ".join(quote(str(field.column)) for field in fields))
    try:
        compiler = queryset.query.get_compiler(database)
        converters = compiler.get_converters([field.get_col(model._meta.db_table) for field in fields])
        names = [field.attname for field in fields]
        instances = [
            model.from_db(database, names, values) for values in compiler.apply_converters(rows, converters)
        ]
    except Exception:
        return len(rows), []
    return len(rows), instances


def update_returning_sql(
    queryset: models.QuerySet[Any], changes: dict[str, Any], returning: str
) -> list[Any]:
    """Run ``queryset.update(**changes)`` as ``UPDATE … RETURNING <returning>`` (SQL, evaluated on
    each changed row; see ``updates_return_rows``) and return the raw rows."""
    from django.db import connections
    from django.db.models.sql import UpdateQuery

    query = cast(UpdateQuery, queryset.query.chain(UpdateQuery))
    query.add_update_values(changes)
    sql, params = query.get_compiler(queryset.db).as_sql()
    with connections[queryset.db].cursor() as cursor:
        cursor.execute(f"{sql} RETURNING {returning}", params)
        return list(cursor.fetchall())


class Slot(models.Expression):
    """A value left open in an ``UPDATE`` compiled once (``CompiledUpdate``): it compiles to one
    placeholder, whose parameter each run fills in, prepared as ``output_field`` saves it."""

    def __init__(self, name: str, output_field: models.Field[Any, Any]) -> None:
        super().__init__(output_field=output_field)
        self.name = name

    def as_sql(self, compiler: Any, connection: Any) -> tuple[str, tuple[str | int, ...]]:
        # The Slot itself marks its parameter's place until a run fills it (the stubs type
        # parameters as the values they usually are).
        return "%s", cast(tuple[str | int, ...], (self,))


class CompiledUpdate:
    """An ``UPDATE … RETURNING`` built and compiled by the ORM once per database, then run with
    new values for its slots (``Slot``).

    Building a queryset and compiling it took more Python than PostgreSQL took to run the
    statement (~0.7 ms of the ~1.5 ms a job's claim cost): the job's two statements have the
    same shape for every call, so only their values change. ``build(database)`` returns the
    queryset, the changes (``Slot`` where a run gives the value) and the SQL to return.
    Only where ``updates_return_rows(database)``.
    """

    def __init__(self, build: Callable[[str], tuple[models.QuerySet[Any], dict[str, Any], str]]) -> None:
        self._build = build
        self._compiled: dict[str, tuple[str, tuple[Any, ...]]] = {}

    def _compile(self, database: str) -> tuple[str, tuple[Any, ...]]:
        from django.db.models.sql import UpdateQuery

        compiled = self._compiled.get(database)
        if compiled is None:
            queryset, changes, returning = self._build(database)
            query = cast(UpdateQuery, queryset.query.chain(UpdateQuery))
            query.add_update_values(changes)
            sql, params = query.get_compiler(database).as_sql()
            compiled = self._compiled[database] = (f"{sql} RETURNING {returning}", tuple(params))
        return compiled

    def run(self, database: str, **values: Any) -> list[Any]:
        """Run the statement on ``database`` with ``values`` (one per ``Slot`` name); return the
        raw rows. Raises ``KeyError`` for a missing value, and what the database raises."""
        sql, params = self._compile(database)
        return run_with_slots(database, sql, params, values)

    def compiled(self, database: str) -> tuple[str, tuple[Any, ...]]:
        """The statement's SQL on ``database`` and its parameters (``Slot`` where a run fills
        one in), to build a larger statement around it (``run_with_slots`` runs that)."""
        return self._compile(database)


def run_with_slots(database: str, sql: str, params: Any, values: dict[str, Any]) -> list[Any]:
    """Run ``sql`` on ``database`` with ``params``, each ``Slot`` among them filled from ``values``
    by its name (prepared as its field saves it); return the raw rows. Raises ``KeyError`` for a
    missing value, and what the database raises."""
    from django.db import connections

    connection = connections[database]
    filled = [
        param.output_field.get_db_prep_save(values[param.name], connection)
        if isinstance(param, Slot)
        else param
        for param in params
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, filled)
        return list(cursor.fetchall())


class CompiledGet:
    """``model._base_manager.db_manager(database).get(pk=…)``, compiled once per model and database.

    The job reloads its object by primary key for every call; building and compiling that
    query cost about twice what PostgreSQL took to answer it. The statement is the ORM's own
    (the base manager's queryset, filtered on the pk), compiled on first use, then run with a
    new pk each time and loaded as ``ModelIterable`` would load it (``Model.from_db``, the
    fields' converters). A base manager whose queryset adds related models, annotations,
    extra columns or deferred fields is not compiled: ``get()`` runs as usual for it.
    """

    def __init__(self) -> None:
        self._compiled: dict[tuple[type[models.Model], str], CompiledSelect | None] = {}

    def get(self, model: type[M], database: str, pk: Any) -> M:
        """The ``model`` instance on ``database`` whose pk is ``pk`` (any value the pk field's
        ``get_prep_value`` accepts, e.g. its string form).

        Raises ``model.DoesNotExist`` if there is none; ``ValueError``, ``TypeError`` or
        ``ValidationError`` for a value the pk field rejects (as ``get()`` does); and what the
        database raises.
        """
        from django.db import connections

        key = (model, database)
        if key not in self._compiled:
            self._compiled[key] = CompiledSelect.of(model, database)
        compiled = self._compiled[key]
        if compiled is None:
            return model._base_manager.db_manager(database).get(pk=pk)
        connection = connections[database]
        pk_field = model._meta.pk
        value = pk_field.get_db_prep_value(pk, connection, prepared=False)
        if isinstance(value, int) and not _in_integer_range(connection, pk_field, value):
            # As the ORM's lookup does: no row can hold it (and SQLite's driver would overflow).
            raise model.DoesNotExist(f"{model._meta.object_name} matching query does not exist.")  # type: ignore[attr-defined]
        params = [value if isinstance(param, Slot) else param for param in compiled.params]
        with connection.cursor() as cursor:
            cursor.execute(compiled.sql, params)
            rows = cursor.fetchall()
        if not rows:
            raise model.DoesNotExist(f"{model._meta.object_name} matching query does not exist.")  # type: ignore[attr-defined]
        return compiled.load(database, model, rows[0])


def _in_integer_range(connection: Any, field: models.Field[Any, Any], value: int) -> bool:
    """Whether ``value`` fits the integer column of ``field`` on ``connection`` (the backend's
    ``integer_field_range``; a field type it does not list is taken to fit)."""
    try:
        low, high = connection.ops.integer_field_range(field.get_internal_type())
    except KeyError:
        return True
    return (low is None or value >= low) and (high is None or value <= high)


class CompiledSelect:
    """The compiled pk lookup of ``CompiledGet``: SQL, parameters (a ``Slot`` for the pk), and
    how to load a row (attribute names in select order, the converters, the compiler)."""

    def __init__(
        self, sql: str, params: tuple[Any, ...], names: list[str], converters: Any, compiler: Any
    ) -> None:
        self.sql, self.params, self.names = sql, params, names
        self.converters, self.compiler = converters, compiler

    def load(self, database: str, model: type[M], row: Any) -> M:
        """The ``model`` instance from ``row`` (this statement's columns, in order)."""
        if self.converters:
            [row] = self.compiler.apply_converters([row], self.converters)
        return model.from_db(database, self.names, row)

    @classmethod
    def of(
        cls, model: type[models.Model], database: str, pk: models.Expression | None = None
    ) -> CompiledSelect | None:
        """Compile ``model``'s lookup on ``database`` of the pk ``pk`` (an expression; by default
        a ``Slot`` named "pk"), or ``None`` if its base manager's queryset loads more than the
        model's own columns (then ``get()`` is used)."""
        pk_field = model._meta.pk
        try:
            lookup = Slot("pk", pk_field) if pk is None else pk
            query = model._base_manager.db_manager(database).filter(pk=lookup).query
        except Exception:  # a pk lookup the ORM builds another way (an unusual pk): use get()
            return None
        if (
            query.select_related is not False
            or query.annotations
            or query.extra
            or query.deferred_loading != (frozenset(), True)
            or not query.default_cols
            or query.combinator
            or query.distinct
        ):
            return None
        compiler = query.get_compiler(database)
        try:
            sql, params = compiler.as_sql()
        except Exception:
            return None
        klass_info = compiler.klass_info
        if (
            not klass_info
            or klass_info["model"] is not model
            or klass_info.get("related_klass_infos")
            or compiler.annotation_col_map
            or sum(isinstance(param, Slot) for param in params) != (1 if pk is None else 0)
        ):
            return None
        select_fields = klass_info["select_fields"]
        if select_fields != list(range(len(compiler.select))):
            return None
        columns = [column for column, _sql, _alias in compiler.select]
        names = [column.target.attname for column in columns]
        return cls(sql, tuple(params), names, compiler.get_converters(columns), compiler)


def returned_calls(database: str, rows: list[Any]) -> list[MethodCall]:
    """``MethodCall`` instances from rows holding every concrete column (``all_columns_sql``), in
    order. Raises what converting a value raises (a forged or corrupt row)."""
    loader = _CALL_LOADERS.get(database)
    if loader is None:
        fields = list(MethodCall._meta.concrete_fields)
        compiler = MethodCall._default_manager.using(database).query.get_compiler(database)
        converters = compiler.get_converters([field.get_col(MethodCall._meta.db_table) for field in fields])
        loader = _CALL_LOADERS[database] = (compiler, converters, [field.attname for field in fields])
    compiler, converters, names = loader
    return [
        MethodCall.from_db(database, names, values) for values in compiler.apply_converters(rows, converters)
    ]


#: Per database: the compiler, column converters and attribute names ``returned_calls`` loads with.
_CALL_LOADERS: dict[str, tuple[Any, Any, list[str]]] = {}


def all_columns_sql(database: str) -> str:
    """Every concrete column of ``MethodCall``, quoted for ``database``, to return from an ``UPDATE``."""
    from django.db import connections

    quote = connections[database].ops.quote_name
    return ", ".join(quote(str(field.column)) for field in MethodCall._meta.concrete_fields)


def has_dependents_sql(database: str) -> str:
    """SQL true for a ``MethodCall`` row that some call waits for (``MethodCallDependency``), to
    return from an ``UPDATE`` of that row (``update_returning_sql``)."""
    from django.db import connections

    quote = connections[database].ops.quote_name
    links = quote(MethodCallDependency._meta.db_table)
    calls = quote(MethodCall._meta.db_table)
    depends_on = quote(str(MethodCallDependency._meta.get_field("depends_on").column))
    pk = quote(str(MethodCall._meta.pk.column))
    # Quoted names from the models' own metadata: no value of anyone's is spliced in.
    return f"EXISTS (SELECT 1 FROM {links} WHERE {links}.{depends_on} = {calls}.{pk})"  # noqa: S608


def database_now(database: str) -> datetime.datetime:
    """The clock of ``database`` (Django's ``Now()``, the one every due-ness and grace check reads),
    as an aware ``datetime``: one ``SELECT``. For many rows written with one timestamp, where an
    expression per row would be compiled once per row."""
    from django.db import connections

    compiler = MethodCall._default_manager.using(database).query.get_compiler(database)
    now = Now()
    sql, params = compiler.compile(now)
    with connections[database].cursor() as cursor:
        cursor.execute(f"SELECT {sql}", params)
        rows = cursor.fetchall()
    [[value]] = compiler.apply_converters(rows, compiler.get_converters([now]))
    return cast(datetime.datetime, value)
