"""Access to the ``ASYNCMODELS`` setting, read on each use so ``override_settings`` works.

Every duration setting is a number of seconds (``int`` or ``float``).
"""

from __future__ import annotations

import datetime
from typing import Any, Final

from django.conf import settings

from .exceptions import ConfigurationError

BACKENDS: Final = ("rq", "immediate")

DEFAULTS: Final[dict[str, Any]] = {
    # "rq": push to RQ through django-rq on commit; "immediate": run in-process on commit.
    "BACKEND": "rq",
    # A running call's lease: how long it lasts, and how often the worker renews it (seconds).
    "LEASE_SECONDS": 60,
    "LEASE_RENEW_SECONDS": 20,
    # How often each asyncmodels worker runs a recovery pass (seconds).
    "RECOVERY_INTERVAL_SECONDS": 10,
    # A pending or enqueued call is re-pushed by recovery once it is this old (seconds).
    "PUSH_GRACE_SECONDS": 30,
    # At most this many calls are handled per step of one recovery pass.
    "RECOVERY_BATCH_SIZE": 500,
    # A running method's progress reports are stored at most this often per call (seconds).
    "PROGRESS_INTERVAL_SECONDS": 1,
    # Finished calls kept per state, in seconds ({"succeeded": 7 * 86400, "failed": 30 * 86400});
    # every recovery pass then deletes one batch of older ones. None (or a state left out): kept.
    "RETENTION_SECONDS": None,
}

_POSITIVE_NUMBERS: Final = (
    "LEASE_SECONDS",
    "LEASE_RENEW_SECONDS",
    "RECOVERY_INTERVAL_SECONDS",
    "PUSH_GRACE_SECONDS",
    "RECOVERY_BATCH_SIZE",
    "PROGRESS_INTERVAL_SECONDS",
)


def find_problems() -> list[str]:
    """Return every problem with ``settings.ASYNCMODELS``, one message each (empty when valid)."""
    user = getattr(settings, "ASYNCMODELS", None) or {}
    if not isinstance(user, dict):
        return [f"The ASYNCMODELS setting must be a dict, not {type(user).__name__}."]
    problems = []
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        problems.append(
            f"Unknown key(s) in the ASYNCMODELS setting: {', '.join(unknown)}. "
            f"Known keys: {', '.join(sorted(DEFAULTS))}."
        )
    config = {**DEFAULTS, **user}
    if config["BACKEND"] not in BACKENDS:
        problems.append(
            f"ASYNCMODELS['BACKEND'] is {config['BACKEND']!r}; it must be one of {', '.join(BACKENDS)}."
        )
    for key in _POSITIVE_NUMBERS:
        value = config[key]
        if not _positive(value):
            problems.append(f"ASYNCMODELS[{key!r}] must be a positive number, not {value!r}.")
    problems += _retention_problems(config["RETENTION_SECONDS"])
    batch = config["RECOVERY_BATCH_SIZE"]
    if _positive(batch) and isinstance(batch, float) and not batch.is_integer():
        problems.append(f"ASYNCMODELS['RECOVERY_BATCH_SIZE'] must be a whole number, not {batch!r}.")
    lease, renew = config["LEASE_SECONDS"], config["LEASE_RENEW_SECONDS"]
    if _positive(lease) and _positive(renew) and renew * 2 > lease:
        problems.append(
            "ASYNCMODELS['LEASE_RENEW_SECONDS'] must be at most half of ASYNCMODELS['LEASE_SECONDS'], "
            "or one late renewal lets a busy worker's lease expire."
        )
    return problems


def _positive(value: Any) -> bool:
    """Whether ``value`` is a positive ``int`` or ``float`` (not a ``bool``)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


def _retention_problems(retention: Any) -> list[str]:
    if retention is None:
        return []
    finished = ("succeeded", "failed", "cancelled")
    if not isinstance(retention, dict):
        return [
            f"ASYNCMODELS['RETENTION_SECONDS'] must be None or a dict of state to seconds, not {retention!r}."
        ]
    problems = []
    for state, seconds in retention.items():
        if state not in finished:
            problems.append(
                f"ASYNCMODELS['RETENTION_SECONDS'] has key {state!r}; only finished states are pruned: "
                f"{', '.join(finished)}."
            )
        elif isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < 1e10:
            problems.append(
                f"ASYNCMODELS['RETENTION_SECONDS'][{state!r}] must be a positive number of seconds, "
                f"not {seconds!r}."
            )
    return problems


def get_config() -> dict[str, Any]:
    """Return the effective configuration: ``DEFAULTS`` updated with ``settings.ASYNCMODELS``.

    Raises ``ConfigurationError`` listing every problem (an unknown key, a bad value).
    """
    problems = find_problems()
    if problems:
        raise ConfigurationError(" ".join(problems))
    return {**DEFAULTS, **(getattr(settings, "ASYNCMODELS", None) or {})}


def get_backend_name() -> str:
    """Return ``"rq"`` or ``"immediate"``; raises ``ConfigurationError`` for anything else."""
    return str(get_config()["BACKEND"])


def get_duration(key: str) -> datetime.timedelta:
    """Return the duration setting ``key`` (configured in seconds) as a ``timedelta``."""
    return datetime.timedelta(seconds=float(get_config()[key]))


def get_retention() -> dict[str, datetime.timedelta]:
    """Return ``RETENTION_SECONDS`` as finished state -> ``timedelta`` (empty when ``None``, the
    default: nothing is pruned by recovery). Raises ``ConfigurationError`` for a bad setting."""
    retention = get_config()["RETENTION_SECONDS"] or {}
    return {state: datetime.timedelta(seconds=float(seconds)) for state, seconds in retention.items()}


def get_rq_queue_names() -> set[str]:
    """Return the queue names configured in ``settings.RQ_QUEUES`` (django-rq's setting)."""
    queues = getattr(settings, "RQ_QUEUES", None) or {}
    return set(queues)
