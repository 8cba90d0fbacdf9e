"""Registration: only model methods, one method per registry name, inheritance."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.db import models
from django.test.utils import isolate_apps

from asyncmodels import async_method, registry
from asyncmodels.exceptions import InvalidOptionError, RegistrationError


@pytest.fixture
def restore_registry() -> Iterator[None]:
    before = {entry.name for entry in registry.all_methods()}
    yield
    for entry in list(registry.all_methods()):
        if entry.name not in before:
            registry.unregister(entry.name)


def _registration_error(exc: BaseException) -> BaseException:
    # Python 3.11 wraps errors raised in __set_name__ in a RuntimeError; 3.12+ does not.
    return exc.__cause__ if isinstance(exc, RuntimeError) and exc.__cause__ else exc


def test_decorating_a_method_of_a_plain_class_fails_at_import() -> None:
    with pytest.raises((RegistrationError, RuntimeError)) as info:

        class NotAModel:
            @async_method()
            def run(self) -> None: ...

    error = _registration_error(info.value)
    assert isinstance(error, RegistrationError)
    assert "NotAModel is not a Django model" in str(error)


@pytest.mark.usefixtures("restore_registry")
@isolate_apps("testproject.cloud")
def test_two_methods_under_one_registry_name_fail_at_import() -> None:
    class First(models.Model):
        @async_method(name="billing.charge")
        def charge(self) -> None: ...

        class Meta:
            app_label = "cloud"

    with pytest.raises(RegistrationError, match=r"share the registry name 'billing\.charge'"):

        class Second(models.Model):
            @async_method(name="billing.charge")
            def charge_again(self) -> None: ...

            class Meta:
                app_label = "cloud"

    entry = registry.get_method("billing.charge")
    assert entry is not None and entry.model is First


@pytest.mark.usefixtures("restore_registry")
@isolate_apps("testproject.cloud")
def test_concrete_subclasses_of_an_abstract_model_register_their_own_names() -> None:
    class Base(models.Model):
        @async_method(queue="urgent")
        def ping(self) -> str:
            return "pong"

        class Meta:
            abstract = True
            app_label = "cloud"

    class Left(Base):
        class Meta:
            app_label = "cloud"

    class Right(Base):
        class Meta:
            app_label = "cloud"

    left, right = registry.get_method("cloud.Left.ping"), registry.get_method("cloud.Right.ping")
    assert left is not None and left.model is Left and left.options.queue == "urgent"
    assert right is not None and right.model is Right
    assert registry.get_method("cloud.Base.ping") is None


def test_undecorated_methods_are_not_in_the_registry() -> None:
    assert registry.get_method("cloud.Instance.provision") is not None
    assert registry.get_method("cloud.Instance.not_async") is None
    assert registry.get_method("cloud.Instance.save") is None


@pytest.mark.parametrize(
    "options",
    [
        {"queue": ""},
        {"queue": 3},
        {"name": ""},
        {"retries": -1},
        {"retry_backoff": "10"},
        {"retry_on": ValueError("not a class")},
        {"timeout": 0},
        {"atomic": 1},
        {"priority": 3},
    ],
)
def test_bad_decorator_options_fail_at_import(options: dict[str, object]) -> None:
    with pytest.raises(InvalidOptionError):
        async_method(**options)  # type: ignore[call-overload]


def test_async_def_and_generator_methods_are_refused_at_import() -> None:
    async def coroutine(self: object) -> None: ...

    def generator(self: object) -> object:
        yield None

    for function in (coroutine, generator):
        with pytest.raises(RegistrationError, match="plain def method"):
            async_method()(function)
