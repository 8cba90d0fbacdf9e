"""Settings for ``manage.py check`` run by tests/test_tasks_backend.py: the test project's, with a
``TASKS`` entry naming a queue missing from ``RQ_QUEUES`` (asyncmodels.E005).

``ASYNCMODELS_TEST_DJANGO_TASKS_APP=1`` keeps the django-tasks backport in ``INSTALLED_APPS``
(where the test project puts it on Django 5.2); otherwise it is left out.
"""

from __future__ import annotations

import os

from testproject.settings import *  # noqa: F403
from testproject.settings import INSTALLED_APPS

if os.environ.get("ASYNCMODELS_TEST_DJANGO_TASKS_APP") != "1":
    INSTALLED_APPS = [app for app in INSTALLED_APPS if app != "django_tasks"]

TASKS = {
    "default": {
        "BACKEND": "asyncmodels.backends.tasks.AsyncModelsBackend",
        "QUEUES": ["default", "nowhere"],
    }
}
