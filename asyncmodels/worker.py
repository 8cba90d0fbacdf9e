"""RQ worker classes that run recovery by themselves: no extra process for anyone to forget.

Set ``RQ = {"WORKER_CLASS": "asyncmodels.worker.Worker"}`` (django-rq reads it) or pass
``--worker-class asyncmodels.worker.Worker`` to ``manage.py rqworker``. Each such worker then
runs a recovery pass (``asyncmodels.recovery``) every ``RECOVERY_INTERVAL_SECONDS``, between jobs
and while it waits for one: with any worker alive, stuck calls move on; with several, passes
overlap harmlessly (every transition is a compare-and-set).

Why in the worker loop rather than a periodic RQ job or a scheduler: a periodic job needs
something to enqueue it (the very thing that may be down), and RQ's scheduler is an extra flag
and process. Why not a thread: a forking worker must not fork while another thread may hold a
lock or a database connection.

Shutdown: the first SIGTERM/SIGINT is RQ's warm shutdown (the current call finishes). A second
one kills the work horse; this class then ends that call's attempt at once (retried if its
policy allows, else failed as "worker lost") instead of leaving it for its lease to run out.
"""

from __future__ import annotations

import logging
import threading
import time
from types import FrameType

from django.db import connections, reset_queries
from django.db.models import Q
from rq.exceptions import StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.worker import SimpleWorker as RQSimpleWorker
from rq.worker import Worker as RQWorker

from . import conf
from .dispatch import JOB_FUNCTION
from .models import CallState, MethodCall
from .recovery import end_lost_attempt, recover_stranded_calls

logger = logging.getLogger("asyncmodels.worker")

#: How long a stopping worker waits for RQ to close its pub/sub connection (seconds).
UNSUBSCRIBE_WAIT_SECONDS = 2.0


class RecoveryMixin:
    """Mix into an RQ worker class: recovery passes in the work loop; a cold stop hands back the call."""

    _asyncmodels_last_recovery: float | None = None

    def _recovery_interval(self) -> float:
        return float(conf.get_config()["RECOVERY_INTERVAL_SECONDS"])

    def _recovery_due(self) -> bool:
        last = self._asyncmodels_last_recovery
        return last is None or time.monotonic() - last >= self._recovery_interval()

    @property
    def should_run_maintenance_tasks(self) -> bool:
        return bool(super().should_run_maintenance_tasks) or self._recovery_due()  # type: ignore[misc]

    def run_maintenance_tasks(self) -> None:
        if super().should_run_maintenance_tasks:  # type: ignore[misc]
            super().run_maintenance_tasks()  # type: ignore[misc]
        if self._recovery_due():
            self.run_recovery()

    @property
    def dequeue_timeout(self) -> int:
        # Wake up from waiting for a job often enough to run recovery on time.
        return max(1, min(int(super().dequeue_timeout), int(self._recovery_interval())))  # type: ignore[misc]

    def execute_job(self, job: Job, queue: Queue) -> None:
        # With DEBUG on, Django logs every query of a connection until a request starts (up to
        # 9,000 per connection); a worker has no requests, so its memory grew by ~10 MiB over
        # the first few thousand calls. Each job starts with empty logs, as a request would (a
        # forking worker's horse inherits them empty).
        reset_queries()
        super().execute_job(job, queue)  # type: ignore[misc]

    def unsubscribe(self) -> None:
        # RQ stops its pub/sub thread after sending UNSUBSCRIBE. With redis-py 8, whose stop()
        # waits for the thread, a thread that read the reply first goes back to waiting for a
        # message, up to RQ's 60 s: a stopping worker (every --burst worker, too) then hung for
        # up to a minute, about one exit in two (rq issue #1613 is the same hang). Ask the
        # thread to stop first, so the reply ends it; and never wait more than a few seconds.
        listener = getattr(self, "pubsub_thread", None)
        if listener is not None:
            try:
                listener.stop(timeout=0)  # redis-py >= 8: clear its flag, do not wait
            except TypeError:
                listener.stop()  # older redis-py: stop() only clears the flag
        thread = threading.Thread(target=super().unsubscribe, name="rq-unsubscribe", daemon=True)  # type: ignore[misc]
        thread.start()
        thread.join(UNSUBSCRIBE_WAIT_SECONDS)
        if thread.is_alive():
            logger.warning(
                "RQ's pub/sub connection did not close within %s s; exiting without it.",
                UNSUBSCRIBE_WAIT_SECONDS,
            )

    def run_recovery(self) -> None:
        """One recovery pass; never lets an error stop the worker."""
        self._asyncmodels_last_recovery = time.monotonic()
        try:
            recover_stranded_calls()
        except StopRequested:
            raise  # RQ's warm shutdown, raised by its SIGTERM handler: let the worker stop
        except Exception:
            logger.exception("Recovery pass failed; the worker goes on.")
        finally:
            # This process forks work horses: never let one inherit an open database connection.
            connections.close_all()
            reset_queries()

    def request_force_stop(self, signum: int, frame: FrameType | None) -> None:
        job = self.get_current_job()  # type: ignore[attr-defined]
        horse_pid = int(getattr(self, "horse_pid", 0) or 0)
        try:
            # Returns without doing anything when the signal repeats within a second; else
            # kills the work horse (forking workers) and raises SystemExit.
            super().request_force_stop(signum, frame)  # type: ignore[misc]
        except SystemExit:
            # Only a forking worker whose horse was really killed hands the call back; in a
            # SimpleWorker the SystemExit runs through the job itself, which records it.
            if horse_pid and job is not None and job.func_name == JOB_FUNCTION and len(job.args) == 2:
                hand_back(int(job.args[0]), str(job.args[1]), worker=str(self.name))  # type: ignore[attr-defined]
            raise


def hand_back(call_id: int, database: str, *, worker: str) -> None:
    """End the attempt of call ``call_id`` on ``database`` now, if ``worker`` (its name) still runs it.

    For a worker stopping hard: its work horse is dead, so the call is retried (if its policy
    allows) or failed at once, instead of after its lease. Never raises.
    """
    try:
        call = (
            MethodCall.objects.using(database)
            .filter(pk=call_id, state=CallState.RUNNING, worker=worker)
            .first()
        )
        if call is None:
            return
        reason = (
            f"The worker running attempt {call.attempts} ({worker}) was stopped hard (a second SIGTERM "
            "or SIGINT) and its work horse killed."
        )
        end_lost_attempt(call, Q(worker=worker), reason)
    except Exception:
        logger.exception("Could not hand back call %s; its lease will expire on its own.", call_id)


class Worker(RecoveryMixin, RQWorker):
    """RQ's forking worker, running asyncmodels recovery."""


class SimpleWorker(RecoveryMixin, RQSimpleWorker):
    """RQ's non-forking worker (one process, jobs run in it), running asyncmodels recovery."""
