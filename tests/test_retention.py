"""``asyncmodels_prune`` and ``asyncmodels.retention``: what is deleted, in what batches, and what
never is; the ``RETENTION_SECONDS`` setting and recovery's own pruning."""

from __future__ import annotations

import datetime
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext, override_settings

from asyncmodels import conf
from asyncmodels.exceptions import ConfigurationError
from asyncmodels.models import MethodCall, MethodCallDependency, MethodCallTag
from asyncmodels.recovery import recover_stranded_calls
from asyncmodels.retention import count_prunable, prune_finished_calls

from .seeded_calls import make_call

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

DAY = datetime.timedelta(days=1)
RETENTION = {"succeeded": 7 * DAY, "failed": 30 * DAY}


def seeded() -> tuple[list[int], list[int]]:
    """Calls of every kind around the cutoffs of ``RETENTION``: (ids a prune must delete, ids it
    must keep)."""
    doomed: list[int] = []
    kept: list[int] = []
    # unfinished calls are never pruned, however old
    kept += [make_call(state, age=90 * DAY).pk for state in ("pending", "running", "scheduled")]
    kept.append(make_call("cancelled", age=90 * DAY).pk)  # no retention given for cancelled calls
    # created long ago, finished yesterday (retried by hand): its age counts from the finish
    kept.append(make_call("succeeded", age=60 * DAY, finished_at=Now() - DAY).pk)
    doomed.append(make_call("succeeded", age=40 * DAY).pk)
    doomed.append(make_call("failed", age=31 * DAY).pk)
    awaited_by_finished = make_call("succeeded", age=9 * DAY)
    awaited_by_waiting = make_call("succeeded", age=9 * DAY)
    doomed.append(awaited_by_finished.pk)  # only a finished call waited for it
    kept.append(awaited_by_waiting.pk)  # an unfinished call still waits for it
    kept.append(make_call("waiting", age=9 * DAY, after=(awaited_by_waiting,)).pk)
    doomed.append(make_call("succeeded", age=8 * DAY, tags=("region:eu",)).pk)
    kept.append(make_call("failed", age=8 * DAY).pk)  # failed calls are kept 30 days
    kept.append(make_call("succeeded", age=6 * DAY).pk)  # younger than 7 days
    kept.append(make_call("succeeded", age=DAY, after=(awaited_by_finished,)).pk)
    return doomed, kept


def all_ids() -> set[int]:
    return set(MethodCall.objects.values_list("pk", flat=True))


def test_prune_deletes_exactly_the_finished_calls_past_their_retention() -> None:
    doomed, kept = seeded()
    report = prune_finished_calls(RETENTION)
    assert all_ids() == set(kept)
    assert report.deleted == {"succeeded": 3, "failed": 1}
    assert not MethodCallTag.objects.filter(call__in=doomed).exists()
    # the dependency link of a pruned call goes with it; the waiting call's link stays
    assert not MethodCallDependency.objects.filter(depends_on__in=doomed).exists()
    assert MethodCallDependency.objects.count() == 1


def test_dry_run_counts_and_changes_nothing() -> None:
    seeded()
    before = {(c.pk, c.state) for c in MethodCall.objects.all()}
    out = StringIO()
    call_command("asyncmodels_prune", "--succeeded", "7d", "--failed", "30d", "--dry-run", stdout=out)
    assert {(c.pk, c.state) for c in MethodCall.objects.all()} == before
    assert MethodCallTag.objects.count() == 1
    assert "would delete 4 call(s): succeeded 3, failed 1" in out.getvalue()
    assert count_prunable(RETENTION).deleted == {"succeeded": 3, "failed": 1}


def test_prune_goes_in_batches_each_a_select_then_deletes_by_primary_key() -> None:
    for _ in range(7):
        make_call("succeeded", age=10 * DAY)
    young = make_call("succeeded", age=DAY)
    with CaptureQueriesContext(connection) as queries:
        report = prune_finished_calls({"succeeded": 7 * DAY}, batch_size=3)
    assert (report.batches, report.total) == (3, 7)
    assert all_ids() == {young.pk}
    statements = [q["sql"] for q in queries.captured_queries if q["sql"] not in ("BEGIN", "COMMIT")]
    table, tags, links = (
        '"asyncmodels_methodcall"',
        '"asyncmodels_methodcalltag"',
        '"asyncmodels_methodcalldependency"',
    )
    shapes = [
        sql.split(" WHERE ")[0].split(" FROM ")[-1] if sql.startswith("DELETE") else sql[:6]
        for sql in statements
    ]
    # the database's clock once, then per batch one SELECT of ids and three DELETEs by key
    assert shapes == ["SELECT", *(["SELECT", tags, links, table] * 3)]
    selects = [sql for sql in statements[1:] if sql.startswith("SELECT")]
    assert all(
        sql.endswith("LIMIT 3" + (" FOR UPDATE SKIP LOCKED" if connection.vendor == "postgresql" else ""))
        for sql in selects
    )
    deletes = [sql for sql in statements if sql.startswith("DELETE FROM " + table)]  # noqa: S608
    keys = [sql.rsplit(" IN (", 1)[1].rstrip(")").split(", ") for sql in deletes]
    assert [len(batch) for batch in keys] == [3, 3, 1]
    by_key = "DELETE FROM " + table + " WHERE " + table + '."id" IN ('  # noqa: S608
    assert all(sql.startswith(by_key) for sql in deletes)


def test_each_batch_commits_on_its_own() -> None:
    """A failure in the third batch leaves the first two deleted (short transactions, not one)."""
    for _ in range(7):
        make_call("succeeded", age=10 * DAY)
    seen: list[int] = []

    def fail_on_third(deleted: int) -> None:
        seen.append(deleted)
        if len(seen) == 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        prune_finished_calls({"succeeded": 7 * DAY}, batch_size=3, progress=fail_on_third)
    assert MethodCall.objects.count() == 1


def test_prune_command_reports_and_uses_the_setting_without_options() -> None:
    seeded()
    out = StringIO()
    with override_settings(ASYNCMODELS={"RETENTION_SECONDS": {"succeeded": 7 * 86400}}):
        call_command("asyncmodels_prune", "--batch-size", "2", stdout=out)
    assert "deleted 3 call(s) in 2 batch(es): succeeded 3." in out.getvalue()
    assert MethodCall.objects.filter(state="failed").count() == 2


def test_prune_command_refuses_bad_input_and_changes_nothing() -> None:
    seeded()
    before = MethodCall.objects.count()
    with pytest.raises(CommandError, match="Nothing to prune by"):
        call_command("asyncmodels_prune", stdout=StringIO())
    with pytest.raises(CommandError, match="is not a duration"):
        call_command("asyncmodels_prune", "--succeeded", "seven days", stdout=StringIO())
    with pytest.raises(CommandError, match="must be at least 1"):
        call_command("asyncmodels_prune", "--succeeded", "7d", "--batch-size", "0", stdout=StringIO())
    with pytest.raises(CommandError, match="unknown database alias"):
        call_command("asyncmodels_prune", "--succeeded", "7d", "--database", "x", stdout=StringIO())
    assert MethodCall.objects.count() == before


def test_prune_only_touches_the_chosen_database() -> None:
    make_call("succeeded", age=10 * DAY, database="other")
    make_call("succeeded", age=10 * DAY)
    call_command("asyncmodels_prune", "--succeeded", "7d", "--database", "other", stdout=StringIO())
    assert MethodCall.objects.using("other").count() == 0
    assert MethodCall.objects.count() == 1


def test_unfinished_states_cannot_be_given_a_retention() -> None:
    with pytest.raises(ValueError, match="'running' is not a finished state"):
        prune_finished_calls({"running": DAY})


def test_recovery_prunes_nothing_by_default() -> None:
    make_call("succeeded", age=400 * DAY)
    assert recover_stranded_calls(["default"]).pruned == 0
    assert MethodCall.objects.count() == 1


def test_recovery_prunes_one_bounded_batch_per_pass_with_the_setting() -> None:
    for _ in range(5):
        make_call("succeeded", age=10 * DAY)
    make_call("failed", age=10 * DAY)
    setting = {"RETENTION_SECONDS": {"succeeded": 7 * 86400, "failed": 86400}, "RECOVERY_BATCH_SIZE": 2}
    with override_settings(ASYNCMODELS=setting):
        assert [recover_stranded_calls(["default"]).pruned for _ in range(5)] == [2, 2, 1, 1, 0]
    assert MethodCall.objects.count() == 0


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ([7], "must be None or a dict"),
        ({"running": 60}, "only finished states are pruned"),
        ({"succeeded": 0}, "must be a positive number of seconds"),
        ({"succeeded": "7d"}, "must be a positive number of seconds"),
    ],
)
def test_retention_setting_is_checked(value: object, problem: str) -> None:
    with (
        override_settings(ASYNCMODELS={"RETENTION_SECONDS": value}),
        pytest.raises(ConfigurationError, match=problem),
    ):
        conf.get_retention()


def test_retention_setting_is_in_seconds() -> None:
    with override_settings(ASYNCMODELS={"RETENTION_SECONDS": {"failed": 90}}):
        assert conf.get_retention() == {"failed": datetime.timedelta(seconds=90)}
    assert conf.get_retention() == {}
