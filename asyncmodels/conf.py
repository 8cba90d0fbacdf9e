"""Access to the ``ASYNCMODELS`` setting, read on each use so ``override_settings`` works."""

from __future__ import annotations

from typing import Any, Final

from django.conf import settings

from .exceptions import ConfigurationError

BACKENDS: Final = ("rq", "immediate")

DEFAULTS: Final[dict[str, Any]] = {
    # "rq": push to RQ through django-rq on commit; "immediate": run in-process on commit.
    "BACKEND": "rq",
}


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
    backend = user.get("BACKEND", DEFAULTS["BACKEND"])
    if backend not in BACKENDS:
        problems.append(f"ASYNCMODELS['BACKEND'] is {backend!r}; it must be one of {', '.join(BACKENDS)}.")
    return problems


def get_config() -> dict[str, Any]:
    """Return the effective configuration: ``DEFAULTS`` updated with ``settings.ASYNCMODELS``.

    Raises ``ConfigurationError`` listing every problem (an unknown key, a bad ``BACKEND``).
    """
    problems = find_problems()
    if problems:
        raise ConfigurationError(" ".join(problems))
    return {**DEFAULTS, **(getattr(settings, "ASYNCMODELS", None) or {})}


def get_backend_name() -> str:
    """Return ``"rq"`` or ``"immediate"``; raises ``ConfigurationError`` for anything else."""
    return str(get_config()["BACKEND"])


def get_rq_queue_names() -> set[str]:
    """Return the queue names configured in ``settings.RQ_QUEUES`` (django-rq's setting)."""
    queues = getattr(settings, "RQ_QUEUES", None) or {}
    return set(queues)
