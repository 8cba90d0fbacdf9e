"""The admin in a real browser: Debian's Chromium (/usr/bin/chromium), driven by Playwright.

Against pytest-django's live server: a staff user logs in, filters the list to failed calls,
opens one and reads its traceback, retries it, a worker runs it, and the page shows it
succeeded; a user without the retry permission sees no retry button; a workflow's last step
lists its steps in order, linked. Screenshots of the list, the call page, an object's page,
a workflow and the overview are saved under ``var/screenshots/`` (or
``$ASYNCMODELS_SCREENSHOTS``) as artefacts to look at.

Playwright's own browser download is never used. Without /usr/bin/chromium these tests are
skipped, unless ASYNCMODELS_REQUIRE_BROWSER=1 (set by .ci/run, which installs Chromium) makes
the absence a failure.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User

from asyncmodels.models import CallState, MethodCall
from testproject.cloud.models import Account, Echo, Instance, Report

from .conftest import REPO, RunWorker

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(os.environ.get("ASYNCMODELS_SCREENSHOTS", REPO / "var" / "screenshots"))
# Flags for a closed network: no background connections to Google's hosts (they fail here).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]


def _need_browser() -> None:
    if Path(CHROMIUM).exists() and shutil.which("chromium"):
        return
    message = f"{CHROMIUM} is missing (Debian: apt-get install chromium)"
    if os.environ.get("ASYNCMODELS_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _need_browser()
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop running in this thread; the ORM calls the tests
    # (and the database set-up) make between browser steps are plain synchronous code, which
    # Django would otherwise refuse as "called from an async context".
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield chromium
            chromium.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def page(browser: Any, live_server: Any) -> Iterator[Any]:
    context = browser.new_context(base_url=live_server.url, viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(15_000)
    # Nothing may be loaded from the internet: fail the test on any request off the live server.
    off_site: list[str] = []
    context.on(
        "request", lambda request: off_site.append(request.url) if not _is_local(request.url) else None
    )
    page = context.new_page()
    yield page
    context.close()
    assert off_site == [], f"the admin loaded something from outside: {off_site}"


def _is_local(url: str) -> bool:
    return url.startswith(("http://localhost", "http://127.0.0.1", "data:", "about:"))


def _log_in(page: Any, username: str, password: str, next_url: str) -> None:
    page.goto(f"/admin/login/?next={next_url}")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")
    page.wait_for_url(re.compile(re.escape(next_url)))


def _shoot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_staff_filters_to_failed_reads_the_traceback_retries_and_sees_it_succeed(
    page: Any, run_worker: RunWorker
) -> None:
    User.objects.create_superuser("admin", "admin@example.com", "pw")
    account = Account.objects.create(name="acme")
    instance = Instance.objects.create(account=account, name="web1")
    instance.provision(size="large")
    instance.resize("huge")  # fails for good
    echo = Echo.objects.create()
    flaky = echo.flaky.using(retries=0)(failures=1)  # fails once; a retry succeeds
    run_worker()
    flaky.refresh_from_db()
    assert flaky.state == CallState.FAILED

    _log_in(page, "admin", "pw", "/admin/asyncmodels/methodcall/")
    assert page.locator("#result_list tbody tr").count() == 3
    page.locator("#changelist-filter a", has_text=re.compile(r"^failed$")).click()
    page.wait_for_url(re.compile(r"state__exact=failed"))
    rows = page.locator("#result_list tbody tr")
    assert rows.count() == 2
    assert rows.locator(".asyncmodels-state-failed").count() == 2
    assert page.locator("#result_list").get_by_text("run 1 of a flaky dependency failed").is_visible()
    _shoot(page, "call-list-failed")

    page.locator("#result_list a", has_text=re.compile(rf"^{flaky.pk}$")).click()
    page.wait_for_url(re.compile(rf"/methodcall/{flaky.pk}/change/"))
    traceback = page.locator("pre.asyncmodels-traceback")
    assert "Traceback (most recent call last)" in traceback.inner_text()
    assert "ConnectionError: run 1 of a flaky dependency failed" in traceback.inner_text()
    assert page.locator(".asyncmodels-attempts tbody tr").count() == 1
    _shoot(page, "call-page-failed")

    page.click("#asyncmodels-retry")
    page.wait_for_url(re.compile(rf"/methodcall/{flaky.pk}/change/"))
    assert page.locator(".messagelist").get_by_text(f"Retried call #{flaky.pk}.").is_visible()
    assert page.locator(".field-state_display .asyncmodels-state").inner_text() == "enqueued"
    assert page.locator("#asyncmodels-retry").count() == 0  # not failed any more

    run_worker()
    page.reload()
    assert page.locator(".field-state_display .asyncmodels-state").inner_text() == "succeeded"
    assert page.locator(".asyncmodels-attempts tbody tr").count() == 2
    assert page.locator(".field-result_json pre").inner_text() == "2"  # the method's return value
    _shoot(page, "call-page-succeeded")
    echo.refresh_from_db()
    assert echo.hits == 2

    page.goto(f"/admin/cloud/instance/{instance.pk}/change/")
    calls = page.locator(".asyncmodels-calls-table tbody tr")
    assert calls.count() == 2
    assert "cloud.Instance.resize" in calls.nth(0).inner_text()  # newest first
    _shoot(page, "object-page-calls")


def test_overview_shows_counts_and_a_chart_whose_figures_link_to_the_list(
    page: Any, run_worker: RunWorker
) -> None:
    User.objects.create_superuser("admin", "admin@example.com", "pw")
    echo = Echo.objects.create()
    for _ in range(3):
        echo.bump()
    echo.fail("nope")
    run_worker()
    echo.bump()  # left enqueued

    _log_in(page, "admin", "pw", "/admin/asyncmodels/")
    page.click("text=Overview of method calls")
    page.wait_for_url(re.compile(r"/overview/"))
    totals = page.locator("#asyncmodels-counts tfoot td")
    states = ["pending", "scheduled", "waiting", "enqueued", "running", "succeeded", "failed", "cancelled"]
    figures = dict(zip(states, (totals.nth(i).inner_text() for i in range(len(states))), strict=True))
    assert figures == {**dict.fromkeys(states, "0"), "succeeded": "3", "failed": "1", "enqueued": "1"}
    bars = page.locator(".asyncmodels-chart svg a")
    assert bars.count() >= 48  # two series, 24 hours, each bar a link
    _shoot(page, "overview")

    # In the admin's dark theme the chart's labels take the page's text colour, not dark grey.
    page.emulate_media(color_scheme="dark")
    page.reload()
    label_colour = page.evaluate(
        "getComputedStyle(document.querySelector('.asyncmodels-chart svg .axis text')).fill"
    )
    body_colour = page.evaluate("getComputedStyle(document.body).color")
    assert label_colour == body_colour, (label_colour, body_colour)
    _shoot(page, "overview-dark")
    page.emulate_media(color_scheme="light")

    page.locator("#asyncmodels-counts tfoot td a").nth(states.index("failed")).click()
    page.wait_for_url(re.compile(r"state__exact=failed"))
    assert page.locator("#result_list tbody tr").count() == 1
    assert page.locator("#result_list").get_by_text("nope").is_visible()


def test_staff_without_retry_permission_sees_no_retry_button(page: Any, run_worker: RunWorker) -> None:
    clerk = User.objects.create_user("clerk", password="pw", is_staff=True)
    clerk.user_permissions.add(Permission.objects.get(codename="view_methodcall"))
    call = Echo.objects.create().fail("nope")
    run_worker()

    _log_in(page, "clerk", "pw", f"/admin/asyncmodels/methodcall/{call.pk}/change/")
    assert page.locator("pre.asyncmodels-traceback").is_visible()
    assert page.locator("#asyncmodels-retry").count() == 0
    assert page.locator("#asyncmodels-cancel").count() == 0
    page.goto("/admin/asyncmodels/methodcall/")
    assert page.locator("select[name=action]").count() == 0  # no action this user may take
    call.refresh_from_db()
    assert call.state == CallState.FAILED
    assert MethodCall.objects.count() == 1


def test_a_workflows_last_step_lists_its_steps_in_order_with_working_links(
    page: Any, run_worker: RunWorker
) -> None:
    User.objects.create_superuser("admin", "admin@example.com", "pw")
    account = Account.objects.create(name="acme")
    report = Report.objects.create(topic="sales", account=account)
    assemble = report.build(parts=3)
    run_worker()
    calls = list(MethodCall.objects.filter(object_id=str(report.pk)).order_by("pk"))
    assert [call.state for call in calls] == [CallState.SUCCEEDED] * 5
    fetch = calls[0]

    _log_in(page, "admin", "pw", f"/admin/asyncmodels/methodcall/{assemble.pk}/change/")
    rows = page.locator("table.asyncmodels-workflow tbody tr")
    assert rows.count() == 5
    steps = [rows.nth(i).locator("td").nth(0).inner_text() for i in range(5)]
    methods = [rows.nth(i).locator("td").nth(2).inner_text() for i in range(5)]
    assert steps == ["1", "2", "2", "2", "3"]
    assert methods == ["cloud.Report.fetch", *["cloud.Report.slice"] * 3, "cloud.Report.assemble"]
    assert "(this call)" in rows.nth(4).inner_text()
    assert page.locator(".field-runs_after li").count() == 3
    assert page.locator(".field-tags_display a.asyncmodels-tag").count() == 2
    _shoot(page, "call-page-workflow")

    rows.nth(0).locator("a", has_text=f"#{fetch.pk}").click()  # step 1's link
    page.wait_for_url(re.compile(rf"/methodcall/{fetch.pk}/change/"))
    assert page.locator(".field-method .readonly").inner_text() == "cloud.Report.fetch"
    assert page.locator(".field-followed_by li").count() == 3
    assert "(this call)" in page.locator("table.asyncmodels-workflow tbody tr").nth(0).inner_text()

    page.locator(".field-tags_display a", has_text="workflow:report").click()
    page.wait_for_url(re.compile(r"tag=workflow%3Areport"))
    assert page.locator("#result_list tbody tr").count() == 5

    page.goto(f"/admin/cloud/account/{account.pk}/change/")  # the steps are tagged with the account
    assert page.locator(".asyncmodels-calls-table tbody tr").count() == 5
    assert page.locator(".asyncmodels-calls-table .asyncmodels-tagged").count() == 5
    _shoot(page, "object-page-tagged-calls")
