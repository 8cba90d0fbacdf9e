"""Optional Prometheus metrics, through ``prometheus_client`` when it is installed.

``pip install "asyncmodels[metrics]"``. Without ``prometheus_client`` this module imports and
does nothing (``AVAILABLE`` is ``False``). With it, the app's ``ready()`` calls ``install()``,
which registers on ``prometheus_client.REGISTRY``:

``asyncmodels_call_transitions_total`` (counter; labels ``queue``, ``method``, ``transition``, ``state``)
    One per signal of ``asyncmodels.signals`` sent in this process (``transition``: enqueued,
    started, succeeded, failed, retried, cancelled, recovered; ``state``: the state just saved).
``asyncmodels_call_failures_total`` (counter; labels ``queue``, ``method``, ``error_type``)
    Failed attempts, by the error's type (``builtins.ValueError``, ``asyncmodels.WorkerLost``…).
``asyncmodels_attempt_duration_seconds`` (histogram; labels ``queue``, ``method``, ``outcome``)
    Wall time of the attempts that ended on a worker of this process (``outcome``: succeeded,
    failed, timed out, interrupted, cancelled).
``asyncmodels_calls`` (gauge; labels ``database``, ``queue``, ``state``)
    Unfinished calls (pending, scheduled, waiting, enqueued, running) per queue and state, read
    from the database on each scrape: one grouped query per database, through the
    ``(state, id)`` index, over the unfinished rows only (a table of millions of finished calls
    costs no more). Every queue of ``RQ_QUEUES`` reports every unfinished state, 0 included.
    Finished calls are counted by the counters, not here.

Counters and the histogram count what happens in the process that exposes them: expose them
from the worker processes (``prometheus_client.start_http_server(port)``), or, with RQ's forking
worker, whose work horses end with each job, use ``prometheus_client``'s multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``), which ``metrics_view`` honours. ``metrics_view`` is a Django
view to add to your URLs (behind your own access control).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from django.http import HttpRequest, HttpResponse

from . import signals

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

logger = logging.getLogger("asyncmodels.metrics")

try:
    import prometheus_client  # noqa: F401  (only whether it imports)
except ImportError:
    AVAILABLE = False
else:
    AVAILABLE = True

#: Attempt duration buckets (seconds).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class _Metrics:
    """The collectors of one registry, and the signal receivers that feed them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Histogram

        self.registry = registry
        self.transitions = Counter(
            "asyncmodels_call_transitions",
            "Transitions of asyncmodels calls (one per signal sent in this process).",
            ["queue", "method", "transition", "state"],
            registry=registry,
        )
        self.failures = Counter(
            "asyncmodels_call_failures",
            "Failed attempts of asyncmodels calls, by error type.",
            ["queue", "method", "error_type"],
            registry=registry,
        )
        self.durations = Histogram(
            "asyncmodels_attempt_duration_seconds",
            "Wall time of asyncmodels call attempts run in this process (seconds).",
            ["queue", "method", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.receivers = {transition: self._receiver(transition) for transition in signals.TRANSITIONS}
        self.calls = CallsCollector()
        registry.register(self.calls)

    def _receiver(self, transition: str) -> Any:
        def count_transition(sender: Any, **kwargs: Any) -> None:
            call = kwargs["call"]
            queue, method = call.queue, call.method
            self.transitions.labels(queue, method, transition, kwargs.get("state", call.state)).inc()
            if transition == "failed":
                self.failures.labels(queue, method, kwargs.get("error_type", "")).inc()
            if transition in ("succeeded", "failed") and kwargs.get("duration") is not None:
                outcome = "succeeded" if transition == "succeeded" else kwargs.get("outcome", "failed")
                self.durations.labels(queue, method, outcome).observe(kwargs["duration"])

        count_transition.__name__ = f"count_{transition}"
        return count_transition

    def connect(self) -> None:
        for transition, signal in signals.TRANSITIONS.items():
            signal.connect(self.receivers[transition], dispatch_uid=f"asyncmodels.metrics.{transition}")


class CallsCollector:
    """``asyncmodels_calls``: unfinished calls per database, queue and state, read on each scrape."""

    def describe(self) -> list[Any]:
        # Registering must not query the database (the registry asks for names at once).
        from prometheus_client.core import GaugeMetricFamily

        return [GaugeMetricFamily("asyncmodels_calls", "", labels=["database", "queue", "state"])]

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "asyncmodels_calls",
            "Unfinished asyncmodels calls per database, queue and state, as the database says now.",
            labels=["database", "queue", "state"],
        )
        for (database, queue, state), count in sorted(unfinished_counts().items()):
            family.add_metric([database, queue, state], count)
        yield family


def unfinished_counts(databases: list[str] | None = None) -> dict[tuple[str, str, str], int]:
    """Unfinished calls per (database, queue, state): one grouped query per database (default:
    every database that holds calls), 0 for each queue of ``RQ_QUEUES`` and unfinished state with
    none. A database that fails is logged and left out."""
    from django.db.models import Count

    from . import conf
    from .models import UNFINISHED_STATES, MethodCall
    from .recovery import recovery_databases

    counts: dict[tuple[str, str, str], int] = {}
    for database in databases if databases is not None else recovery_databases():
        try:
            rows = list(
                MethodCall.objects.using(database)
                .filter(state__in=sorted(UNFINISHED_STATES))
                .order_by()
                .values_list("queue", "state")
                .annotate(n=Count("pk"))
            )
        except Exception:
            logger.exception("Could not count the unfinished calls on database %r.", database)
            continue
        for queue in conf.get_rq_queue_names():
            for state in UNFINISHED_STATES:
                counts[(database, queue, str(state))] = 0
        for queue, state, n in rows:
            counts[(database, queue, state)] = n
    return counts


_installed: dict[int, _Metrics] = {}


def install(registry: CollectorRegistry | None = None) -> bool:
    """Register asyncmodels' metrics on ``registry`` (default ``prometheus_client.REGISTRY``) and
    connect their signal receivers; return whether it did (``False`` without
    ``prometheus_client``). Idempotent per registry; the app's ``ready()`` calls it."""
    if not AVAILABLE:
        return False
    from prometheus_client import REGISTRY

    registry = registry if registry is not None else REGISTRY
    metrics = _installed.get(id(registry))
    if metrics is None or metrics.registry is not registry:
        metrics = _installed[id(registry)] = _Metrics(registry)
    metrics.connect()
    return True


def metrics_view(request: HttpRequest) -> HttpResponse:
    """A Django view exposing the default registry in Prometheus' text format.

    Add it to your URLs behind your own access control, e.g.
    ``path("metrics/", asyncmodels.metrics.metrics_view)``. Under ``PROMETHEUS_MULTIPROC_DIR``
    (prometheus_client's multiprocess mode) it merges every process's counters and adds the
    database's counts (``asyncmodels_calls``). Without ``prometheus_client``: 501.
    """
    if not AVAILABLE:
        return HttpResponse(
            "prometheus_client is not installed (pip install 'asyncmodels[metrics]').\n",
            status=501,
            content_type="text/plain",
        )
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(CallsCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
