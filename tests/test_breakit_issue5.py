"""Problems a hostile review of issue 5 (tags, unique, exclusive, dependencies, progress) found,
each pinned by a test that failed before its fix (SQLite + fakeredis, the default mode)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.db import IntegrityError, transaction
from django.test import override_settings

from asyncmodels import current_call, decorator, registry
from asyncmodels.exceptions import CallError, InvalidTagError
from asyncmodels.models import CallState, MethodCall, MethodCallDependency
from asyncmodels.recovery import recover_stranded_calls
from testproject.cloud.models import Account, Echo, Instance, Region, Report

from .conftest import won_claim

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

# -- 1. immediate backend: a dependency chain recurses once per step ----------------------------


@override_settings(ASYNCMODELS={"BACKEND": "immediate"})
def test_immediate_backend_runs_a_long_dependency_chain_to_the_end() -> None:
    """README (Test your own code): "a whole workflow has run when the block exits". Each released
    step runs inside the previous step's after_attempt(), so ~130 steps exhaust Python's stack:
    the step that hits the limit has run its method but is left `running`, the rest `waiting`."""
    echo = Echo.objects.create()
    with transaction.atomic():
        calls = [echo.bump()]
        for _ in range(200):
            calls.append(echo.bump.using(after=[calls[-1]])())
    states: dict[str, int] = dict.fromkeys(CallState, 0)
    for state in MethodCall.objects.filter(pk__in=[c.pk for c in calls]).values_list("state", flat=True):
        states[state] += 1
    echo.refresh_from_db()
    assert states[CallState.SUCCEEDED] == len(calls), {k: v for k, v in states.items() if v}
    assert echo.hits == len(calls)


@override_settings(ASYNCMODELS={"BACKEND": "immediate", "LEASE_SECONDS": 1, "LEASE_RENEW_SECONDS": 0.5})
def test_immediate_backend_chain_step_that_hit_the_stack_limit_is_not_run_twice() -> None:
    """The step left `running` by the RecursionError had already run its method; recovery then
    takes its worker for lost and (the method has retries) runs it a second time."""
    echo = Echo.objects.create()
    with transaction.atomic():
        calls = [echo.flaky(0)]
        for _ in range(160):
            calls.append(echo.flaky.using(after=[calls[-1]])(0))
    deadline = time.monotonic() + 20
    while MethodCall.objects.filter(pk__in=[c.pk for c in calls]).unfinished().exists():
        assert time.monotonic() < deadline, "chain did not finish"
        time.sleep(0.3)
        recover_stranded_calls()
    echo.refresh_from_db()
    assert MethodCall.objects.filter(pk__in=[c.pk for c in calls]).succeeded().count() == len(calls)
    assert echo.hits == len(calls), f"{echo.hits} runs for {len(calls)} calls: a step ran twice"


# -- 2. a plain dict argument is taken for result_of() ------------------------------------------


def test_a_plain_dict_argument_shaped_like_result_of_adds_no_dependency() -> None:
    """README: dicts with str keys are supported, and a dict holding "__type__" is wrapped so user
    data "can never be mistaken for a tag". result_references() walks into the wrapper's items
    and takes the user's dict for a result_of(): the call waits for an unrelated call."""
    echo = Echo.objects.create()
    unrelated = echo.bump()
    payload = {"__type__": "result_of", "call": unrelated.pk, "db": "default"}
    call = echo.echo(payload)
    assert not MethodCallDependency.objects.filter(call=call.pk).exists()
    assert call.state != CallState.WAITING, call.state_reason


def test_a_plain_dict_argument_shaped_like_result_of_is_not_refused_with_a_raw_error() -> None:
    echo = Echo.objects.create()
    try:
        call = echo.echo({"__type__": "result_of", "call": "abc", "db": "default"})
    except CallError:
        pytest.fail("plain data refused as a dependency")
    except Exception as exc:  # currently: ValueError from int("abc"), not a CallError
        pytest.fail(f"raw {type(exc).__name__}: {exc}")
    assert call.get_arguments()[0][0]["call"] == "abc"


# -- 3. tags= callable returning one str --------------------------------------------------------


def test_tags_callable_returning_a_single_str_is_not_split_into_characters() -> None:
    """tags=lambda self: f"region:{...}" (a str, not a list) is iterated character by character:
    the call is silently tagged 'r', 'e', 'g', ... instead of raising InvalidTagError."""
    entry = registry.get_method("cloud.Report.fetch")
    assert entry is not None
    report = Report.objects.create(topic="t")
    import dataclasses

    options = dataclasses.replace(entry.options, tags=lambda self: "region:eu")
    try:
        call = decorator.make_call(entry, report, (), {}, options)
    except InvalidTagError:
        return  # refusing is fine
    assert call.tags == ["region:eu"], call.tags


# -- 4. unique call: lost race when the winner finishes fast -------------------------------------


def test_unique_call_racing_a_winner_that_already_finished_does_not_raise_integrity_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On PostgreSQL, a caller whose INSERT waited on a rival's uncommitted row gets the unique
    violation when the rival commits; if the rival's call has finished by the time the loser
    looks it up (immediate backend: it runs on commit), make_call() re-raises the raw
    IntegrityError. Seen for real: scratch/unique_race.py, 16 threads x 30 rounds, immediate
    backend, 16 IntegrityErrors. Here the interleaving is replayed deterministically."""
    instance = Instance.objects.create(account=Account.objects.create(name="a"), name="i")
    rival = instance.reboot()  # the winner's row; our pre-check must not see it yet
    real = decorator._unfinished_with_key
    lookups = []

    def interleaved(database: str, key: str) -> MethodCall | None:
        lookups.append(key)
        if len(lookups) == 1:
            return None  # pre-check ran while the winner's row was still uncommitted
        MethodCall.objects.filter(pk=rival.pk).update(state=CallState.SUCCEEDED)  # winner ran
        return real(database, key)

    monkeypatch.setattr(decorator, "_unfinished_with_key", interleaved)
    try:
        call = instance.reboot()
    except IntegrityError as exc:
        pytest.fail(f"raw IntegrityError from a unique call: {exc}")
    assert call.pk is not None


# -- 5. report_progress with text the database refuses -------------------------------------------


def test_report_progress_with_unstorable_text_does_not_break_the_method(run_worker: Any) -> None:
    """Errors and tracebacks are made storable (_storable_text), but a progress message with a
    lone surrogate (or a NUL, on PostgreSQL: DataError) raises out of report_progress() and fails
    the user's method."""
    echo = Echo.objects.create()
    call = echo.bump()
    from asyncmodels.job import _claim

    MethodCall.objects.filter(pk=call.pk).update(state=CallState.ENQUEUED)
    assert won_claim(_claim(call.pk, "default"))
    running = MethodCall.objects.get(pk=call.pk)
    for message in ("device said \ud800", "device said \x00"):
        running._progress_written = None  # type: ignore[assignment]
        try:
            running.report_progress(0.5, message)
        except Exception as exc:
            pytest.fail(f"report_progress({message!r}) raised {type(exc).__name__}: {exc}")
    assert current_call() is None


# -- 6. for_object() on a string pk --------------------------------------------------------------


def test_for_object_of_a_string_pk_with_a_trailing_space_returns_its_calls() -> None:
    """A CharField primary key "eu " is a valid row with calls of its own, but for_object()
    (and calls_for(), and MethodCallsAdminMixin's panel) raise InvalidTagError for it, because
    the model's tag is validated like a user-given tag. Same for a str pk over ~240 characters
    (tag longer than 255)."""
    region = Region.objects.create(code="eu ")
    call = region.ping()
    assert list(MethodCall.objects.own_calls(region)) == [call]
    assert list(MethodCall.objects.for_object(region)) == [call]


# -- 7. cancelled with no reason -----------------------------------------------------------------


def test_a_call_cancelled_before_it_started_says_why() -> None:
    """cancel() without a reason leaves a cancelled call with an empty state_reason and no error
    (a running call asked to stop gets "Asked to stop while running.")."""
    echo = Echo.objects.create()
    call = echo.bump()
    assert call.cancel()
    call.refresh_from_db()
    assert call.state == CallState.CANCELLED
    assert call.state_reason or call.error, "a cancelled call with no reason at all"
