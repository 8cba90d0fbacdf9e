"""Using asyncmodels in a user's own TestCase: nothing commits, so calls stay pending."""

from __future__ import annotations

from django.test import TestCase, override_settings

from asyncmodels.models import CallState
from testproject.cloud.models import Account, Instance


@override_settings(ASYNCMODELS={"BACKEND": "immediate"})
class ImmediateBackendInTestCase(TestCase):
    def setUp(self) -> None:
        self.instance = Instance.objects.create(account=Account.objects.create(name="acme"), name="web1")

    def test_call_stays_pending_until_on_commit_callbacks_run(self) -> None:
        call = self.instance.provision(size="large")
        call.refresh_from_db()
        self.assertEqual(call.state, CallState.PENDING)

    def test_capture_on_commit_callbacks_runs_the_call(self) -> None:
        with self.captureOnCommitCallbacks(execute=True):
            call = self.instance.provision(size="large")
        call.refresh_from_db()
        self.assertEqual(call.state, CallState.SUCCEEDED)
        self.instance.refresh_from_db()
        self.assertEqual(self.instance.size, "large")
