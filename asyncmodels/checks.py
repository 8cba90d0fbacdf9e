"""System checks for wiring mistakes, each with a stable id (``asyncmodels.E001``…).

``django.contrib.contenttypes`` is required too, but without it ``MethodCall`` cannot even be
imported, so Django itself reports that before any check runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig, apps
from django.conf import settings
from django.core import checks

from . import conf, registry

E001 = checks.Error(
    "'django_rq' is not in INSTALLED_APPS.",
    hint="asyncmodels pushes calls to RQ through django-rq; add 'django_rq' to INSTALLED_APPS.",
    id="asyncmodels.E001",
)
E002 = "asyncmodels.E002"  # a decorated method's queue is not in RQ_QUEUES
E003 = "asyncmodels.E003"  # the ASYNCMODELS setting is invalid
W001 = checks.Warning(
    "RQ's WORKER_CLASS is not an asyncmodels worker, so no worker runs recovery: calls whose push "
    "or worker was lost stay stuck until something else runs it.",
    hint="Set RQ = {'WORKER_CLASS': 'asyncmodels.worker.Worker'} (or pass --worker-class to rqworker), "
    "or run 'manage.py asyncmodels_recover --loop' beside your workers.",
    id="asyncmodels.W001",
)


@checks.register(checks.Tags.compatibility)
def check_django_rq_installed(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E001: django_rq must be installed."""
    return [] if apps.is_installed("django_rq") else [E001]


@checks.register(checks.Tags.compatibility)
def check_method_queues(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E002: every decorated method's queue must be a key of RQ_QUEUES."""
    configured = conf.get_rq_queue_names()
    return [
        checks.Error(
            f"{entry.name} uses queue {entry.options.queue!r}, which is not in RQ_QUEUES.",
            hint=f"Add {entry.options.queue!r} to RQ_QUEUES or change @async_method(queue=...).",
            obj=entry.model,
            id=E002,
        )
        for entry in registry.all_methods()
        if entry.options.queue not in configured
    ]


@checks.register(checks.Tags.compatibility)
def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E003: the ASYNCMODELS setting must be valid; one message per problem."""
    hint = "See the Configure section of the README."
    return [checks.Error(problem, hint=hint, id=E003) for problem in conf.find_problems()]


@checks.register(checks.Tags.compatibility)
def check_worker_class(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """W001: with the rq backend, django-rq's WORKER_CLASS should run recovery."""
    if conf.find_problems() or conf.get_backend_name() != "rq":
        return []
    from rq.utils import import_attribute

    from .worker import RecoveryMixin

    worker_class = (getattr(settings, "RQ", None) or {}).get("WORKER_CLASS")
    try:
        resolved = import_attribute(worker_class) if isinstance(worker_class, str) else worker_class
    except (ImportError, AttributeError, ValueError):
        resolved = None
    if isinstance(resolved, type) and issubclass(resolved, RecoveryMixin):
        return []
    return [W001]
