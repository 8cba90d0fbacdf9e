"""The no-op tasks bench/peers.py drains through its peers, beside asyncmodels' ``Echo.noop``.

Importable only in the benchmark's environment (``.venv-bench``), where the peers are installed.
"""

from django_tasks import task
from procrastinate.contrib.django import app


@task()  # type: ignore[untyped-decorator,unused-ignore]
def tasks_noop() -> None:
    """A django-tasks task that does nothing (database backend)."""


@app.task(name="procrastinate_noop")  # type: ignore[untyped-decorator,unused-ignore]
def procrastinate_noop() -> None:
    """A Procrastinate task that does nothing."""
