"""The typed JSON encoding of arguments and results. No pickle anywhere.

A value is stored as plain JSON when JSON keeps its type (``None``, ``bool``, ``int``, finite
``float``, ``str``, ``list``, and ``dict`` with ``str`` keys). Other supported types become a
tagged object ``{"__type__": <tag>, ...}``:

=============  =====================================================================
``datetime``   aware only; ISO 8601 plus the ``zoneinfo`` key when there is one
``date``       ISO 8601
``time``       ISO 8601 (with its UTC offset when aware)
``timedelta``  days, seconds, microseconds
``Decimal``    its exact string
``UUID``       its canonical string
``tuple``      its items
model          ``app_label.ModelName``, the encoded primary key and the database alias;
               decoded by reloading the row, so the worker gets a fresh copy
=============  =====================================================================

A ``dict`` whose keys include ``"__type__"`` is wrapped (tag ``dict``) so that user data can
never be mistaken for a tag. Exact types are required: a subclass (an ``enum`` member that is
also a ``str``, say) is refused rather than silently coming back as its base type.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import math
import uuid
import zoneinfo
from typing import Any, Final

from django.apps import apps
from django.core.exceptions import ObjectDoesNotExist
from django.db import models

from .exceptions import DecodingError, EncodingError

TAG: Final = "__type__"

JSONValue = Any  # a value json.dumps accepts: the output of encode()


def encode(value: Any, *, path: str = "value") -> JSONValue:
    """Return ``value`` in the typed JSON encoding.

    ``path`` names the value in error messages (``"kwargs['when']"``, ``"args[0][2]"``).
    Raises ``EncodingError`` naming the path and the type for anything not supported.
    """
    kind = type(value)
    if value is None or kind is bool or kind is int:
        return value
    if kind is str:
        if "\x00" in value:
            # PostgreSQL's jsonb cannot store NUL characters; refuse everywhere for one behaviour.
            raise EncodingError(
                f"{path} is a str containing a NUL character (\\x00), which cannot be stored."
            )
        return value
    if kind is float:
        if not math.isfinite(value):
            raise EncodingError(f"{path} is the float {value!r}; only finite floats can be stored in JSON.")
        return value
    if kind is list:
        return [encode(item, path=f"{path}[{index}]") for index, item in enumerate(value)]
    if kind is tuple:
        return {TAG: "tuple", "items": [encode(item, path=f"{path}[{i}]") for i, item in enumerate(value)]}
    if kind is dict:
        encoded: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise EncodingError(
                    f"{path} has a key {key!r} of type {type(key).__name__}; dict keys must be str."
                )
            encoded[key] = encode(item, path=f"{path}[{key!r}]")
        if TAG in encoded:
            return {TAG: "dict", "items": encoded}
        return encoded
    if kind is datetime.datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise EncodingError(
                f"{path} is a naive datetime ({value.isoformat()}); pass an aware datetime "
                "(django.utils.timezone.now(), or datetime.replace(tzinfo=...))."
            )
        tagged: dict[str, Any] = {TAG: "datetime", "value": value.isoformat()}
        if isinstance(value.tzinfo, zoneinfo.ZoneInfo):
            tagged["zone"] = value.tzinfo.key
        return tagged
    if kind is datetime.date:
        return {TAG: "date", "value": value.isoformat()}
    if kind is datetime.time:
        return {TAG: "time", "value": value.isoformat()}
    if kind is datetime.timedelta:
        return {
            TAG: "timedelta",
            "days": value.days,
            "seconds": value.seconds,
            "microseconds": value.microseconds,
        }
    if kind is decimal.Decimal:
        return {TAG: "decimal", "value": str(value)}
    if kind is uuid.UUID:
        return {TAG: "uuid", "value": str(value)}
    if isinstance(value, models.Model):
        return _encode_model(value, path)
    if isinstance(value, enum.Enum):
        raise EncodingError(
            f"{path} is the enum member {kind.__qualname__}.{value.name}; pass its .value "
            f"({value.value!r}) instead, enum types are not stored."
        )
    raise EncodingError(
        f"{path} is of type {kind.__module__}.{kind.__qualname__}, which cannot be stored. Supported: "
        "None, bool, int, float, str, list, tuple, dict with str keys, aware datetime, date, time, "
        "timedelta, Decimal, UUID and saved model instances."
    )


def _encode_model(instance: models.Model, path: str) -> JSONValue:
    if instance._state.adding or instance.pk is None:
        raise EncodingError(
            f"{path} is an unsaved {instance._meta.label} instance; save it first so a worker can reload it."
        )
    return {
        TAG: "model",
        "model": instance._meta.label,
        "pk": encode(instance.pk, path=f"{path}.pk"),
        "db": instance._state.db or "default",
    }


def decode(value: JSONValue) -> Any:
    """Return the Python value for an ``encode()`` output; model references are reloaded.

    Raises ``DecodingError`` for an unknown tag, a model that is not installed, or a referenced
    row that no longer exists.
    """
    if isinstance(value, list):
        return [decode(item) for item in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(TAG)
    if tag is None:
        return {key: decode(item) for key, item in value.items()}
    try:
        return _decode_tagged(tag, value)
    except DecodingError:
        raise
    except (KeyError, TypeError, ValueError, decimal.InvalidOperation, zoneinfo.ZoneInfoNotFoundError) as exc:
        raise DecodingError(f"Malformed stored value with tag {tag!r}: {exc!r}") from exc


def _decode_tagged(tag: str, value: dict[str, Any]) -> Any:
    if tag == "dict":
        return {key: decode(item) for key, item in value["items"].items()}
    if tag == "tuple":
        return tuple(decode(item) for item in value["items"])
    if tag == "datetime":
        moment = datetime.datetime.fromisoformat(value["value"])
        if "zone" in value:
            moment = moment.astimezone(zoneinfo.ZoneInfo(value["zone"]))
        return moment
    if tag == "date":
        return datetime.date.fromisoformat(value["value"])
    if tag == "time":
        return datetime.time.fromisoformat(value["value"])
    if tag == "timedelta":
        return datetime.timedelta(
            days=value["days"], seconds=value["seconds"], microseconds=value["microseconds"]
        )
    if tag == "decimal":
        return decimal.Decimal(value["value"])
    if tag == "uuid":
        return uuid.UUID(value["value"])
    if tag == "model":
        return _decode_model(value)
    raise DecodingError(f"Unknown tag {tag!r} in a stored value.")


def _decode_model(value: dict[str, Any]) -> models.Model:
    try:
        model = apps.get_model(value["model"])
    except LookupError as exc:
        raise DecodingError(
            f"Stored reference to {value['model']}, which is not an installed model."
        ) from exc
    pk = decode(value["pk"])
    manager = model._base_manager.db_manager(value["db"])
    try:
        instance: models.Model = manager.get(pk=pk)
    except ObjectDoesNotExist as exc:
        raise DecodingError(
            f"{model._meta.label} with pk={pk!r} no longer exists (it was passed as an argument)."
        ) from exc
    return instance
