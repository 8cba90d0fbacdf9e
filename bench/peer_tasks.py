"""The no-op tasks bench/peers.py drains through its peers, beside asyncmodels' ``Echo.noop``
(and the same no-op as a task of asyncmodels' backend for the tasks framework).

Importable only in the benchmark's environment (``.venv-bench``), where the peers are installed.
"""

from django_tasks import task
from procrastinate.contrib.django import app


@task()  # type: ignore[untyped-decorator,unused-ignore]
def tasks_noop() -> None:
    """A django-tasks task that does nothing (database backend)."""


@task(backend="asyncmodels")  # type: ignore[untyped-decorator,unused-ignore]
def asyncmodels_noop() -> None:
    """The same no-op through asyncmodels' backend of the tasks framework (no object to reload)."""


@app.task(name="procrastinate_noop")  # type: ignore[untyped-decorator,unused-ignore]
def procrastinate_noop() -> None:
    """A Procrastinate task that does nothing."""
