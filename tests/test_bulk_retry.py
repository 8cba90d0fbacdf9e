"""``asyncmodels_retry`` and ``asyncmodels.bulk_retry``: the selection, dry run, the push on commit,
and bad input that changes nothing."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from io import StringIO

import pytest
from django.contrib.contenttypes.models import ContentType
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db.models.functions import Now

from asyncmodels.bulk_retry import CallSelection, retry_calls, select_calls
from asyncmodels.models import CallState, MethodCall
from testproject.cloud.models import Account, Echo, Instance

from .conftest import RunWorker
from .seeded_calls import make_call

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

HOUR = datetime.timedelta(hours=1)


def retry(*args: str) -> str:
    out = StringIO()
    call_command("asyncmodels_retry", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def states() -> dict[int, str]:
    return dict(MethodCall.objects.values_list("pk", "state"))


@pytest.fixture
def site() -> dict[str, MethodCall]:
    """Finished calls of several methods, objects, tags, errors and ages."""
    account = Account.objects.create(name="acme")
    echo = Echo.objects.create()
    instance = Instance.objects.create(account=account, name="web-1")
    return {
        "bump_boom": make_call("failed", echo=echo, age=HOUR),
        "bump_timeout": make_call(
            "failed", echo=echo, age=3 * HOUR, error="Timed out after 5 s", error_type="asyncmodels.Timeout"
        ),
        "bump_old": make_call("failed", echo=echo, age=48 * HOUR),
        "provision": make_call(
            "failed",
            age=HOUR,
            method="cloud.Instance.provision",
            queue="provisioning",
            error="size 'xl' is not offered",
            content_type=ContentType.objects.get_for_model(Instance),
            object_id=str(instance.pk),
        ),
        "tagged": make_call("failed", age=HOUR, tags=(f"cloud.account:{account.pk}", "region:eu")),
        "cancelled": make_call("cancelled", echo=echo, age=HOUR, state_reason="Cancelled by ops."),
        "succeeded": make_call("succeeded", echo=echo, age=HOUR),
        "running": make_call("running", echo=echo, age=HOUR),
        "other_db": make_call("failed", age=HOUR, database="other"),
    }


def picked(site: dict[str, MethodCall], selection: CallSelection, database: str = "default") -> set[str]:
    ids = {call.pk for call in select_calls(selection, database=database)}
    return {name for name, call in site.items() if call.pk in ids and call._state.db == database}


def test_selection_picks_exactly_the_matching_failed_calls(site: dict[str, MethodCall]) -> None:
    account = Account.objects.get()
    echo = Echo.objects.first()
    assert echo is not None
    assert picked(site, CallSelection()) == {"bump_boom", "bump_timeout", "bump_old", "provision", "tagged"}
    assert picked(site, CallSelection(methods=("cloud.Echo.bump",))) == {
        "bump_boom",
        "bump_timeout",
        "bump_old",
        "tagged",
    }
    assert picked(site, CallSelection(models=("cloud.Instance",))) == {"provision"}
    assert picked(site, CallSelection(objects=(f"cloud.Echo:{echo.pk}",))) == {
        "bump_boom",
        "bump_timeout",
        "bump_old",
    }
    # an object's calls include those tagged with it (as MethodCall.objects.for_object)
    assert picked(site, CallSelection(objects=(f"cloud.Account:{account.pk}",))) == {"tagged"}
    assert picked(site, CallSelection(tags=("region:eu",))) == {"tagged"}
    assert picked(site, CallSelection(error="TIMEOUT")) == {"bump_timeout"}  # the type, any case
    assert picked(site, CallSelection(error="not offered")) == {"provision"}
    assert picked(site, CallSelection(finished_after=2 * HOUR)) == {"bump_boom", "provision", "tagged"}
    assert picked(site, CallSelection(finished_before=2 * HOUR, finished_after=24 * HOUR)) == {"bump_timeout"}
    assert picked(site, CallSelection(states=("cancelled",))) == {"cancelled"}
    assert picked(site, CallSelection(methods=("cloud.Echo.bump",), error="boom")) == {
        "bump_boom",
        "bump_old",
        "tagged",
    }
    assert picked(site, CallSelection(), database="other") == {"other_db"}


def test_dry_run_lists_and_changes_nothing(
    site: dict[str, MethodCall], queued_jobs: Callable[..., int]
) -> None:
    before = states()
    output = retry("--method", "cloud.Echo.bump", "--error", "boom", "--dry-run")
    assert states() == before
    assert queued_jobs() == 0
    assert output.startswith("Would retry 3 call(s) (dry run: nothing changed):")
    for name in ("bump_boom", "bump_old", "tagged"):
        assert f"#{site[name].pk} failed cloud.Echo.bump(" in output
    assert f"#{site['bump_timeout'].pk} " not in output


def test_retry_moves_the_selected_calls_through_the_models_retry_and_pushes_them_on_commit(
    site: dict[str, MethodCall], queued_jobs: Callable[..., int], run_worker: RunWorker
) -> None:
    echo = Echo.objects.get(pk=site["bump_boom"].object_id)
    output = retry("--object", f"cloud.Echo:{echo.pk}", "--since", "2h")
    assert output.startswith("Retried 1 call(s); pushed to RQ on commit.")
    after = states()
    assert after.pop(site["bump_boom"].pk) == CallState.ENQUEUED
    assert all(
        after[call.pk] == call.state
        for name, call in site.items()
        if name != "bump_boom" and name != "other_db"
    )
    call = MethodCall.objects.get(pk=site["bump_boom"].pk)
    assert call.state_reason.startswith("Retried by asyncmodels_retry (")
    assert call.attempts == 1  # a new attempt is counted when it starts
    assert queued_jobs("default") == 1
    run_worker("default")
    call.refresh_from_db()
    echo.refresh_from_db()
    assert (call.state, call.attempts, echo.hits) == (CallState.SUCCEEDED, 2, 1)


def test_cancelled_calls_only_when_asked(site: dict[str, MethodCall]) -> None:
    echo_id = site["cancelled"].object_id
    retry("--object", f"cloud.Echo:{echo_id}", "--since", "2h", "--dry-run")
    assert "No call matches" in retry("--state", "cancelled", "--method", "cloud.Echo.nothing")
    output = retry("--state", "cancelled", "--object", f"cloud.Echo:{echo_id}")
    assert output.startswith("Retried 1 call(s)")
    assert MethodCall.objects.get(pk=site["cancelled"].pk).state == CallState.ENQUEUED
    assert MethodCall.objects.get(pk=site["bump_boom"].pk).state == CallState.FAILED


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "No selection given"),
        (("--model", "cloud.Nothing"), "'cloud.Nothing' is not an installed model"),
        (("--object", "cloud.Echo"), "is not an object; use app_label.ModelName:pk"),
        (("--object", "cloud.Echo:abc"), "'abc' is not a valid primary key of cloud.Echo"),
        (("--tag", " padded "), "a tag must be non-empty text"),
        (("--since", "yesterday"), "neither a date/time"),
        (("--state", "succeeded", "--all"), "invalid choice: 'succeeded'"),
        (("--all", "--limit", "4"), "More than 4 calls match; nothing was retried"),
        (("--all", "--database", "nowhere"), "unknown database alias 'nowhere'"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    site: dict[str, MethodCall], queued_jobs: Callable[..., int], args: tuple[str, ...], message: str
) -> None:
    before = states()
    with pytest.raises(CommandError, match=message):
        retry(*args)
    assert states() == before
    assert queued_jobs() == 0


def test_all_retries_every_failed_call_within_the_limit(site: dict[str, MethodCall]) -> None:
    output = retry("--all", "--limit", "5")
    assert output.startswith("Retried 5 call(s)")
    assert MethodCall.objects.filter(state=CallState.FAILED).count() == 0
    assert MethodCall.objects.using("other").get().state == CallState.FAILED


def test_a_call_that_moved_on_meanwhile_is_left_alone(site: dict[str, MethodCall]) -> None:
    calls = select_calls(CallSelection(methods=("cloud.Instance.provision",)))
    MethodCall.objects.filter(pk=site["provision"].pk).update(state=CallState.PENDING, finished_at=None)
    report = retry_calls(calls)
    assert (report.retried, [c.pk for c in report.skipped]) == ([], [site["provision"].pk])


def test_a_refused_call_fails_the_command_after_the_others_are_retried(
    site: dict[str, MethodCall],
) -> None:
    MethodCall.objects.filter(pk=site["provision"].pk).update(queue="gone")
    with pytest.raises(CommandError, match="1 call\\(s\\) could not be retried"):
        retry("--all")
    assert MethodCall.objects.get(pk=site["provision"].pk).state == CallState.FAILED
    assert MethodCall.objects.filter(state=CallState.ENQUEUED).count() == 4


def test_dates_are_read_as_times_on_finished_at(site: dict[str, MethodCall]) -> None:
    MethodCall.objects.filter(pk=site["bump_old"].pk).update(finished_at=Now() - datetime.timedelta(days=400))
    long_ago = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=300)).strftime("%Y-%m-%d")
    output = retry("--until", long_ago, "--dry-run")
    assert output.startswith("Would retry 1 call(s)")
    assert f"#{site['bump_old'].pk} " in output
