"""Prometheus metrics: counters fed by the signals, a collector counting from the database."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import redis
from django.db import connections
from django.db.models.functions import Now
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext
from prometheus_client import REGISTRY, generate_latest

from asyncmodels import metrics
from asyncmodels.models import UNFINISHED_STATES, CallState, MethodCall
from testproject.cloud.models import Echo

from .conftest import REPO
from .test_signals import work_here

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_transitions_failures_and_durations_are_counted(redis_connection: redis.Redis) -> None:
    labels = {"queue": "default", "method": "cloud.Echo.fail"}
    before = {
        transition: _sample(
            "asyncmodels_call_transitions_total", **labels, transition=transition, state=state
        )
        for transition, state in (("enqueued", "enqueued"), ("started", "running"), ("failed", "failed"))
    }
    failures = _sample("asyncmodels_call_failures_total", **labels, error_type="builtins.ValueError")
    durations = _sample("asyncmodels_attempt_duration_seconds_count", **labels, outcome="failed")
    succeeded = _sample(
        "asyncmodels_attempt_duration_seconds_count",
        queue="default",
        method="cloud.Echo.noop",
        outcome="succeeded",
    )
    Echo.objects.create().fail("disk full")
    Echo.objects.create().fail("disk full")
    Echo.objects.create().noop()
    work_here(redis_connection)
    for transition, state in (("enqueued", "enqueued"), ("started", "running"), ("failed", "failed")):
        after = _sample("asyncmodels_call_transitions_total", **labels, transition=transition, state=state)
        assert after - before[transition] == 2, transition
    assert (
        _sample("asyncmodels_call_failures_total", **labels, error_type="builtins.ValueError") - failures == 2
    )
    assert _sample("asyncmodels_attempt_duration_seconds_count", **labels, outcome="failed") - durations == 2
    assert (
        _sample(
            "asyncmodels_attempt_duration_seconds_count",
            queue="default",
            method="cloud.Echo.noop",
            outcome="succeeded",
        )
        - succeeded
        == 1
    )


def _spread_states() -> None:
    """Calls in every state, on two queues."""
    echo = Echo.objects.create()
    calls = [echo.noop() for _ in range(9)]
    states = [
        CallState.PENDING,
        CallState.PENDING,
        CallState.SCHEDULED,
        CallState.WAITING,
        CallState.RUNNING,
        CallState.ENQUEUED,
        CallState.SUCCEEDED,
        CallState.FAILED,
        CallState.CANCELLED,
    ]
    for call, state in zip(calls, states, strict=True):
        MethodCall.objects.filter(pk=call.pk).update(state=state, run_after=Now())
    MethodCall.objects.filter(pk__in=[calls[0].pk, calls[4].pk]).update(queue="urgent")


def test_the_collector_counts_unfinished_calls_per_queue_and_state_as_the_table_says() -> None:
    _spread_states()
    with CaptureQueriesContext(connections["default"]) as queries:
        counted = metrics.unfinished_counts(["default"])
    assert len(queries.captured_queries) == 1  # one grouped query
    table = Counter(
        ("default", queue, state)
        for queue, state in MethodCall.objects.filter(state__in=UNFINISHED_STATES).values_list(
            "queue", "state"
        )
    )
    assert {key: n for key, n in counted.items() if n} == dict(table)
    assert counted[("default", "urgent", "pending")] == 1 and counted[("default", "default", "pending")] == 1
    assert counted[("default", "provisioning", "running")] == 0  # every queue and unfinished state reported
    assert not any(state in ("succeeded", "failed", "cancelled") for _, _, state in counted)
    scraped = generate_latest(REGISTRY).decode()
    for (database, queue, state), n in counted.items():
        assert (
            f'asyncmodels_calls{{database="{database}",queue="{queue}",state="{state}"}} {float(n)}'
            in scraped
        )


def test_metrics_view_exposes_the_registry() -> None:
    _spread_states()
    response = metrics.metrics_view(RequestFactory().get("/metrics/"))
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    body = response.content.decode()
    assert 'asyncmodels_calls{database="default",queue="urgent",state="pending"} 1.0' in body
    assert "asyncmodels_call_transitions_total" in body


def test_without_prometheus_client_nothing_is_required() -> None:
    """The app starts, calls run and signals are sent; the metrics do nothing and the view says why."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["prometheus_client"] = None  # as if it were not installed: importing it fails
        import django
        django.setup()
        from django.test import RequestFactory
        from asyncmodels import metrics
        assert metrics.AVAILABLE is False
        assert metrics.install() is False
        response = metrics.metrics_view(RequestFactory().get("/metrics/"))
        assert response.status_code == 501, response.status_code
        print("ok")
        """
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "testproject.settings"}
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "ok"
