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


def get_config() -> dict[str, Any]:
    """Return the effective configuration: ``DEFAULTS`` updated with ``settings.ASYNCMODELS``.

    Raises ``ConfigurationError`` for an unknown key or a ``BACKEND`` not in ``BACKENDS``.
    """
    user = getattr(settings, "ASYNCMODELS", None) or {}
    if not isinstance(user, dict):
        raise ConfigurationError("The ASYNCMODELS setting must be a dict.")
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        raise ConfigurationError(
            f"Unknown key(s) in the ASYNCMODELS setting: {', '.join(unknown)}. "
            f"Known keys: {', '.join(sorted(DEFAULTS))}."
        )
    config = {**DEFAULTS, **user}
    if config["BACKEND"] not in BACKENDS:
        raise ConfigurationError(
            f"ASYNCMODELS['BACKEND'] is {config['BACKEND']!r}; it must be one of {', '.join(BACKENDS)}."
        )
    return config


def get_backend_name() -> str:
    """Return ``"rq"`` or ``"immediate"``; raises ``ConfigurationError`` for anything else."""
    return str(get_config()["BACKEND"])


def get_rq_queue_names() -> set[str]:
    """Return the queue names configured in ``settings.RQ_QUEUES`` (django-rq's setting)."""
    queues = getattr(settings, "RQ_QUEUES", None) or {}
    return set(queues)
