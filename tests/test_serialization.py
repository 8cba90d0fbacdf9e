"""The typed JSON encoding: what the method receives equals what the caller passed, in type and value."""

from __future__ import annotations

import datetime
import decimal
import json
import math
import uuid
import zoneinfo
from typing import Any

import pytest
from django.db import transaction

from asyncmodels import serialization
from asyncmodels.exceptions import DecodingError, UnsupportedArgumentError
from asyncmodels.models import CallState, MethodCall
from testproject.cloud.models import Account, Echo, Instance, Volume

from .conftest import RunWorker

PARIS = zoneinfo.ZoneInfo("Europe/Paris")
NEW_YORK = zoneinfo.ZoneInfo("America/New_York")

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
    # Values that a naive JSON encoding changes on the way (PostgreSQL's jsonb, astimezone()).
    "float-exponent": 1e16,
    "float-max": 1e308,
    "float-tiny": 5e-324,
    "negative-zero": -0.0,
    "int-beyond-64-bits": -(2**200),
    "datetime-fold": datetime.datetime(2021, 11, 7, 1, 30, fold=1, tzinfo=NEW_YORK),
    "datetime-dst-gap": datetime.datetime(2021, 3, 14, 2, 30, tzinfo=NEW_YORK),
    "datetime-near-min": datetime.datetime(1, 1, 1, 12, tzinfo=zoneinfo.ZoneInfo("Asia/Tokyo")),
    "datetime-near-max": datetime.datetime(9999, 12, 31, 23, tzinfo=NEW_YORK),
    "time-fold": datetime.time(1, 30, fold=1),
    "decimal-nan": decimal.Decimal("NaN"),
    "dict-in-tuple-in-dict": {"t": ({"__type__": "x"}, ())},
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
    elif isinstance(sent, (datetime.datetime, datetime.time)):
        assert received.tzinfo == sent.tzinfo or received.utcoffset() == sent.utcoffset()
        assert received.fold == sent.fold
        assert received.replace(tzinfo=None) == sent.replace(tzinfo=None)  # the same wall time
    elif isinstance(sent, decimal.Decimal):
        assert str(received) == str(sent)
    elif isinstance(sent, float):
        assert math.copysign(1.0, received) == math.copysign(1.0, sent)


@pytest.mark.parametrize("name", [name for name in SUPPORTED if name != "decimal-nan"])
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
    assert received["types"] == [type(value).__name__ for value in values]
    decimal_nan = list(SUPPORTED).index("decimal-nan")  # NaN != NaN: compare it by text
    assert str(received["args"].pop(decimal_nan)) == "NaN"
    values.pop(decimal_nan)
    _same(received["args"], values)
    for name, value in SUPPORTED.items():
        if name != "decimal-nan":
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


def test_zoneinfo_loaded_from_a_file_comes_back_as_the_same_instant() -> None:
    with open("/usr/share/zoneinfo/Europe/Paris", "rb") as source:
        keyless = zoneinfo.ZoneInfo.from_file(source)
    value = datetime.datetime(2021, 6, 1, 12, tzinfo=keyless)
    decoded = serialization.decode(json.loads(json.dumps(serialization.encode(value))))
    assert decoded == value
    assert decoded.utcoffset() == datetime.timedelta(hours=2)


@pytest.mark.django_db(transaction=True)
def test_keyword_argument_named_like_the_tag_reaches_the_method(run_worker: RunWorker) -> None:
    echo = Echo.objects.create()
    call = echo.echo(__type__="dict", items={"a": 1})
    run_worker()
    call.refresh_from_db()
    assert call.return_value["kwargs"] == {"__type__": "dict", "items": {"a": 1}}


def _nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("\ud800", "surrogate"),
        ("\ud83d\ude00", "surrogate"),
        ({"k\x00": 1}, "NUL"),
        ({"\udfff": 1}, "surrogate"),
        (10**4301, "too large"),
        (_nested(150), "nested more than 100 levels"),
        (datetime.time(12, tzinfo=PARIS), "no fixed offset"),
    ],
    ids=[
        "lone-surrogate",
        "surrogate-pair",
        "nul-in-key",
        "surrogate-in-key",
        "huge-int",
        "too-deep",
        "time-zone",
    ],
)
def test_values_no_database_stores_faithfully_are_refused_and_the_transaction_survives(
    value: object, message: str
) -> None:
    echo = Echo.objects.create()
    account = Account.objects.create(name="before")
    with transaction.atomic():
        Account.objects.filter(pk=account.pk).update(name="the caller's own write")
        with pytest.raises(UnsupportedArgumentError, match=message):
            echo.echo(value)
        with pytest.raises(UnsupportedArgumentError, match="NUL"):
            echo.echo(**{"bad\x00name": 1})
    account.refresh_from_db()
    assert account.name == "the caller's own write"
    assert MethodCall.objects.count() == 0
