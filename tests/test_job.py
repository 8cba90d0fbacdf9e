"""The generic job: claim once, reload fresh, run only registered methods, record everything."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import django_rq
import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from pytest_django import DjangoAssertNumQueries

from asyncmodels import dispatch
from asyncmodels.job import run_method_call
from asyncmodels.models import CallState, MethodCall
from testproject.cloud.models import Account, Echo, Instance, Region, Volume

from .conftest import RunWorker, wait_for

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


@pytest.fixture
def instance() -> Instance:
    return Instance.objects.create(account=Account.objects.create(name="acme"), name="web1")


def test_committed_call_runs_exactly_once_and_succeeds_with_result(
    instance: Instance, run_worker: RunWorker
) -> None:
    call = instance.provision(size="large")
    run_worker()
    run_worker()  # a second worker finds nothing more to do
    call.refresh_from_db()
    assert call.state == CallState.SUCCEEDED
    assert call.result == {"name": "web1", "size": "large", "status": "running"}
    assert call.attempts == 1
    assert call.error == call.traceback == ""
    assert call.worker
    assert call.created_at <= call.enqueued_at <= call.started_at <= call.finished_at  # type: ignore[operator]
    instance.refresh_from_db()
    assert (instance.size, instance.status) == ("large", "running")


def test_method_sees_the_committed_row_not_a_stale_copy(instance: Instance, run_worker: RunWorker) -> None:
    call = instance.describe()
    Instance.objects.filter(pk=instance.pk).update(name="renamed after the call", status="stopped")
    run_worker()
    call.refresh_from_db()
    assert call.result == {"name": "renamed after the call", "size": "small", "status": "stopped"}


def test_object_deleted_before_the_run_fails_saying_the_object_is_gone(
    instance: Instance, run_worker: RunWorker
) -> None:
    call = instance.provision(size="large")
    pk = instance.pk
    instance.delete()
    run_worker()
    call.refresh_from_db()
    assert call.state == CallState.FAILED
    assert call.error_type == "asyncmodels.ObjectDoesNotExist"
    assert "gone" in call.error
    assert f"cloud.Instance with pk='{pk}'" in call.error
    assert call.attempts == 1


def test_row_naming_an_undecorated_method_fails_and_runs_nothing(
    instance: Instance, run_worker: RunWorker
) -> None:
    # A forged or stale row: the job must look the name up in the registry, never getattr().
    call = MethodCall.objects.create(
        content_type=ContentType.objects.get_for_model(Instance),
        object_id=str(instance.pk),
        method="cloud.Instance.not_async",
        queue="default",
    )
    dispatch.push(call)
    run_worker()
    call.refresh_from_db()
    assert call.state == CallState.FAILED
    assert call.error_type == "asyncmodels.MethodNotRegistered"
    assert "nothing was run" in call.error
    instance.refresh_from_db()
    assert instance.status == "new"


def test_same_job_delivered_twice_runs_the_method_once(run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    call = echo.bump()
    # A second delivery of the same call (a re-push, a duplicated message) under another job id.
    queue = django_rq.get_queue("default", commit_mode="auto")
    queue.enqueue(dispatch.JOB_FUNCTION, call.pk, "default", job_id=f"duplicate-{call.pk}")
    assert queue.count == 2
    run_worker()
    echo.refresh_from_db()
    assert echo.hits == 1
    call.refresh_from_db()
    assert call.state == CallState.SUCCEEDED
    assert call.attempts == 1


def test_job_for_a_running_or_finished_call_does_nothing(run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    call = echo.bump()
    run_worker()
    run_method_call(call.pk, "default")  # a late duplicate after success
    run_method_call(10_000_000, "default")  # an id that does not exist
    echo.refresh_from_db()
    assert echo.hits == 1


def test_cancelled_call_is_not_run(run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    call = echo.bump()
    assert call.cancel() is True
    run_worker()
    echo.refresh_from_db()
    assert echo.hits == 0
    call.refresh_from_db()
    assert call.state == CallState.CANCELLED
    assert call.attempts == 0


def test_raising_method_fails_with_type_message_and_traceback(run_worker: RunWorker) -> None:
    call = Echo.objects.create().fail("disk full on /dev/sda1")
    run_worker()
    call.refresh_from_db()
    assert call.state == CallState.FAILED
    assert call.error_type == "builtins.ValueError"
    assert call.error == "disk full on /dev/sda1"
    assert "Traceback (most recent call last)" in call.traceback
    assert "in fail" in call.traceback
    assert call.finished_at is not None
    assert call.result is None


def test_unstorable_result_still_succeeds_with_a_readable_note(run_worker: RunWorker) -> None:
    call = Echo.objects.create().unstorable()
    run_worker()
    call.refresh_from_db()
    assert call.state == CallState.SUCCEEDED
    assert call.result is None
    assert "could not be stored" in call.result_note
    assert "builtins.object" in call.result_note


def test_uuid_and_string_primary_keys(instance: Instance, run_worker: RunWorker) -> None:
    volume = Volume.objects.create(label="vol-a")
    region = Region.objects.create(code="eu-west-1")
    attach = volume.attach(instance)
    ping = region.ping()
    run_worker()
    attach.refresh_from_db()
    ping.refresh_from_db()
    assert attach.object_id == str(volume.pk)
    assert (attach.state, attach.result) == (CallState.SUCCEEDED, "vol-a attached to web1 (new)")
    assert (ping.state, ping.result) == (CallState.SUCCEEDED, "pong from eu-west-1")
    assert list(volume.attach.calls()) == [attach]
    assert list(MethodCall.objects.for_object(region)) == [ping]


def test_model_argument_is_reloaded_fresh_on_the_worker(instance: Instance, run_worker: RunWorker) -> None:
    volume = Volume.objects.create(label="vol-b")
    call = volume.attach(instance)
    Instance.objects.filter(pk=instance.pk).update(name="web1-renamed", status="running")
    run_worker()
    call.refresh_from_db()
    assert call.result == "vol-b attached to web1-renamed (running)"


def test_model_argument_deleted_before_the_run_fails_readably(
    instance: Instance, run_worker: RunWorker
) -> None:
    volume = Volume.objects.create(label="vol-c")
    call = volume.attach(instance)
    instance.delete()
    run_worker()
    call.refresh_from_db()
    assert call.state == CallState.FAILED
    assert call.error_type == "asyncmodels.ArgumentsUnavailable"
    assert "no longer exists" in call.error


def _statements(queries: CaptureQueriesContext) -> list[str]:
    """The data statements captured, without transaction bookkeeping (SQLite logs BEGIN)."""
    verbs = [query["sql"].split()[0].upper() for query in queries.captured_queries]
    return [verb for verb in verbs if verb not in {"BEGIN", "COMMIT", "SAVEPOINT", "RELEASE"}]


def test_call_path_query_count(instance: Instance) -> None:
    instance.describe()  # warm the ContentType cache, as any process does after its first call
    with CaptureQueriesContext(connection) as queries:
        with transaction.atomic():
            instance.describe()
            in_transaction = _statements(queries)
        after_commit = _statements(queries)
    assert in_transaction == ["INSERT"]  # the call itself: one row, written `enqueued`
    assert after_commit == ["INSERT"]  # on commit: the push only (no UPDATE marking it)
    with CaptureQueriesContext(connection) as queries, transaction.atomic(), transaction.atomic():
        instance.describe()  # in a savepoint: written `pending`
    assert _statements(queries) == ["INSERT", "UPDATE"]  # on commit: push, then pending -> enqueued


def test_job_query_count(
    instance: Instance, django_assert_num_queries: DjangoAssertNumQueries, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncmodels.job

    # A process's first call (the next one on PostgreSQL reads its object with the claim:
    # tests/test_claim_with_object.py).
    monkeypatch.setattr(asyncmodels.job, "_LAST_MODEL", {})
    call = instance.describe()
    # claim and read the call (one UPDATE … RETURNING), reload the object, record the outcome
    # (UPDATE … RETURNING whether any call waits for this one: none here, so no more queries).
    with django_assert_num_queries(3) as queries:
        run_method_call(call.pk, "default")
    claim, _, finish = (query["sql"] for query in queries.captured_queries)
    assert claim.startswith("UPDATE") and " RETURNING " in claim
    assert finish.startswith("UPDATE") and "RETURNING EXISTS" in finish
    call.refresh_from_db()
    assert call.state == CallState.SUCCEEDED


def test_job_reads_the_call_after_the_claim_where_update_cannot_return_rows(
    instance: Instance, monkeypatch: pytest.MonkeyPatch, django_assert_num_queries: DjangoAssertNumQueries
) -> None:
    import asyncmodels.job

    monkeypatch.setattr(asyncmodels.job, "updates_return_rows", lambda database: False)  # MySQL, say
    call = instance.describe()
    # claim, read the call, reload the object, record the outcome, look for waiting calls
    with django_assert_num_queries(5) as queries:
        run_method_call(call.pk, "default")
    assert not any(" RETURNING " in query["sql"] for query in queries.captured_queries)
    assert queries.captured_queries[1]["sql"].startswith("SELECT")
    call.refresh_from_db()
    assert call.state == CallState.SUCCEEDED


def _forged_call(echo: Echo, **fields: object) -> MethodCall:
    values: dict[str, object] = {
        "content_type": ContentType.objects.get_for_model(Echo),
        "object_id": str(echo.pk),
        "method": "cloud.Echo.bump",
        "queue": "default",
        **fields,
    }
    call = MethodCall.objects.create(**values)
    dispatch.push(call)
    return call


@pytest.mark.parametrize(
    ("fields", "error_type"),
    [
        ({"method": "cloud.Echo.echo", "args": "ab"}, "asyncmodels.ArgumentsUnavailable"),
        ({"method": "cloud.Echo.echo", "args": {"k1": 1}}, "asyncmodels.ArgumentsUnavailable"),
        ({"method": "cloud.Echo.echo", "kwargs": ["x"]}, "asyncmodels.ArgumentsUnavailable"),
        (
            {
                "method": "cloud.Echo.echo",
                "args": [{"__type__": "model", "model": 5, "pk": 1, "db": "default"}],
            },
            "asyncmodels.ArgumentsUnavailable",
        ),
        (
            {
                "method": "cloud.Echo.echo",
                "args": [{"__type__": "model", "model": "cloud.Echo", "pk": 1, "db": "nope"}],
            },
            "asyncmodels.ArgumentsUnavailable",
        ),
        (
            {"method": "cloud.Echo.echo", "args": [{"__type__": "timedelta", "days": 10**10, "seconds": 0}]},
            "asyncmodels.ArgumentsUnavailable",
        ),
        (
            {"method": "os.system", "args": ["touch /tmp/asyncmodels-pwned"]},
            "asyncmodels.MethodNotRegistered",
        ),
        ({"object_id": "not-a-number"}, "asyncmodels.InvalidObjectId"),
    ],
    ids=[
        "args-str",
        "args-dict",
        "kwargs-list",
        "bad-model-ref",
        "bad-db-alias",
        "timedelta-overflow",
        "os-system",
        "garbage-pk",
    ],
)
def test_forged_rows_fail_readably_and_run_nothing(
    run_worker: RunWorker, fields: dict[str, object], error_type: str
) -> None:
    echo = Echo.objects.create()
    call = _forged_call(echo, **fields)
    run_worker()
    call.refresh_from_db()
    assert (call.state, call.error_type) == (CallState.FAILED, error_type), call.error
    assert call.error
    echo.refresh_from_db()
    assert echo.hits == 0


def test_forged_row_with_padded_object_id_runs_nothing(run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    call = _forged_call(echo, object_id=f" {echo.pk} ")
    run_worker()
    call.refresh_from_db()
    assert (call.state, call.error_type) == (CallState.FAILED, "asyncmodels.InvalidObjectId")
    echo.refresh_from_db()
    assert echo.hits == 0


def test_row_whose_content_type_disagrees_with_its_method_runs_nothing(run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    call = _forged_call(echo, content_type=ContentType.objects.get_for_model(Instance))
    run_worker()
    call.refresh_from_db()
    assert (call.state, call.error_type) == (CallState.FAILED, "asyncmodels.ContentTypeMismatch")
    echo.refresh_from_db()
    assert echo.hits == 0


def test_forged_row_nested_too_deep_to_load_fails(run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    call = _forged_call(echo, method="cloud.Echo.echo")
    deep = "[" * 1500 + "]" * 1500  # valid JSON (SQLite allows 2000 levels); too deep for json.loads
    placeholder = "%s::jsonb" if connection.vendor == "postgresql" else "%s"
    with connection.cursor() as cursor:
        sql = f"UPDATE asyncmodels_methodcall SET args = {placeholder} WHERE id = %s"  # noqa: S608
        cursor.execute(sql, [deep, call.pk])
    run_worker()
    state, error_type = MethodCall.objects.filter(pk=call.pk).values_list("state", "error_type").get()
    assert (state, error_type) == (CallState.FAILED, "asyncmodels.RowUnreadable")


@pytest.mark.parametrize(
    ("how", "state", "check"),
    [
        ("unprintable", CallState.FAILED, "Unprintable (no message)"),
        ("nul-message", CallState.FAILED, "device sent \\x00 then \\ud800"),
        ("nul-key-result", CallState.SUCCEEDED, "NUL character"),
        ("huge-int-result", CallState.SUCCEEDED, "too large"),
    ],
)
def test_awkward_errors_and_results_still_end_the_call(
    run_worker: RunWorker, how: str, state: CallState, check: str
) -> None:
    call = Echo.objects.create().explode(how)
    run_worker()
    call.refresh_from_db()
    assert call.state == state
    assert check in (call.error if state == CallState.FAILED else call.result_note)


def test_method_raising_system_exit_is_recorded_then_propagates() -> None:
    call = Echo.objects.create().explode("exit")
    with pytest.raises(SystemExit):
        run_method_call(call.pk, "default")
    call.refresh_from_db()
    assert (call.state, call.error_type) == (CallState.FAILED, "builtins.SystemExit")
    assert call.finished_at is not None


def test_pushing_a_call_rq_still_holds_adds_no_second_job(queued_jobs: Callable[..., int]) -> None:
    call = Echo.objects.create().bump()
    assert queued_jobs() == 1
    assert dispatch.push(call) is True
    assert queued_jobs() == 1


def test_bookkeeping_retries_once_on_a_fresh_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.db import OperationalError

    from asyncmodels import job

    echo = Echo.objects.create()
    call = echo.bump()
    real_prepare = job._prepare
    failures: list[int] = []

    def prepare_on_a_dropped_connection(claimed: MethodCall) -> object:
        if not failures:
            failures.append(1)
            raise OperationalError("server closed the connection unexpectedly")
        return real_prepare(claimed)

    monkeypatch.setattr(job, "_prepare", prepare_on_a_dropped_connection)
    run_method_call(call.pk, "default")
    call.refresh_from_db()
    assert (call.state, failures) == (CallState.SUCCEEDED, [1])
    echo.refresh_from_db()
    assert echo.hits == 1


def test_the_lease_thread_is_woken_only_for_a_lease_due_before_it_wakes(
    instance: Instance, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    from asyncmodels import job

    settings.ASYNCMODELS = {**settings.ASYNCMODELS, "LEASE_SECONDS": 600, "LEASE_RENEW_SECONDS": 200}
    renewer = job._LeaseRenewer()
    notified: list[float] = []
    notify = renewer._changed.notify

    def counted(n: int = 1) -> None:
        notified.append(time.monotonic())
        notify(n)

    monkeypatch.setattr(renewer._changed, "notify", counted)
    call = instance.describe()
    first = job.LeaseKeeper(call)
    renewer.add(first)  # starts the thread, which then sleeps until this lease is due
    wait_for(lambda: renewer._wakes_at == first.due, message="the thread to sleep until the lease is due")
    later = job.LeaseKeeper(call)  # due after the thread wakes anyway: left asleep
    renewer.add(later)
    assert notified == []
    sooner = job.LeaseKeeper(call)
    sooner.due = first.due - 5
    renewer.add(sooner)  # due before it wakes: woken, and it now sleeps until this one
    assert len(notified) == 1
    wait_for(lambda: renewer._wakes_at == sooner.due, message="the thread to sleep until the sooner lease")
    for lease in (first, later, sooner):
        renewer.remove(lease)
