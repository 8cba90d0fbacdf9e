"""Problems a hostile review of issue 6 (calls written enqueued, the claim's UPDATE ... RETURNING,
one-transaction recovery steps) found, each pinned by a test that failed before its fix
(SQLite + fakeredis by default; PostgreSQL and a real Redis with the real mode)."""

from __future__ import annotations

from typing import Any, ClassVar

from django.test import TestCase

from asyncmodels.models import CallState, MethodCall
from testproject.cloud.models import Echo

# -- 1. a call made in setUpTestData is written enqueued and never pushed -----------------------


class CallMadeInSetUpTestDataTests(TestCase):
    """README (Make a call): "Made inside a savepoint (... and so in every Django TestCase) ... it
    is written pending ...; in a test that never commits it stays pending". setUpTestData runs in
    the TestCase's class-level transaction, the outermost atomic block: no savepoint is open, so
    enqueued_at_insert() wrote the call `enqueued` although that transaction never commits and
    nothing will ever push it: the test sees a call claiming to be in Redis that no job holds."""

    databases: ClassVar[Any] = {"default", "other"}
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
