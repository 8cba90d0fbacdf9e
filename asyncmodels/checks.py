"""System checks for wiring mistakes, each with a stable id (``asyncmodels.E001``…).

``django.contrib.contenttypes`` is required too, but without it ``MethodCall`` cannot even be
imported, so Django itself reports that before any check runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import import_module
from importlib.util import find_spec
from typing import Any

from django.apps import AppConfig, apps
from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

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
    # Read directly: an otherwise invalid ASYNCMODELS setting (E003) must not hide this warning.
    user = getattr(settings, "ASYNCMODELS", None) or {}
    backend = user.get("BACKEND", conf.DEFAULTS["BACKEND"]) if isinstance(user, dict) else None
    if backend != "rq":
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


def register_tasks_framework_check() -> str | None:
    """Make ``manage.py check`` run the tasks framework's own check (each ``TASKS`` backend's
    ``check()``: asyncmodels.E004, E005, E007) when ``TASKS`` uses asyncmodels' backend.

    Called from ``AsyncModelsConfig.ready()``. Django 6 registers that check only once
    ``django.tasks`` is imported, and the django-tasks backport only when its app is in
    ``INSTALLED_APPS``: without this, nothing imports either before the checks run. Importing the
    framework's own module registers its check once, however often it is imported, so nothing is
    reported twice when Django or the backport registered it too. Returns the module imported
    (``"django.tasks"`` or ``"django_tasks.checks"``), or ``None`` when no ``TASKS`` entry uses
    asyncmodels' backend or no tasks framework is installed. Never raises.
    """
    entries = getattr(settings, "TASKS", None)
    if not isinstance(entries, dict) or not any(
        _uses_asyncmodels_backend(entry) for entry in entries.values()
    ):
        return None
    module = "django.tasks" if find_spec("django.tasks") is not None else "django_tasks.checks"
    try:
        import_module(module)
    except ImportError:  # no framework: asyncmodels' backend itself cannot be imported either
        return None
    return module


def _uses_asyncmodels_backend(entry: object) -> bool:
    """Whether a ``TASKS`` entry's ``BACKEND`` is asyncmodels' backend or a subclass of it."""
    path = entry.get("BACKEND") if isinstance(entry, dict) else None
    if not isinstance(path, str):
        return False
    try:
        from .backends.tasks import AsyncModelsBackend

        backend = import_string(path)
    except ImportError:
        return False
    return isinstance(backend, type) and issubclass(backend, AsyncModelsBackend)
