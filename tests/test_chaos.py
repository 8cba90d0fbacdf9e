"""The chaos run, small: ``manage.py chaos`` kills workers, flushes and restarts its own Redis and
drops the database connections while 60 calls drain, and must find no call lost or run twice.

Only with real services on PostgreSQL (``ASYNCMODELS_TEST_SERVICES=real ASYNCMODELS_DB=postgres``),
on a database of its own (``<ASYNCMODELS_PG_NAME>_chaos`` and its ``_other`` twin, created and dropped
here). It starts its own Redis server: the shared one is not touched. Select it with ``-m chaos``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
# Named after the suite's own database, so that two runs side by side (CI's legs) keep apart.
DATABASE = f"{os.environ.get('ASYNCMODELS_PG_NAME', 'asyncmodels')}_chaos"
DATABASES = (DATABASE, f"{DATABASE}_other")  # the settings open "<name>_other" as the "other" alias
LINE = re.compile(
    r"^chaos: calls=(?P<calls>\d+) kills=(?P<kills>\d+) flushes=(?P<flushes>\d+) "
    r"redis_restarts=(?P<restarts>\d+) pg_drops=(?P<drops>\d+) lost=(?P<lost>\d+) "
    r"double_runs=(?P<double_runs>\d+) seconds_to_drain=(?P<seconds>[\d.]+)$",
    re.MULTILINE,
)

REAL_POSTGRES = (
    os.environ.get("ASYNCMODELS_TEST_SERVICES") == "real" and os.environ.get("ASYNCMODELS_DB") == "postgres"
)

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.skipif(
        not REAL_POSTGRES,
        reason="the chaos run needs real services on PostgreSQL "
        "(ASYNCMODELS_TEST_SERVICES=real ASYNCMODELS_DB=postgres)",
    ),
]


@pytest.fixture(autouse=True)
def redis_connection() -> Iterator[None]:
    """Replaces conftest's: the chaos run brings its own Redis, the shared one stays untouched."""
    yield


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    server = settings.DATABASES["default"]
    return psycopg.connect(
        host=server["HOST"],
        port=server["PORT"],
        user=server["USER"],
        password=server["PASSWORD"] or None,
        dbname="postgres",
        autocommit=True,
    )


def _drop_databases() -> None:
    with _admin() as admin:
        for name in DATABASES:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def chaos_database() -> Iterator[str]:
    """Fresh databases for the run (a killed earlier run may have left some), dropped afterwards."""
    _drop_databases()
    with _admin() as admin:
        for name in DATABASES:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield DATABASE
    finally:
        _drop_databases()


def test_no_call_is_lost_or_runs_twice_while_workers_die(chaos_database: str) -> None:
    command = [sys.executable, "manage.py", "chaos", "--calls", "60", "--workers", "2", "--kills", "2"]
    command += ["--flushes", "1", "--redis-restarts", "1", "--pg-drops", "1", "--timeout", "90"]
    env = {**os.environ, "ASYNCMODELS_DB": "postgres", "ASYNCMODELS_PG_NAME": chaos_database}
    completed = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=150, check=False
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    line = LINE.search(completed.stdout)
    assert line is not None, output
    assert (line["lost"], line["double_runs"]) == ("0", "0"), output
    faults = (line["calls"], line["kills"], line["flushes"], line["restarts"], line["drops"])
    assert faults == ("60", "2", "1", "1", "1"), output
