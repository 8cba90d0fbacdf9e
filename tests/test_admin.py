"""The admin with Django's test client: list, call page, permissions, actions, per-object calls,
overview, escaping and query counts. (The same flows in a real browser: test_admin_browser.py.)"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Callable

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from asyncmodels import admin as asyncmodels_admin
from asyncmodels.admin import BoundedCountPaginator, MethodCallsAdminMixin, TagFilter
from asyncmodels.models import CallState, MethodCall, MethodCallDependency, MethodCallTag
from testproject.cloud.models import Account, Echo, Instance, Ledger, Region, Report

from .conftest import RunWorker

pytestmark = pytest.mark.django_db(transaction=True)

LIST_URL = "/admin/asyncmodels/methodcall/"
OVERVIEW_URL = f"{LIST_URL}overview/"


def _call_url(call: MethodCall, action: str = "change") -> str:
    return f"{LIST_URL}{call.pk}/{action}/"


def _client_for(user: User, *, enforce_csrf_checks: bool = False) -> Client:
    client = Client(enforce_csrf_checks=enforce_csrf_checks)
    client.force_login(user)
    return client


def _staff(username: str, *codenames: str) -> User:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return User.objects.get(pk=user.pk)  # a fresh object: no cached permissions


@pytest.fixture
def staff_client() -> Client:
    return _client_for(User.objects.create_superuser("admin", "admin@example.com", "pw"))


@pytest.fixture
def instance() -> Instance:
    return Instance.objects.create(account=Account.objects.create(name="acme"), name="web1")


def _row_ids(page: str) -> list[int]:
    return [
        int(pk)
        for pk in re.findall(r'<th class="field-id"><a href="/admin/asyncmodels/methodcall/(\d+)/', page)
    ]


# The list.


def test_list_shows_badges_object_links_and_first_error_line_newest_first(
    staff_client: Client, instance: Instance, run_worker: RunWorker
) -> None:
    ok = instance.provision(size="large")
    failed = instance.resize("huge")
    multi_line = Echo.objects.create().fail("first line\nsecond line")
    run_worker()
    page = staff_client.get(LIST_URL).content.decode()
    assert _row_ids(page) == [multi_line.pk, failed.pk, ok.pk]
    assert '<span class="asyncmodels-state asyncmodels-state-succeeded">succeeded</span>' in page
    assert page.count('<span class="asyncmodels-state asyncmodels-state-failed">failed</span>') == 2
    assert f'<a href="/admin/cloud/instance/{instance.pk}/change/">Instance {instance.pk}</a>' in page
    assert "size &#x27;huge&#x27; is not offered in this region" in page
    assert "first line" in page and "second line" not in page
    assert "Echo " in page  # Echo has no admin page: its label is not a link
    assert 'href="/admin/cloud/echo/' not in page
    assert "3 method calls" in page


def test_object_link_quotes_string_primary_keys(staff_client: Client) -> None:
    Region.objects.create(code="eu_west/1").ping()
    page = staff_client.get(LIST_URL).content.decode()
    assert 'href="/admin/cloud/region/eu_5Fwest_2F1/change/"' in page


def test_filters_by_state_queue_method_model_created_and_object(
    staff_client: Client, instance: Instance, run_worker: RunWorker
) -> None:
    provision = instance.provision(size="large")  # provisioning queue
    resize = instance.resize("huge")  # fails
    urgent = instance.describe.using(queue="urgent")()
    other = Instance.objects.create(account=instance.account, name="web2").describe()
    invoice = instance.account.send_invoice("2026-11")
    run_worker()
    MethodCall.objects.filter(pk=invoice.pk).update(created_at=timezone.now() - datetime.timedelta(days=3))

    def ids(**params: str) -> set[int]:
        response = staff_client.get(LIST_URL, params)
        assert response.status_code == 200, params
        return set(_row_ids(response.content.decode()))

    assert ids(state__exact="failed") == {resize.pk}
    assert ids(queue="provisioning") == {provision.pk, resize.pk}
    assert ids(queue="urgent") == {urgent.pk}
    assert ids(method="cloud.Instance.describe") == {urgent.pk, other.pk}
    assert ids(model="cloud.account") == {invoice.pk}
    assert ids(model="cloud.instance", state__exact="succeeded") == {provision.pk, urgent.pk, other.pk}
    assert ids(created="24h") == {provision.pk, resize.pk, urgent.pk, other.pk}
    assert ids(created="7d") == {provision.pk, resize.pk, urgent.pk, other.pk, invoice.pk}
    hour = timezone.localtime(provision.created_at).strftime("%Y-%m-%dT%H:00")
    assert provision.pk in ids(created=hour)
    assert ids(object=f"{provision.content_type_id}:{instance.pk}") == {provision.pk, resize.pk, urgent.pk}
    assert ids(object="nonsense") == set()
    assert ids(created="not-a-time") == set()
    assert ids(model="cloud.nosuchmodel") == set()


def test_filter_choices_come_from_settings_and_the_registry_without_queries(staff_client: Client) -> None:
    page = staff_client.get(LIST_URL).content.decode()
    for choice in (
        "?method=cloud.Instance.provision",
        "?model=cloud.instance",
        "?queue=urgent",
        "?created=24h",
    ):
        assert choice in page
    assert "Show counts" not in page  # facets would COUNT every choice on every view


def test_search_matches_an_exact_object_id_or_error_text(
    staff_client: Client, instance: Instance, run_worker: RunWorker
) -> None:
    other = Instance.objects.create(pk=instance.pk * 10 + 1, account=instance.account, name="web2")
    mine = instance.describe()
    theirs = other.describe()
    failed = Echo.objects.create(pk=999).fail(
        "disk quota exceeded on volume alpha"
    )  # no digits: ids are searched too
    run_worker()

    def ids(term: str) -> set[int]:
        return set(_row_ids(staff_client.get(LIST_URL, {"q": term}).content.decode()))

    assert ids(str(instance.pk)) == {mine.pk}  # exact: not the object whose id merely contains it
    assert ids(str(other.pk)) == {theirs.pk}
    assert ids("QUOTA exceeded") == {failed.pk}
    assert ids("nothing like it") == set()


def test_list_queries_do_not_grow_with_rows_and_never_count_the_whole_table(
    staff_client: Client, instance: Instance, run_worker: RunWorker
) -> None:
    def list_queries() -> list[str]:
        with CaptureQueriesContext(connection) as captured:
            assert staff_client.get(LIST_URL, {"state__exact": "succeeded"}).status_code == 200
        return [query["sql"] for query in captured.captured_queries]

    instance.describe()
    run_worker()
    few = list_queries()
    for index in range(30):
        Instance.objects.create(account=instance.account, name=f"web-{index}").describe()
        Echo.objects.create().bump()
    run_worker()
    many = list_queries()
    assert len(many) == len(few), many
    counts = [sql for sql in many if "COUNT(" in sql.upper()]
    assert counts, "the list shows how many calls match"
    assert all("LIMIT" in sql.upper() for sql in counts), counts  # bounded, never the whole table
    # session, user, recent tags (the tag filter's choices), bounded count, rows (and their
    # content types, when not cached yet)
    assert len(many) <= 6, many


def test_bounded_count_says_more_than_its_limit(
    staff_client: Client, monkeypatch: pytest.MonkeyPatch, run_worker: RunWorker
) -> None:
    echo = Echo.objects.create()
    for _ in range(5):
        echo.bump()
    monkeypatch.setattr(BoundedCountPaginator, "limit", 3)
    page = staff_client.get(LIST_URL).content.decode()
    assert "more than 3 method calls" in page
    assert len(_row_ids(page)) == 5  # all rows still listed (one page)
    exact = staff_client.get(LIST_URL, {"q": "no such error"}).content.decode()
    assert "0 method calls" in exact


# The call page.


def test_call_page_shows_everything_escaped(staff_client: Client, run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    script = "<script>alert(1)</script>"
    call = echo.fail(script)
    shown = echo.echo(script, key=script)
    run_worker()
    page = staff_client.get(_call_url(call)).content.decode()
    assert script not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert '<pre class="asyncmodels-traceback">Traceback (most recent call last)' in page
    assert "builtins.ValueError" in page
    echoed = staff_client.get(_call_url(shown)).content.decode()
    assert script not in echoed
    assert "&quot;key&quot;: &quot;&lt;script&gt;alert(1)&lt;/script&gt;&quot;" in echoed  # kwargs, result


def test_call_page_shows_attempts_lease_timing_and_links_to_the_object_and_its_calls(
    staff_client: Client, instance: Instance, run_worker: RunWorker
) -> None:
    call = Echo.objects.create().flaky.using(retry_backoff=60, retry_backoff_max=60)(failures=5)
    run_worker()
    page = staff_client.get(_call_url(call)).content.decode()
    assert "History, oldest first" in page
    assert "run 1 of a flaky dependency failed" in page
    assert "attempt 2 of 3 is due in" in page
    assert "(not due yet)" in page
    assert "&quot;retries&quot;: 2" in page

    running = instance.describe()
    lease = timezone.now() + datetime.timedelta(seconds=50)
    MethodCall.objects.filter(pk=running.pk).update(
        state=CallState.RUNNING,
        worker="host-1.4242",
        attempts=1,
        started_at=timezone.now(),
        lease_expires_at=lease,
    )
    page = staff_client.get(_call_url(running)).content.decode()
    assert "held by host-1.4242 until" in page
    assert f'href="/admin/cloud/instance/{instance.pk}/change/"' in page
    object_filter = f"object={running.content_type_id}%3A{instance.pk}"
    assert f'href="/admin/asyncmodels/methodcall/?{object_filter}"' in page
    assert f"?{object_filter}&amp;method=cloud.Instance.describe" in page
    MethodCall.objects.filter(pk=running.pk).update(
        lease_expires_at=timezone.now() - datetime.timedelta(seconds=5)
    )
    page = staff_client.get(_call_url(running)).content.decode()
    assert "its worker is presumed lost" in page


def test_calls_are_read_only(staff_client: Client) -> None:
    call = Echo.objects.create().bump()
    assert staff_client.get(f"{LIST_URL}add/").status_code == 403
    response = staff_client.post(_call_url(call), {"state": "succeeded"})
    assert response.status_code == 403
    assert staff_client.post(_call_url(call, "delete"), {"post": "yes"}).status_code == 403
    call.refresh_from_db()
    assert call.state != "succeeded"


def test_staff_without_view_permission_gets_403() -> None:
    clerk = _staff("clerk")
    client = _client_for(clerk)
    assert client.get(LIST_URL).status_code == 403
    assert client.get(OVERVIEW_URL).status_code == 403
    clerk.user_permissions.add(Permission.objects.get(codename="view_methodcall"))
    client = _client_for(User.objects.get(pk=clerk.pk))
    assert client.get(LIST_URL).status_code == 200
    assert client.get(OVERVIEW_URL).status_code == 200


# Retry and cancel: buttons and list actions.


def test_retry_button_needs_the_retry_permission_and_a_post(
    run_worker: RunWorker, queued_jobs: Callable[..., int]
) -> None:
    call = Echo.objects.create().flaky.using(retries=0)(failures=1)
    run_worker()
    viewer = _client_for(_staff("viewer", "view_methodcall"))
    page = viewer.get(_call_url(call)).content.decode()
    assert 'id="asyncmodels-retry"' not in page
    assert viewer.post(_call_url(call, "retry")).status_code == 403
    call.refresh_from_db()
    assert call.state == CallState.FAILED

    retrier = _client_for(_staff("retrier", "view_methodcall", "retry_methodcall"))
    page = retrier.get(_call_url(call)).content.decode()
    assert 'id="asyncmodels-retry"' in page
    assert 'id="asyncmodels-cancel"' not in page  # a failed call cannot be cancelled
    assert retrier.get(_call_url(call, "retry")).status_code == 405  # POST only
    response = retrier.post(_call_url(call, "retry"), follow=True)
    assert f"Retried call #{call.pk}." in response.content.decode()
    call.refresh_from_db()
    assert call.state == CallState.ENQUEUED
    entry = LogEntry.objects.get(object_id=str(call.pk))
    assert entry.get_change_message() == "Retried in the admin by retrier."
    assert entry.user.get_username() == "retrier"
    assert "Retried in the admin by retrier." in retrier.get(_call_url(call, "history")).content.decode()
    assert queued_jobs() == 1
    run_worker()
    call.refresh_from_db()
    assert (call.state, call.attempts) == (CallState.SUCCEEDED, 2)


def test_actions_are_csrf_protected(run_worker: RunWorker) -> None:
    call = Echo.objects.create().fail("nope")
    run_worker()
    client = _client_for(
        User.objects.create_superuser("admin", "a@example.com", "pw"), enforce_csrf_checks=True
    )
    assert client.post(_call_url(call, "retry")).status_code == 403
    call.refresh_from_db()
    assert call.state == CallState.FAILED
    client.get(_call_url(call))  # sets the CSRF cookie, as the page's form would
    token = client.cookies["csrftoken"].value
    assert client.post(_call_url(call, "retry"), {"csrfmiddlewaretoken": token}).status_code == 302
    call.refresh_from_db()
    assert call.state == CallState.ENQUEUED


def test_retry_of_a_succeeded_call_is_refused_with_a_message(
    staff_client: Client, run_worker: RunWorker
) -> None:
    echo = Echo.objects.create()
    call = echo.bump()
    run_worker()
    assert 'id="asyncmodels-retry"' not in staff_client.get(_call_url(call)).content.decode()
    page = staff_client.post(_call_url(call, "retry"), follow=True).content.decode()
    assert "was not retried: succeeded calls are never run again" in page
    call.refresh_from_db()
    echo.refresh_from_db()
    assert (call.state, call.attempts, echo.hits) == (CallState.SUCCEEDED, 1, 1)


def test_cancel_button_cancels_a_call_not_started_and_refuses_a_running_one(
    run_worker: RunWorker, queued_jobs: Callable[..., int]
) -> None:
    echo = Echo.objects.create()
    call = echo.bump()
    assert queued_jobs() == 1
    canceller = _client_for(_staff("canceller", "view_methodcall", "cancel_methodcall"))
    page = canceller.get(_call_url(call)).content.decode()
    assert 'id="asyncmodels-cancel"' in page and 'id="asyncmodels-retry"' not in page
    response = canceller.post(_call_url(call, "cancel"), follow=True)
    assert f"Cancelled call #{call.pk}." in response.content.decode()
    run_worker()
    call.refresh_from_db()
    echo.refresh_from_db()
    assert (call.state, echo.hits) == (CallState.CANCELLED, 0)
    assert call.state_reason == "Cancelled in the admin by canceller."

    running = echo.bump()
    MethodCall.objects.filter(pk=running.pk).update(state=CallState.RUNNING, attempts=1)
    page = canceller.get(_call_url(running)).content.decode()
    assert 'id="asyncmodels-cancel">Ask to stop</button>' in page
    page = canceller.post(_call_url(running, "cancel"), follow=True).content.decode()
    assert f"Asked running call #{running.pk} to stop: no further attempt will follow" in page
    assert "asked to stop</span>" in page  # beside the state badge
    assert 'id="asyncmodels-cancel"' not in page  # asked once
    running.refresh_from_db()
    assert running.state == CallState.RUNNING and running.cancel_requested_at is not None
    page = canceller.post(_call_url(running, "cancel"), follow=True).content.decode()
    assert f"Call #{running.pk} was already asked to stop." in page

    viewer = _client_for(_staff("viewer", "view_methodcall"))
    waiting = echo.bump()
    assert viewer.post(_call_url(waiting, "cancel")).status_code == 403
    waiting.refresh_from_db()
    assert waiting.state == CallState.ENQUEUED


def test_retry_action_on_the_list_retries_only_failed_and_cancelled(
    staff_client: Client, run_worker: RunWorker, queued_jobs: Callable[..., int]
) -> None:
    echo = Echo.objects.create()
    failed = echo.fail("nope")
    succeeded = echo.bump()
    cancelled = echo.bump()
    cancelled.cancel()
    run_worker()
    selected = [str(call.pk) for call in (failed, succeeded, cancelled)]
    page = staff_client.post(
        LIST_URL, {"action": "retry_calls", "_selected_action": selected}, follow=True
    ).content.decode()
    assert f"Retried 2 calls: #{failed.pk}, #{cancelled.pk}." in page
    assert f"Call #{succeeded.pk} was not retried: succeeded calls are never run again" in page
    assert queued_jobs() == 2
    run_worker()
    states = dict(MethodCall.objects.values_list("pk", "state"))
    assert states == {
        failed.pk: CallState.FAILED,
        succeeded.pk: CallState.SUCCEEDED,
        cancelled.pk: CallState.SUCCEEDED,
    }
    echo.refresh_from_db()
    assert echo.hits == 2  # the succeeded call did not run again; the cancelled one ran once


def test_list_actions_need_their_permissions(run_worker: RunWorker, queued_jobs: Callable[..., int]) -> None:
    echo = Echo.objects.create()
    failed = echo.fail("nope")
    run_worker()
    waiting = echo.bump()
    viewer = _client_for(_staff("viewer", "view_methodcall"))
    page = viewer.get(LIST_URL).content.decode()
    assert 'name="action"' not in page
    viewer.post(LIST_URL, {"action": "retry_calls", "_selected_action": [str(failed.pk)]})
    viewer.post(LIST_URL, {"action": "cancel_calls", "_selected_action": [str(waiting.pk)]})
    failed.refresh_from_db()
    waiting.refresh_from_db()
    assert (failed.state, waiting.state) == (CallState.FAILED, CallState.ENQUEUED)

    canceller = _client_for(_staff("canceller", "view_methodcall", "cancel_methodcall"))
    page = canceller.get(LIST_URL).content.decode()
    assert 'value="cancel_calls"' in page and 'value="retry_calls"' not in page
    canceller.post(
        LIST_URL, {"action": "cancel_calls", "_selected_action": [str(waiting.pk), str(failed.pk)]}
    )
    failed.refresh_from_db()
    waiting.refresh_from_db()
    assert (failed.state, waiting.state) == (CallState.FAILED, CallState.CANCELLED)


# Per object: MethodCallsAdminMixin on the demo's Instance and Account admins.


def test_object_page_lists_its_calls_newest_first_with_a_link_to_all(
    staff_client: Client, instance: Instance, run_worker: RunWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = instance.provision(size="large")
    second = instance.resize("huge")
    elsewhere = Instance.objects.create(account=instance.account, name="web2").describe()
    run_worker()
    third = instance.describe()
    page = staff_client.get(f"/admin/cloud/instance/{instance.pk}/change/").content.decode()
    shown = [int(pk) for pk in re.findall(r'<a href="/admin/asyncmodels/methodcall/(\d+)/change/">#', page)]
    assert shown == [third.pk, second.pk, first.pk]
    assert elsewhere.pk not in shown
    assert "asyncmodels-state-failed" in page and "asyncmodels-state-enqueued" in page
    assert "These calls in the call list" in page

    monkeypatch.setattr(MethodCallsAdminMixin, "method_calls_limit", 2)
    page = staff_client.get(f"/admin/cloud/instance/{instance.pk}/change/").content.decode()
    shown = [int(pk) for pk in re.findall(r'<a href="/admin/asyncmodels/methodcall/(\d+)/change/">#', page)]
    assert shown == [third.pk, second.pk]
    link = re.search(
        r'<a href="(/admin/asyncmodels/methodcall/\?object=[^"]+)">All calls of this object', page
    )
    assert link is not None
    listed = staff_client.get(link.group(1).replace("&amp;", "&")).content.decode()
    assert set(_row_ids(listed)) == {first.pk, second.pk, third.pk}

    account_page = staff_client.get(f"/admin/cloud/account/{instance.account.pk}/change/").content.decode()
    assert "Method calls" in account_page and "No calls yet." in account_page


def test_object_page_still_saves_and_hides_calls_from_users_who_may_not_view_them(instance: Instance) -> None:
    instance.describe()
    editor = _staff("editor", "view_instance", "change_instance")
    client = _client_for(editor)
    page = client.get(f"/admin/cloud/instance/{instance.pk}/change/").content.decode()
    assert "asyncmodels-calls-table" not in page
    response = client.post(
        f"/admin/cloud/instance/{instance.pk}/change/",
        {"account": instance.account.pk, "name": "renamed", "size": "small", "status": "new"},
    )
    assert response.status_code == 302
    instance.refresh_from_db()
    assert instance.name == "renamed"
    superuser = _client_for(User.objects.create_superuser("admin", "a@example.com", "pw"))
    response = superuser.post(
        f"/admin/cloud/instance/{instance.pk}/change/",
        {"account": instance.account.pk, "name": "again", "size": "small", "status": "new"},
    )
    assert response.status_code == 302
    instance.refresh_from_db()
    assert instance.name == "again"


# Tags: the tag filter, the object filter and the per-object section show calls tagged with an object.


@dataclasses.dataclass
class TaggedCalls:
    """An account with an instance (reboot: tagged with the account and "region:eu"; configure:
    tagged with the account; describe: no tags), the account's own call, and another account's
    instance's reboot; all finished."""

    account: Account
    instance: Instance
    other: Instance
    invoice: MethodCall
    reboot: MethodCall
    configure: MethodCall
    describe: MethodCall
    other_reboot: MethodCall

    @classmethod
    def make(cls, run_worker: RunWorker) -> TaggedCalls:
        account = Account.objects.create(name="acme")
        instance = Instance.objects.create(account=account, name="web1")
        other = Instance.objects.create(account=Account.objects.create(name="globex"), name="web9")
        made = cls(
            account=account,
            instance=instance,
            other=other,
            invoice=account.send_invoice("2026-11"),
            reboot=instance.reboot("patch"),
            configure=instance.configure("dns", "1.1.1.1"),
            describe=instance.describe(),
            other_reboot=other.reboot(),
        )
        run_worker()
        return made

    @property
    def all_pks(self) -> set[int]:
        return {self.invoice.pk, self.reboot.pk, self.configure.pk, self.describe.pk, self.other_reboot.pk}


def test_tag_filter_lists_the_calls_with_a_tag_and_offers_recent_tags(
    staff_client: Client, run_worker: RunWorker
) -> None:
    made = TaggedCalls.make(run_worker)
    account = made.account

    def ids(**params: str) -> set[int]:
        response = staff_client.get(LIST_URL, params)
        assert response.status_code == 200, params
        return set(_row_ids(response.content.decode()))

    assert ids(tag="region:eu") == {made.reboot.pk, made.other_reboot.pk}
    assert ids(tag=f"cloud.account:{account.pk}") == {made.reboot.pk, made.configure.pk}
    assert ids(tag=f"cloud.account:{account.pk}", method="cloud.Instance.reboot") == {made.reboot.pk}
    assert ids(tag="no-such-tag") == set()
    for bad in ("", " region:eu", "region:eu ", "a\x00b", "x" * 256, "x" * 5000):
        assert ids(tag=bad) == set(), bad
    assert ids() == made.all_pks

    page = staff_client.get(LIST_URL).content.decode()
    assert "By tag" in page
    assert 'href="?tag=region%3Aeu"' in page
    assert f'href="?tag=cloud.account%3A{account.pk}"' in page
    # The value in use is offered (selected) even when it is not among the recent tags.
    page = staff_client.get(LIST_URL, {"tag": "no-such-tag"}).content.decode()
    assert re.search(r'<li class="selected">\s*<a href="\?tag=no-such-tag">no-such-tag</a>', page)


def test_tag_filter_is_a_subquery_and_offers_only_recent_tags(
    staff_client: Client, run_worker: RunWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = TaggedCalls.make(run_worker)
    with CaptureQueriesContext(connection) as captured:
        assert staff_client.get(LIST_URL, {"tag": "region:eu"}).status_code == 200
    sqls = [query["sql"].upper() for query in captured.captured_queries]
    assert not any("DISTINCT" in sql for sql in sqls), sqls
    recent = [sql for sql in sqls if "ASYNCMODELS_METHODCALLTAG" in sql and "LIMIT" in sql]
    assert recent, sqls  # the choices: one bounded read of the latest tag rows

    # Only the tags of the latest rows are offered: here the last call's two tags.
    monkeypatch.setattr(TagFilter, "recent_rows", 2)
    page = staff_client.get(LIST_URL).content.decode()
    assert 'href="?tag=region%3Aeu"' in page
    assert f'href="?tag=cloud.account%3A{made.other.account_id}"' in page
    assert f'href="?tag=cloud.account%3A{made.account.pk}"' not in page


def test_object_filter_lists_the_objects_own_calls_and_the_calls_tagged_with_it(
    staff_client: Client, run_worker: RunWorker
) -> None:
    made = TaggedCalls.make(run_worker)
    account, instance = made.account, made.instance

    def ids(obj: Account | Instance) -> set[int]:
        value = asyncmodels_admin.object_filter_value(obj)
        return set(_row_ids(staff_client.get(LIST_URL, {"object": value}).content.decode()))

    assert ids(account) == {made.invoice.pk, made.reboot.pk, made.configure.pk}
    assert ids(instance) == {made.reboot.pk, made.configure.pk, made.describe.pk}
    assert ids(account) == set(MethodCall.objects.for_object(account).values_list("pk", flat=True))
    assert ids(instance) == set(MethodCall.objects.for_object(instance).values_list("pk", flat=True))


def test_object_page_marks_the_calls_only_tagged_with_it_and_links_to_the_same_calls(
    staff_client: Client, run_worker: RunWorker
) -> None:
    made = TaggedCalls.make(run_worker)
    account, instance = made.account, made.instance
    page = staff_client.get(f"/admin/cloud/account/{account.pk}/change/").content.decode()
    rows = re.findall(
        r"<tr><td><a href=\"/admin/asyncmodels/methodcall/(\d+)/change/\">#\d+</a>(.*?)</tr>", page
    )
    shown = {int(pk): cells for pk, cells in rows}
    invoice, reboot, configure = made.invoice, made.reboot, made.configure
    assert set(shown) == {invoice.pk, reboot.pk, configure.pk}
    assert "this object" in shown[invoice.pk] and "tagged" not in shown[invoice.pk]
    instance_link = f'<a href="/admin/cloud/instance/{instance.pk}/change/">Instance {instance.pk}</a>'
    for call in (reboot, configure):
        assert instance_link in shown[call.pk] and ">tagged</span>" in shown[call.pk]
    assert "calls on other objects tagged with it" in page
    link = re.search(
        r'<a href="(/admin/asyncmodels/methodcall/\?object=[^"]+)">These calls in the call list', page
    )
    assert link is not None
    listed = staff_client.get(link.group(1).replace("&amp;", "&")).content.decode()
    assert set(_row_ids(listed)) == set(shown)

    # The instance's own page: all of them are its own.
    page = staff_client.get(f"/admin/cloud/instance/{instance.pk}/change/").content.decode()
    assert ">tagged</span>" not in page and "calls on other objects tagged with it" not in page


# The call page: tags, unique and exclusive keys, progress, dependencies and the workflow.


def _workflow(run_worker: RunWorker, parts: int = 3) -> tuple[Report, list[MethodCall]]:
    """A finished Report workflow: fetch, ``parts`` slices, assemble (in that order of ids)."""
    report = Report.objects.create(topic="sales", account=Account.objects.create(name="acme"))
    report.build(parts=parts)
    run_worker()
    calls = list(
        MethodCall.objects.filter(object_id=str(report.pk), method__startswith="cloud.Report.").order_by("pk")
    )
    assert [call.state for call in calls] == [CallState.SUCCEEDED] * (parts + 2)
    return report, calls


def _workflow_rows(page: str) -> list[tuple[int, int]]:
    """(step, call id) of each row of the call page's workflow table, in order."""
    table = page[page.index('<table class="asyncmodels-workflow">') :]
    table = table[: table.index("</table>")]
    return [
        (int(step), int(pk))
        for step, pk in re.findall(
            r'<tr class="[^"]*"><td>(\d+)</td><td><a href="/admin/asyncmodels/methodcall/(\d+)/change/">',
            table,
        )
    ]


def test_call_page_shows_tags_as_links_to_the_filtered_list(
    staff_client: Client, run_worker: RunWorker
) -> None:
    made = TaggedCalls.make(run_worker)
    reboot, account = made.reboot, made.account
    page = staff_client.get(_call_url(reboot)).content.decode()
    assert (
        f'<a class="asyncmodels-tag" href="/admin/asyncmodels/methodcall/?tag=cloud.account%3A{account.pk}"'
        in page
    )
    assert (
        'href="/admin/asyncmodels/methodcall/?tag=region%3Aeu" title="Calls with this tag">region:eu</a>'
        in page
    )
    assert "yes (one unfinished call per key)" in page  # Instance.reboot is unique=True
    assert "this one has finished, so the same call now makes a new one" in page
    assert "Workflow" not in page and "field-runs_after" not in page  # no dependencies
    assert "field-progress_display" not in page and "field-exclusive_display" not in page
    page = staff_client.get(_call_url(made.describe)).content.decode()
    assert re.search(r"<label>Tags:</label>\s*<div class=\"readonly\">none</div>", page)
    assert "field-unique_display" not in page


def test_call_page_shows_the_exclusive_key_and_its_holder(staff_client: Client) -> None:
    ledger = Ledger.objects.create(name="books")
    holder = ledger.settle()
    waiting = ledger.settle()
    MethodCall.objects.filter(pk=holder.pk).update(state=CallState.RUNNING, attempts=1)
    MethodCall.objects.filter(pk=waiting.pk).update(state=CallState.WAITING)
    page = staff_client.get(_call_url(waiting)).content.decode()
    assert (
        f"<code>cloud.Ledger.settle@cloud.ledger:{ledger.pk}</code>: calls with this key run one at a time"
        in page
    )
    holder_link = f'<a href="/admin/asyncmodels/methodcall/{holder.pk}/change/">#{holder.pk}</a>'
    assert f"Held now by {holder_link} cloud.Ledger.settle." in page
    assert "This call holds it now." in staff_client.get(_call_url(holder)).content.decode()
    post = ledger.post()  # the group "books" of post and audit
    page = staff_client.get(_call_url(post)).content.decode()
    assert f"<code>cloud.ledger.books@cloud.ledger:{ledger.pk}</code>" in page
    assert "No call holds it now." in page


def test_call_page_shows_progress_as_a_bar_with_its_message(staff_client: Client) -> None:
    call = Echo.objects.create().bump()
    MethodCall.objects.filter(pk=call.pk).update(
        state=CallState.RUNNING,
        attempts=1,
        progress=0.425,
        progress_message="<b>slice 2 of 3</b>",
        progress_at=timezone.now(),
    )
    page = staff_client.get(_call_url(call)).content.decode()
    assert '<progress class="asyncmodels-progress" max="100" value="42">42%</progress> 42%' in page
    assert "&lt;b&gt;slice 2 of 3&lt;/b&gt;" in page and "<b>slice" not in page
    assert "reported " in page


def test_call_page_shows_what_a_step_runs_after_what_follows_it_and_the_workflow_in_order(
    staff_client: Client, run_worker: RunWorker
) -> None:
    report, calls = _workflow(run_worker)
    fetch, slices, assemble = calls[0], calls[1:4], calls[4]
    assert [call.method for call in calls] == ["cloud.Report.fetch"] + ["cloud.Report.slice"] * 3 + [
        "cloud.Report.assemble"
    ]
    expected = [(1, fetch.pk), *((2, piece.pk) for piece in slices), (3, assemble.pk)]

    page = staff_client.get(_call_url(assemble)).content.decode()
    assert _workflow_rows(page) == expected
    assert "5 calls in 3 steps; this call is step 3." in page
    runs_after = page[page.index("field-runs_after") : page.index("field-workflow_steps")]
    assert re.findall(r'href="/admin/asyncmodels/methodcall/(\d+)/change/">#', runs_after) == [
        str(piece.pk) for piece in slices
    ]
    assert runs_after.count("asyncmodels-state-succeeded") == 3
    assert "field-followed_by" not in page  # nothing waits for the last step
    this_call = (
        f'<a href="/admin/asyncmodels/methodcall/{assemble.pk}/change/">#{assemble.pk}</a> (this call)'
    )
    assert f'<tr class="asyncmodels-current"><td>3</td><td>{this_call}' in page
    assert f"<td>#{slices[0].pk}, #{slices[1].pk}, #{slices[2].pk}</td>" in page  # what it ran after
    assert f'<a href="/admin/cloud/report/{report.pk}/change/">Report {report.pk}</a>' in page

    page = staff_client.get(_call_url(fetch)).content.decode()
    assert _workflow_rows(page) == expected  # the same group, seen from its first step
    assert "this call is step 1." in page and "field-runs_after" not in page
    followed_by = page[page.index("field-followed_by") : page.index("field-workflow_steps")]
    assert re.findall(r'href="/admin/asyncmodels/methodcall/(\d+)/change/">#', followed_by) == [
        str(piece.pk) for piece in slices
    ]

    page = staff_client.get(_call_url(slices[1])).content.decode()
    assert _workflow_rows(page) == expected
    assert "this call is step 2." in page
    runs_after = page[page.index("field-runs_after") : page.index("field-followed_by")]
    assert f'/methodcall/{fetch.pk}/change/">#{fetch.pk}</a> cloud.Report.fetch' in runs_after
    followed_by = page[page.index("field-followed_by") : page.index("field-workflow_steps")]
    assert f'/methodcall/{assemble.pk}/change/">#{assemble.pk}</a> cloud.Report.assemble' in followed_by


def test_workflow_of_a_failed_step_shows_the_cancelled_rest(
    staff_client: Client, run_worker: RunWorker
) -> None:
    report = Report.objects.create(topic="broken source")
    assemble = report.build(parts=2)
    run_worker()
    page = staff_client.get(_call_url(assemble)).content.decode()
    table = page[page.index('<table class="asyncmodels-workflow">') :]
    states = re.findall(r'asyncmodels-state-(\w+)">', table[: table.index("</table>")])
    assert states == ["failed", "cancelled", "cancelled", "cancelled"]


def test_call_page_queries_do_not_grow_with_the_workflow(staff_client: Client, run_worker: RunWorker) -> None:
    def page_queries(call: MethodCall) -> int:
        with CaptureQueriesContext(connection) as captured:
            assert staff_client.get(_call_url(call)).status_code == 200
        return len(captured.captured_queries)

    _report, small = _workflow(run_worker, parts=2)
    _report, large = _workflow(run_worker, parts=12)
    page_queries(small[-1])  # content types cached
    assert page_queries(small[-1]) == page_queries(large[-1])
    assert page_queries(small[1]) == page_queries(large[1])  # a slice: both directions
    plain = Echo.objects.create().bump()
    with CaptureQueriesContext(connection) as captured:
        assert staff_client.get(_call_url(plain)).status_code == 200
    # No dependency: two reads of the dependency table (one each way), no walk.
    walked = [query["sql"] for query in captured.captured_queries if "methodcalldependency" in query["sql"]]
    assert len(walked) == 2, walked


def test_runs_after_lists_a_bounded_number_of_calls_and_says_how_many_more(
    staff_client: Client, run_worker: RunWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    _report, calls = _workflow(run_worker, parts=4)
    monkeypatch.setattr(asyncmodels_admin, "NEIGHBOURS_SHOWN", 3)
    page = staff_client.get(_call_url(calls[-1])).content.decode()
    runs_after = page[page.index("field-runs_after") : page.index("field-workflow_steps")]
    assert runs_after.count("<li><a ") == 3 and "<li>… and 1 more</li>" in runs_after
    assert len(_workflow_rows(page)) == 6  # the workflow still has every step
    page = staff_client.get(_call_url(calls[0])).content.decode()
    assert "<li>… and 1 more</li>" in page and len(_workflow_rows(page)) == 6


def test_workflow_walk_is_bounded(staff_client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain longer than the walk's rounds (or calls) is cut, in a fixed number of queries."""
    echo = Echo.objects.create()

    def chain(length: int) -> list[MethodCall]:
        calls = [echo.bump()]
        for _ in range(length - 1):
            calls.append(echo.bump.using(after=[calls[-1]])())
        return calls

    def page_queries(call: MethodCall) -> tuple[int, str]:
        with CaptureQueriesContext(connection) as captured:
            response = staff_client.get(_call_url(call))
            assert response.status_code == 200
        return len(captured.captured_queries), response.content.decode()

    monkeypatch.setattr(asyncmodels_admin, "WORKFLOW_MAX_ROUNDS", 3)
    short, long = chain(6), chain(15)
    page_queries(short[0])
    short_count, page = page_queries(short[-1])
    assert "The workflow is larger" in page
    assert [step for step, _pk in _workflow_rows(page)] == [1, 2, 3, 4, 5]  # 1 + 3 rounds of 1
    long_count, page = page_queries(long[-1])
    assert long_count == short_count

    monkeypatch.setattr(asyncmodels_admin, "WORKFLOW_MAX_ROUNDS", 50)
    monkeypatch.setattr(asyncmodels_admin, "WORKFLOW_MAX_CALLS", 4)
    _count, page = page_queries(long[7])
    assert len(_workflow_rows(page)) == 4 and "The workflow is larger" in page
    monkeypatch.setattr(asyncmodels_admin, "WORKFLOW_MAX_CALLS", 200)
    _count, page = page_queries(long[7])
    assert [pk for _step, pk in _workflow_rows(page)] == [call.pk for call in long]
    assert "15 calls in 15 steps; this call is step 8." in page
    assert MethodCallDependency.objects.count() == 5 + 14
    assert not MethodCallTag.objects.exists()


# The overview.


def test_overview_counts_states_per_queue_and_links_each_figure(
    staff_client: Client, instance: Instance, run_worker: RunWorker
) -> None:
    instance.provision(size="large")
    instance.resize("huge")
    echo = Echo.objects.create()
    echo.bump()
    run_worker()
    echo.bump()  # enqueued
    stuck = echo.bump()
    MethodCall.objects.filter(pk=stuck.pk).update(
        state=CallState.RUNNING,
        attempts=1,
        started_at=timezone.now() - datetime.timedelta(minutes=5),
        lease_expires_at=timezone.now() - datetime.timedelta(minutes=1),
    )
    page = staff_client.get(OVERVIEW_URL).content.decode()
    default_row = re.search(r"<tr><th>default</th>(.*?)</tr>", page, re.S)
    provisioning_row = re.search(r"<tr><th>provisioning</th>(.*?)</tr>", page, re.S)
    assert default_row is not None and provisioning_row is not None
    figures = re.findall(r">(\d+)</a>", default_row.group(1))
    # pending scheduled waiting enqueued running succeeded failed cancelled
    assert figures == ["0", "0", "0", "1", "1", "1", "0", "0"]
    assert re.findall(r">(\d+)</a>", provisioning_row.group(1)) == ["0", "0", "0", "0", "0", "1", "1", "0"]
    assert (
        'href="/admin/asyncmodels/methodcall/?state__exact=failed&amp;queue=provisioning&amp;created=24h"'
        in page
    )
    assert f"#{stuck.pk} cloud.Echo.bump</a>, on an unknown worker, started 5" in page
    expired = re.search(r'lease expired.*?<a href="([^"]+)">1</a>', page, re.S)
    assert expired is not None and expired.group(1) == f"{LIST_URL}?attention=lease-expired"
    # The figure's link lists exactly the calls it counts: not the other running call.
    MethodCall.objects.filter(pk=echo.bump().pk).update(
        state=CallState.RUNNING, attempts=1, lease_expires_at=timezone.now() + datetime.timedelta(minutes=1)
    )
    assert _row_ids(staff_client.get(expired.group(1)).content.decode()) == [stuck.pk]
    overdue = echo.bump.using(run_after=datetime.timedelta(seconds=1))()
    MethodCall.objects.filter(pk=overdue.pk).update(run_after=timezone.now() - datetime.timedelta(minutes=5))
    echo.bump.using(run_after=datetime.timedelta(hours=1))()  # scheduled, not overdue
    assert _row_ids(staff_client.get(LIST_URL, {"attention": "overdue"}).content.decode()) == [overdue.pk]
    # The chart: server-rendered SVG, bars linked to the list, nothing loaded from elsewhere.
    chart = page.index('<div class="asyncmodels-chart">')
    svg = page[page.index("<svg", chart) : page.index("</svg>", chart)]
    assert svg.count('xlink:href="/admin/asyncmodels/methodcall/?created=') >= 24
    assert "<script" not in svg
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page)


def test_overview_queries_do_not_grow_with_rows(staff_client: Client, run_worker: RunWorker) -> None:
    def overview_queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert staff_client.get(OVERVIEW_URL).status_code == 200
        return len(captured.captured_queries)

    echo = Echo.objects.create()
    echo.bump()
    run_worker()
    few = overview_queries()
    for _ in range(20):
        echo.bump()
        echo.fail("nope")
    run_worker()
    assert overview_queries() == few


def test_app_index_and_list_link_to_the_overview(staff_client: Client) -> None:
    assert f'href="{OVERVIEW_URL}"' in staff_client.get("/admin/asyncmodels/").content.decode()
    assert f'href="{OVERVIEW_URL}"' in staff_client.get(LIST_URL).content.decode()


# Several databases: each call lives on its object's database; ?db=<alias> picks which to show.


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_calls_on_another_database_are_listed_opened_retried_and_counted_with_db(
    staff_client: Client, run_worker: RunWorker, queued_jobs: Callable[..., int]
) -> None:
    echo = Echo.objects.using("other").create()
    call = echo.fail("<b>nope</b>")
    default_twin = Echo.objects.create().fail("the default database's call")
    run_worker()
    if default_twin.pk != call.pk:  # give the default database's call the same pk
        MethodCall.objects.filter(pk=default_twin.pk).update(id=call.pk)
        default_twin = MethodCall.objects.get(pk=call.pk)

    assert _row_ids(staff_client.get(LIST_URL).content.decode()) == [default_twin.pk]
    page = staff_client.get(LIST_URL, {"db": "other"}).content.decode()
    assert _row_ids(page) == [call.pk]
    assert "By database" in page and '?db=other"' in page
    assert f"Echo {echo.pk} (on other)" in page  # not linked: the Echo admin would show default's
    preserved = "_changelist_filters=db%3Dother"
    assert f'href="/admin/asyncmodels/methodcall/{call.pk}/change/?{preserved}"' in page

    detail = staff_client.get(f"{_call_url(call)}?{preserved}").content.decode()
    assert "&lt;b&gt;nope&lt;/b&gt;" in detail
    assert f'action="/admin/asyncmodels/methodcall/{call.pk}/retry/?{preserved}"' in detail
    assert f'href="/admin/asyncmodels/methodcall/{call.pk}/history/?{preserved}"' in detail
    assert 'href="/admin/asyncmodels/methodcall/?db=other"' in detail  # the breadcrumb
    object_filter = f"object={call.content_type_id}%3A{echo.pk}"
    assert f'href="/admin/asyncmodels/methodcall/?db=other&amp;{object_filter}"' in detail

    response = staff_client.post(f"{_call_url(call, 'retry')}?{preserved}")
    assert response.status_code == 302
    assert response["Location"] == f"{_call_url(call)}?{preserved}"
    call.refresh_from_db()
    assert call.state == CallState.ENQUEUED
    assert call.state_reason == "Retried in the admin by admin."  # kept until a worker claims it
    assert queued_jobs() == 1
    history = staff_client.get(f"{_call_url(call, 'history')}?{preserved}").content.decode()
    assert "Retried in the admin by admin." in history
    twin_history = staff_client.get(_call_url(default_twin, "history")).content.decode()
    assert "Retried in the admin" not in twin_history  # each call's history is its own
    run_worker()
    call.refresh_from_db()
    assert (call.state, call.attempts, call.state_reason) == (CallState.FAILED, 2, "")

    overview = staff_client.get(OVERVIEW_URL, {"db": "other"}).content.decode()
    assert "(database other)" in overview
    failed_today = "/admin/asyncmodels/methodcall/?db=other&amp;state__exact=failed&amp;created=24h"
    assert f'href="{failed_today}"' in overview
    assert staff_client.get(LIST_URL, {"db": "nonsense"}).status_code == 404
    assert staff_client.get(OVERVIEW_URL, {"db": "nonsense"}).status_code == 404


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_a_workflow_on_another_database_links_its_steps_and_tags_there(
    staff_client: Client, run_worker: RunWorker
) -> None:
    report = Report.objects.using("other").create(topic="sales")
    assemble = report.build(parts=2)
    run_worker()
    preserved = "_changelist_filters=db%3Dother"
    page = staff_client.get(f"{_call_url(assemble)}?{preserved}").content.decode()
    steps = re.findall(r'<tr class="[^"]*"><td>(\d)</td><td><a href="([^"]+)">#', page)
    assert [step for step, _url in steps] == ["1", "2", "2", "3"]
    assert all(url.endswith(f"/change/?{preserved}") for _step, url in steps), steps
    assert 'href="/admin/asyncmodels/methodcall/?db=other&amp;tag=workflow%3Areport"' in page
    listed = staff_client.get(LIST_URL, {"db": "other", "tag": "workflow:report"}).content.decode()
    assert len(_row_ids(listed)) == 4
    assert _row_ids(staff_client.get(LIST_URL, {"tag": "workflow:report"}).content.decode()) == []


# Another admin site: the links stay on it.


@pytest.mark.urls("tests.custom_site_urls")
def test_on_a_custom_admin_site_the_links_stay_on_that_site(
    staff_client: Client, instance: Instance, run_worker: RunWorker
) -> None:
    call = instance.resize("huge")
    run_worker()
    page = staff_client.get(f"/ops/cloud/instance/{instance.pk}/change/").content.decode()
    assert f'href="/ops/asyncmodels/methodcall/{call.pk}/change/"' in page
    assert 'href="/ops/asyncmodels/methodcall/?object=' in page
    listing = staff_client.get("/ops/asyncmodels/methodcall/").content.decode()
    assert 'href="/ops/asyncmodels/methodcall/overview/"' in listing
    detail = staff_client.get(f"/ops/asyncmodels/methodcall/{call.pk}/change/").content.decode()
    assert f'action="/ops/asyncmodels/methodcall/{call.pk}/retry/"' in detail
    response = staff_client.post(f"/ops/asyncmodels/methodcall/{call.pk}/retry/")
    assert response["Location"] == f"/ops/asyncmodels/methodcall/{call.pk}/change/"
    overview = staff_client.get("/ops/asyncmodels/methodcall/overview/").content.decode()
    assert 'href="/ops/asyncmodels/methodcall/?state__exact=enqueued"' in overview
    breadcrumbs = overview[overview.index('<div class="breadcrumbs">') :]
    breadcrumbs = breadcrumbs[: breadcrumbs.index("</div>")]
    assert '<a href="/ops/">Home</a>' in breadcrumbs
    assert 'href="/ops/asyncmodels/"' in breadcrumbs and 'href="/ops/asyncmodels/methodcall/"' in breadcrumbs

    echo = Echo.objects.create()
    echo.bump()
    bare = staff_client.get(f"/bare/cloud/echo/{echo.pk}/change/").content.decode()
    assert "asyncmodels-calls-table" in bare  # the calls are shown...
    assert "/asyncmodels/methodcall/" not in bare  # ...without links to a site that has no call pages


def test_list_shows_a_running_calls_progress_bar_with_its_message(
    staff_client: Client, instance: Instance
) -> None:
    reporting, silent, done = instance.describe(), instance.describe(), instance.describe()
    MethodCall.objects.filter(pk=reporting.pk).update(
        state=CallState.RUNNING, progress=0.4, progress_message="slice <2> of 5", progress_at=timezone.now()
    )
    MethodCall.objects.filter(pk=silent.pk).update(state=CallState.RUNNING)
    MethodCall.objects.filter(pk=done.pk).update(state=CallState.SUCCEEDED, progress=1.0)
    page = staff_client.get(LIST_URL).content.decode()
    rows = {
        int(match): row
        for row in page.split("<tr")[1:]
        for match in re.findall(r'<th class="field-id"><a href="/admin/asyncmodels/methodcall/(\d+)/', row)
    }
    assert set(rows) == {reporting.pk, silent.pk, done.pk}
    bar = '<progress class="asyncmodels-progress" max="100" value="40">40%</progress> 40%'
    assert bar in rows[reporting.pk]
    assert 'title="slice &lt;2&gt; of 5"' in rows[reporting.pk]  # the message, escaped, as its tooltip
    assert "<progress" not in rows[silent.pk]  # running, no fraction reported: no bar
    assert "<progress" not in rows[done.pk]  # finished: the state says it all
