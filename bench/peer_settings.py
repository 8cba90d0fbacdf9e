"""Settings of bench/peers.py: the test project's, plus django-tasks' database backend and Procrastinate.

Used only in the benchmark's own environment (``make bench-peers`` makes ``.venv-bench``); the
library and its test project know nothing of these packages. Each peer gets a database of its own
next to the project's (``<ASYNCMODELS_PG_NAME>_tasks``, ``<ASYNCMODELS_PG_NAME>_procrastinate``).
"""

from typing import Any

from testproject.settings import *  # noqa: F403
from testproject.settings import DATABASES, INSTALLED_APPS

# The test project lists django_tasks already where the backport is installed (as here).
INSTALLED_APPS = [
    *INSTALLED_APPS,
    *(
        app
        for app in ("django_tasks", "django_tasks_db", "procrastinate.contrib.django")
        if app not in INSTALLED_APPS
    ),
]

#: App label -> the database alias that holds its tables, and nothing else.
PEER_DATABASES = {"django_tasks_db": "tasks", "procrastinate": "procrastinate"}
DATABASES = {
    **DATABASES,
    **{
        alias: {**DATABASES["default"], "NAME": f"{DATABASES['default']['NAME']}_{alias}"}
        for alias in PEER_DATABASES.values()
    },
}
DATABASE_ROUTERS = ["bench.peer_settings.PeerRouter"]

TASKS = {
    "default": {"BACKEND": "django_tasks_db.DatabaseBackend"},
    # The same no-op task through asyncmodels' backend (bench.peer_tasks.asyncmodels_noop).
    "asyncmodels": {"BACKEND": "asyncmodels.backends.tasks.AsyncModelsBackend", "QUEUES": ["default"]},
}
PROCRASTINATE_DATABASE_ALIAS = PEER_DATABASES["procrastinate"]
PROCRASTINATE_IMPORT_PATHS = ["bench.peer_tasks"]
PROCRASTINATE_AUTODISCOVER_MODULE_NAME = ""


class PeerRouter:
    """Send each peer's models to its own database, and no other app's there."""

    def db_for_read(self, model: type[Any], **hints: Any) -> str | None:
        return PEER_DATABASES.get(model._meta.app_label)

    db_for_write = db_for_read

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        if app_label in PEER_DATABASES:
            return db == PEER_DATABASES[app_label]
        return False if db in PEER_DATABASES.values() else None
