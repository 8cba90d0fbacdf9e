"""System checks for wiring mistakes, each with a stable id (``asyncmodels.E001``…)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig, apps
from django.core import checks

from . import conf, registry
from .exceptions import ConfigurationError

E001 = checks.Error(
    "'django_rq' is not in INSTALLED_APPS.",
    hint="asyncmodels pushes calls to RQ through django-rq; add 'django_rq' to INSTALLED_APPS.",
    id="asyncmodels.E001",
)
E003 = "asyncmodels.E003"  # the ASYNCMODELS setting is invalid
E002 = "asyncmodels.E002"  # a decorated method's queue is not in RQ_QUEUES
E004 = checks.Error(
    "'django.contrib.contenttypes' is not in INSTALLED_APPS.",
    hint="MethodCall points at objects through content types; add 'django.contrib.contenttypes'.",
    id="asyncmodels.E004",
)


@checks.register(checks.Tags.compatibility)
def check_django_rq_installed(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E001: django_rq must be installed."""
    return [] if apps.is_installed("django_rq") else [E001]


@checks.register(checks.Tags.compatibility)
def check_contenttypes_installed(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E004: django.contrib.contenttypes must be installed."""
    return [] if apps.is_installed("django.contrib.contenttypes") else [E004]


@checks.register(checks.Tags.compatibility)
def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E003: the ASYNCMODELS setting must be valid."""
    try:
        conf.get_config()
    except ConfigurationError as exc:
        return [checks.Error(str(exc), hint="See the configuration section of the README.", id=E003)]
    return []


@checks.register(checks.Tags.compatibility)
def check_method_queues(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E002: every decorated method's queue must be a key of RQ_QUEUES."""
    configured = conf.get_rq_queue_names()
    errors: list[checks.CheckMessage] = []
    for entry in registry.all_methods():
        if entry.options.queue not in configured:
            errors.append(
                checks.Error(
                    f"{entry.name} uses queue {entry.options.queue!r}, which is not in RQ_QUEUES.",
                    hint=f"Add {entry.options.queue!r} to RQ_QUEUES or change @async_method(queue=...).",
                    obj=entry.model,
                    id=E002,
                )
            )
    return errors
