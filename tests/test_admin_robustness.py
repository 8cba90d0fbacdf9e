"""Hostile probes of the admin (list, call page, per-object calls, overview, retry/cancel): markup
in every stored field, forged and damaged rows, bad query parameters, odd time zones, permission
gaps and races. The test client raises a view's exception, so a 500 fails the test with it."""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from typing import Any

import django_rq
import pytest
import redis
from django.contrib import admin
from django.contrib.auth.models import Permission, User
from django.contrib.contenttypes.models import ContentType
from django.db import DataError, connection, transaction
from django.db.models import JSONField, Value
from django.test import Client
from django.utils import timezone
from redis.backoff import NoBackoff
from redis.retry import Retry

from asyncmodels.admin import BoundedCountPaginator, MethodCallAdmin, MethodCallsAdminMixin
from asyncmodels.models import CallState, MethodCall, MethodCallDependency, MethodCallTag
from asyncmodels.overview import _hour_key, _hourly
from testproject.cloud.models import Account, Echo, Instance, Region

from .conftest import RunWorker

pytestmark = pytest.mark.django_db(transaction=True)

LIST_URL = "/admin/asyncmodels/methodcall/"
OVERVIEW_URL = f"{LIST_URL}overview/"
SCRIPT = "<script>alert(1)</script>"
ATTR = '"><img src=x onerror=alert(1)>'


def _call_url(call: MethodCall | int, action: str = "change") -> str:
    pk = call if isinstance(call, int) else call.pk
    return f"{LIST_URL}{pk}/{action}/"


def _client_for(user: User, *, enforce_csrf_checks: bool = False) -> Client:
    client = Client(enforce_csrf_checks=enforce_csrf_checks)
    client.force_login(user)
    return client


def _staff(username: str, *codenames: str, is_staff: bool = True) -> User:
    user = User.objects.create_user(username, password="pw", is_staff=is_staff)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return User.objects.get(pk=user.pk)


@pytest.fixture
def staff_client() -> Client:
    return _client_for(User.objects.create_superuser("admin", "admin@example.com", "pw"))


def _row_ids(page: str) -> list[int]:
    return [
        int(pk)
        for pk in re.findall(r'<th class="field-id"><a href="/admin/asyncmodels/methodcall/(\d+)/', page)
    ]


def _get_ok(client: Client, url: str, params: dict[str, str] | None = None) -> str:
    response = client.get(url, params or {})
    assert response.status_code in (200, 302), (url, params, response.status_code)
    if response.status_code == 302:
        response = client.get(response["Location"])
        assert response.status_code == 200
    return response.content.decode()


def _assert_escaped(page: str, *payloads: str) -> None:
    for payload in payloads:
        assert payload not in page, payload
    assert "<script>alert" not in page
    assert "<img src=x" not in page


def _forged(**fields: Any) -> MethodCall:
    """A call of Echo.bump, then its row rewritten with ``fields`` (as a bug or a hand edit would)."""
    call = Echo.objects.create().bump()
    MethodCall.objects.filter(pk=call.pk).update(**fields)
    call.refresh_from_db()
    return call


# ---------------------------------------------------------------------------------------------
# XSS


def test_xss_in_arguments_results_errors_tracebacks_attempt_log_on_call_page(
    staff_client: Client, run_worker: RunWorker
) -> None:
    echo = Echo.objects.create()
    shown = echo.echo(SCRIPT, ATTR, **{"k": SCRIPT})
    failed = echo.fail(SCRIPT + ATTR)
    run_worker()
    for call in (shown, failed):
        _assert_escaped(staff_client.get(_call_url(call)).content.decode(), SCRIPT, ATTR)
    forged = _forged(
        state=CallState.FAILED,
        error=SCRIPT,
        error_type=ATTR,
        traceback=SCRIPT,
        worker=ATTR,
        state_reason=SCRIPT,
        result_note=ATTR,
        kwargs={SCRIPT: ATTR},
        policy={ATTR: SCRIPT},
        attempt_log=[
            {
                "attempt": SCRIPT,
                "worker": ATTR,
                "started_at": SCRIPT,
                "duration": SCRIPT,
                "outcome": ATTR,
                "error": SCRIPT,
            }
        ],
    )
    page = staff_client.get(_call_url(forged)).content.decode()
    _assert_escaped(page, SCRIPT, ATTR)
    assert "asyncmodels-state-&quot;&gt;" in page  # the outcome is escaped inside the class too


def test_xss_in_forged_method_queue_state_in_list_call_page_overview_and_object_section(
    staff_client: Client,
) -> None:
    instance = Instance.objects.create(account=Account.objects.create(name="a"), name="i")
    call = instance.describe()
    MethodCall.objects.filter(pk=call.pk).update(
        method=SCRIPT, queue=ATTR, state=ATTR[:20], error=SCRIPT + "\nsecond"
    )
    for url in (LIST_URL, _call_url(call), OVERVIEW_URL, f"/admin/cloud/instance/{instance.pk}/change/"):
        _assert_escaped(_get_ok(staff_client, url), SCRIPT, ATTR, ATTR[:20])
    # the same in a running/pending call shown under "needs attention" on the overview
    MethodCall.objects.filter(pk=call.pk).update(state=CallState.RUNNING, worker=SCRIPT)
    _assert_escaped(_get_ok(staff_client, OVERVIEW_URL), SCRIPT)
    MethodCall.objects.filter(pk=call.pk).update(state=CallState.PENDING)
    _assert_escaped(_get_ok(staff_client, OVERVIEW_URL), SCRIPT)


def test_xss_in_string_primary_keys_list_call_page_object_filter_and_mixin(staff_client: Client) -> None:
    for code in ('"><svg onload=1>', "<b>x</b>", "a/b?c#d&e"):
        Region.objects.create(code=code).ping()
    page = _get_ok(staff_client, LIST_URL)
    assert '"><svg onload=1>' not in page and "<b>x</b>" not in page
    assert "/admin/cloud/region/_22_3E_3Csvg%20onload_3D1_3E/change/" in page
    ct = ContentType.objects.get_for_model(Region)
    for call in MethodCall.objects.all():
        _assert_escaped(_get_ok(staff_client, _call_url(call)), '"><svg onload=1>', "<b>x</b>")
        listed = _get_ok(staff_client, LIST_URL, {"object": f"{ct.pk}:{call.object_id}"})
        assert _row_ids(listed) == [call.pk]
        assert '"><svg onload=1>' not in listed and "<b>x</b>" not in listed
    # MethodCallsAdminMixin on a model with a string key
    region_admin = type("RegionAdmin", (MethodCallsAdminMixin, admin.ModelAdmin), {})(Region, admin.site)
    html = str(region_admin.asyncmodels_method_calls(Region.objects.get(code='"><svg onload=1>')))
    assert "<svg" not in html
    assert f"?object={ct.pk}%3A%22%3E%3Csvg+onload%3D1%3E" in html


def test_xss_in_filter_parameters_and_search(staff_client: Client) -> None:
    Echo.objects.create().bump()
    for params in (
        {"queue": SCRIPT},
        {"method": ATTR},
        {"model": SCRIPT},
        {"object": f"1:{SCRIPT}"},
        {"object": SCRIPT},
        {"created": SCRIPT},
        {"q": SCRIPT},
        {"state__exact": SCRIPT},
    ):
        _assert_escaped(_get_ok(staff_client, LIST_URL, params), SCRIPT, ATTR)


def test_xss_in_tags_dependencies_progress_and_keys(staff_client: Client) -> None:
    account = Account.objects.create(name="a")
    instance = Instance.objects.create(account=account, name="i")
    call = instance.describe()
    earlier = _forged(method=SCRIPT, state=ATTR[:20])
    later = _forged(method=ATTR, state=SCRIPT[:20])
    MethodCallDependency.objects.create(call=call, depends_on=earlier)
    MethodCallDependency.objects.create(call=later, depends_on=call)
    MethodCall.objects.filter(pk=call.pk).update(
        progress=0.5, progress_message=SCRIPT, unique_key=ATTR, exclusive_key=SCRIPT, state=CallState.RUNNING
    )
    MethodCallTag.objects.create(call=call, tag=SCRIPT)
    MethodCallTag.objects.create(call=call, tag=ATTR)
    # A call on an object whose key is markup, tagged with the account: on the account's page.
    odd = Region.objects.create(code=ATTR[:20]).ping()  # the column holds 20 characters
    MethodCallTag.objects.create(call=odd, tag=f"cloud.account:{account.pk}")
    for url, params in (
        (LIST_URL, {}),
        (LIST_URL, {"tag": SCRIPT}),
        (LIST_URL, {"tag": ATTR}),
        (_call_url(call), {}),
        (_call_url(earlier), {}),
        (_call_url(later), {}),
        (f"/admin/cloud/account/{account.pk}/change/", {}),
        (f"/admin/cloud/instance/{instance.pk}/change/", {}),
    ):
        _assert_escaped(_get_ok(staff_client, url, params), SCRIPT, ATTR, ATTR[:20], SCRIPT[:20])
    assert _row_ids(_get_ok(staff_client, LIST_URL, {"tag": SCRIPT})) == [call.pk]
    page = _get_ok(staff_client, _call_url(call))
    assert "?tag=%3Cscript%3Ealert%281%29%3C%2Fscript%3E" in page  # the tag's link, quoted


def test_xss_in_messages_after_retry_and_cancel() -> None:
    user = User.objects.create_superuser(SCRIPT, "x@example.com", "pw")
    client = _client_for(user)
    call = _forged(state=CallState.FAILED, error="e")
    page = client.post(_call_url(call, "retry"), follow=True).content.decode()
    _assert_escaped(page, SCRIPT)
    assert "Retried call #" in page
    # a refusal message quoting a forged state
    weird = _forged(state=SCRIPT[:20])
    for action in ("retry", "cancel"):
        _assert_escaped(client.post(_call_url(weird, action), follow=True).content.decode(), SCRIPT[:20])
    _assert_escaped(client.get(_call_url(call, "history")).content.decode(), SCRIPT)
    _assert_escaped(client.get(_call_url(call)).content.decode(), SCRIPT)  # state_reason names the user


def test_overview_escapes_a_forged_queue_and_method(staff_client: Client) -> None:
    call = _forged(queue=SCRIPT, method=SCRIPT, state=CallState.PENDING)
    page = _get_ok(staff_client, OVERVIEW_URL)
    assert SCRIPT not in page
    assert "<tr><th>&lt;script&gt;alert(1)&lt;/script&gt;</th>" in page  # the queue's row
    assert f"#{call.pk} &lt;script&gt;alert(1)&lt;/script&gt;</a>" in page  # the oldest pending
    chart = page.index('<div class="asyncmodels-chart">')
    svg = page[page.index("<svg", chart) : page.index("</svg>", chart)]
    assert "<script" not in svg and "onload" not in svg and "javascript:" not in svg


# ---------------------------------------------------------------------------------------------
# Permissions and CSRF


def test_anonymous_and_non_staff_and_inactive_users_are_sent_to_login() -> None:
    call = _forged(state=CallState.FAILED)
    non_staff = _client_for(_staff("joe", "view_methodcall", "retry_methodcall", is_staff=False))
    inactive = User.objects.create_superuser("gone", "g@example.com", "pw")
    inactive.is_active = False
    inactive.save()
    for client in (Client(), non_staff, _client_for(inactive)):
        for url in (LIST_URL, OVERVIEW_URL, _call_url(call)):
            response = client.get(url)
            assert response.status_code == 302 and "/login/" in response["Location"], url
        for action in ("retry", "cancel"):
            response = client.post(_call_url(call, action))
            assert response.status_code == 302 and "/login/" in response["Location"]
        client.post(LIST_URL, {"action": "retry_calls", "_selected_action": [str(call.pk)]})
    call.refresh_from_db()
    assert call.state == CallState.FAILED


def test_staff_without_any_permission_cannot_retry_or_cancel() -> None:
    failed = _forged(state=CallState.FAILED)
    enqueued = Echo.objects.create().bump()
    client = _client_for(_staff("clerk"))
    assert client.post(_call_url(failed, "retry")).status_code == 403
    assert client.post(_call_url(enqueued, "cancel")).status_code == 403
    assert (
        client.post(LIST_URL, {"action": "retry_calls", "_selected_action": [str(failed.pk)]}).status_code
        == 403
    )
    assert client.get(_call_url(failed)).status_code == 403
    failed.refresh_from_db()
    enqueued.refresh_from_db()
    assert (failed.state, enqueued.state) == (CallState.FAILED, CallState.ENQUEUED)


def test_retry_permission_without_view_permission_cannot_retry_by_url() -> None:
    """Retry and cancel also need the view permission: nobody acts on calls they may not see."""
    failed = _forged(state=CallState.FAILED)
    enqueued = Echo.objects.create().bump()
    client = _client_for(_staff("blind", "retry_methodcall", "cancel_methodcall"))
    assert client.get(LIST_URL).status_code == 403
    assert client.get(_call_url(failed)).status_code == 403
    client.post(_call_url(failed, "retry"))
    client.post(_call_url(enqueued, "cancel"))
    failed.refresh_from_db()
    enqueued.refresh_from_db()
    assert (failed.state, enqueued.state) == (CallState.FAILED, CallState.ENQUEUED)


def test_view_only_user_get_and_post_on_buttons() -> None:
    failed = _forged(state=CallState.FAILED)
    client = _client_for(_staff("viewer", "view_methodcall"))
    assert client.get(_call_url(failed, "retry")).status_code == 405
    assert client.post(_call_url(failed, "retry")).status_code == 403
    assert client.post(_call_url(failed, "cancel")).status_code == 403
    client.post(
        LIST_URL, {"action": "retry_calls", "_selected_action": [str(failed.pk)], "select_across": "1"}
    )
    failed.refresh_from_db()
    assert failed.state == CallState.FAILED


def test_csrf_on_buttons_and_list_actions() -> None:
    failed = _forged(state=CallState.FAILED)
    enqueued = Echo.objects.create().bump()
    client = _client_for(
        User.objects.create_superuser("admin", "a@example.com", "pw"), enforce_csrf_checks=True
    )
    assert client.post(_call_url(failed, "retry")).status_code == 403
    assert client.post(_call_url(enqueued, "cancel")).status_code == 403
    response = client.post(LIST_URL, {"action": "retry_calls", "_selected_action": [str(failed.pk)]})
    assert response.status_code == 403
    response = client.post(LIST_URL, {"action": "cancel_calls", "_selected_action": [str(enqueued.pk)]})
    assert response.status_code == 403
    assert client.get(_call_url(failed, "retry")).status_code == 405  # GET never acts
    failed.refresh_from_db()
    enqueued.refresh_from_db()
    assert (failed.state, enqueued.state) == (CallState.FAILED, CallState.ENQUEUED)


def test_overview_and_app_index_permissions() -> None:
    _forged(state=CallState.FAILED)
    assert _client_for(_staff("r", "retry_methodcall")).get(OVERVIEW_URL).status_code == 403
    assert _client_for(_staff("v", "view_methodcall")).get(OVERVIEW_URL).status_code == 200


# ---------------------------------------------------------------------------------------------
# Bad parameters


@pytest.mark.parametrize(
    "params",
    [
        {"object": "abc"},
        {"object": "99999999999999999999:1"},
        {"object": "1:"},
        {"object": ":1"},
        {"object": ""},
        {"object": "1:" + "x" * 5000},
        {"object": "-1:1"},
        {"created": "2026-13-45T99"},
        {"created": "x" * 10000},
        {"created": ""},
        {"created": "2026-01-01"},
        {"p": "999999"},
        {"p": "-1"},
        {"p": "abc"},
        {"o": "5"},
        {"o": "99"},
        {"o": "x.-.--1"},
        {"q": "%"},
        {"q": "_"},
        {"q": "x" * 5000},
        {"all": ""},
        {"model": "nodot"},
        {"model": "."},
        {"queue": ""},
        {"e": "1"},
        {"state__exact": "bogus"},
        {"tag": ""},
        {"tag": "x" * 5000},
        {"tag": "a\x00b"},
        {"tag": " padded "},
        {"tag": SCRIPT},
        {"object": "1:a\x00b"},
        # NUL: no column holds one, and PostgreSQL refuses it even in a query
        {"queue": "a\x00b"},
        {"method": "a\x00b"},
        {"state__exact": "a\x00b"},
        {"model": "cloud.a\x00b"},
        {"q": "a\x00b"},
        {"p": "1\x00"},
    ],
    ids=lambda p: repr(p)[:40],
)
def test_bad_list_parameters_never_500(staff_client: Client, params: dict[str, str]) -> None:
    Echo.objects.create().fail("50% of _things_")
    _get_ok(staff_client, LIST_URL, params)


def test_unicode_digit_content_type_id_in_object_filter(staff_client: Client) -> None:
    """Digits that are not ASCII ('²', '①': isdigit() but not int()) are an unknown object."""
    Echo.objects.create().bump()
    for value in ("²:1", "①:1", "1²:1"):
        page = _get_ok(staff_client, LIST_URL, {"object": value})
        assert _row_ids(page) == []


@pytest.mark.parametrize(
    "value",
    [
        "2026-13-45T99:00",  # well formed, invalid: parse_datetime raises ValueError
        "2026-02-30T10:00",
        "2026-01-01T25:00",
        "2026-01-01T00:00+99:00",  # offset out of range
        "9999-12-31T23:30",  # hour + 1 h overflows
        "0001-01-01T00:00+01:00",  # to UTC overflows
    ],
)
def test_created_filter_with_invalid_or_extreme_hours(staff_client: Client, value: str) -> None:
    """A well-formed but impossible or extreme hour lists nothing, never a 500."""
    Echo.objects.create().bump()
    page = _get_ok(staff_client, LIST_URL, {"created": value})
    assert _row_ids(page) == []


def test_created_filter_early_year_in_zone_east_of_utc(staff_client: Client, settings: Any) -> None:
    settings.TIME_ZONE = "Asia/Tokyo"
    Echo.objects.create().bump()
    page = _get_ok(staff_client, LIST_URL, {"created": "0001-01-01T00:00"})
    assert _row_ids(page) == []


def test_sortable_by_is_enforced_for_o_parameter(staff_client: Client) -> None:
    """?o=N sorts only by the sortable_by columns: no unindexed full-table sort by queue, method
    or attempts on a table of millions."""
    echo = Echo.objects.create()
    first = echo.bump()
    second = echo.bump()
    third = echo.bump()
    # the oldest call sorts first by every other column, ascending
    MethodCall.objects.filter(pk=first.pk).update(attempts=0, queue="aaa", method="a", state="aaa")
    MethodCall.objects.filter(pk=second.pk).update(attempts=5, queue="mmm", method="m", state="mmm")
    MethodCall.objects.filter(pk=third.pk).update(attempts=9, queue="zzz", method="z", state="zzz")
    expected = [third.pk, second.pk, first.pk]
    # (index 0 is the action checkbox: 1 id, 2 state, 3 method, 5 queue, 6 attempts)
    for o in ("2", "3", "5", "6", "5.6"):
        assert _row_ids(_get_ok(staff_client, LIST_URL, {"o": o})) == expected, o


def test_search_wildcards_are_literal_and_object_id_is_exact(
    staff_client: Client, run_worker: RunWorker
) -> None:
    echo = Echo.objects.create()
    pct = echo.fail("100% broken")
    plain = echo.fail("plain failure")
    run_worker()
    assert _row_ids(_get_ok(staff_client, LIST_URL, {"q": "%"})) == [pct.pk]
    assert _row_ids(_get_ok(staff_client, LIST_URL, {"q": "_"})) == []
    assert _row_ids(_get_ok(staff_client, LIST_URL, {"q": "plain"})) == [plain.pk]


@pytest.mark.parametrize("pk", ["999999", "abc", "1%2F2", "99999999999999999999", "-1", "0", "1.0"])
def test_retry_and_cancel_with_bad_pks_give_404(staff_client: Client, pk: str) -> None:
    _forged(state=CallState.FAILED)
    for action in ("retry", "cancel"):
        assert staff_client.post(f"{LIST_URL}{pk}/{action}/").status_code == 404, (pk, action)


def test_pk_with_slash_in_retry_url(staff_client: Client) -> None:
    call = _forged(state=CallState.FAILED)
    assert staff_client.post(f"{LIST_URL}{call.pk}/x/retry/").status_code == 404
    call.refresh_from_db()
    assert call.state == CallState.FAILED


# ---------------------------------------------------------------------------------------------
# State races


def test_retry_twice_quickly_pushes_once(
    staff_client: Client, run_worker: RunWorker, queued_jobs: Callable[..., int]
) -> None:
    echo = Echo.objects.create()
    call = echo.flaky.using(retries=0)(failures=1)
    run_worker()
    first = staff_client.post(_call_url(call, "retry"), follow=True).content.decode()
    second = staff_client.post(_call_url(call, "retry"), follow=True).content.decode()
    assert "Retried call #" in first
    assert "was not retried: enqueued, not failed or cancelled" in second
    assert queued_jobs() == 1
    run_worker()
    call.refresh_from_db()
    echo.refresh_from_db()
    assert (call.state, echo.hits) == (CallState.SUCCEEDED, 2)


def test_retry_when_object_was_deleted(staff_client: Client, run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    call = echo.fail("x")
    run_worker()
    echo.delete()
    page = staff_client.post(_call_url(call, "retry"), follow=True).content.decode()
    assert "Retried call #" in page
    run_worker()
    call.refresh_from_db()
    assert call.state == CallState.FAILED
    for url in (LIST_URL, _call_url(call), OVERVIEW_URL):
        _get_ok(staff_client, url)


def test_cancel_retry_cancel_never_runs_the_method(
    staff_client: Client, run_worker: RunWorker, queued_jobs: Callable[..., int]
) -> None:
    echo = Echo.objects.create()
    call = echo.bump()
    assert "Cancelled call #" in staff_client.post(_call_url(call, "cancel"), follow=True).content.decode()
    assert "Retried call #" in staff_client.post(_call_url(call, "retry"), follow=True).content.decode()
    assert "Cancelled call #" in staff_client.post(_call_url(call, "cancel"), follow=True).content.decode()
    run_worker()
    call.refresh_from_db()
    echo.refresh_from_db()
    assert (call.state, echo.hits) == (CallState.CANCELLED, 0)
    # and a last retry runs it exactly once
    staff_client.post(_call_url(call, "retry"))
    run_worker()
    call.refresh_from_db()
    echo.refresh_from_db()
    assert (call.state, echo.hits) == (CallState.SUCCEEDED, 1)


def test_retry_when_queue_no_longer_configured_tells_the_user(
    staff_client: Client, run_worker: RunWorker, settings: Any
) -> None:
    """A retry on a queue that left RQ_QUEUES could only fail again: refused, saying why."""
    call = Echo.objects.create().fail.using(queue="urgent")("boom")
    run_worker()
    settings.RQ_QUEUES = {k: v for k, v in settings.RQ_QUEUES.items() if k != "urgent"}
    page = staff_client.post(_call_url(call, "retry"), follow=True).content.decode()
    call.refresh_from_db()
    assert (call.state, call.error, call.attempts) == (CallState.FAILED, "boom", 1)  # untouched
    assert "Retried call #" not in page
    assert "queue &#x27;urgent&#x27; of call" in page and "no longer in settings.RQ_QUEUES" in page
    _get_ok(staff_client, LIST_URL, {"queue": "urgent"})
    _get_ok(staff_client, OVERVIEW_URL)


def test_retry_in_admin_when_redis_is_down_stays_pending_with_reason(
    staff_client: Client, run_worker: RunWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed = Echo.objects.create().fail("x")
    run_worker()
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    monkeypatch.setattr(django_rq.queues, "get_connection", lambda name="default", **kwargs: dead)
    response = staff_client.post(_call_url(failed, "retry"), follow=True)
    assert response.status_code == 200
    failed.refresh_from_db()
    assert failed.state == CallState.PENDING
    assert "push to queue 'default' failed" in failed.state_reason
    # the list action too
    other = _forged(state=CallState.FAILED)
    response = staff_client.post(
        LIST_URL, {"action": "retry_calls", "_selected_action": [str(other.pk)]}, follow=True
    )
    assert response.status_code == 200
    other.refresh_from_db()
    assert other.state == CallState.PENDING and "failed" in other.state_reason
    for url in (LIST_URL, _call_url(failed), OVERVIEW_URL):
        _get_ok(staff_client, url)


def test_action_retry_and_cancel_mixed_selection(staff_client: Client) -> None:
    calls = [
        _forged(state=state) for state in (CallState.FAILED, CallState.RUNNING, "bogus", CallState.WAITING)
    ]
    ids = [str(c.pk) for c in calls] + ["999999"]  # ("abc" 500s in Django's own response_action)
    response = staff_client.post(LIST_URL, {"action": "cancel_calls", "_selected_action": ids}, follow=True)
    assert response.status_code == 200
    states = dict(MethodCall.objects.values_list("pk", "state"))
    failed, running, bogus, waiting = (c.pk for c in calls)
    assert states == {failed: "failed", running: "running", bogus: "bogus", waiting: "cancelled"}
    response = staff_client.post(LIST_URL, {"action": "retry_calls", "_selected_action": ids}, follow=True)
    assert response.status_code == 200
    states = dict(MethodCall.objects.values_list("pk", "state"))
    # The failed and the (now) cancelled call were retried and pushed; the others are untouched.
    assert states == {failed: "enqueued", running: "running", bogus: "bogus", waiting: "enqueued"}
    assert f"Retried 2 calls: #{failed}, #{waiting}." in response.content.decode()


# ---------------------------------------------------------------------------------------------
# Forged / odd rows: list, call page and overview must not 500


@pytest.mark.parametrize(
    "fields",
    [
        {"attempt_log": 5},
        {"attempt_log": "not a list"},
        {"attempt_log": {"a": 1}},
        {"attempt_log": [1, "x", None, [1]]},
        {"attempt_log": [{"started_at": "garbage", "duration": "1.5", "attempt": {"x": 1}}]},
        {"attempt_log": [{"started_at": 12345, "duration": True}]},
        {"attempt_log": [{"duration": -3}]},
        {"attempt_log": Value(None, JSONField())},
        {"policy": "x"},
        {"policy": [1, 2]},
        {"args": {"a": 1}},
        {"args": "str"},
        {"kwargs": [1]},
        {"result": {"__type__": "nonsense"}},
        {"state": "bogus"},
        {"state": CallState.RUNNING, "started_at": None, "lease_expires_at": None},
        {"state": CallState.SCHEDULED, "run_after": None},
        {"attempts": 0, "state": CallState.RUNNING},
        {"object_id": ""},
        {"error": "\n\n   \n"},
    ],
    ids=lambda f: repr(f)[:50],
)
def test_forged_rows_do_not_break_pages(staff_client: Client, fields: dict[str, Any]) -> None:
    call = _forged(**fields)
    for url in (LIST_URL, _call_url(call), OVERVIEW_URL):
        _get_ok(staff_client, url)


@pytest.mark.parametrize(
    "entry",
    [
        {"started_at": "2026-13-45T99:00"},  # well formed, invalid -> ValueError
        {"started_at": "2026-01-01T10:00:00"},  # naive -> localtime() ValueError
        {"started_at": "2026-01-01T10:00:00+00:00", "duration": 1e300},  # timedelta overflow
        {"duration": 1e300},
        {"duration": 10**400},  # float() overflow
        # (NaN and Infinity are refused by the JSON column's check on SQLite, and by jsonb)
        {"started_at": "9999-12-31T23:59:59+00:00", "duration": 10},
    ],
    ids=lambda e: repr(e)[:60],
)
def test_attempt_log_entries_with_odd_times_do_not_break_call_page(
    staff_client: Client, entry: dict[str, Any]
) -> None:
    """Damaged times and durations in attempt_log show as "-", and the other rows still show."""
    call = _forged(state=CallState.FAILED, attempt_log=[{"attempt": 1, "outcome": "failed", **entry}])
    page = _get_ok(staff_client, _call_url(call))
    assert "asyncmodels-attempts" in page


def test_started_after_finished_and_far_dates(staff_client: Client) -> None:
    now = timezone.now()
    call = _forged(
        state=CallState.SUCCEEDED,
        started_at=now,
        finished_at=now - datetime.timedelta(days=400),
        run_after=datetime.datetime(9999, 12, 31, 23, 0, tzinfo=datetime.UTC),
    )
    for url in (LIST_URL, _call_url(call), OVERVIEW_URL):
        _get_ok(staff_client, url)


def test_far_future_dates_in_zone_east_of_utc(staff_client: Client, settings: Any) -> None:
    """A datetime near 9999-12-31 (legal for DateTimeField) still shows in a zone east of UTC."""
    settings.TIME_ZONE = "Asia/Tokyo"
    far = datetime.datetime(9999, 12, 31, 23, 0, tzinfo=datetime.UTC)
    call = _forged(state=CallState.SCHEDULED, run_after=far)
    for url in (LIST_URL, _call_url(call), OVERVIEW_URL):
        _get_ok(staff_client, url)


def test_content_type_of_a_deleted_model(staff_client: Client) -> None:
    ghost = ContentType.objects.create(app_label="gone", model="ghost")
    call = _forged(content_type_id=ghost.pk, object_id=SCRIPT, state=CallState.FAILED)
    page = _get_ok(staff_client, LIST_URL)
    assert "gone.ghost" in page
    _assert_escaped(page, SCRIPT)
    _assert_escaped(_get_ok(staff_client, _call_url(call)), SCRIPT)
    _assert_escaped(_get_ok(staff_client, LIST_URL, {"object": f"{ghost.pk}:{SCRIPT}"}), SCRIPT)
    _get_ok(staff_client, OVERVIEW_URL)
    page = staff_client.post(_call_url(call, "retry"), follow=True).content.decode()
    assert "Retried call #" in page


def test_forged_dependency_cycles_do_not_break_the_workflow(staff_client: Client) -> None:
    """The library cannot make a cycle (a call only waits for calls that exist already); forged
    rows can. Such calls are listed last, with a note, and the page still renders."""
    first, second, third = (_forged(state=CallState.WAITING) for _ in range(3))
    alone = _forged(state=CallState.WAITING)
    for waiting, waited_for in ((first, second), (second, first), (third, first), (alone, alone)):
        MethodCallDependency.objects.create(call=waiting, depends_on=waited_for)
    page = _get_ok(staff_client, _call_url(third))
    assert "wait for each other in a cycle" in page
    assert page.count('<tr class="asyncmodels-current">') == 1
    rows = re.findall(r'<tr class="[^"]*"><td>(\d+)</td><td><a href="[^"]*/(\d+)/change/', page)
    assert sorted(int(pk) for _step, pk in rows) == [first.pk, second.pk, third.pk]
    page = _get_ok(staff_client, _call_url(alone))  # waits for itself
    assert "wait for each other in a cycle" in page
    assert re.search(r"Runs after:</label>\s*<div class=\"readonly\"><ul", page)


@pytest.mark.parametrize("progress", [-1.0, 2.5, float("inf"), float("-inf"), float("nan"), None])
def test_odd_progress_values_do_not_break_the_call_page(staff_client: Client, progress: float | None) -> None:
    call = _forged(state=CallState.RUNNING, progress=progress, progress_message="half way")
    page = _get_ok(staff_client, _call_url(call))
    assert "half way" in page
    values = re.findall(r'<progress class="asyncmodels-progress" max="100" value="(\d+)"', page)
    assert all(0 <= int(value) <= 100 for value in values), values


def test_tag_filter_choices_skip_forged_tags_that_are_no_tags(staff_client: Client) -> None:
    call = Echo.objects.create().bump()
    for tag in (" padded", "", "ok:1"):
        MethodCallTag.objects.create(call=call, tag=tag)
    page = _get_ok(staff_client, LIST_URL)
    assert 'href="?tag=ok%3A1"' in page
    assert 'href="?tag=+padded"' not in page and 'href="?tag="' not in page
    call_page = _get_ok(staff_client, _call_url(call))
    assert '<span class="asyncmodels-tag"> padded</span>' in call_page  # shown, not linked


def _forged_with_surrogates(**fields: Any) -> MethodCall:
    """SQLite's JSON columns keep a lone surrogate (as the escape \\ud800); PostgreSQL's jsonb
    refuses it, so there such a row cannot exist (which this checks, then skips)."""
    if connection.vendor == "postgresql":
        with pytest.raises(DataError, match="json"), transaction.atomic():
            _forged(**fields)
        pytest.skip("PostgreSQL's jsonb refuses lone surrogates: no such row can exist")
    return _forged(**fields)


def test_lone_surrogates_in_json_fields_do_not_break_the_call_page(staff_client: Client) -> None:
    """A lone surrogate (a row written before the encoder refused them, or by other code) is
    shown escaped; the response still encodes."""
    call = _forged_with_surrogates(
        args=["\ud800"], kwargs={"k": "\udfff"}, result="\ud83d", policy={"x": "\ud800"}
    )
    page = _get_ok(staff_client, _call_url(call))
    assert "ud800" in page  # shown as an escape


def test_lone_surrogate_in_attempt_log_does_not_break_the_call_page(staff_client: Client) -> None:
    call = _forged_with_surrogates(
        state=CallState.FAILED, attempt_log=[{"attempt": 1, "worker": "w\ud800", "error": "\udfff"}]
    )
    page = _get_ok(staff_client, _call_url(call))
    assert "w\\ud800" in page and "\\udfff" in page  # each shown as its escape


# ---------------------------------------------------------------------------------------------
# The overview, odd states and time zones


def test_overview_with_odd_states_and_timestamps(staff_client: Client) -> None:
    now = timezone.now()
    _forged(state=CallState.PENDING)
    _forged(state=CallState.ENQUEUED, enqueued_at=None)
    _forged(state=CallState.RUNNING, started_at=None, lease_expires_at=now - datetime.timedelta(hours=1))
    _forged(state=CallState.SCHEDULED, run_after=now - datetime.timedelta(days=2))
    _forged(state="bogus")
    _forged(state=CallState.FAILED, created_at=now + datetime.timedelta(days=3))
    _forged(state=CallState.SUCCEEDED, created_at=now - datetime.timedelta(days=3))
    page = _get_ok(staff_client, OVERVIEW_URL)
    assert "<svg" in page


class _FrozenTimezone:
    """``django.utils.timezone`` with a fixed ``now()``, for asyncmodels.overview only."""

    def __init__(self, now: datetime.datetime) -> None:
        self._now = now

    def now(self) -> datetime.datetime:
        return self._now

    def __getattr__(self, name: str) -> Any:
        return getattr(timezone, name)


@pytest.mark.parametrize(
    "zone", ["UTC", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu", "Pacific/Chatham", "Etc/GMT+12"]
)
def test_overview_in_other_time_zones(staff_client: Client, settings: Any, zone: str) -> None:
    settings.TIME_ZONE = zone
    echo = Echo.objects.create()
    for hours in (0, 1, 5, 23, 25):
        call = echo.bump()
        MethodCall.objects.filter(pk=call.pk).update(
            created_at=timezone.now() - datetime.timedelta(hours=hours)
        )
    _get_ok(staff_client, OVERVIEW_URL)


@pytest.mark.parametrize(
    "zone", ["UTC", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu", "Pacific/Chatham"]
)
@pytest.mark.parametrize("minute", [5, 20, 35, 50])
def test_overview_counts_the_call_made_a_minute_ago(
    settings: Any, monkeypatch: pytest.MonkeyPatch, zone: str, minute: int
) -> None:
    """The hourly window is cut on local hours: in a zone with a :30/:45 offset, a call made a
    minute ago is in the table and the chart whatever the local minute."""
    from asyncmodels.overview import build_overview

    settings.TIME_ZONE = zone
    now = datetime.datetime(2026, 1, 15, 18, minute, tzinfo=datetime.UTC)
    monkeypatch.setattr("asyncmodels.overview.timezone", _FrozenTimezone(now))
    call = Echo.objects.create().bump()
    MethodCall.objects.filter(pk=call.pk).update(created_at=now - datetime.timedelta(minutes=1))
    overview = build_overview(MethodCall.objects.order_by())
    assert sum(cell.count for _start, cell, _failed in overview.hours) == 1, [
        _hour_key(start) for start, _c, _f in overview.hours[-2:]
    ]


def _hours_table(page: str) -> tuple[list[str], list[tuple[str, str]]]:
    head = re.search(r'<table id="asyncmodels-hours".*?<thead><tr><th>hour from</th>(.*?)</tr>', page, re.S)
    assert head is not None
    headers = re.findall(r"<th>(\d\d:\d\d)</th>", head.group(1))
    links = re.findall(r"<tr><th>calls</th>(.*?)</tr>", page, re.S)[0]
    return headers, re.findall(r'<a href="([^"]+)">(\d+)</a>', links)


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu"])
def test_overview_hour_headers_name_the_hour_their_column_counts(
    staff_client: Client, settings: Any, zone: str
) -> None:
    """Each column's header names the local hour it counts, links to and the chart labels."""
    settings.TIME_ZONE = zone
    headers, cells = _hours_table(_get_ok(staff_client, OVERVIEW_URL))
    keys = [re.search(r"created=\d{4}-\d\d-\d\dT(\d\d)%3A00", url).group(1) for url, _n in cells]  # type: ignore[union-attr]
    assert len(headers) == len(keys) == 24
    assert headers == [f"{k}:00" for k in keys], (headers[:3], keys[:3])


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu"])
def test_overview_first_hour_count_matches_its_link(staff_client: Client, settings: Any, zone: str) -> None:
    """The first column counts the same whole local hour that its link lists."""
    settings.TIME_ZONE = zone
    _headers, cells = _hours_table(_get_ok(staff_client, OVERVIEW_URL))
    first_url = cells[0][0].replace("&amp;", "&")
    hour = re.search(r"created=([\dT%A-]+)", first_url).group(1).replace("%3A", ":")  # type: ignore[union-attr]
    local_start = timezone.make_aware(datetime.datetime.fromisoformat(hour))
    call = Echo.objects.create().bump()
    MethodCall.objects.filter(pk=call.pk).update(created_at=local_start + datetime.timedelta(minutes=1))
    _headers, cells = _hours_table(_get_ok(staff_client, OVERVIEW_URL))
    listed = _row_ids(_get_ok(staff_client, cells[0][0].replace("&amp;", "&")))
    assert listed == [call.pk]
    assert int(cells[0][1]) == len(listed), (cells[0], listed)


def test_hourly_counts_over_a_dst_fall_back_count_each_call_once(settings: Any) -> None:
    """In a DST fall-back two UTC hours share a local label (01:00): the call is counted once."""
    settings.TIME_ZONE = "America/New_York"
    call = Echo.objects.create().bump()
    MethodCall.objects.filter(pk=call.pk).update(
        created_at=datetime.datetime(2025, 11, 2, 5, 30, tzinfo=datetime.UTC)  # 01:30 EDT
    )
    since = datetime.datetime(2025, 11, 1, 13, 0, tzinfo=datetime.UTC)
    hours = _hourly(MethodCall.objects.order_by(), since, lambda **filters: "")
    assert sum(cell.count for _start, cell, _failed in hours) == 1, [
        (_hour_key(start), cell.count) for start, cell, _f in hours if cell.count
    ]


# ---------------------------------------------------------------------------------------------
# Per-object section


def test_object_section_with_odd_calls(staff_client: Client) -> None:
    instance = Instance.objects.create(account=Account.objects.create(name="a"), name="i")
    call = instance.describe()
    MethodCall.objects.filter(pk=call.pk).update(
        state="bogus",
        error=SCRIPT,
        method=ATTR,
        created_at=datetime.datetime(1, 1, 1, 1, tzinfo=datetime.UTC),
    )
    page = _get_ok(staff_client, f"/admin/cloud/instance/{instance.pk}/change/")
    _assert_escaped(page, SCRIPT, ATTR)


def test_object_section_needs_only_view_permission_and_hides_otherwise() -> None:
    instance = Instance.objects.create(account=Account.objects.create(name="a"), name="i")
    instance.describe()
    page = (
        _client_for(_staff("both", "view_instance", "view_methodcall"))
        .get(f"/admin/cloud/instance/{instance.pk}/change/")
        .content.decode()
    )
    assert "asyncmodels-calls-table" in page
    page = (
        _client_for(_staff("retr", "view_instance", "retry_methodcall"))
        .get(f"/admin/cloud/instance/{instance.pk}/change/")
        .content.decode()
    )
    assert "asyncmodels-calls-table" not in page


def test_select_all_across_pages_says_how_many_it_acts_on(
    staff_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'Select all' never acts on more calls than the page offered: past the bounded count, the
    action refuses (it would otherwise retry millions of calls in one request)."""
    for _ in range(6):
        _forged(state=CallState.FAILED)
    monkeypatch.setattr(BoundedCountPaginator, "limit", 3)
    monkeypatch.setattr(MethodCallAdmin, "list_per_page", 2)
    page = _get_ok(staff_client, LIST_URL)
    offered = re.search(r"Select all (\d+) method calls", page)
    response = staff_client.post(
        LIST_URL,
        {"action": "retry_calls", "select_across": "1", "index": "0", "_selected_action": ["1"]},
        follow=True,
    )
    assert offered is not None and offered.group(1) == "4"  # the bounded count: limit + 1
    assert MethodCall.objects.exclude(state=CallState.FAILED).count() == 0
    assert "Nothing was retried: the selection holds more than 3 calls" in response.content.decode()
