"""``Model.method.bulk_call(objects, ...)``: one INSERT, one pipeline, the checks of a single call."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from asyncmodels.exceptions import (
    InvalidArgumentsError,
    InvalidDependencyError,
    InvalidTagError,
    UnsavedInstanceError,
    UnsupportedArgumentError,
)
from asyncmodels.models import CallState, MethodCall, MethodCallTag
from testproject.cloud.models import Account, Echo, Instance

from .conftest import RunWorker

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


def test_a_bulk_call_is_one_insert_and_one_push_for_all_objects(
    queued_jobs: Callable[..., int], run_worker: RunWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis.client

    pipelines: list[int] = []
    real_execute = redis.client.Pipeline.execute

    def counting_execute(self: redis.client.Pipeline, *args: Any, **kwargs: Any) -> Any:
        pipelines.append(len(self.command_stack))
        return real_execute(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", counting_execute)
    echoes = [Echo.objects.create() for _ in range(60)]
    ContentType.objects.get_for_model(Echo)
    with CaptureQueriesContext(connection) as queries:
        calls = Echo.bump.bulk_call(echoes)
    # Just written, so nobody can hold their jobs yet: no pipeline asking RQ, one enqueueing.
    assert len(pipelines) == 1
    statements = [
        q["sql"].split()[0] for q in queries.captured_queries if "asyncmodels_methodcall" in q["sql"]
    ]
    # The rows, in as few INSERTs as the database takes (one on PostgreSQL; SQLite caps the
    # number of parameters of one statement), written `enqueued`: nothing more on commit.
    fields = [f for f in MethodCall._meta.concrete_fields if not f.primary_key]
    inserts = math.ceil(60 / connection.ops.bulk_batch_size(fields, calls))
    assert statements == ["INSERT"] * inserts
    assert inserts == 1 or connection.vendor == "sqlite"
    assert [call.object_id for call in calls] == [str(echo.pk) for echo in echoes]
    assert {call.state for call in calls} == {CallState.ENQUEUED}
    # One reading of the database's clock for every row, stored as written.
    stored = set(MethodCall.objects.values_list("created_at", "enqueued_at"))
    assert len(stored) == 1 and stored == {(calls[0].created_at, calls[0].enqueued_at)}
    assert calls[0].created_at == calls[0].enqueued_at
    assert queued_jobs() == 60
    run_worker()
    assert list(Echo.objects.values_list("hits", flat=True).distinct()) == [1]
    assert set(MethodCall.objects.values_list("state", flat=True)) == {CallState.SUCCEEDED}


def test_a_bulk_call_checks_everything_first_and_writes_nothing_on_a_bad_input() -> None:
    account = Account.objects.create(name="a")
    saved = Instance.objects.create(account=account, name="web")
    for objects, args, kwargs, error in [
        ([saved, Instance(account=account, name="unsaved")], (), {}, UnsavedInstanceError),
        ([saved, account], (), {}, UnsavedInstanceError),  # not an Instance
        ([saved], ("small", "extra"), {}, InvalidArgumentsError),
        ([saved], (), {"sise": "large"}, InvalidArgumentsError),
        ([saved], (object(),), {}, UnsupportedArgumentError),
    ]:
        assert isinstance(objects, list)
        with pytest.raises(error):
            Instance.provision.bulk_call(objects, *args, **kwargs)
    assert not MethodCall.objects.exists()


def test_a_bulk_call_records_tags_and_keeps_unique_calls_unique(queued_jobs: Callable[..., int]) -> None:
    account = Account.objects.create(name="a")
    first, second = (Instance.objects.create(account=account, name=n) for n in ("web1", "web2"))
    earlier = first.reboot()
    calls = Instance.reboot.bulk_call([first, second, second])
    assert calls[0].pk == earlier.pk  # unfinished: returned, not made again
    assert calls[1].pk == calls[2].pk != earlier.pk  # one call for an object given twice
    assert MethodCall.objects.count() == 2 and queued_jobs() == 2
    assert calls[1].tags == [f"cloud.account:{account.pk}", "region:eu"]
    assert set(MethodCall.objects.for_object(account)) == {earlier, calls[1]}
    assert MethodCallTag.objects.count() == 4


def test_a_bulk_call_with_a_bad_tag_writes_nothing() -> None:
    account = Account.objects.create(name="a")
    orphan_account = Account(name="unsaved")
    good = Instance.objects.create(account=account, name="good")
    bad = Instance.objects.create(account=account, name="bad")
    bad.account = orphan_account  # its tag would be an unsaved instance
    with pytest.raises(InvalidTagError):
        Instance.reboot.bulk_call([good, bad])
    assert not MethodCall.objects.exists()


def test_a_bulk_call_goes_to_each_objects_database_and_rolls_back_with_the_caller() -> None:
    here = Echo.objects.create()
    there = Echo.objects.using("other").create()
    calls = Echo.bump.bulk_call([here, there])
    assert [call._state.db for call in calls] == ["default", "other"]
    assert MethodCall.objects.using("other").get().object_id == str(there.pk)
    with pytest.raises(RuntimeError), transaction.atomic():
        Echo.bump.bulk_call([here, here])
        raise RuntimeError("roll back")
    assert MethodCall.objects.count() == 1
    assert Echo.bump.bulk_call([]) == []


def test_result_of_is_refused_in_a_bulk_call() -> None:
    from asyncmodels import result_of

    echo = Echo.objects.create()
    first = echo.bump()
    with pytest.raises(InvalidDependencyError):
        Echo.echo.bulk_call([echo], result_of(first))
    assert MethodCall.objects.count() == 1
