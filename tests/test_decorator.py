"""The call-time API: what a call writes, and every bad input refused with nothing written."""

from __future__ import annotations

import datetime
import enum
from collections.abc import Callable
from typing import Any

import pytest
from django.db import transaction

from asyncmodels.exceptions import (
    CallError,
    InvalidArgumentsError,
    InvalidOptionError,
    UnknownQueueError,
    UnsavedInstanceError,
    UnsupportedArgumentError,
)
from asyncmodels.models import CallState, MethodCall
from testproject.cloud.models import Account, Echo, Instance

from .conftest import RunWorker

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


class Size(enum.StrEnum):
    LARGE = "large"


@pytest.fixture
def instance() -> Instance:
    return Instance.objects.create(account=Account.objects.create(name="acme"), name="web1")


def test_call_returns_a_pending_row_describing_the_call(instance: Instance) -> None:
    with transaction.atomic(), transaction.atomic():  # in a savepoint, as in a TestCase
        call = instance.provision(size="large")
        assert isinstance(call, MethodCall)
        assert call.state == CallState.PENDING
    assert call.method == "cloud.Instance.provision"
    assert call.queue == "provisioning"
    assert call.object_id == str(instance.pk)
    assert call.content_object == instance
    assert call.args == []
    assert call.kwargs == {"size": "large"}
    assert call.attempts == 0


def test_now_runs_inline_returns_the_result_and_writes_no_call(instance: Instance) -> None:
    assert instance.provision.now(size="medium") == {"name": "web1", "size": "medium", "status": "running"}
    assert MethodCall.objects.count() == 0
    instance.refresh_from_db()
    assert instance.size == "medium"


def test_using_overrides_the_queue_for_one_call(instance: Instance, queued_jobs: Callable[..., int]) -> None:
    urgent = instance.provision.using(queue="urgent")(size="large")
    normal = instance.provision(size="small")
    assert (urgent.queue, normal.queue) == ("urgent", "provisioning")
    assert queued_jobs("urgent") == 1
    assert queued_jobs("provisioning") == 1


def test_using_refuses_unknown_options(instance: Instance) -> None:
    with pytest.raises(InvalidOptionError, match="retires"):
        instance.provision.using(retires=3)
    with pytest.raises(InvalidOptionError, match="queue"):
        instance.provision.using(queue="")


def test_calls_lists_this_objects_calls_of_this_method_newest_first(instance: Instance) -> None:
    other = Instance.objects.create(account=instance.account, name="web2")
    first = instance.provision(size="small")
    second = instance.provision(size="large")
    instance.describe()
    other.provision(size="small")
    assert list(instance.provision.calls()) == [second, first]


def test_decorated_method_keeps_its_name_and_docstring(instance: Instance) -> None:
    assert instance.provision.__name__ == "provision"
    assert "committed" in (instance.provision.__doc__ or "")
    assert Instance.provision.__name__ == "provision"


def _assert_refused(
    call: Callable[[], Any], error: type[CallError], message: str, queued_jobs: Callable[..., int]
) -> None:
    with pytest.raises(error, match=message):
        call()
    assert MethodCall.objects.count() == 0
    assert queued_jobs() == 0


def test_unsaved_instance_is_refused(queued_jobs: Callable[..., int]) -> None:
    unsaved = Instance(account=Account.objects.create(name="acme"), name="draft")
    _assert_refused(lambda: unsaved.provision(size="large"), UnsavedInstanceError, "unsaved", queued_jobs)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {"colour": "red"}, "unexpected keyword argument 'colour'"),
        ((), {"sise": "large"}, r"unexpected keyword argument 'sise' \(it accepts: size\)"),
        (("small", "extra"), {}, "too many positional arguments"),
        (("small",), {"size": "large"}, "multiple values for argument 'size'"),
    ],
)
def test_arguments_that_do_not_bind_are_refused(
    instance: Instance,
    queued_jobs: Callable[..., int],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    message: str,
) -> None:
    _assert_refused(lambda: instance.provision(*args, **kwargs), InvalidArgumentsError, message, queued_jobs)


def test_missing_required_argument_is_refused(instance: Instance, queued_jobs: Callable[..., int]) -> None:
    _assert_refused(
        lambda: instance.resize(), InvalidArgumentsError, "missing a required argument", queued_jobs
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (object(), r"kwargs\['value'\] is of type builtins.object"),
        ({1, 2}, "builtins.set"),
        (b"bytes", "builtins.bytes"),
        (datetime.datetime(2026, 1, 1, 12, 0), "naive datetime"),
        (float("nan"), "only finite floats"),
        (float("inf"), "only finite floats"),
        ({1: "int key"}, "dict keys must be str"),
        ([1, [2, object()]], r"kwargs\['value'\]\[1\]\[1\] is of type builtins.object"),
        (Size.LARGE, r"enum member Size.LARGE; pass its .value \('large'\)"),
        ("nul\x00byte", "NUL"),
        (lambda: None, "function"),
    ],
    ids=[
        "object",
        "set",
        "bytes",
        "naive-datetime",
        "nan",
        "inf",
        "int-key",
        "nested",
        "enum",
        "nul",
        "lambda",
    ],
)
def test_argument_of_an_unstorable_type_is_refused_naming_it(
    queued_jobs: Callable[..., int], value: Any, message: str
) -> None:
    echo = Echo.objects.create()
    _assert_refused(lambda: echo.echo(value=value), UnsupportedArgumentError, message, queued_jobs)


def test_positional_argument_path_is_named(queued_jobs: Callable[..., int]) -> None:
    echo = Echo.objects.create()
    _assert_refused(lambda: echo.echo("ok", {"x"}), UnsupportedArgumentError, r"args\[1\]", queued_jobs)


def test_unsaved_model_instance_as_argument_is_refused(queued_jobs: Callable[..., int]) -> None:
    echo = Echo.objects.create()
    _assert_refused(lambda: echo.echo(Echo()), UnsupportedArgumentError, "unsaved cloud.Echo", queued_jobs)


def test_queue_not_in_rq_queues_is_refused(instance: Instance, queued_jobs: Callable[..., int]) -> None:
    _assert_refused(
        lambda: instance.provision.using(queue="nonexistent")(size="large"),
        UnknownQueueError,
        "nonexistent",
        queued_jobs,
    )


def test_refused_call_inside_a_transaction_leaves_the_transaction_usable(instance: Instance) -> None:
    with transaction.atomic():
        with pytest.raises(UnsupportedArgumentError):
            instance.provision(size=object())
        instance.describe()  # the caller's transaction was not poisoned by the refusal
    assert MethodCall.objects.count() == 1


def test_call_errors_are_also_standard_python_errors(instance: Instance) -> None:
    with pytest.raises(TypeError):
        instance.provision(colour="red")
    with pytest.raises(ValueError):
        instance.provision.using(queue="nonexistent")()


def test_call_made_on_an_instance_loaded_from_another_database(run_worker: RunWorker) -> None:
    echo = Echo.objects.using("other").create()
    loaded = Echo.objects.using("other").get(pk=echo.pk)
    call = loaded.bump()
    assert MethodCall.objects.using("other").filter(pk=call.pk).exists()
    run_worker()
    loaded.refresh_from_db()
    assert loaded.hits == 1


def test_calling_through_the_class_is_the_same_as_through_the_instance(instance: Instance) -> None:
    with transaction.atomic():
        call = Instance.provision(instance, size="large")
    assert call.method == "cloud.Instance.provision"
    assert call.kwargs == {"size": "large"}
    with pytest.raises(InvalidArgumentsError, match="needs a model instance"):
        Instance.provision("not an instance")  # type: ignore[arg-type]


def test_return_value_and_arguments_are_decoded(run_worker: RunWorker) -> None:
    when = datetime.datetime(2026, 3, 1, 9, 30, tzinfo=datetime.UTC)
    echo = Echo.objects.create()
    call = echo.echo(when, label="x")
    assert call.get_arguments() == ([when], {"label": "x"})
    run_worker()
    call.refresh_from_db()
    assert call.return_value == {"args": [when], "kwargs": {"label": "x"}, "types": ["datetime"]}
    assert call.result is not None and call.result["args"][0]["__type__"] == "datetime"
