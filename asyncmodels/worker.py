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
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING

import redis
from django.db import connections, reset_queries
from django.db.models import Q
from rq.exceptions import NoSuchJobError, StopRequested
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import JobTimeoutException
from rq.utils import as_text, now, utcformat
from rq.worker import SimpleWorker as RQSimpleWorker
from rq.worker import Worker as RQWorker
from rq.worker import WorkerStatus

if TYPE_CHECKING:
    from redis.client import Pipeline

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


class LeanSimpleWorker(SimpleWorker):
    """``SimpleWorker`` that runs asyncmodels' own jobs without RQ's per-job bookkeeping.

    The ``MethodCall`` row already records everything RQ would (who runs the call, since when,
    how it ended, with what error), and the lease on the row, not RQ's ``StartedJobRegistry``,
    is what recovers a call whose worker died. So for a job of ``run_method_call`` this worker
    skips RQ's execution records, started/finished registries, job status changes, result
    handling, dependents and callbacks (about twenty Redis commands per job): it runs the job
    under RQ's job timeout, then takes the job off Redis (its entry in the queue's intermediate
    list, its hash) and records its own state, statistics and heartbeat, in the same round trip
    as it takes the next job: id and hash at once (``take_next_job``), one request per call.
    A worker on several queues, or on a Redis older than 6.2 or without scripting, takes its
    jobs as RQ does (two requests), and sends that bookkeeping in a request of its own.

    A call still running after ``ANNOUNCE_AFTER_SECONDS`` is announced from a helper thread:
    the job taken off Redis, the worker shown busy, its heartbeat stretched over the job's
    timeout. Before that, Redis shows the worker idle: a short call is over before anyone looks.

    Any other job runs exactly as on RQ's ``SimpleWorker``. For every job, the worker sends its
    routine heartbeat, rewrites its state and checks ``rq suspend`` at most once per
    ``ROUTINE_REDIS_SECONDS`` instead of several times per job (a heartbeat keeps the worker key
    alive for ``worker_ttl`` + 60 s; a suspension is noticed that much later).

    It still registers with RQ (``rqinfo`` and django-rq's admin list it, with its job counts),
    runs recovery passes, honours SIGTERM (the current call finishes) and a second SIGTERM (the
    call is recorded as interrupted, then the worker exits). A crash mid-call leaves the row
    ``running`` with a lease that recovery ends (and, within the first second, the job in RQ's
    intermediate list, which RQ's own cleanup moves to its failed registry); a crash after
    taking the job and before the claim leaves the row ``enqueued``, which recovery pushes again.
    RQ-level ``depends_on`` or callbacks on asyncmodels' jobs are not honoured (asyncmodels never
    sets them: use ``after=``).
    """

    #: Seconds: a routine heartbeat, idle-state write or suspension check this soon after the
    #: last one is skipped.
    ROUTINE_REDIS_SECONDS = 1.0
    #: Seconds a call runs before the worker announces it to Redis (see the class docstring);
    #: well under the minute after which RQ's cleanup fails a job left in the intermediate list.
    ANNOUNCE_AFTER_SECONDS = 1.0

    _routine_heartbeat_at: float | None = None
    _suspension_checked_at: float | None = None
    _announcer: CallAnnouncer | None = None
    #: The last call's bookkeeping (``run_call_job``), sent with the next take (``take_next_job``).
    _bookkeeping: Pipeline | None = None
    #: Whether Redis runs ``TAKE_NEXT_JOB`` (set false the first time it refuses).
    _scripting = True

    #: Lua, one round trip: move the next job id from the queue (KEYS[1]) to its intermediate
    #: list (KEYS[2]), as RQ's own LMOVE does, and return it with its hash (key prefix ARGV[1]).
    TAKE_NEXT_JOB = """
local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
if not id then return false end
return {id, redis.call('HGETALL', ARGV[1] .. id)}
"""

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """Take the next job in one round trip (``take_next_job``) if one is waiting; else wait
        for one as RQ does (heartbeats, maintenance, a blocking pop of up to ``timeout`` seconds)."""
        taken = self.take_next_job()
        if taken is not None:
            return taken
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    def take_next_job(self) -> tuple[Job, Queue] | None:
        """The next job of this worker's only queue and the queue, or ``None`` if it is empty (or
        the worker listens to several queues, or Redis is older than 6.2: RQ's own path then
        pops). One round trip, which also carries the last call's bookkeeping.

        A Redis error is logged and gives ``None``: RQ's path, which follows, retries the
        connection as it always does.
        """
        pipeline, self._bookkeeping = self._bookkeeping, None
        queues = self._ordered_queues
        version = self.get_redis_server_version()  # type: ignore[no-untyped-call]
        if len(queues) != 1 or version < (6, 2, 0) or not self._scripting:
            if pipeline is not None:
                self._send_bookkeeping(pipeline)
            return None
        queue = queues[0]
        keys = (queue.key, IntermediateQueue.get_intermediate_queue_key(queue.key))
        while True:
            if pipeline is None:
                pipeline = self.connection.pipeline(transaction=False)
            pipeline.eval(self.TAKE_NEXT_JOB, 2, *keys, self.job_class.redis_job_namespace_prefix)
            try:
                with pipeline:
                    taken = pipeline.execute(raise_on_error=False)[-1]
            except redis.RedisError:
                self.log.warning("Worker %s: could not take a job from Redis", self.name, exc_info=True)
                return None
            if isinstance(taken, redis.ResponseError):
                # EVAL refused (a Redis-compatible server without scripting, say): RQ's own
                # pops from now on; the bookkeeping sent with it went through regardless.
                self._scripting = False
                self.log.warning(
                    "Worker %s: Redis refused the one-round-trip take (%s); taking jobs as RQ does.",
                    self.name,
                    taken,
                )
                return None
            pipeline = None
            if not taken:
                return None
            job_id, fields = as_text(taken[0]), taken[1]
            if not fields:
                continue  # its hash is gone (deleted, expired): RQ passes over it the same way
            job = self.job_class(job_id, connection=self.connection, serializer=self.serializer)
            try:
                job.restore(dict(zip(fields[::2], fields[1::2], strict=True)))
            except NoSuchJobError:
                continue  # a hash without the job's data: RQ passes over it the same way
            job.redis_server_version = version
            self.reorder_queues(reference_queue=queue)
            if self.log_job_description:
                self.log.info("Worker %s: %s: %s (%s)", self.name, queue.name, job.description, job.id)
            else:
                self.log.info("Worker %s: %s: %s", self.name, queue.name, job.id)
            return job, queue

    def _send_bookkeeping(self, pipeline: Pipeline) -> None:
        try:
            with pipeline:
                pipeline.execute()
        except redis.RedisError:
            self.log.warning("Worker %s: could not record its last job in Redis", self.name, exc_info=True)

    def teardown(self) -> None:
        if self._bookkeeping is not None:
            pipeline, self._bookkeeping = self._bookkeeping, None
            self._send_bookkeeping(pipeline)
        super().teardown()  # type: ignore[no-untyped-call]

    def execute_job(self, job: Job, queue: Queue) -> None:
        if not is_plain_call_job(job):
            super().execute_job(job, queue)
            return
        reset_queries()  # as RecoveryMixin.execute_job does for every job
        self.run_call_job(job, queue)

    def run_call_job(self, job: Job, queue: Queue) -> None:
        """Run a job of asyncmodels' ``run_method_call``; its Redis bookkeeping is sent with the
        next take (``take_next_job``) or when the worker stops (plus one request for a call
        longer than ``ANNOUNCE_AFTER_SECONDS``).

        Raises what the job lets through (``SystemExit``, ``KeyboardInterrupt``: a cold stop)
        and Redis' errors (the worker then exits, as RQ's does; recovery sees to the call).
        """
        if self._announcer is None:
            self._announcer = CallAnnouncer(self)
        # Busy at once for RQ's signal handler: a SIGTERM now waits for the call to finish. In
        # Redis only once announced (RQ's set_state would write it now).
        self._state = WorkerStatus.BUSY
        job.worker_name = self.name  # read by the job (current_worker_name); not written to Redis
        job.started_at = now()
        self._announcer.watch(job, queue)
        succeeded = False
        try:
            timeout = job.timeout or self.queue_class.DEFAULT_TIMEOUT
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=job.id):
                job.perform()
            succeeded = True
        except Exception:
            # The job records the method's own errors on the row; this is a failure around it
            # (the database unreachable, a timeout outside the method): RQ's handlers log it.
            self.handle_exception(job, *sys.exc_info())
        finally:
            announced = self._announcer.done()
            job.ended_at = now()
            # Sent with the next take (take_next_job), or when the worker stops (teardown).
            pipeline = self._bookkeeping = self.connection.pipeline(transaction=False)
            if not announced:
                self.take_off_redis(job, queue, pipeline)
            self.set_state(WorkerStatus.IDLE, pipeline=pipeline)
            if succeeded:
                self.increment_successful_job_count(pipeline=pipeline)
            else:
                self.increment_failed_job_count(pipeline=pipeline)
            self.increment_total_working_time(job.ended_at - job.started_at, pipeline)
            self.heartbeat(pipeline=pipeline)
            self._routine_heartbeat_at = time.monotonic()
        self.log.info("Worker %s: %s: Job OK (%s)", self.name, job.origin, job.id)

    def take_off_redis(self, job: Job, queue: Queue, pipeline: Pipeline) -> None:
        """Queue on ``pipeline`` the removal of ``job``'s entry in the intermediate list and of
        its hash: the row is the record, and nothing is left for RQ's cleanup to fail later."""
        pipeline.lrem(IntermediateQueue.get_intermediate_queue_key(queue.key), 1, job.id)
        pipeline.delete(job.key, job.dependents_key, job.dependencies_key)

    def announce(self, job: Job, queue: Queue) -> None:
        """Tell Redis about a call that runs long: job taken off, worker busy, heartbeat over the
        job's timeout. Called from ``CallAnnouncer``'s thread. Raises Redis' errors."""
        with self.connection.pipeline(transaction=False) as pipeline:
            self.take_off_redis(job, queue, pipeline)
            pipeline.hset(self.key, "state", WorkerStatus.BUSY)
            ttl = max(self.worker_ttl + 60, self.get_heartbeat_ttl(job))
            pipeline.hset(self.key, "last_heartbeat", utcformat(now()))
            pipeline.expire(self.key, ttl)
            pipeline.expire(self.executions_key, ttl)
            pipeline.execute()

    def _routine_done_lately(self, at: float | None) -> bool:
        return at is not None and time.monotonic() - at < self.ROUTINE_REDIS_SECONDS

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """RQ's heartbeat, in one round trip; a routine one (no ``timeout``, no ``pipeline``) is
        skipped within ``ROUTINE_REDIS_SECONDS`` of the last routine one."""
        routine = timeout is None and pipeline is None
        if routine and self._routine_done_lately(self._routine_heartbeat_at):
            return
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
        else:
            with self.connection.pipeline(transaction=False) as own:
                super().heartbeat(timeout, pipeline=own)
                own.execute()
        # Any other heartbeat may have set a shorter expiry (a job's): the next routine one goes.
        self._routine_heartbeat_at = time.monotonic() if routine else None

    def set_state(self, state: str, pipeline: Pipeline | None = None) -> None:
        if pipeline is None and state == self.get_state():
            return  # only this process writes its state: Redis holds this one already
        super().set_state(state, pipeline=pipeline)

    def check_for_suspension(self, burst: bool) -> None:
        if self._routine_done_lately(self._suspension_checked_at):
            return
        super().check_for_suspension(burst)
        self._suspension_checked_at = time.monotonic()


class CallAnnouncer:
    """A ``LeanSimpleWorker``'s helper thread: announces (``announce()``) the call it runs once
    that call has run ``ANNOUNCE_AFTER_SECONDS``; most calls end before, and cost it nothing."""

    def __init__(self, worker: LeanSimpleWorker) -> None:
        self.worker = worker
        self._changed = threading.Condition(threading.Lock())
        self._running: tuple[Job, Queue, float] | None = None  # job, queue, since (monotonic)
        self._announced = False
        self._idle = False  # whether the thread waits for a call with no deadline
        self._thread = threading.Thread(target=self._run, name="asyncmodels-announcer", daemon=True)
        self._thread.start()

    def watch(self, job: Job, queue: Queue) -> None:
        """Start watching the call the worker is about to run."""
        with self._changed:
            self._running, self._announced = (job, queue, time.monotonic()), False
            # Woken only from a wait without a deadline: a thread woken for every call cost
            # ~5 ms a call (the main thread then waits for the GIL to come back).
            if self._idle:
                self._changed.notify()

    def done(self) -> bool:
        """Stop watching (after an announcement in progress, if any); return whether it was announced."""
        with self._changed:
            self._running = None
            return self._announced

    def _run(self) -> None:
        with self._changed:
            while True:
                if self._running is None or self._announced:
                    self._idle = True
                    self._changed.wait()
                    self._idle = False
                    continue
                job, queue, since = self._running
                wait = since + self.worker.ANNOUNCE_AFTER_SECONDS - time.monotonic()
                if wait > 0:
                    self._changed.wait(wait)  # the call may end, and others start, meanwhile
                    continue
                # Under the lock: done() waits for this, so the idle state cannot come first.
                try:
                    self.worker.announce(job, queue)
                except Exception:
                    # Not announced: the worker takes the job off Redis when the call ends.
                    logger.exception("Could not announce job %s to Redis; it runs on regardless.", job.id)
                    self._running = None
                else:
                    self._announced = True


def is_plain_call_job(job: Job) -> bool:
    """Whether ``job`` is asyncmodels' ``run_method_call(call_id, database)`` as ``dispatch`` pushes
    it: no result kept, no RQ callbacks, repeats or rate limit, whose bookkeeping it would need."""
    try:
        function, args = job.func_name, job.args
    except Exception:  # data that does not deserialize: RQ's own path fails that job and goes on
        return False
    return (
        function == JOB_FUNCTION
        and len(args) == 2
        and not job.kwargs
        and job.result_ttl == 0
        and job._success_callback_name is None
        and job._failure_callback_name is None
        and job._stopped_callback_name is None
        and not job.repeats_left
        and not job.has_rate_limit
    )
