"""The claim that also reads the call's object (``job._ClaimWithObject``, PostgreSQL): one statement
less per call when calls on one model follow each other, and never a claim that fails or a
wrong object, whatever the row holds."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import ProgrammingError, connection
from django.test.utils import CaptureQueriesContext

from asyncmodels import job, models
from asyncmodels.models import CallState, MethodCall
from testproject.cloud.models import Account, Echo, Instance, Region, Volume

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

POSTGRESQL = connection.vendor == "postgresql"


@pytest.fixture(autouse=True)
def no_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no model guessed (a worker process's first call)."""
    monkeypatch.setattr(job, "_LAST_MODEL", {})
    monkeypatch.setattr(job, "_CLAIM_WITH_OBJECT", job._ClaimWithObject())


def _run(call: MethodCall) -> list[str]:
    """Run ``call`` in this process; return its SQL statements."""
    with CaptureQueriesContext(connection) as queries:
        job.run_method_call(call.pk, "default")
    call.refresh_from_db()
    return [query["sql"] for query in queries.captured_queries]


def _instance(name: str = "web1") -> Instance:
    return Instance.objects.create(account=Account.objects.create(name="acme"), name=name)


def test_the_second_call_on_a_model_reads_its_object_with_the_claim() -> None:
    first, second = _instance("one"), _instance("two")
    made = first.describe()
    assert len(_run(made)) == 3  # claim, object, outcome: no model guessed yet
    call = second.describe()
    Instance.objects.filter(pk=second.pk).update(status="changed")
    statements = _run(call)
    assert call.state == CallState.SUCCEEDED
    assert call.result == {"name": "two", "size": "small", "status": "changed"}
    if POSTGRESQL:
        assert len(statements) == 2  # claim with the object, outcome
        assert statements[0].startswith("WITH") and "LATERAL" in statements[0]
    else:
        assert len(statements) == 3  # SQLite: no UPDATE inside WITH


@pytest.mark.skipif(not POSTGRESQL, reason="the combined claim is PostgreSQL's")
def test_a_call_on_another_model_is_read_as_before_and_becomes_the_guess() -> None:
    _run(_instance().describe())  # guess: Instance
    region = Region.objects.create(code="eu-west")
    call = region.ping()
    statements = _run(call)
    assert (call.state, call.result) == (CallState.SUCCEEDED, "pong from eu-west")
    assert len(statements) == 3 and statements[0].startswith("WITH")  # guessed wrong: read after
    again = Region.objects.create(code="us-east").ping()
    assert len(_run(again)) == 2
    assert again.result == "pong from us-east"


@pytest.mark.skipif(not POSTGRESQL, reason="the combined claim is PostgreSQL's")
@pytest.mark.parametrize(
    ("model", "object_id", "error_type"),
    [
        ("echo", "not-a-number", "asyncmodels.InvalidObjectId"),
        ("echo", " {pk} ", "asyncmodels.InvalidObjectId"),
        ("echo", "0{pk}", "asyncmodels.InvalidObjectId"),
        ("echo", "99999999999999999999999", "asyncmodels.ObjectDoesNotExist"),  # as the ORM says
        ("echo", "", "asyncmodels.InvalidObjectId"),
        ("echo", "987654321", "asyncmodels.ObjectDoesNotExist"),
        ("volume", "not-a-uuid", "asyncmodels.InvalidObjectId"),
        ("volume", "{pk_upper}", "asyncmodels.InvalidObjectId"),
        ("volume", "00000000-0000-0000-0000-000000000000", "asyncmodels.ObjectDoesNotExist"),
    ],
)
def test_no_stored_object_id_makes_the_claim_fail_or_loads_another_object(
    model: str, object_id: str, error_type: str
) -> None:
    obj: Any = Echo.objects.create() if model == "echo" else Volume.objects.create(label="disk")
    method = "cloud.Echo.bump" if model == "echo" else "cloud.Volume.attach"
    warm = obj.bump() if model == "echo" else Volume.objects.create(label="warm").attach(_instance())
    _run(warm)  # the guess is now this model
    call = MethodCall.objects.create(
        content_type=ContentType.objects.get_for_model(type(obj)),
        object_id=object_id.format(pk=obj.pk, pk_upper=str(obj.pk).upper()),
        method=method,
        queue="default",
        args=[]
        if model == "echo"
        else [{"__type__": "model", "model": "cloud.Instance", "pk": 1, "db": "default"}],
    )
    statements = _run(call)
    assert statements[0].startswith("WITH")  # the combined claim ran, and did not fail
    assert (call.state, call.error_type) == (CallState.FAILED, error_type), call.error
    assert call.attempts == 1


@pytest.mark.skipif(not POSTGRESQL, reason="the combined claim is PostgreSQL's")
def test_a_row_whose_content_type_is_not_its_methods_model_still_runs_nothing() -> None:
    echo = Echo.objects.create()
    _run(echo.bump())  # the guess: Echo
    call = MethodCall.objects.create(
        content_type=ContentType.objects.get_for_model(Instance),
        object_id=str(echo.pk),
        method="cloud.Echo.bump",
        queue="default",
    )
    _run(call)
    assert (call.state, call.error_type) == (CallState.FAILED, "asyncmodels.ContentTypeMismatch")
    echo.refresh_from_db()
    assert echo.hits == 1  # the first call's only


@pytest.mark.skipif(not POSTGRESQL, reason="the combined claim is PostgreSQL's")
def test_a_deleted_object_fails_the_call_as_before() -> None:
    echo, gone = Echo.objects.create(), Echo.objects.create()
    _run(echo.bump())
    call = gone.bump()
    gone.delete()
    _run(call)
    assert (call.state, call.error_type) == (CallState.FAILED, "asyncmodels.ArgumentsUnavailable") or (
        call.state,
        call.error_type,
    ) == (CallState.FAILED, "asyncmodels.ObjectDoesNotExist")
    assert "no longer exists" in call.error


@pytest.mark.skipif(not POSTGRESQL, reason="the combined claim is PostgreSQL's")
def test_a_refused_combined_statement_falls_back_for_good(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second, third = _instance("a"), _instance("b"), _instance("c")
    _run(first.describe())
    run_with_slots = models.run_with_slots
    refused: list[str] = []

    def refuse_combined(database: str, sql: str, params: Any, values: dict[str, Any]) -> list[Any]:
        if sql.startswith("WITH"):
            refused.append(sql)
            raise ProgrammingError("say, a column type this code did not expect")
        return run_with_slots(database, sql, params, values)

    monkeypatch.setattr(job, "run_with_slots", refuse_combined)
    call = second.describe()
    assert len(_run(call)) == 3
    assert call.state == CallState.SUCCEEDED and call.attempts == 1
    later = third.describe()
    assert not any(sql.startswith("WITH") for sql in _run(later))  # not tried again
    assert later.state == CallState.SUCCEEDED
    assert len(refused) == 1
