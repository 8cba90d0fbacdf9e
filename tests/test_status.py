"""``asyncmodels_status`` and ``asyncmodels.status``: counts, stuck calls, exit code, JSON shape."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db.models.functions import Now
from pytest_django import DjangoAssertNumQueries

from asyncmodels.status import Thresholds, format_status, read_status

from .conftest import REPO, _worker_env
from .seeded_calls import make_call

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

MINUTE = datetime.timedelta(minutes=1)


def status_command(*args: str) -> tuple[str, CommandError | None]:
    """Run the command in this process; return its output and the CommandError it ended with."""
    out = StringIO()
    try:
        call_command("asyncmodels_status", *args, stdout=out)
    except CommandError as exc:
        return out.getvalue(), exc
    return out.getvalue(), None


def healthy_site() -> None:
    """A site with work in flight but nothing stuck."""
    make_call("pending", age=datetime.timedelta(seconds=5))
    make_call("enqueued", age=2 * MINUTE, queue="urgent")
    make_call("running", age=3 * MINUTE, lease_expires_at=Now() + MINUTE, worker="w1")
    make_call("succeeded", age=10 * MINUTE)
    make_call("succeeded", age=10 * MINUTE)
    make_call("failed", age=20 * MINUTE)
    make_call("succeeded", age=datetime.timedelta(hours=5))  # outside the default 1 h window


def test_healthy_site_exits_zero_and_counts_per_queue_and_state() -> None:
    healthy_site()
    output, error = status_command()
    assert error is None, output
    status = read_status()
    assert status.healthy
    assert status.counts == {
        ("default", "pending"): 1,
        ("urgent", "enqueued"): 1,
        ("default", "running"): 1,
        ("default", "succeeded"): 2,
        ("default", "failed"): 1,
    }
    assert status.failure_rate == pytest.approx(1 / 3)
    assert status.oldest_pending is not None and status.oldest_pending.age < MINUTE
    assert status.longest_running is not None and status.longest_running.worker == "w1"
    assert "OK: nothing needs a human." in output
    assert "1 of 3 finished calls failed (33.3%)" in output
    assert format_status(status).splitlines()[3].split() == [
        "queue",
        "pending",
        "scheduled",
        "waiting",
        "enqueued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    ]


@pytest.mark.parametrize(
    ("stuck", "problem"),
    [
        ({"state": "pending", "age": 6 * MINUTE}, "1 pending call(s) older than 5m"),
        ({"state": "enqueued", "age": 31 * MINUTE}, "1 enqueued call(s) waiting longer than 30m"),
        (
            {"state": "running", "age": 10 * MINUTE, "lease_expires_at": Now() - 2 * MINUTE},
            "1 running call(s) whose lease expired more than 1m ago",
        ),
        (
            {"state": "scheduled", "age": 10 * MINUTE, "run_after": Now() - 6 * MINUTE},
            "1 scheduled call(s) overdue by more than 5m",
        ),
    ],
)
def test_stuck_call_makes_the_command_fail_naming_it(stuck: dict[str, object], problem: str) -> None:
    healthy_site()
    state = stuck.pop("state")
    make_call(str(state), **stuck)  # type: ignore[arg-type]
    output, error = status_command()
    assert error is not None, output
    assert problem in str(error)
    assert "NEEDS ATTENTION:" in output
    assert problem in output


def test_thresholds_are_options() -> None:
    make_call("pending", age=6 * MINUTE)
    assert status_command("--pending-after", "10m")[1] is None
    assert status_command("--pending-after", "5m")[1] is not None


def test_an_expired_lease_within_the_grace_is_counted_but_not_stuck() -> None:
    make_call("running", age=5 * MINUTE, lease_expires_at=Now() - datetime.timedelta(seconds=10))
    status = read_status()
    assert (status.expired_leases, status.stuck_leases, status.healthy) == (1, 0, True)
    status = read_status(thresholds=Thresholds(lease_grace=datetime.timedelta(0)))
    assert (status.stuck_leases, status.healthy) == (1, False)


def test_failure_rate_above_the_limit_fails_only_when_asked() -> None:
    make_call("succeeded")
    make_call("failed")
    assert status_command()[1] is None
    assert status_command("--max-failure-rate", "0.6")[1] is None
    _output, error = status_command("--max-failure-rate", "0.4")
    assert error is not None and "50.0% of the calls finished in the last 1h failed" in str(error)


def test_since_widens_the_window_of_finished_calls() -> None:
    make_call("failed", age=datetime.timedelta(hours=5))
    assert read_status().total("failed") == 0
    assert read_status(window=datetime.timedelta(hours=6)).total("failed") == 1
    output, _ = status_command("--json", "--since", "6h")
    assert json.loads(output)["totals"]["failed"] == 1


def test_json_shape_is_stable() -> None:
    healthy_site()
    make_call("pending", age=6 * MINUTE)
    output, error = status_command("--json")
    assert error is not None
    data = json.loads(output)
    assert set(data) == {
        "version",
        "database",
        "now",
        "window_seconds",
        "thresholds",
        "queues",
        "totals",
        "oldest_pending",
        "oldest_enqueued",
        "longest_running",
        "expired_leases",
        "failures",
        "stuck",
        "healthy",
        "problems",
    }
    assert data["version"] == 1
    assert data["database"] == "default"
    assert data["window_seconds"] == 3600
    assert data["thresholds"] == {
        "pending_seconds": 300,
        "enqueued_seconds": 1800,
        "lease_grace_seconds": 60,
        "overdue_seconds": 300,
        "failure_rate": None,
    }
    assert data["queues"]["default"]["pending"] == 2
    assert data["queues"]["urgent"] == {
        "pending": 0,
        "scheduled": 0,
        "waiting": 0,
        "enqueued": 1,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert data["totals"]["succeeded"] == 2
    assert set(data["oldest_pending"]) == {
        "id",
        "method",
        "queue",
        "object",
        "age_seconds",
        "worker",
        "lease_expires_at",
    }
    assert data["oldest_pending"]["age_seconds"] >= 360
    assert data["oldest_pending"]["method"] == "cloud.Echo.bump"
    assert data["oldest_pending"]["object"].startswith("cloud.echo:")
    assert data["longest_running"]["lease_expires_at"] is not None
    assert data["failures"] == {"finished": 3, "failed": 1, "rate": pytest.approx(1 / 3)}
    assert data["stuck"] == {"pending": 1, "enqueued": 0, "expired_leases": 0, "overdue_scheduled": 0}
    assert data["healthy"] is False
    assert len(data["problems"]) == 1


def test_database_option_reads_that_alias() -> None:
    make_call("pending", age=6 * MINUTE, database="other")
    assert status_command()[1] is None
    output, error = status_command("--database", "other", "--json")
    assert error is not None
    assert json.loads(output)["database"] == "other"
    assert status_command("--database", "nowhere")[1] is not None


def test_bad_duration_is_refused() -> None:
    with pytest.raises(CommandError, match="'5x' is not a duration"):
        call_command("asyncmodels_status", "--since", "5x", stdout=StringIO())


def test_read_status_costs_the_same_queries_for_any_number_of_calls(
    django_assert_num_queries: DjangoAssertNumQueries,
) -> None:
    healthy_site()
    with django_assert_num_queries(11):
        read_status()
    for state in ("pending", "enqueued", "running", "succeeded", "failed"):
        make_call(state)
    with django_assert_num_queries(11):
        read_status()


def test_exit_status_of_the_process_serves_as_a_health_check() -> None:
    """The real process: status 0 when healthy, 1 (and the problem on stderr) when stuck."""

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", "asyncmodels_status", "--json"],
            cwd=REPO,
            env=_worker_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    healthy_site()
    completed = run()
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["healthy"] is True
    make_call("enqueued", age=45 * MINUTE)
    completed = run()
    assert completed.returncode == 1
    assert json.loads(completed.stdout)["healthy"] is False
    assert "1 enqueued call(s) waiting longer than 30m" in completed.stderr
