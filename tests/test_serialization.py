"""The typed JSON encoding: what the method receives equals what the caller passed, in type and value."""

from __future__ import annotations

import datetime
import decimal
import json
import uuid
import zoneinfo
from typing import Any

import pytest

from asyncmodels import serialization
from asyncmodels.exceptions import DecodingError
from asyncmodels.models import CallState
from testproject.cloud.models import Account, Echo, Instance, Volume

from .conftest import RunWorker

PARIS = zoneinfo.ZoneInfo("Europe/Paris")

SUPPORTED: dict[str, Any] = {
    "none": None,
    "true": True,
    "int": 12345678901234567890,
    "negative": -7,
    "float": 0.1,
    "str": "héllo <b>wörld</b> 🚀",
    "empty-str": "",
    "list": [1, "two", [3.5, None]],
    "dict": {"a": 1, "nested": {"b": [True, False]}},
    "tag-lookalike": {"__type__": "datetime", "value": "not a date"},
    "tuple": (1, ("nested", 2)),
    "datetime-utc": datetime.datetime(2026, 11, 29, 15, 4, 5, 123456, tzinfo=datetime.UTC),
    "datetime-zone": datetime.datetime(2026, 7, 1, 9, 30, tzinfo=PARIS),
    "datetime-offset": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))),
    "date": datetime.date(2024, 2, 29),
    "time": datetime.time(23, 59, 59, 999999),
    "time-aware": datetime.time(8, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
    "timedelta": datetime.timedelta(days=-1, seconds=5, microseconds=7),
    "decimal": decimal.Decimal("12345678901234567890.000000000001"),
    "decimal-negative-zero": decimal.Decimal("-0.00"),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
}


def _same(received: Any, sent: Any) -> None:
    """Equal in value and in type, recursively (1 == 1.0 == True is not enough)."""
    assert type(received) is type(sent), (received, sent)
    assert received == sent
    if isinstance(sent, (list, tuple)):
        for left, right in zip(received, sent, strict=True):
            _same(left, right)
    elif isinstance(sent, dict):
        for key in sent:
            _same(received[key], sent[key])
    elif isinstance(sent, datetime.datetime):
        assert received.tzinfo == sent.tzinfo or received.utcoffset() == sent.utcoffset()
    elif isinstance(sent, decimal.Decimal):
        assert str(received) == str(sent)


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_encode_decode_round_trip_through_json_text(name: str) -> None:
    value = SUPPORTED[name]
    stored = json.loads(json.dumps(serialization.encode(value)))
    _same(serialization.decode(stored), value)


def test_zoneinfo_datetime_comes_back_in_its_zone() -> None:
    value = SUPPORTED["datetime-zone"]
    decoded = serialization.decode(json.loads(json.dumps(serialization.encode(value))))
    assert decoded.tzinfo == PARIS
    assert decoded.utcoffset() == datetime.timedelta(hours=2)


@pytest.mark.parametrize(
    "stored",
    [{"__type__": "no-such-tag"}, {"__type__": "date", "value": "not-a-date"}, {"__type__": "decimal"}],
)
def test_malformed_stored_values_raise_decoding_error(stored: dict[str, Any]) -> None:
    with pytest.raises(DecodingError):
        serialization.decode(stored)


@pytest.mark.django_db(transaction=True)
def test_every_supported_type_reaches_the_worker_unchanged(run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    values = list(SUPPORTED.values())
    call = echo.echo(*values, **{name.replace("-", "_"): value for name, value in SUPPORTED.items()})
    run_worker()
    call.refresh_from_db()
    assert call.state == CallState.SUCCEEDED, call.error
    received = serialization.decode(call.result)
    _same(received["args"], values)
    assert received["types"] == [type(value).__name__ for value in values]
    for name, value in SUPPORTED.items():
        _same(received["kwargs"][name.replace("-", "_")], value)


@pytest.mark.django_db(transaction=True)
def test_results_round_trip_like_arguments(run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    call = echo.echo(SUPPORTED["decimal"], when=SUPPORTED["datetime-zone"])
    run_worker()
    call.refresh_from_db()
    result = serialization.decode(call.result)
    _same(result["args"][0], SUPPORTED["decimal"])
    _same(result["kwargs"]["when"], SUPPORTED["datetime-zone"])


@pytest.mark.django_db(transaction=True)
def test_model_instances_are_stored_as_references(run_worker: RunWorker) -> None:
    instance = Instance.objects.create(account=Account.objects.create(name="acme"), name="web1")
    volume = Volume.objects.create(label="v")
    echo = Echo.objects.create()
    call = echo.echo(instance, volume=volume)
    assert call.args == [{"__type__": "model", "model": "cloud.Instance", "pk": instance.pk, "db": "default"}]
    assert call.kwargs["volume"]["pk"] == {"__type__": "uuid", "value": str(volume.pk)}
    run_worker()
    call.refresh_from_db()
    result = serialization.decode(call.result)
    assert result["args"] == [instance]
    assert result["kwargs"]["volume"] == volume
    assert result["types"] == ["Instance"]
