"""The first admin: a read-only list and detail page of every call."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client

from testproject.cloud.models import Account, Echo, Instance, Region

from .conftest import RunWorker

pytestmark = pytest.mark.django_db(transaction=True)

LIST_URL = "/admin/asyncmodels/methodcall/"


@pytest.fixture
def staff_client() -> Client:
    user = User.objects.create_superuser("admin", "admin@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


def test_list_shows_state_method_object_and_filters_by_state(
    staff_client: Client, run_worker: RunWorker
) -> None:
    instance = Instance.objects.create(account=Account.objects.create(name="acme"), name="web1")
    instance.provision(size="large")
    failed = instance.resize("huge")
    run_worker()
    page = staff_client.get(LIST_URL).content.decode()
    assert "cloud.Instance.provision" in page
    assert "succeeded" in page and "failed" in page
    assert f'href="/admin/cloud/instance/{instance.pk}/change/"' in page
    assert "size &#x27;huge&#x27; is not offered" in page
    filtered = staff_client.get(LIST_URL, {"state__exact": "failed"}).content.decode()
    assert f"/admin/asyncmodels/methodcall/{failed.pk}/change/" in filtered
    assert "cloud.Instance.provision" not in filtered


def test_detail_shows_arguments_result_error_and_traceback_escaped(
    staff_client: Client, run_worker: RunWorker
) -> None:
    call = Echo.objects.create().fail("<script>alert(1)</script>")
    run_worker()
    page = staff_client.get(f"{LIST_URL}{call.pk}/change/").content.decode()
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<pre>Traceback (most recent call last)" in page
    assert "builtins.ValueError" in page


def test_object_link_quotes_string_primary_keys(staff_client: Client) -> None:
    region = Region.objects.create(code="eu_west/1")
    region.ping()
    page = staff_client.get(LIST_URL).content.decode()
    assert 'href="/admin/cloud/region/eu_5Fwest_2F1/change/"' in page


def test_calls_are_read_only(staff_client: Client) -> None:
    call = Echo.objects.create().bump()
    assert staff_client.get(f"{LIST_URL}add/").status_code == 403
    response = staff_client.post(f"{LIST_URL}{call.pk}/change/", {"state": "succeeded"})
    assert response.status_code == 403
    assert staff_client.post(f"{LIST_URL}{call.pk}/delete/", {"post": "yes"}).status_code == 403
    call.refresh_from_db()
    assert call.state != "succeeded"


def test_staff_without_view_permission_gets_403() -> None:
    user = User.objects.create_user("clerk", password="pw", is_staff=True)
    client = Client()
    client.force_login(user)
    assert client.get(LIST_URL).status_code == 403
    user.user_permissions.add(Permission.objects.get(codename="view_methodcall"))
    assert client.get(LIST_URL).status_code == 200


def test_detail_shows_every_attempt_and_the_reason_of_a_scheduled_retry(
    staff_client: Client, run_worker: RunWorker
) -> None:
    call = Echo.objects.create().flaky.using(retry_backoff=60, retry_backoff_max=60)(failures=5)
    run_worker()
    page = staff_client.get(f"{LIST_URL}{call.pk}/change/").content.decode()
    assert "Attempts, oldest first" in page
    assert "run 1 of a flaky dependency failed" in page
    assert "attempt 2 of 3 is due in" in page
    assert "&quot;retries&quot;: 2" in page
