"""Issue 5 on one process: tags and for_object, unique calls, exclusive methods, dependencies and
workflows, progress reports. Real worker processes and concurrency: test_issue5_workers.py."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable
from typing import Any

import pytest
from django.conf import settings
from django.contrib.contenttypes.models import ContentType
from django.db import IntegrityError, connection, transaction
from django.db.models.functions import Now
from pytest_django import DjangoAssertNumQueries

from asyncmodels import async_method, result_of
from asyncmodels.decorator import BoundAsyncMethod
from asyncmodels.exceptions import (
    DuplicateCallError,
    InvalidDependencyError,
    InvalidOptionError,
    InvalidTagError,
)
from asyncmodels.job import _claim, after_attempt, run_method_call
from asyncmodels.models import CallState, MethodCall, MethodCallDependency, MethodCallTag
from asyncmodels.recovery import recover_stranded_calls
from asyncmodels.registry import get_method_for
from asyncmodels.tags import tag_for
from testproject.cloud.models import Account, Echo, Instance, Ledger, Report

from .conftest import RunWorker, won_claim

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])
POSTGRES = settings.DATABASES["default"]["ENGINE"].endswith("postgresql")


@pytest.fixture
def account() -> Account:
    return Account.objects.create(name="acme")


@pytest.fixture
def instance(account: Account) -> Instance:
    return Instance.objects.create(account=account, name="web1")


def _with_options(instance: Instance, attribute: str, **changes: Any) -> BoundAsyncMethod:
    """``instance.<attribute>`` with its method's options changed, for options no demo method has."""
    entry = get_method_for(type(instance), attribute)
    assert entry is not None
    return BoundAsyncMethod(entry, instance, dataclasses.replace(entry.options, **changes))


# -- tags and tracking -------------------------------------------------------------------------


def test_tags_are_recorded_and_for_object_finds_own_and_tagged_calls(
    account: Account, instance: Instance
) -> None:
    elsewhere = Instance.objects.create(account=Account.objects.create(name="other"), name="db1")
    reboot = instance.reboot()
    invoice = account.send_invoice("2026-11")
    foreign = elsewhere.reboot()
    untagged = instance.describe()
    assert reboot.tags == [f"cloud.account:{account.pk}", "region:eu"]
    assert untagged.tags == []
    assert set(MethodCall.objects.for_object(account)) == {reboot, invoice}
    assert set(MethodCall.objects.own_calls(account)) == {invoice}
    assert set(MethodCall.objects.for_object(instance)) == {reboot, untagged}
    assert set(MethodCall.objects.tagged("region:eu")) == {reboot, foreign}
    assert set(MethodCall.objects.tagged(account)) == {reboot}
    assert set(Instance.reboot.calls_for(account)) == {reboot}
    assert set(instance.reboot.calls_for(account)) == {reboot}
    assert set(Instance.describe.calls_for(account)) == set()
    assert set(instance.describe.calls()) == {untagged}


def test_for_object_with_a_state_filter_is_one_query(
    account: Account,
    instance: Instance,
    run_worker: RunWorker,
    django_assert_num_queries: DjangoAssertNumQueries,
) -> None:
    second = Instance.objects.create(account=account, name="web2")
    ok = instance.reboot()
    bad = second.configure("dns", "x")
    run_worker()
    MethodCall.objects.filter(pk=bad.pk).update(state=CallState.FAILED)
    ContentType.objects.clear_cache()  # one query even with Django's content type cache cold
    with transaction.atomic():
        pending = second.reboot()
        with django_assert_num_queries(1):
            failed = list(MethodCall.objects.for_object(account).failed())
        with django_assert_num_queries(1):
            unfinished = list(MethodCall.objects.for_object(account).unfinished())
    assert failed == [bad]
    assert unfinished == [pending]
    assert ok in MethodCall.objects.for_object(account).succeeded()


def test_for_object_reads_indexes_not_the_table(account: Account, instance: Instance) -> None:
    instance.reboot()
    account.send_invoice("2026-11")
    query = MethodCall.objects.for_object(account).failed()
    if POSTGRES:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL enable_seqscan = off")  # tiny tables: ask what it *can* do
            plan = query.explain()
        assert "Seq Scan" not in plan, plan
        assert "asyncmodels_tag_call" in plan and "asyncmodels_call_object_id" in plan, plan
    else:
        plan = query.explain()
        scans = [line for line in plan.splitlines() if "SCAN" in line and "USING" not in line]
        assert not scans, plan


def test_a_bad_tag_refuses_the_call_and_writes_nothing(instance: Instance) -> None:
    for tags, message in [
        (lambda self: [Account(name="unsaved")], "unsaved cloud.Account"),
        (lambda self: [""], "non-empty"),
        (lambda self: ["x" * 256], "at most 255"),
        (lambda self: ["a\x00b"], "NUL"),
        (lambda self: [3], "not int"),
        (lambda self: 1 / 0, "ZeroDivisionError"),
    ]:
        with pytest.raises(InvalidTagError, match=message):
            _with_options(instance, "reboot", tags=tags)()
    assert not MethodCall.objects.exists()
    assert not MethodCallTag.objects.exists()


def test_tags_skip_none_and_repeats(instance: Instance) -> None:
    call = _with_options(
        instance, "describe", tags=lambda self: [None, self.account, "a", self.account, "a"]
    )()
    assert call.tags == [f"cloud.account:{instance.account_id}", "a"]


def test_tag_options_are_checked_at_import_and_fixed_per_method(instance: Instance) -> None:
    with pytest.raises(InvalidOptionError, match="tags must be"):
        async_method(tags="region:eu")
    with pytest.raises(InvalidOptionError, match="tags must be"):
        async_method(tags=["a", 1])  # type: ignore[list-item]
    with pytest.raises(InvalidOptionError, match="set per method"):
        instance.reboot.using(tags=["x"])
    with pytest.raises(InvalidTagError):
        MethodCall.objects.tagged(3)  # type: ignore[arg-type]
    assert tag_for(instance) == f"cloud.instance:{instance.pk}"


def test_a_rolled_back_call_leaves_no_tags(instance: Instance) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        instance.reboot()
        raise RuntimeError("roll back")
    assert not MethodCall.objects.exists() and not MethodCallTag.objects.exists()


# -- unique calls ------------------------------------------------------------------------------


def test_a_duplicate_unique_call_returns_the_unfinished_one_in_one_query(
    instance: Instance,
    run_worker: RunWorker,
    queued_jobs: Callable[..., int],
    django_assert_num_queries: DjangoAssertNumQueries,
) -> None:
    first = instance.reboot()
    with django_assert_num_queries(1):
        again = instance.reboot(reason="double click")
    assert again.pk == first.pk
    assert MethodCall.objects.count() == 1 and queued_jobs() == 1  # no new row, no new push
    run_worker()
    first.refresh_from_db()
    assert first.state == CallState.SUCCEEDED and first.result == "web1 rebooted"
    later = instance.reboot()  # the first finished: a new call may be made
    assert later.pk != first.pk and later.state in {CallState.PENDING, CallState.ENQUEUED}
    other = Instance.objects.create(account=instance.account, name="web2").reboot()
    assert other.pk not in {first.pk, later.pk}  # unique per object


def test_unique_on_named_arguments_applies_defaults(instance: Instance) -> None:
    dns = instance.configure("dns", "1.1.1.1")
    assert instance.configure(setting="dns", value="8.8.8.8").pk == dns.pk
    assert instance.configure("ntp", "pool").pk != dns.pk
    provision = _with_options(instance, "provision", unique=("size",))
    small = provision()
    assert provision(size="small").pk == small.pk  # the default is part of the key
    assert provision("large").pk != small.pk


def test_unique_calls_inside_one_transaction_and_after_a_rollback(instance: Instance) -> None:
    with transaction.atomic():
        first = instance.reboot()
        assert instance.reboot().pk == first.pk
    with pytest.raises(RuntimeError), transaction.atomic():
        instance.configure("tz", "UTC")
        raise RuntimeError("roll back")
    assert not MethodCall.objects.filter(method="cloud.Instance.configure").exists()
    fresh = instance.configure("tz", "UTC")  # the rolled-back call holds no key
    assert fresh.state in {CallState.PENDING, CallState.ENQUEUED}
    assert MethodCall.objects.filter(method="cloud.Instance.configure").count() == 1


def test_the_database_refuses_a_second_unfinished_row_with_the_same_key(instance: Instance) -> None:
    call = instance.reboot()
    fields = {
        f.attname: getattr(call, f.attname) for f in MethodCall._meta.concrete_fields if f.attname != "id"
    }
    fields.pop("created_at")
    with pytest.raises(IntegrityError), transaction.atomic():
        MethodCall.objects.create(**fields)
    MethodCall.objects.filter(pk=call.pk).update(state=CallState.SUCCEEDED)
    MethodCall.objects.create(**fields)  # a finished call no longer holds the key


def test_retrying_a_unique_call_while_another_is_unfinished_is_refused(instance: Instance) -> None:
    first = instance.reboot()
    assert first.cancel()
    second = instance.reboot()
    assert second.pk != first.pk
    with pytest.raises(DuplicateCallError, match=f"call #{second.pk}"):
        first.retry()
    first.refresh_from_db()
    assert first.state == CallState.CANCELLED
    assert second.cancel()
    assert first.retry() is True


def test_unique_options_are_checked_at_import() -> None:
    with pytest.raises(InvalidOptionError, match="unique must be"):
        async_method(unique=())
    with pytest.raises(InvalidOptionError, match="unique must be"):
        async_method(unique="size")  # type: ignore[call-overload]

    def provision(self: object, size: str = "small") -> None: ...

    with pytest.raises(InvalidOptionError, match="'colour', which it does not take"):
        async_method(unique=("colour",))(provision)


# -- exclusive methods -------------------------------------------------------------------------


def test_a_call_finding_its_object_busy_waits_then_runs_when_the_holder_ends(run_worker: RunWorker) -> None:
    ledger, elsewhere = Ledger.objects.create(), Ledger.objects.create()
    holder, second = ledger.settle(0), ledger.settle(0)
    parallel = elsewhere.settle(0)
    assert won_claim(_claim(holder.pk, "default"))  # a worker runs the holder now
    run_method_call(second.pk)
    second.refresh_from_db()
    assert second.state == CallState.WAITING
    assert second.attempts == 0  # waiting its turn is not an attempt
    assert f"call #{holder.pk}" in second.state_reason
    run_method_call(parallel.pk)  # another ledger: not blocked
    parallel.refresh_from_db()
    assert parallel.state == CallState.SUCCEEDED
    MethodCall.objects.filter(pk=holder.pk).update(state=CallState.SUCCEEDED, finished_at=Now())
    holder.refresh_from_db()
    after_attempt(holder)  # what the job does once the holder's attempt ended
    second.refresh_from_db()
    assert second.state == CallState.ENQUEUED
    run_worker()
    second.refresh_from_db()
    assert second.state == CallState.SUCCEEDED and second.attempts == 1


def test_a_call_whose_holder_ended_while_it_parked_is_run_by_the_same_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asyncmodels import job

    call = Ledger.objects.create().settle(0)
    real_claim, answers = job._claim, [job.BUSY]  # the holder ends right after our claim failed

    def claim(call_id: int, database: str) -> int | MethodCall:
        return answers.pop() if answers else real_claim(call_id, database)

    monkeypatch.setattr(job, "_claim", claim)
    run_method_call(call.pk)
    call.refresh_from_db()
    assert call.state == CallState.SUCCEEDED and call.attempts == 1


def test_the_end_of_a_holder_releases_one_waiting_call_at_a_time(
    queued_jobs: Callable[..., int], run_worker: RunWorker
) -> None:
    ledger = Ledger.objects.create()
    holder, *parked = [ledger.settle(0) for _ in range(4)]
    assert won_claim(_claim(holder.pk, "default"))
    for call in parked:
        run_method_call(call.pk)
    assert MethodCall.objects.filter(state=CallState.WAITING).count() == 3
    waited = MethodCall.objects.get(pk=parked[0].pk)
    assert waited.waits == 1 and waited.job_id.endswith(f"-{waited.pk}-1-w1")  # a fresh RQ job id
    MethodCall.objects.filter(pk=holder.pk).update(state=CallState.SUCCEEDED, finished_at=Now())
    before = queued_jobs()
    after_attempt(holder)
    assert MethodCall.objects.filter(state=CallState.WAITING).count() == 2
    assert MethodCall.objects.get(pk=parked[0].pk).state == CallState.ENQUEUED  # the oldest first
    assert queued_jobs() == before + 1
    run_worker()  # each call's end releases the next
    assert set(MethodCall.objects.values_list("state", flat=True)) == {CallState.SUCCEEDED}


def test_exclusive_groups_share_a_key_per_object() -> None:
    ledger = Ledger.objects.create()
    post, audit, settle = ledger.post(0), ledger.audit(0), ledger.settle(0)
    assert post.exclusive_key == audit.exclusive_key != settle.exclusive_key
    assert Ledger.objects.create().post(0).exclusive_key != post.exclusive_key
    assert won_claim(_claim(post.pk, "default"))
    run_method_call(audit.pk)
    audit.refresh_from_db()
    assert audit.state == CallState.WAITING


def test_recovery_releases_a_waiting_call_whose_holder_ended_unseen(run_worker: RunWorker) -> None:
    ledger = Ledger.objects.create()
    holder, second = ledger.settle(0), ledger.settle(0)
    assert won_claim(_claim(holder.pk, "default"))
    run_method_call(second.pk)
    # The holder's worker ends it but dies before releasing the next call.
    MethodCall.objects.filter(pk=holder.pk).update(state=CallState.FAILED, finished_at=Now())
    report = recover_stranded_calls(["default"])
    assert report.released_waiting == 1
    run_worker()
    second.refresh_from_db()
    assert second.state == CallState.SUCCEEDED


def test_a_lost_holder_releases_the_next_call(run_worker: RunWorker) -> None:
    ledger = Ledger.objects.create()
    holder, second = ledger.settle(0), ledger.settle(0)
    assert won_claim(_claim(holder.pk, "default"))
    run_method_call(second.pk)
    MethodCall.objects.filter(pk=holder.pk).update(lease_expires_at=Now() - datetime.timedelta(minutes=1))
    report = recover_stranded_calls(["default"])
    assert report.failed_lost == 1
    second.refresh_from_db()
    assert second.state == CallState.ENQUEUED  # released by the pass that ended the holder
    run_worker()
    second.refresh_from_db()
    assert second.state == CallState.SUCCEEDED


def test_exclusive_option_is_checked() -> None:
    with pytest.raises(InvalidOptionError, match="exclusive must be"):
        async_method(exclusive="")
    with pytest.raises(InvalidOptionError, match="exclusive must be"):
        async_method(exclusive=1)  # type: ignore[call-overload]


# -- dependencies and workflows ----------------------------------------------------------------


def test_a_workflow_runs_its_steps_in_order_with_earlier_results(
    account: Account, run_worker: RunWorker
) -> None:
    report = Report.objects.create(topic="tides", account=account)
    with transaction.atomic():
        assemble = report.build(parts=3, lines=6)
    calls = list(MethodCall.objects.order_by("id"))
    fetch, slices = calls[0], calls[1:4]
    assert [c.state for c in calls] == ["enqueued", "waiting", "waiting", "waiting", "waiting"]
    assert f"#{fetch.pk}" in slices[0].state_reason
    assert list(
        MethodCallDependency.objects.filter(call=assemble).order_by("id").values_list("depends_on", flat=True)
    ) == [s.pk for s in slices]
    run_worker()
    for call in calls:
        call.refresh_from_db()
        assert call.state == CallState.SUCCEEDED, (call, call.error)
    assert fetch.finished_at is not None and calls[4].started_at is not None
    assert all(s.started_at is not None and s.started_at >= fetch.finished_at for s in slices)
    assert assemble.pk == calls[4].pk
    assert all(s.finished_at is not None and calls[4].started_at >= s.finished_at for s in slices)
    assert calls[4].result == 6
    report.refresh_from_db()
    assert report.text.splitlines() == [f"TIDES: LINE {n}" for n in range(1, 7)]
    assert set(MethodCall.objects.for_object(account)) == set(calls)


def test_a_failed_step_cancels_what_waits_for_it_naming_it(run_worker: RunWorker) -> None:
    report = Report.objects.create(topic="broken source")
    report.build(parts=2)
    run_worker()
    fetch, *slices, assemble = MethodCall.objects.order_by("id")
    assert fetch.state == CallState.FAILED
    for step in slices:
        assert step.state == CallState.CANCELLED and step.attempts == 0
        assert f"Call #{fetch.pk} (cloud.Report.fetch)" in step.state_reason and "failed" in step.state_reason
    assert assemble.state == CallState.CANCELLED and "cloud.Report.slice" in assemble.state_reason


def test_cancelling_a_dependency_cancels_its_dependents(instance: Instance) -> None:
    first = instance.describe()
    second = instance.describe.using(after=[first])()
    third = instance.provision.using(after=[second])()
    assert first.cancel(reason="not needed")
    second.refresh_from_db()
    third.refresh_from_db()
    assert second.state == third.state == CallState.CANCELLED
    assert f"#{first.pk}" in second.state_reason and f"#{second.pk}" in third.state_reason


def test_a_dependency_already_finished_settles_the_call_on_commit(instance: Instance) -> None:
    done = instance.describe()
    MethodCall.objects.filter(pk=done.pk).update(state=CallState.SUCCEEDED)
    failed = instance.describe()
    MethodCall.objects.filter(pk=failed.pk).update(state=CallState.FAILED)
    with transaction.atomic():
        released = instance.provision.using(after=[done])()
        doomed = instance.provision.using(after=[done, failed])()
        assert released.state == doomed.state == CallState.WAITING  # nothing moves before the commit
    released.refresh_from_db()
    doomed.refresh_from_db()
    assert released.state == CallState.ENQUEUED
    assert doomed.state == CallState.CANCELLED and f"#{failed.pk}" in doomed.state_reason


def test_bad_dependencies_are_refused_and_nothing_is_written(instance: Instance) -> None:
    real = instance.describe()
    gone = MethodCall.objects.get(pk=instance.describe().pk)
    MethodCall.objects.filter(pk=gone.pk).delete()
    elsewhere = Instance.objects.using("other").create(
        account=Account.objects.using("other").create(name="o"), name="x"
    )
    before = MethodCall.objects.count()
    for after, message in [
        (["not a call"], "must be a saved MethodCall"),
        ([MethodCall()], "must be a saved MethodCall"),
        ([gone], "do not exist"),
    ]:
        with pytest.raises(InvalidDependencyError, match=message):
            instance.provision.using(after=after)()
    with pytest.raises(InvalidDependencyError, match="list of MethodCall"):
        instance.provision.using(after="abc")
    assert instance.provision.using(after=real).after == (real,)  # one call is a list of one
    with pytest.raises(InvalidDependencyError, match="on database 'default'"):
        elsewhere.describe.using(after=[real])()
    with pytest.raises(InvalidDependencyError, match="saved MethodCall"):
        result_of("x")  # type: ignore[arg-type]
    assert MethodCall.objects.count() == before
    assert not MethodCallDependency.objects.exists()
    assert not MethodCall.objects.using("other").exists()


def test_result_of_adds_the_dependency_and_an_unstorable_result_fails_the_step(run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    unstorable = echo.unstorable()
    fine = echo.bump()
    step = echo.echo(result_of(fine), nested={"x": [result_of(unstorable)]})
    assert list(
        MethodCallDependency.objects.filter(call=step).order_by("id").values_list("depends_on", flat=True)
    ) == [fine.pk, unstorable.pk]
    run_worker()
    step.refresh_from_db()
    assert step.state == CallState.FAILED
    assert step.error_type == "asyncmodels.ArgumentsUnavailable"
    assert f"call #{unstorable.pk}" in step.error and "could not be stored" in step.error
    passed = echo.echo(result_of(fine))
    run_worker()
    passed.refresh_from_db()
    assert passed.result is not None and passed.result["args"] == [1]


def test_retrying_a_dependent_waits_for_its_dependency_again(
    instance: Instance, run_worker: RunWorker
) -> None:
    first = instance.resize("huge")  # fails: not offered
    second = instance.describe.using(after=[first])()
    run_worker()
    second.refresh_from_db()
    assert second.state == CallState.CANCELLED
    MethodCall.objects.filter(pk=first.pk).update(args=["large"])
    assert first.retry()
    assert second.retry()
    second.refresh_from_db()
    assert second.state == CallState.WAITING
    run_worker()
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.state == second.state == CallState.SUCCEEDED


def test_recovery_settles_a_waiting_call_whose_dependency_ended_unseen(instance: Instance) -> None:
    first = instance.describe()
    second = instance.describe.using(after=[first])()
    third = instance.describe.using(after=[first])()
    MethodCall.objects.filter(pk=first.pk).update(state=CallState.SUCCEEDED)  # its worker died after
    assert recover_stranded_calls(["default"]).released_waiting == 2
    MethodCall.objects.filter(pk=first.pk).update(state=CallState.FAILED)
    fourth = instance.describe.using(after=[first])()  # settled on commit: cancelled at once
    fourth.refresh_from_db()
    assert fourth.state == CallState.CANCELLED
    for call in (second, third):
        call.refresh_from_db()
        assert call.state == CallState.ENQUEUED


def test_a_waiting_call_can_be_cancelled(instance: Instance) -> None:
    first = instance.describe()
    second = instance.describe.using(after=[first])()
    assert second.can_cancel and second.cancel()
    assert second.state == CallState.CANCELLED


# -- progress ----------------------------------------------------------------------------------


def test_progress_reports_are_checked_throttled_and_stored_while_running(
    instance: Instance, settings: object
) -> None:
    call = instance.describe()
    assert won_claim(_claim(call.pk, "default"))
    call.refresh_from_db()
    for bad in (-0.1, 1.5, float("nan"), "half", True):
        with pytest.raises(ValueError, match="progress"):
            call.report_progress(bad)  # type: ignore[arg-type]
    assert call.report_progress(0.1, "started") is True
    assert call.report_progress(0.2, "tick") is False  # throttled: within the interval
    assert call.report_progress(1.0, "done") is True  # the end is always stored
    call.refresh_from_db()
    assert (call.progress, call.progress_message) == (1.0, "done") and call.progress_at is not None
    MethodCall.objects.filter(pk=call.pk).update(state=CallState.SUCCEEDED)
    stale = MethodCall.objects.get(pk=call.pk)
    assert stale.report_progress(0.5) is False  # not running: not written


def test_unknown_option_errors_list_what_that_place_accepts(instance: Instance) -> None:
    with pytest.raises(InvalidOptionError) as using_error:
        instance.reboot.using(name="x")
    known = str(using_error.value).split("known: ")[1].rstrip(".").split(", ")
    assert {"after", "run_after", "queue", "retries"} <= set(known)
    assert not {"tags", "unique", "exclusive", "retry_on", "name"} & set(known)
    with pytest.raises(InvalidOptionError) as decorator_error:
        async_method(queu="x")  # type: ignore[call-overload]
    assert "name" in str(decorator_error.value).split("known: ")[1].rstrip(".").split(", ")
