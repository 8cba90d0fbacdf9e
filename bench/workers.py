"""Worker processes that a benchmark starts, times from their start until they all exit, and reaps."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class WorkerProcesses:
    """``count`` copies of a worker command run from the repository root, one timed run at a time."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.output = ""  # the last run's combined stdout and stderr, for a failure report

    def run(self, command: Sequence[str], count: int, env: Mapping[str, str], timeout: float) -> float:
        """Start ``count`` workers, wait until all have exited; return the seconds that took.

        Raises ``SystemExit`` (showing their output) if one is still running after ``timeout``
        seconds or exits with a non-zero code.
        """
        with tempfile.TemporaryFile() as log:
            started = time.perf_counter()
            self.processes = [
                subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
                for _ in range(count)
            ]
            deadline = started + timeout
            try:
                for process in self.processes:
                    process.wait(timeout=max(deadline - time.perf_counter(), 0.1))
            except subprocess.TimeoutExpired:
                self.stop()
                raise SystemExit(f"workers did not finish in {timeout:.0f} s: {' '.join(command)}") from None
            elapsed = time.perf_counter() - started
            failures = [process.returncode for process in self.processes if process.returncode]
            self.processes = []
            log.seek(0)
            self.output = log.read().decode(errors="replace")
        if failures:
            self.fail(f"workers exited with codes {failures}: {' '.join(command)}")
        return elapsed

    def fail(self, message: str) -> None:
        """Raise ``SystemExit(message)`` after writing the tail of the last run's output to stderr."""
        sys.stderr.write(self.output[-5000:])
        raise SystemExit(message)

    def stop(self) -> None:
        """Kill the workers still running (an interrupted or timed-out run)."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        self.processes = []
