"""Problems a hostile review of issue 6 (calls written enqueued, the claim's UPDATE ... RETURNING,
one-transaction recovery steps) found, each pinned by a test that failed before its fix
(SQLite + fakeredis by default; PostgreSQL and a real Redis with the real mode)."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import pytest
from django.conf import settings
from django.contrib.admin.sites import site
from django.db import connections, transaction
from django.test import TestCase

from asyncmodels import dispatch, job
from asyncmodels.models import CallState, MethodCall
from testproject.cloud.models import Echo

from .conftest import dead_queue

DB = pytest.mark.django_db(transaction=True, databases=["default", "other"])

# -- 1. a call made in setUpTestData is written enqueued and never pushed -----------------------


class CallMadeInSetUpTestDataTests(TestCase):
    """README (Make a call): "Made inside a savepoint (... and so in every Django TestCase) ... it
    is written pending ...; in a test that never commits it stays pending". setUpTestData runs in
    the TestCase's class-level transaction, the outermost atomic block: no savepoint is open, so
    enqueued_at_insert() wrote the call `enqueued` although that transaction never commits and
    nothing will ever push it: the test sees a call claiming to be in Redis that no job holds."""

    databases = {"default", "other"}
    call: ClassVar[MethodCall]

    @classmethod
    def setUpTestData(cls) -> None:
        cls.call = Echo.objects.create().bump()

    def test_the_call_is_pending_like_one_made_in_the_test(self) -> None:
        made_here = Echo.objects.create().bump()
        self.assertEqual(made_here.state, CallState.PENDING)
        row = MethodCall.objects.get(pk=self.call.pk)
        self.assertEqual(row.state, CallState.PENDING)
        self.assertIsNone(row.enqueued_at)
        self.assertEqual(self.call.state, CallState.PENDING)


# -- 2. a call written enqueued whose push failed keeps its enqueued_at -------------------------


@DB
def test_a_call_whose_push_failed_shows_no_enqueued_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call written `enqueued` (top level, or autocommit) whose push fails goes back to `pending`
    with the reason, but kept the INSERT's enqueued_at: the admin then shows an "enqueued" time
    for a call Redis never held (and so does the row once it is cancelled), where the same call
    made in a savepoint, or before issue 6, has none."""
    monkeypatch.setattr(dispatch, "get_queue", lambda name: dead_queue(name))
    echo = Echo.objects.create()
    single = echo.bump()  # autocommit: pushed (and failed) at once
    with transaction.atomic():
        batch = [echo.bump() for _ in range(2)]
        with transaction.atomic():
            in_savepoint = echo.bump()
    bulk = Echo.bump.bulk_call(Echo.objects.filter(pk=echo.pk))
    admin = site._registry[MethodCall]
    for call in [single, *batch, in_savepoint, *bulk]:
        row = MethodCall.objects.get(pk=call.pk)
        assert row.state == CallState.PENDING and row.state_reason.startswith("The push to queue")
        assert row.enqueued_at is None, (call.pk, row.enqueued_at)
        assert admin.enqueued_time(row) == "-"  # type: ignore[attr-defined]
        assert call.enqueued_at is None
    single.cancel()
    assert MethodCall.objects.get(pk=single.pk).enqueued_at is None


# -- 3. atomic=True: a dependent committed before the method's transaction commits is missed ----


@DB
@pytest.mark.skipif(
    not settings.DATABASES["default"]["ENGINE"].endswith("postgresql"),
    reason="needs a second writer while the method's transaction is open (SQLite locks the file)",
)
def test_a_dependent_made_before_an_atomic_call_commits_is_released(monkeypatch: pytest.MonkeyPatch) -> None:
    """The finishing UPDATE ... RETURNING EXISTS(dependents) of an atomic=True call runs inside the
    method's transaction, which commits only afterwards. A dependent committed in between read
    the call still running (so it waits), and the EXISTS read before it existed (so after_attempt
    skipped settling): the dependent stayed `waiting` until a recovery pass, where before issue 6
    the finished call released it at once (after_attempt looked after the commit)."""
    echo = Echo.objects.create()
    dependency = echo.bump_atomically()
    made: list[MethodCall] = []
    finish = job._finish

    def finish_then_a_dependent_commits(call: MethodCall, **changes: Any) -> bool:
        recorded = finish(call, **changes)
        if connections[call._state.db or "default"].in_atomic_block and not made:

            def make_dependent() -> None:
                try:
                    made.append(echo.bump.using(after=[dependency])())
                finally:
                    connections.close_all()

            thread = threading.Thread(target=make_dependent)
            thread.start()
            thread.join(timeout=30)
        return recorded

    monkeypatch.setattr(job, "_finish", finish_then_a_dependent_commits)
    MethodCall.objects.filter(pk=dependency.pk).update(state=CallState.PENDING)  # not in Redis
    job.run_method_call(dependency.pk, "default")
    assert MethodCall.objects.get(pk=dependency.pk).state == CallState.SUCCEEDED
    assert made, "the dependent was not made"
    assert MethodCall.objects.get(pk=made[0].pk).state == CallState.ENQUEUED
