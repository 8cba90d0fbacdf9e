"""The job's object reload (``models.CompiledGet``): the ORM's own pk lookup, compiled once per model
and database, must load exactly what ``_base_manager.get(pk=…)`` loads and refuse what it refuses."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import connections, models
from django.test.utils import CaptureQueriesContext

from asyncmodels.models import CompiledGet
from testproject.cloud.models import Account, Echo, Instance, Region, Volume

pytestmark = pytest.mark.django_db(databases=["default", "other"])


def _values(obj: models.Model) -> list[Any]:
    return [getattr(obj, field.attname) for field in obj._meta.concrete_fields]


@pytest.mark.parametrize("database", ["default", "other"])
def test_it_loads_what_the_orm_loads_for_int_uuid_and_string_keys_and_converted_fields(database: str) -> None:
    account = Account.objects.using(database).create(name="acme")
    objects: list[models.Model] = [
        Instance.objects.using(database).create(account=account, name="web1", size="large"),
        Volume.objects.using(database).create(label="disk"),
        Region.objects.using(database).create(code="eu-west"),
        Echo.objects.using(database).create(note="hello"),
    ]
    loader = CompiledGet()
    for obj in objects:
        model = type(obj)
        expected = model._base_manager.db_manager(database).get(pk=obj.pk)
        for pk in (obj.pk, str(obj.pk)):  # the row stores object ids as text
            loaded = loader.get(model, database, pk)
            assert type(loaded) is model
            assert _values(loaded) == _values(expected)
            assert (loaded._state.db, loaded._state.adding) == (database, False)


def test_the_second_load_is_one_select_with_the_same_compiled_sql() -> None:
    account = Account.objects.create(name="acme")
    first, second = (Instance.objects.create(account=account, name=name) for name in ("a", "b"))
    loader = CompiledGet()
    with CaptureQueriesContext(connections["default"]) as queries:
        assert loader.get(Instance, "default", str(first.pk)).name == "a"
        assert loader.get(Instance, "default", str(second.pk)).name == "b"
    assert len(queries.captured_queries) == 2
    sql = [query["sql"].replace(str(first.pk), "?").replace(str(second.pk), "?") for query in queries]
    assert sql[0] == sql[1] and sql[0].startswith("SELECT")
    assert loader._compiled[(Instance, "default")] is not None


def test_it_refuses_what_the_orm_refuses_with_the_same_errors() -> None:
    loader = CompiledGet()
    with pytest.raises(Instance.DoesNotExist):
        loader.get(Instance, "default", "987654")
    with pytest.raises(ValueError, match="expected a number but got 'abc'"):
        loader.get(Instance, "default", "abc")
    with pytest.raises(ValidationError):
        loader.get(Volume, "default", "not-a-uuid")
    with pytest.raises(Volume.DoesNotExist):
        loader.get(Volume, "default", str(uuid.uuid4()))
    with pytest.raises(Region.DoesNotExist):
        loader.get(Region, "default", "nowhere")


class _WithAccount(models.Manager["Instance"]):
    def get_queryset(self) -> models.QuerySet[Instance]:
        return super().get_queryset().select_related("account")


class _OnlyRunning(models.Manager["Instance"]):
    def get_queryset(self) -> models.QuerySet[Instance]:
        return super().get_queryset().filter(status="running")


def _base_manager(monkeypatch: pytest.MonkeyPatch, manager: models.Manager[Instance]) -> None:
    manager.model = Instance
    monkeypatch.setattr(Instance._meta, "base_manager", manager)


def test_a_base_manager_that_loads_related_rows_is_not_compiled_and_still_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    instance = Instance.objects.create(account=Account.objects.create(name="acme"), name="web1")
    _base_manager(monkeypatch, _WithAccount())
    loader = CompiledGet()
    loaded = loader.get(Instance, "default", str(instance.pk))
    assert loader._compiled[(Instance, "default")] is None  # fell back to get()
    with CaptureQueriesContext(connections["default"]) as queries:
        assert loaded.account.name == "acme"  # loaded with the instance, as select_related does
    assert not queries.captured_queries


def test_a_base_manager_filter_is_kept_in_the_compiled_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    account = Account.objects.create(name="acme")
    running = Instance.objects.create(account=account, name="up", status="running")
    stopped = Instance.objects.create(account=account, name="down", status="stopped")
    _base_manager(monkeypatch, _OnlyRunning())
    loader = CompiledGet()
    assert loader.get(Instance, "default", str(running.pk)).name == "up"
    assert loader._compiled[(Instance, "default")] is not None
    with pytest.raises(Instance.DoesNotExist):
        loader.get(Instance, "default", str(stopped.pk))
