"""Models a user of asyncmodels would write: accounts, their instances, and their methods."""

from __future__ import annotations

import time
import uuid
from typing import Any

from django.db import models

from asyncmodels import async_method, current_call, result_of
from asyncmodels.models import MethodCall


class ProvisioningError(Exception):
    """The (pretend) cloud refused a request."""


class Account(models.Model):
    name = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.name

    @async_method()
    def send_invoice(self, month: str) -> str:
        return f"invoice {month} sent to {self.name}"


class Instance(models.Model):
    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="instances")
    name = models.CharField(max_length=100)
    size = models.CharField(max_length=20, default="small")
    status = models.CharField(max_length=20, default="new")

    def __str__(self) -> str:
        return self.name

    @async_method(queue="provisioning")
    def provision(self, size: str = "small") -> dict[str, Any]:
        """Pretend to create the machine; the worker sees the row as committed, never stale."""
        self.size = size
        self.status = "running"
        self.save(update_fields=["size", "status"])
        return {"name": self.name, "size": size, "status": self.status}

    @async_method(queue="provisioning")
    def resize(self, size: str) -> str:
        """Fails for sizes the pretend cloud does not offer."""
        if size not in {"small", "medium", "large"}:
            raise ProvisioningError(f"size {size!r} is not offered in this region")
        self.size = size
        self.save(update_fields=["size"])
        return size

    @async_method(queue="provisioning", unique=True, tags=lambda self: [self.account, "region:eu"])
    def reboot(self, reason: str = "") -> str:
        """Unique: rebooting twice before the first reboot ran is one reboot. Tagged with the
        account, so ``MethodCall.objects.for_object(account)`` finds it."""
        self.status = "running"
        self.save(update_fields=["status"])
        return f"{self.name} rebooted{': ' + reason if reason else ''}"

    @async_method(unique=("setting",), tags=lambda self: [self.account])
    def configure(self, setting: str, value: str) -> dict[str, str]:
        """Unique per setting: a second change of the same setting while one is unfinished
        returns the first call; a change of another setting is a call of its own."""
        return {"setting": setting, "value": value}

    @async_method()
    def backup(self, seconds: float = 0.5) -> str:
        """A slow method."""
        time.sleep(seconds)
        return f"backup of {self.name} took {seconds}s"

    @async_method()
    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "status": self.status}

    def not_async(self) -> str:
        """A plain method: a stored call naming it must never run."""
        self.status = "hacked"
        self.save(update_fields=["status"])
        return "ran"


class Volume(models.Model):
    """A model with a UUID primary key."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    label = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.label

    @async_method()
    def attach(self, instance: Instance) -> str:
        return f"{self.label} attached to {instance.name} ({instance.status})"


class Region(models.Model):
    """A model with a string primary key."""

    code = models.CharField(max_length=20, primary_key=True)

    def __str__(self) -> str:
        return self.code

    @async_method()
    def ping(self) -> str:
        return f"pong from {self.code}"


class Echo(models.Model):
    """Returns whatever it is given, so tests can check what the worker received."""

    note = models.CharField(max_length=100, blank=True)
    hits = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"echo {self.pk}"

    @async_method()
    def echo(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"args": list(args), "kwargs": kwargs, "types": [type(a).__name__ for a in args]}

    @async_method()
    def bump(self) -> int:
        """Count runs in the database, so tests can see a method ran exactly once."""
        type(self).objects.using(self._state.db).filter(pk=self.pk).update(hits=models.F("hits") + 1)
        self.refresh_from_db(fields=["hits"])
        return self.hits

    @async_method()
    def noop(self) -> None:
        """Does nothing: what the throughput benchmark (bench/throughput.py) runs by the thousand."""

    @async_method()
    def fail(self, message: str) -> None:
        raise ValueError(message)

    @async_method(retries=2, retry_backoff=1, retry_backoff_max=2, retry_on=(ConnectionError,))
    def flaky(self, failures: int) -> int:
        """Count the run, then fail with ConnectionError for the first ``failures`` runs."""
        hits = int(self.bump.now())
        if hits <= failures:
            raise ConnectionError(f"run {hits} of a flaky dependency failed")
        return hits

    @async_method(retries=2, retry_on=(ConnectionError,))
    def wrong_kind_of_error(self) -> None:
        raise KeyError("not retried: only ConnectionError is")

    @async_method(timeout=1)
    def sleepy(self, seconds: float) -> str:
        time.sleep(seconds)
        return "woke up"

    @async_method(atomic=True, retries=1, retry_backoff=1)
    def bump_atomically(self, pause: float = 0.0) -> int:
        """Count the run in the same transaction as the call's success; pause after the write."""
        hits = int(self.bump.now())
        if pause and self.note == "pause":
            time.sleep(pause)
        return hits

    @async_method()
    def explode(self, how: str) -> object:
        """Fail or return in the awkward ways a real method can, for the job's robustness tests."""

        class Unprintable(Exception):
            def __str__(self) -> str:
                raise RuntimeError("str() of this exception fails")

        if how == "exit":
            raise SystemExit(3)
        if how == "unprintable":
            raise Unprintable
        if how == "nul-message":
            raise ValueError("device sent \x00 then \ud800")
        if how == "nul-key-result":
            return {"a\x00b": 1}
        if how == "huge-int-result":
            return 10**5000
        raise ValueError(f"unknown way to explode: {how}")

    @async_method()
    def unstorable(self) -> object:
        return object()

    @async_method(retries=3, retry_backoff=1)
    def steps(self, count: int, stop_after: int) -> int:
        """Do ``count`` steps (each counted in ``hits``), checking for a stop request before each;
        after ``stop_after`` steps it asks its own call to stop, as an operator would."""
        call = current_call()
        assert call is not None  # noqa: S101 (a test model: it only ever runs as a call)
        for step in range(count):
            if step == stop_after:
                call.cancel(reason="operator: stop between steps")
            call.raise_if_cancel_requested()
            self.bump.now()
        return count

    @async_method(retries=3, retry_backoff=1, retry_on=(ConnectionError,))
    def probe_plan(self, plan: list[str], seconds: float = 3.0) -> int:
        """Count the run (hits), then act as plan[run - 1] says (the last entry repeats):
        "return", "fail" (ConnectionError, retried), "value" (ValueError, not retried), each
        optionally prefixed "slow" (sleep ``seconds`` first)."""
        hits = int(self.bump.now())
        action = plan[min(hits, len(plan)) - 1]
        if action.startswith("slow"):
            time.sleep(seconds)
        if action.endswith("fail"):
            raise ConnectionError(f"run {hits} failed")
        if action.endswith("value"):
            raise ValueError(f"run {hits} raised ValueError")
        return hits

    @async_method(atomic=True, retries=3, retry_backoff=1, retry_on=(ConnectionError,))
    def probe_atomic(self, seconds: float, then: str) -> int:
        """atomic=True: count the run inside the transaction, sleep, then "fail" or "return"."""
        hits = int(self.bump.now())
        time.sleep(seconds)
        if then == "fail":
            raise ConnectionError(f"atomic run {hits} failed")
        return hits

    @async_method(retries=3, retry_backoff=1, retry_on=(ConnectionError,))
    def asked_to_stop(self, then: str) -> str:
        """Ask its own running call to stop (as an operator would, meanwhile), then fail or return."""
        own = self.asked_to_stop.calls().running().get()
        own.cancel(reason="operator: stop this")
        if then == "fail":
            raise ConnectionError("a retryable failure, after the cancel request")
        return "finished anyway"


class Ledger(models.Model):
    """Exclusive methods: calls on one ledger never overlap; each run records its own times."""

    name = models.CharField(max_length=100, blank=True)

    def __str__(self) -> str:
        return self.name or f"ledger {self.pk}"

    @async_method(exclusive=True)
    def settle(self, seconds: float = 0.2) -> dict[str, Any]:
        """Exclusive per ledger: write a ``Run`` with start and end (the host's clock)."""
        return self.record("settle", seconds)

    @async_method(exclusive="books")
    def post(self, seconds: float = 0.2) -> dict[str, Any]:
        """In the group "books" with ``audit``: a post and an audit of one ledger never overlap."""
        return self.record("post", seconds)

    @async_method(exclusive="books")
    def audit(self, seconds: float = 0.2) -> dict[str, Any]:
        return self.record("audit", seconds)

    def record(self, method: str, seconds: float) -> dict[str, Any]:
        import os

        run = Run.objects.using(self._state.db).create(
            ledger=self, method=method, pid=os.getpid(), start=time.time()
        )
        time.sleep(seconds)
        run.end = time.time()
        run.save(update_fields=["end"])
        return {"run": run.pk, "start": run.start, "end": run.end}


class Run(models.Model):
    """One run of a ``Ledger`` method, as its worker saw it (``time.time()`` at start and end)."""

    ledger = models.ForeignKey(Ledger, on_delete=models.CASCADE, related_name="runs")
    method = models.CharField(max_length=20)
    pid = models.PositiveIntegerField()
    start = models.FloatField()
    end = models.FloatField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.method} of ledger {self.ledger_id} by pid {self.pid}"


class Report(models.Model):
    """A small workflow: ``build()`` makes fetch -> slice (several, in parallel) -> assemble."""

    account = models.ForeignKey(
        Account, null=True, blank=True, on_delete=models.SET_NULL, related_name="reports"
    )
    topic = models.CharField(max_length=100)
    text = models.TextField(blank=True)

    def __str__(self) -> str:
        return self.topic

    def build(self, parts: int = 3, lines: int = 12) -> MethodCall:
        """Make the workflow's calls (in the caller's transaction) and return the last one.

        Each slice receives the fetched lines (``result_of(fetched)``) and so waits for the
        fetch; the assembly receives every slice's result and waits for all of them.
        """
        fetched = self.fetch(lines)
        slices = [self.slice(result_of(fetched), part, parts) for part in range(parts)]
        return self.assemble(pieces=[result_of(piece) for piece in slices])

    @async_method(tags=lambda self: [self.account, "workflow:report"])
    def fetch(self, lines: int = 12) -> list[str]:
        """Step 1: pretend to download the source."""
        if self.topic == "broken source":
            raise ConnectionError("the source is unreachable")
        return [f"{self.topic}: line {number}" for number in range(1, lines + 1)]

    @async_method(tags=lambda self: [self.account, "workflow:report"])
    def slice(self, lines: list[str], part: int, parts: int) -> list[str]:
        """Step 2 (one per part): take this part's share of the lines, upper-cased."""
        return [line.upper() for line in lines[part::parts]]

    @async_method(unique=True, tags=lambda self: [self.account, "workflow:report"])
    def assemble(self, pieces: list[list[str]]) -> int:
        """Step 3: join the parts into the report's text; return its number of lines."""
        lines = sorted(
            (line for piece in pieces for line in piece), key=lambda line: int(line.rsplit(" ", 1)[1])
        )
        self.text = "\n".join(lines)
        self.save(update_fields=["text"])
        return len(lines)


class ChaosTask(models.Model):
    """One call of a chaos run (``manage.py chaos``): each task gets exactly one call, so the task
    identifies the call, and its ``executions`` say how often (and when) the method really ran."""

    run = models.CharField(max_length=40, db_index=True, help_text="The chaos run that made this task.")
    number = models.PositiveIntegerField()
    method = models.CharField(max_length=20, help_text="The method of its one call: work or work_retrying.")

    class Meta:
        constraints = (models.UniqueConstraint(fields=["run", "number"], name="cloud_chaostask_run_number"),)

    def __str__(self) -> str:
        return f"chaos {self.run} #{self.number} ({self.method})"

    @async_method()
    def work(self, seconds: float) -> int:
        """Record the execution, sleep, record its end. Never retried: a lost worker fails it."""
        return self.execute("work", seconds)

    @async_method(retries=5, retry_backoff=1, retry_backoff_max=3)
    def work_retrying(self, seconds: float) -> int:
        """The same, retried (up to 5 times) when its worker is lost."""
        return self.execute("work_retrying", seconds)

    def execute(self, method: str, seconds: float) -> int:
        """Write an ``Execution`` row, sleep ``seconds``, then set its ``finished_at``; return its pk.

        Each write commits on its own (the methods are not ``atomic``), so a process killed in
        the sleep leaves a start without a finish. Times are the host's clock, like the kill
        times the chaos command records, so the two compare.
        """
        import os

        from django.contrib.contenttypes.models import ContentType
        from django.utils import timezone

        from asyncmodels.models import CallState, MethodCall

        database = self._state.db or "default"
        content_type = ContentType.objects.db_manager(database).get_for_model(self)

        def start() -> Execution:
            attempt = (
                MethodCall.objects.using(database)
                .filter(content_type=content_type, object_id=str(self.pk), state=CallState.RUNNING)
                .values_list("attempts", flat=True)
                .first()
            )
            return Execution.objects.using(database).create(
                task=self, method=method, attempt=attempt, pid=os.getpid(), started_at=timezone.now()
            )

        execution: Execution = _write_reconnecting(database, start)
        time.sleep(seconds)
        _write_reconnecting(
            database,
            lambda: (
                Execution.objects.using(database).filter(pk=execution.pk).update(finished_at=timezone.now())
            ),
        )
        return execution.pk


def _write_reconnecting(database: str, write: Any) -> Any:
    """Run ``write()``; if the connection was dropped under it (the chaos run terminates backends),
    run it once more on a fresh connection, as the library does for its own claim."""
    from django.db import InterfaceError, OperationalError, connections

    try:
        return write()
    except (OperationalError, InterfaceError):
        if connections[database].in_atomic_block:
            raise
        connections[database].close()
        return write()


class Execution(models.Model):
    """One run of a ``ChaosTask`` method body, as the worker process saw it."""

    task = models.ForeignKey(ChaosTask, on_delete=models.CASCADE, related_name="executions")
    method = models.CharField(max_length=20)
    attempt = models.PositiveIntegerField(null=True, help_text="The call's attempt number when it started.")
    pid = models.PositiveIntegerField(help_text="The process (RQ work horse) that ran it.")
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True, help_text="Unset if the process was killed.")
    killed_at = models.DateTimeField(
        null=True, blank=True, help_text="When the chaos run saw its process dead, after a kill -9."
    )

    class Meta:
        ordering = ("started_at", "id")

    def __str__(self) -> str:
        return f"{self.method} of {self.task_id} by pid {self.pid} at {self.started_at:%H:%M:%S.%f}"
