"""System checks: each wiring mistake has its own id."""

from __future__ import annotations

import pytest
from django.apps import apps
from django.test import override_settings

from asyncmodels import checks
from asyncmodels.exceptions import ConfigurationError


def test_project_passes_all_checks() -> None:
    assert checks.check_django_rq_installed() == []
    assert checks.check_settings() == []
    assert checks.check_method_queues() == []


def test_missing_django_rq_is_e001(monkeypatch: pytest.MonkeyPatch) -> None:
    real = apps.is_installed
    monkeypatch.setattr(apps, "is_installed", lambda name: name != "django_rq" and real(name))
    assert [message.id for message in checks.check_django_rq_installed()] == ["asyncmodels.E001"]


def test_method_queue_missing_from_rq_queues_is_e002() -> None:
    with override_settings(RQ_QUEUES={"default": {"URL": "redis://127.0.0.1:6379/0"}}):
        messages = checks.check_method_queues()
    assert {message.id for message in messages} == {"asyncmodels.E002"}
    assert any("cloud.Instance.provision uses queue 'provisioning'" in message.msg for message in messages)


@pytest.mark.parametrize(
    ("setting", "text"), [({"BACKEND": "celery"}, "must be one of"), ({"BAKCEND": "rq"}, "Unknown key")]
)
def test_bad_asyncmodels_setting_is_e003(setting: dict[str, str], text: str) -> None:
    with override_settings(ASYNCMODELS=setting):
        messages = checks.check_settings()
        with pytest.raises(ConfigurationError):
            from asyncmodels import conf

            conf.get_config()
    assert [message.id for message in messages] == ["asyncmodels.E003"]
    assert text in messages[0].msg


def test_every_setting_problem_is_reported_at_once() -> None:
    with override_settings(ASYNCMODELS={"BACKEND": "celery", "RETRIES": 3}):
        messages = checks.check_settings()
    assert [message.id for message in messages] == ["asyncmodels.E003", "asyncmodels.E003"]
    assert "RETRIES" in messages[0].msg
    assert "'celery'" in messages[1].msg


@pytest.mark.parametrize(
    ("rq_setting", "warned"),
    [
        ({"WORKER_CLASS": "asyncmodels.worker.Worker"}, False),
        ({"WORKER_CLASS": "asyncmodels.worker.SimpleWorker"}, False),
        ({"WORKER_CLASS": "rq.worker.Worker"}, True),
        ({"WORKER_CLASS": "no.such.Worker"}, True),
        ({}, True),
    ],
)
def test_worker_class_without_recovery_is_w001(rq_setting: dict[str, str], warned: bool) -> None:
    with override_settings(RQ=rq_setting):
        messages = checks.check_worker_class()
    assert [message.id for message in messages] == (["asyncmodels.W001"] if warned else [])


def test_w001_is_reported_even_when_the_asyncmodels_setting_is_invalid() -> None:
    with override_settings(RQ={}, ASYNCMODELS={"NO_SUCH_KEY": 1}):
        assert [message.id for message in checks.check_worker_class()] == ["asyncmodels.W001"]


def test_e003_reports_every_problem_at_once() -> None:
    setting = {
        "LEASE_SECONDS": 6,
        "LEASE_RENEW_SECONDS": 5,
        "FOO": 1,
        "BACKEND": "x",
        "RECOVERY_BATCH_SIZE": 2.5,
    }
    with override_settings(ASYNCMODELS=setting):
        messages = checks.check_settings()
    assert {message.id for message in messages} == {"asyncmodels.E003"}
    texts = [message.msg for message in messages]
    for text in ("Unknown key(s)", "'BACKEND'", "at most half", "whole number"):
        assert sum(text in each for each in texts) == 1, (text, texts)  # one message per problem


def test_w001_is_silent_with_the_immediate_backend() -> None:
    with override_settings(RQ={}, ASYNCMODELS={"BACKEND": "immediate"}):
        assert checks.check_worker_class() == []


@pytest.mark.parametrize(
    ("setting", "text"),
    [
        ({"LEASE_SECONDS": 0}, "positive number"),
        ({"LEASE_SECONDS": "60"}, "positive number"),
        ({"LEASE_SECONDS": 10, "LEASE_RENEW_SECONDS": 6}, "at most half"),
        ({"RECOVERY_BATCH_SIZE": 0.5}, "whole number"),
        ({"RECOVERY_INTERVAL_SECONDS": -1}, "positive number"),
    ],
)
def test_bad_durations_are_e003(setting: dict[str, object], text: str) -> None:
    with override_settings(ASYNCMODELS=setting):
        messages = checks.check_settings()
    assert [message.id for message in messages] == ["asyncmodels.E003"]
    assert text in messages[0].msg
