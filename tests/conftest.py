"""Fixtures that run the suite in one of two modes, chosen by ASYNCMODELS_TEST_SERVICES.

``fake`` (default): fakeredis, and an in-process ``rq.SimpleWorker`` in burst mode.
``real``: the Redis at ASYNCMODELS_REDIS_URL (its own db number, flushed before and after each
test) and a real ``manage.py rqworker --burst`` subprocess opening the test databases.
The database is whatever testproject.settings selects (SQLite files, or PostgreSQL).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import django_rq
import fakeredis
import pytest
import redis
from django.conf import settings
from django.db import connections
from rq import SimpleWorker

REPO = Path(__file__).resolve().parent.parent
SERVICES = os.environ.get("ASYNCMODELS_TEST_SERVICES", "fake")
ALL_QUEUES = ("default", "provisioning", "urgent")

RunWorker = Callable[..., str]


def pytest_report_header() -> str:
    engine = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    redis_kind = (
        "fakeredis + in-process SimpleWorker" if SERVICES == "fake" else "real Redis + rqworker processes"
    )
    return f"asyncmodels test mode: {engine} database, {redis_kind}"


@pytest.fixture(autouse=True)
def redis_connection(monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    """The Redis every django-rq queue uses in this test, empty at the start."""
    if SERVICES == "fake":
        connection: redis.Redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        monkeypatch.setattr(django_rq.queues, "get_connection", lambda name="default", **kwargs: connection)
        yield connection
        return
    connection = redis.Redis.from_url(settings.REDIS_URL)
    connection.flushdb()
    yield connection
    connection.flushdb()


def _worker_env() -> dict[str, str]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "testproject.settings"}
    default = connections["default"].settings_dict
    if default["ENGINE"].endswith("sqlite3"):
        env["ASYNCMODELS_SQLITE_PREFIX"] = "test_"
    else:
        # pytest-django names the test databases test_<name> and test_<name>_other.
        env["ASYNCMODELS_PG_NAME"] = str(default["NAME"])
    return env


@pytest.fixture
def run_worker(redis_connection: redis.Redis) -> RunWorker:
    """Drain the given queues (all by default) with one burst worker; return its output."""

    def run(*queues: str) -> str:
        names = queues or ALL_QUEUES
        if SERVICES == "fake":
            worker = SimpleWorker(
                [django_rq.get_queue(name, commit_mode="auto") for name in names], connection=redis_connection
            )
            worker.work(burst=True)
            return ""
        completed = subprocess.run(
            [sys.executable, "manage.py", "rqworker", "--burst", *names],
            cwd=REPO,
            env=_worker_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        output = completed.stdout + completed.stderr
        assert completed.returncode == 0, output
        return output

    return run


@pytest.fixture
def queued_jobs(redis_connection: redis.Redis) -> Callable[..., int]:
    """Return a function counting the jobs waiting in the given queues (all by default)."""

    def count(*queues: str) -> int:
        return sum(django_rq.get_queue(name, commit_mode="auto").count for name in queues or ALL_QUEUES)

    return count
