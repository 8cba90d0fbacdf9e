"""``@async_method``: turn a model method into a durable call that a worker runs after commit."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import inspect
import json
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, overload

from django.db import IntegrityError, models, transaction
from django.db.models.functions import Now

from . import conf, dependencies, dispatch, exclusive, registry, serialization, tags
from .exceptions import (
    EncodingError,
    InvalidArgumentsError,
    InvalidDependencyError,
    InvalidOptionError,
    RegistrationError,
    UnknownQueueError,
    UnsavedInstanceError,
    UnsupportedArgumentError,
)
from .options import FIXED_PER_METHOD, MethodOptions, build_options
from .registry import RegisteredMethod

if TYPE_CHECKING:
    from .models import MethodCall, MethodCallQuerySet


class AsyncMethod:
    """The class attribute ``@async_method`` leaves on a model; instances get ``BoundAsyncMethod``.

    It has a ``contribute_to_class()`` so Django's model metaclass hands it the finished model
    class; registration itself happens on ``class_prepared`` (see ``asyncmodels.registry``).
    """

    __name__: str
    __doc__: str | None

    def __init__(self, function: Callable[..., Any], options: MethodOptions, name: str | None) -> None:
        self.function = function
        self.options = options
        self.name = name
        self.owner: type[models.Model] | None = None
        self.attribute = function.__name__
        functools.update_wrapper(self, function)

    def contribute_to_class(self, cls: type[models.Model], name: str, **kwargs: Any) -> None:
        """Called by Django's model metaclass; a plain class would call ``__set_name__`` instead."""
        self.owner = cls
        self.attribute = name
        setattr(cls, name, self)

    def __set_name__(self, owner: type, name: str) -> None:
        # Django's ModelBase routes objects with contribute_to_class() around type.__new__, so this
        # only runs when the decorator sits in a class that is not a Django model.
        if not (isinstance(owner, type) and issubclass(owner, models.Model)):
            raise RegistrationError(
                f"@async_method decorates {owner.__qualname__}.{name}, but {owner.__qualname__} is not a "
                "Django model. Async methods must be methods of a model, so a worker can reload the object."
            )

    def __call__(self, instance: models.Model, /, *args: Any, **kwargs: Any) -> MethodCall:
        """``Model.method(instance, ...)``: the same as ``instance.method(...)``."""
        if not isinstance(instance, models.Model):
            raise InvalidArgumentsError(
                f"{self.attribute}() called on the class needs a model instance first, not {instance!r}."
            )
        return self.__get__(instance, type(instance))(*args, **kwargs)

    def bulk_call(self, instances: Iterable[models.Model], /, *args: Any, **kwargs: Any) -> list[MethodCall]:
        """Call this method on each of ``instances`` (saved instances of the model, on any
        database) with the same arguments: ``Instance.provision.bulk_call(queryset, size="large")``.

        One ``INSERT`` of the calls per database (plus one of their tags), in one transaction or a
        savepoint of the caller's, pushed on commit in one Redis pipeline (written ``enqueued``,
        or ``pending`` and marked in one ``UPDATE`` inside a savepoint; see
        ``dispatch.enqueued_at_insert``): for "do this to ten thousand rows". Every check of a
        single call runs first, and any failure refuses the whole batch, writing nothing:
        ``UnsavedInstanceError`` (also for an object of another model), ``InvalidArgumentsError``,
        ``UnsupportedArgumentError``, ``UnknownQueueError``, ``InvalidTagError``. The method's
        options apply (``unique``: an object with an unfinished call gets it back); ``result_of()``
        and ``using(after=..., run_after=...)`` are for single calls. Returns the calls, one per
        object in the order given.
        """
        if self.owner is None:
            raise RegistrationError(f"{self.attribute} is not a method of a prepared model.")
        entry = registry.get_method_for(self.owner, self.attribute)
        if entry is None:
            raise RegistrationError(
                f"{self.owner._meta.label}.{self.attribute} is not registered; call bulk_call() on the "
                "concrete model's method."
            )
        return make_calls(entry, instances, args, kwargs, entry.options)

    def calls_for(self, instance: models.Model) -> MethodCallQuerySet:
        """Calls of this method about ``instance``: made on it, or tagged with it (see
        ``MethodCallQuerySet.for_object``), on its database. ``Instance.provision.calls_for(account)``
        answers "which provisions of this account's instances"; chain ``.failed()`` and so on.
        """
        from .models import MethodCall

        names = [entry.name for entry in registry.all_methods() if entry.function is self.function]
        database = instance._state.db or "default"
        return MethodCall.objects.using(database).for_object(instance).filter(method__in=names)

    @overload
    def __get__(self, instance: None, owner: type[models.Model]) -> AsyncMethod: ...

    @overload
    def __get__(self, instance: models.Model, owner: type[models.Model]) -> BoundAsyncMethod: ...

    def __get__(
        self, instance: models.Model | None, owner: type[models.Model]
    ) -> AsyncMethod | BoundAsyncMethod:
        if instance is None:
            return self
        entry = registry.get_method_for(type(instance), self.attribute)
        if entry is None:
            raise RegistrationError(
                f"{type(instance)._meta.label}.{self.attribute} is not registered; async methods work "
                "on concrete models that Django has prepared."
            )
        return BoundAsyncMethod(entry, instance, entry.options)


class BoundAsyncMethod:
    """``instance.method``: calling it records a ``MethodCall``; see ``now()``, ``using()``, ``calls()``."""

    __name__: str
    __doc__: str | None

    def __init__(
        self,
        entry: RegisteredMethod,
        instance: models.Model,
        options: MethodOptions,
        run_after: datetime.datetime | datetime.timedelta | None = None,
        after: tuple[Any, ...] = (),
    ) -> None:
        self.entry = entry
        self.instance = instance
        self.options = options
        self.run_after = run_after
        self.after = after
        functools.update_wrapper(self, entry.function)

    def __repr__(self) -> str:
        return f"<async method {self.entry.name} of {self.instance!r}>"

    def __call__(self, *args: Any, **kwargs: Any) -> MethodCall:
        """Record the call and push it to the queue when the instance's database commits.

        Returns the new ``MethodCall``: ``pending`` inside a transaction; outside one the push
        happens at once (``refresh_from_db()`` shows the current state). Raises, writing nothing:
        ``UnsavedInstanceError``, ``InvalidArgumentsError``, ``UnsupportedArgumentError``,
        ``UnknownQueueError``, ``InvalidTagError``, ``InvalidDependencyError``. Inside
        ``transaction.atomic()`` the row is part of the caller's transaction; a rollback leaves
        no row and pushes nothing. For a ``unique`` method, a duplicate of an unfinished call
        returns that call and writes nothing.
        """
        return make_call(self.entry, self.instance, args, kwargs, self.options, self.run_after, self.after)

    def now(self, *args: Any, **kwargs: Any) -> Any:
        """Run the method here and now, without a record, and return its own result."""
        return self.entry.function(self.instance, *args, **kwargs)

    def using(self, *, run_after: Any = None, after: Any = (), **options: Any) -> BoundAsyncMethod:
        """Return this method with options overridden for one call: ``using(queue="urgent")(...)``.

        ``run_after`` (``timedelta`` from now, by the database's clock, or an aware ``datetime``)
        makes the call ``scheduled``: it is pushed once due. ``after`` (a list of ``MethodCall``
        on the same database, or one) makes it ``waiting`` until all of them succeeded, and cancels it
        if one fails or is cancelled (``asyncmodels.dependencies``). Any ``@async_method``
        option but ``retry_on``, ``tags``, ``unique`` and ``exclusive`` may be overridden.
        Raises ``InvalidOptionError`` for an unknown option, a bad value or a naive
        ``datetime``; ``after`` is checked when the call is made (``InvalidDependencyError``).
        """
        where = f"{self.entry.name}.using()"
        fixed = sorted(set(options) & FIXED_PER_METHOD)
        if fixed:
            raise InvalidOptionError(f"{where}: {', '.join(fixed)} is set per method, in @async_method(...).")
        accepted = {f.name for f in dataclasses.fields(MethodOptions)} - FIXED_PER_METHOD | {
            "run_after",
            "after",
        }
        merged = build_options(where, self.options, accepted=accepted, **options)
        from .models import MethodCall

        if isinstance(after, MethodCall):
            after = (after,)  # one call: after=call_a is after=[call_a]
        if isinstance(after, (str, bytes)) or not isinstance(after, (list, tuple, set, frozenset)):
            raise InvalidDependencyError(f"{where}: after= must be a list of MethodCall, not {after!r}.")
        return BoundAsyncMethod(
            self.entry,
            self.instance,
            merged,
            _check_run_after(run_after, where) if run_after is not None else self.run_after,
            (*self.after, *after),
        )

    def calls(self) -> MethodCallQuerySet:
        """This object's calls of this method, newest first, on the instance's database."""
        from .models import MethodCall

        database = self.instance._state.db or "default"
        return MethodCall.objects.using(database).own_calls(self.instance).for_method(self.entry.name)

    def calls_for(self, instance: models.Model) -> MethodCallQuerySet:
        """Calls of this method made on ``instance`` or tagged with it (``AsyncMethod.calls_for``)."""
        from .models import MethodCall

        database = instance._state.db or "default"
        return MethodCall.objects.using(database).for_object(instance).for_method(self.entry.name)


#: The furthest ahead a call may be scheduled by a timedelta (the database adds it to its clock).
MAX_RUN_AFTER = datetime.timedelta(days=3650)


def _check_run_after(value: Any, where: str) -> datetime.datetime | datetime.timedelta | None:
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidOptionError(
                f"{where}: run_after is a naive datetime ({value.isoformat()}); pass an aware one "
                "(django.utils.timezone.now() + ...) or a timedelta."
            )
        return value
    if isinstance(value, datetime.timedelta):
        if not datetime.timedelta(0) <= value <= MAX_RUN_AFTER:
            raise InvalidOptionError(
                f"{where}: run_after must be a timedelta from 0 to {MAX_RUN_AFTER.days} days, not {value}."
            )
        return value
    raise InvalidOptionError(f"{where}: run_after must be a timedelta or an aware datetime, not {value!r}.")


def _refuse_unexpected_keywords(entry: RegisteredMethod, kwargs: dict[str, Any], label: str) -> None:
    """Name a misspelt keyword, before ``bind()`` complains about the argument it was meant to be."""
    parameters = list(entry.signature.parameters.values())[1:]  # without self
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
        return
    accepted = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unexpected = sorted(set(kwargs) - set(accepted))
    if unexpected:
        raise InvalidArgumentsError(
            f"{label}(): got an unexpected keyword argument {unexpected[0]!r} "
            f"(it accepts: {', '.join(accepted) or 'no keyword arguments'})."
        )


def make_call(
    entry: RegisteredMethod,
    instance: models.Model,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: MethodOptions,
    run_after: datetime.datetime | datetime.timedelta | None = None,
    after: tuple[Any, ...] = (),
) -> MethodCall:
    """Validate a call, write its ``MethodCall`` row and register the push on commit.

    Every check runs before the INSERT, so a refused call writes nothing. The row goes to the
    instance's own database (``instance._state.db``); the push is registered with
    ``transaction.on_commit(..., using=that database, robust=True)``, so a failing push is
    logged and never breaks the caller's commit. The row, its tags and its dependencies are
    written together (one transaction, or a savepoint in the caller's).

    A ``unique`` call first looks for an unfinished call with its key (one query) and returns
    it if there is one. Otherwise it inserts in a savepoint: if a concurrent caller inserted
    the same key first, the database's unique constraint refuses ours and that call is
    returned instead.
    """
    from django.contrib.contenttypes.models import ContentType

    from .models import CallState, MethodCall, MethodCallDependency, MethodCallTag

    label = f"{entry.model._meta.label}.{entry.attribute}"
    _check_saved(instance, entry, label)
    encoded_args, encoded_kwargs = _check_arguments(entry, instance, args, kwargs, options, label)

    database = instance._state.db or "default"
    call_tags = tags.tags_of(options.tags, instance, label)
    waits_for = dependencies.check_dependencies(
        [*after, *dependencies.result_references([encoded_args, encoded_kwargs])], database, label
    )
    unique_key = _unique_key(entry, instance, args, kwargs, options)
    if unique_key is not None:
        existing = _unfinished_with_key(database, unique_key)
        if existing is not None:
            return existing  # the duplicate path: one query, nothing written, nothing pushed
    if waits_for:
        state, reason = CallState.WAITING, dependencies.waiting_reason(waits_for)
    elif run_after is not None:
        state, reason = CallState.SCHEDULED, ""
    elif dispatch.enqueued_at_insert(database):  # its push is certain at the commit: no UPDATE after it
        state, reason = CallState.ENQUEUED, ""
    else:
        state, reason = CallState.PENDING, ""
    content_type = ContentType.objects.db_manager(database).get_for_model(instance)
    row = MethodCall(
        content_type=content_type,
        object_id=str(instance.pk),
        method=entry.name,
        queue=options.queue,
        args=encoded_args,
        kwargs=encoded_kwargs,
        policy=options.to_policy(),
        state=state,
        state_reason=reason,
        enqueued_at=Now() if state == CallState.ENQUEUED else None,
        # A delay counts from the database's clock, like every due-ness check.
        run_after=Now() + run_after if isinstance(run_after, datetime.timedelta) else run_after,
        unique_key=unique_key,
        exclusive_key=_exclusive_key(entry, instance, options),
    )

    def write() -> MethodCall:
        setattr(row, dispatch.WRITTEN_AT, time.monotonic())  # before the INSERT takes enqueued_at
        row.save(using=database, force_insert=True)
        if call_tags:
            MethodCallTag.objects.using(database).bulk_create(
                MethodCallTag(call=row, tag=tag) for tag in call_tags
            )
        if waits_for:
            MethodCallDependency.objects.using(database).bulk_create(
                MethodCallDependency(call=row, depends_on_id=call_id) for call_id in waits_for
            )
        return row

    if unique_key is not None:
        for last_try in (False, True):
            try:
                with transaction.atomic(using=database):  # a savepoint: a lost race stays ours
                    call = write()
                break
            except IntegrityError:
                existing = _unfinished_with_key(database, unique_key)
                if existing is not None:
                    return existing
                if last_try:
                    raise
                # The call that won the race has finished already: the key is free again.
                row.pk = None
                row._state.adding = True
    elif call_tags or waits_for:
        with transaction.atomic(using=database, savepoint=False):
            call = write()
    else:
        call = write()
    if isinstance(run_after, datetime.timedelta):
        call.refresh_from_db(fields=["run_after"])
    if state == CallState.ENQUEUED:
        call.enqueued_at = call.created_at  # both the INSERT's Now(), returned with the row

    if state == CallState.WAITING:
        dependencies.settle_on_commit(call)
    else:
        dispatch.push_on_commit(call, scheduled=state == CallState.SCHEDULED)
    return call


def _check_saved(instance: models.Model, entry: RegisteredMethod, label: str) -> None:
    if not isinstance(instance, entry.model) or instance._state.adding or instance.pk is None:
        what = "an unsaved" if isinstance(instance, entry.model) else "not a"
        raise UnsavedInstanceError(
            f"{label}() was called on {what} {entry.model._meta.label} ({instance!r}); save() it first "
            "so a worker can reload it by primary key."
        )


def _check_arguments(
    entry: RegisteredMethod,
    instance: models.Model,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: MethodOptions,
    label: str,
) -> tuple[list[Any], Any]:
    """The call-time checks of the arguments, the queue and the backend; the encoded arguments."""
    _refuse_unexpected_keywords(entry, kwargs, label)
    try:
        entry.signature.bind(instance, *args, **kwargs)
    except TypeError as exc:
        raise InvalidArgumentsError(f"{label}(): {exc}") from exc
    try:
        encoded_args, encoded_kwargs = serialization.encode_arguments(args, kwargs)
    except EncodingError as exc:
        raise UnsupportedArgumentError(f"{label}(): {exc}") from exc
    if options.queue not in conf.get_rq_queue_names():
        raise UnknownQueueError(
            f"{label}(): queue {options.queue!r} is not in settings.RQ_QUEUES "
            f"(configured: {', '.join(sorted(conf.get_rq_queue_names())) or 'none'})."
        )
    conf.get_backend_name()  # a misconfigured backend fails here, before the INSERT
    return encoded_args, encoded_kwargs


def make_calls(
    entry: RegisteredMethod,
    instances: Iterable[models.Model],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: MethodOptions,
) -> list[MethodCall]:
    """Make the same call on many objects: the rows in one ``INSERT`` per database (and their tags
    in one more), pushed on commit together (``dispatch.push_many``: one pipeline).

    The checks are those of a single call, all made before anything is written: one bad
    object, argument or tag refuses the whole batch. For a ``unique`` method an object with an
    unfinished call gets that call back (one query for the whole batch), and an object repeated
    in ``instances`` gets one call. Returns the calls in the order of ``instances``.
    """
    from django.contrib.contenttypes.models import ContentType

    from .models import UNFINISHED_STATES, CallState, MethodCall, MethodCallTag, database_now

    label = f"{entry.model._meta.label}.{entry.attribute}"
    objects = list(instances)
    for instance in objects:
        _check_saved(instance, entry, label)
    if not objects:
        return []
    encoded_args, encoded_kwargs = _check_arguments(entry, objects[0], args, kwargs, options, label)
    if dependencies.result_references([encoded_args, encoded_kwargs]):
        raise InvalidDependencyError(
            f"{label}: result_of() is for single calls (using(after=...)), not bulk calls."
        )
    planned: list[tuple[models.Model, str, list[str], str | None]] = []
    for instance in objects:
        database = instance._state.db or "default"
        planned.append(
            (
                instance,
                database,
                tags.tags_of(options.tags, instance, label),
                _unique_key(entry, instance, args, kwargs, options),
            )
        )
    results: dict[int, MethodCall] = {}  # position in ``objects`` -> its call
    for database in dict.fromkeys(plan[1] for plan in planned):
        positions = [index for index, plan in enumerate(planned) if plan[1] == database]
        keys = [key for index in positions if (key := planned[index][3]) is not None]
        existing = (
            {
                call.unique_key: call
                for call in MethodCall.objects.using(database).filter(
                    unique_key__in=keys, state__in=UNFINISHED_STATES
                )
            }
            if keys
            else {}
        )
        content_type = ContentType.objects.db_manager(database).get_for_model(entry.model)
        state = CallState.ENQUEUED if dispatch.enqueued_at_insert(database) else CallState.PENDING
        # One reading of the database's clock for all rows: with no expression left in any row,
        # Django inserts them on PostgreSQL with one array per column (UNNEST), not a placeholder
        # per value, and compiles no expression per row.
        written_at = time.monotonic()  # before the clock reading that becomes enqueued_at
        now = database_now(database)
        enqueued_at = now if state == CallState.ENQUEUED else None
        rows: list[MethodCall] = []
        row_tags: list[list[str]] = []
        by_key: dict[str, MethodCall] = {}
        for index in positions:
            instance, _, call_tags, key = planned[index]
            if key is not None and (key in existing or key in by_key):
                results[index] = existing.get(key) or by_key[key]  # unique: the unfinished call
                continue
            row = MethodCall(
                content_type=content_type,
                object_id=str(instance.pk),
                method=entry.name,
                queue=options.queue,
                args=encoded_args,
                kwargs=encoded_kwargs,
                policy=options.to_policy(),
                state=state,
                created_at=now,
                enqueued_at=enqueued_at,
                unique_key=key,
                exclusive_key=_exclusive_key(entry, instance, options),
            )
            setattr(row, dispatch.WRITTEN_AT, written_at)
            rows.append(row)
            row_tags.append(call_tags)
            if key is not None:
                by_key[key] = row
            results[index] = row
        try:
            with transaction.atomic(using=database):  # a savepoint in the caller's transaction
                MethodCall.objects.using(database).bulk_create(rows)
                links = [
                    MethodCallTag(call=row, tag=tag)
                    for row, call_tags in zip(rows, row_tags, strict=True)
                    for tag in call_tags
                ]
                if links:
                    MethodCallTag.objects.using(database).bulk_create(links)
        except IntegrityError:
            if not keys:
                raise
            # A concurrent caller made one of these unique calls meanwhile: make them one by
            # one, each finding its own race's winner.
            for index in positions:
                results[index] = make_call(entry, planned[index][0], args, kwargs, options)
            continue
        dispatch.push_all_on_commit(rows, database)
    return [results[index] for index in range(len(objects))]


def _unfinished_with_key(database: str, key: str) -> MethodCall | None:
    from .models import UNFINISHED_STATES, MethodCall

    return MethodCall.objects.using(database).filter(unique_key=key, state__in=UNFINISHED_STATES).first()


def _unique_key(
    entry: RegisteredMethod,
    instance: models.Model,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: MethodOptions,
) -> str | None:
    """The key of a ``unique`` call: a SHA-256 of the method, the object and the named arguments'
    encoded values (with the signature's defaults applied, so ``f()`` and ``f(size="small")``
    are the same call when ``"small"`` is the default)."""
    if not options.unique:
        return None
    values: dict[str, Any] = {}
    if isinstance(options.unique, tuple):
        bound = entry.signature.bind(instance, *args, **kwargs)
        bound.apply_defaults()
        var_keyword = next(
            (p.name for p in entry.signature.parameters.values() if p.kind is p.VAR_KEYWORD), None
        )
        extra = bound.arguments.get(var_keyword, {}) if var_keyword else {}
        for name in options.unique:
            value = bound.arguments[name] if name in bound.arguments else extra.get(name)
            values[name] = serialization.encode(value, path=name)
    text = json.dumps([entry.name, str(instance.pk), values], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _exclusive_key(entry: RegisteredMethod, instance: models.Model, options: MethodOptions) -> str | None:
    if options.exclusive is False:
        return None
    group = (
        entry.name if options.exclusive is True else f"{entry.model._meta.label_lower}.{options.exclusive}"
    )
    return exclusive.exclusive_key(group, instance)


@overload
def async_method(function: Callable[..., Any], /) -> AsyncMethod: ...


@overload
def async_method(
    *,
    queue: str = "default",
    name: str | None = None,
    retries: int = 0,
    retry_backoff: datetime.timedelta | float = ...,
    retry_backoff_max: datetime.timedelta | float = ...,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = ...,
    timeout: datetime.timedelta | float | None = None,
    atomic: bool = False,
    tags: Callable[[Any], Iterable[Any]] | Iterable[str] | None = None,
    unique: bool | tuple[str, ...] = False,
    exclusive: bool | str = False,
) -> Callable[[Callable[..., Any]], AsyncMethod]: ...


def async_method(
    function: Callable[..., Any] | None = None,
    /,
    *,
    queue: str = "default",
    name: str | None = None,
    **options: Any,
) -> AsyncMethod | Callable[[Callable[..., Any]], AsyncMethod]:
    """Decorate a model method so that calling it records a ``MethodCall`` run later by a worker.

    ``queue`` (str): the django-rq queue (a key of ``RQ_QUEUES``) the call is pushed to.
    ``name`` (str | None): the registry name stored on each row; defaults to
    ``"app_label.ModelName.method"``. Give one to keep old rows runnable across a rename.
    ``retries`` (int, default 0): further attempts after a failed one, ``retries + 1`` in all.
    ``retry_backoff`` (``timedelta`` or seconds, default 10 s) and ``retry_backoff_max`` (default
    1 h): the first wait before a retry, and the cap as waits double (with jitter).
    ``retry_on`` (exception class or tuple, default ``Exception``): which errors are retried; a lost
    worker or a timed-out attempt is retried whenever ``retries`` allows.
    ``timeout`` (``timedelta`` or seconds, at least 1 s; default none): bounds one attempt, as RQ's
    job timeout. ``atomic`` (bool): run the method in a transaction that also records its success,
    so its database writes and the ``succeeded`` state commit together or not at all.

    ``tags`` (callable given the instance, returning model instances, strings or ``None``; or a
    list of str): recorded with each call, so ``MethodCall.objects.for_object(account)`` finds
    calls about ``account`` made on other objects (``asyncmodels.tags``).
    ``unique`` (``True``, or a tuple of argument names): while a call of this method on an
    object is unfinished, calling it again (with equal values of those arguments) returns that
    call instead of making another; a database constraint enforces it.
    ``exclusive`` (``True``, or a group name shared by several methods of the model): calls on
    one object never run at the same time; a call that finds the object busy waits, holding no
    worker (``asyncmodels.exclusive``).

    Usable bare (``@async_method``) or with options. Raises ``RegistrationError`` at import if the
    class is not a Django model or the registry name is taken, ``InvalidOptionError`` for bad options.
    """
    method_options = build_options(
        "@async_method",
        accepted=[f.name for f in dataclasses.fields(MethodOptions)] + ["name"],
        queue=queue,
        **options,
    )
    if name is not None and (not isinstance(name, str) or not name):
        raise InvalidOptionError(f"@async_method: name must be a non-empty str, not {name!r}.")

    def decorate(func: Callable[..., Any]) -> AsyncMethod:
        if not callable(func) or isinstance(func, (staticmethod, classmethod)):
            raise RegistrationError("@async_method decorates plain instance methods (def method(self, ...)).")
        if (
            inspect.iscoroutinefunction(func)
            or inspect.isasyncgenfunction(func)
            or inspect.isgeneratorfunction(func)
        ):
            # Calling one only creates a coroutine or generator: the body would never run, yet the
            # call would be recorded as succeeded. Refuse instead of losing the work silently.
            raise RegistrationError(
                f"@async_method cannot decorate {func.__qualname__}: it is an async def or generator "
                "function; decorate a plain def method."
            )
        if isinstance(method_options.unique, tuple):
            _check_unique_names(func, method_options.unique)
        return AsyncMethod(func, method_options, name)

    if function is not None:
        return decorate(function)
    return decorate


def _check_unique_names(func: Callable[..., Any], names: tuple[str, ...]) -> None:
    """Refuse, at import, a ``unique=(...)`` naming an argument the method does not take."""
    parameters = list(inspect.signature(func).parameters.values())[1:]  # without self
    named = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    unknown = [name for name in names if name not in named]
    if unknown:
        raise InvalidOptionError(
            f"@async_method(unique=...) on {func.__qualname__} names {', '.join(map(repr, unknown))}, "
            f"which it does not take (it takes: {', '.join(named) or 'no named arguments'})."
        )
