"""Options of a decorated method, set in ``@async_method(...)`` and overridable per call by ``using()``.

Durations are ``timedelta`` objects, or numbers of seconds (``int``/``float``), normalised to
``timedelta`` here. The per-call part of the options is stored on the row (``MethodCall.policy``)
so the worker and recovery apply what the caller asked for, not what the code says today.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable
from typing import Any

from .exceptions import InvalidOptionError
from .retries import RetryPolicy, as_timedelta


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """Options of one decorated method.

    ``queue`` (str): the ``RQ_QUEUES`` queue calls are pushed to.
    ``retries`` (int ≥ 0): further attempts after a failed first one (``retries + 1`` in all).
    ``retry_backoff`` / ``retry_backoff_max`` (``timedelta``): first wait before a retry, and the
    cap as waits double (with jitter; see ``asyncmodels.retries``).
    ``retry_on`` (tuple of exception classes): which errors are retried; a lost worker or a
    timeout counts when the method retries at all.
    ``timeout`` (``timedelta`` or ``None``): bounds one attempt (RQ's job timeout).
    ``atomic`` (bool): run the method in a transaction that also records its success.
    ``tags`` (callable given the instance, or a list of str; or ``None``): what else each call
    is about (``asyncmodels.tags``). ``unique`` (``False``, ``True``, or a tuple of argument
    names): at most one unfinished call per object and method (and those argument values).
    ``exclusive`` (``False``, ``True``, or a group name): calls on one object never run at the
    same time (``asyncmodels.exclusive``).
    """

    queue: str = "default"
    retries: int = 0
    retry_backoff: datetime.timedelta = datetime.timedelta(seconds=10)
    retry_backoff_max: datetime.timedelta = datetime.timedelta(hours=1)
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    timeout: datetime.timedelta | None = None
    atomic: bool = False
    tags: Any = None
    unique: bool | tuple[str, ...] = False
    exclusive: bool | str = False

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            retries=self.retries, backoff=self.retry_backoff, backoff_max=self.retry_backoff_max
        )

    def to_policy(self) -> dict[str, Any]:
        """The per-call options as stored on the row (JSON; durations in seconds)."""
        return {
            "retries": self.retries,
            "retry_backoff": self.retry_backoff.total_seconds(),
            "retry_backoff_max": self.retry_backoff_max.total_seconds(),
            "timeout": self.timeout.total_seconds() if self.timeout is not None else None,
            "atomic": self.atomic,
        }


#: Options ``using()`` may not change: they cannot be stored on the row, or they hold for
#: every call of the method (uniqueness and exclusivity are only as good as every call's key).
FIXED_PER_METHOD = frozenset({"retry_on", "tags", "unique", "exclusive"})


def build_options(
    where: str, base: MethodOptions | None = None, *, accepted: Iterable[str] = (), **given: Any
) -> MethodOptions:
    """Return ``base`` (or the defaults) with ``given`` applied, validated and normalised.

    Raises ``InvalidOptionError`` naming ``where`` for an unknown option or a bad value; its
    message lists ``accepted`` (what the caller at ``where`` takes) or else every option.
    """
    known = {field.name for field in dataclasses.fields(MethodOptions)}
    unknown = sorted(set(given) - known)
    if unknown:
        listed = sorted(accepted or known)
        raise InvalidOptionError(
            f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(listed)}."
        )
    base = base or MethodOptions()
    values = {field.name: getattr(base, field.name) for field in dataclasses.fields(MethodOptions)} | given
    queue = values["queue"]
    if not isinstance(queue, str) or not queue:
        raise InvalidOptionError(f"{where}: queue must be a non-empty str, not {queue!r}.")
    retries = values["retries"]
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InvalidOptionError(f"{where}: retries must be an int ≥ 0, not {retries!r}.")
    retry_on = values["retry_on"]
    if isinstance(retry_on, type):
        retry_on = (retry_on,)
    if not isinstance(retry_on, tuple) or not all(
        isinstance(kind, type) and issubclass(kind, BaseException) for kind in retry_on
    ):
        raise InvalidOptionError(
            f"{where}: retry_on must be an exception class or a tuple of them, not {retry_on!r}."
        )
    if not isinstance(values["atomic"], bool):
        raise InvalidOptionError(f"{where}: atomic must be True or False, not {values['atomic']!r}.")
    backoff = as_timedelta(values["retry_backoff"], name=f"{where}: retry_backoff")
    backoff_max = as_timedelta(values["retry_backoff_max"], name=f"{where}: retry_backoff_max")
    assert backoff is not None and backoff_max is not None  # noqa: S101 - allow_none is False
    if backoff_max < backoff:
        raise InvalidOptionError(
            f"{where}: retry_backoff_max ({backoff_max}) is shorter than retry_backoff ({backoff})."
        )
    timeout = as_timedelta(values["timeout"], name=f"{where}: timeout", allow_none=True)
    if timeout is not None and timeout.total_seconds() < 1:
        raise InvalidOptionError(f"{where}: timeout must be at least one second (RQ counts whole seconds).")
    tags = values["tags"]
    if tags is not None and not callable(tags):
        if (
            isinstance(tags, (str, bytes))
            or not isinstance(tags, (list, tuple))
            or not all(type(tag) is str for tag in tags)
        ):
            raise InvalidOptionError(
                f"{where}: tags must be a callable (given the instance) or a list of str, not {tags!r}."
            )
        tags = tuple(tags)
    unique = values["unique"]
    if isinstance(unique, list):
        unique = tuple(unique)
    if not (
        isinstance(unique, bool)
        or (isinstance(unique, tuple) and unique and all(type(name) is str and name for name in unique))
    ):
        raise InvalidOptionError(
            f"{where}: unique must be True, False or a non-empty tuple of argument names, not {unique!r}."
        )
    exclusive = values["exclusive"]
    if not (isinstance(exclusive, bool) or (type(exclusive) is str and exclusive and len(exclusive) <= 100)):
        raise InvalidOptionError(
            f"{where}: exclusive must be True, False or a group name (a str of 1 to 100 characters), "
            f"not {exclusive!r}."
        )
    return MethodOptions(
        queue=queue,
        retries=retries,
        retry_backoff=backoff,
        retry_backoff_max=backoff_max,
        retry_on=retry_on,
        timeout=timeout,
        atomic=values["atomic"],
        tags=tags,
        unique=unique,
        exclusive=exclusive,
    )


def retry_policy_from_row(policy: Any) -> RetryPolicy:
    """The retry part of a row's ``MethodCall.policy``; no retries if it is missing or malformed.

    Never raises: recovery and the job must be able to end any call, whatever its row holds.
    """
    try:
        return _retry_policy(policy)
    except Exception:  # a forged or corrupt policy
        return RetryPolicy(retries=0)


def _retry_policy(policy: Any) -> RetryPolicy:
    policy = policy or {}
    defaults = MethodOptions()
    return RetryPolicy(
        retries=int(policy.get("retries", 0)),
        backoff=datetime.timedelta(
            seconds=float(policy.get("retry_backoff", defaults.retry_backoff.total_seconds()))
        ),
        backoff_max=datetime.timedelta(
            seconds=float(policy.get("retry_backoff_max", defaults.retry_backoff_max.total_seconds()))
        ),
    )
