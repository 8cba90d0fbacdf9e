"""The typed JSON encoding of arguments and results. No pickle anywhere.

A value is stored as plain JSON when JSON keeps its type (``None``, ``bool``, ``int``, finite
``float``, ``str``, ``list``, and ``dict`` with ``str`` keys). Other supported types become a
tagged object ``{"__type__": <tag>, ...}``:

=============  =====================================================================
``float``      only when JSON databases would change it (``1e16``, ``-0.0``): its repr
``datetime``   aware only; ISO 8601, the ``zoneinfo`` key when there is one, and ``fold``
``date``       ISO 8601
``time``       ISO 8601 (with its UTC offset when aware; a zone without fixed offset is
               refused) and ``fold``
``timedelta``  days, seconds, microseconds
``Decimal``    its exact string
``UUID``       its canonical string
``tuple``      its items
model          ``app_label.ModelName``, the encoded primary key and the database alias;
               decoded by reloading the row, so the worker gets a fresh copy
result_of      a call's id and database (``asyncmodels.result_of``); decoded as that
               call's result, read when the step runs
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

from .dependencies import ResultOf
from .exceptions import DecodingError, EncodingError

TAG: Final = "__type__"
#: Deeper nesting is refused at call time: a worker must be able to decode whatever was stored.
MAX_DEPTH: Final = 100

JSONValue = Any  # a value json.dumps accepts: the output of encode()


def encode(value: Any, *, path: str = "value") -> JSONValue:
    """Return ``value`` in the typed JSON encoding.

    ``path`` names the value in error messages (``"kwargs['when']"``, ``"args[0][2]"``).
    Raises ``EncodingError`` naming the path and the type for anything not supported, and for
    values no database can store faithfully (NUL characters, lone surrogates, ints of more than
    4300 digits, nesting deeper than ``MAX_DEPTH``).
    """
    return _encode(value, path, 0)


def encode_arguments(
    args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]
) -> tuple[list[Any], JSONValue]:
    """Encode a call's positional and keyword arguments; raises ``EncodingError`` like ``encode``."""
    encoded_args = [_encode(value, f"args[{index}]", 1) for index, value in enumerate(args)]
    encoded_kwargs = {
        _check_text(key, "a keyword argument name"): _encode(value, f"kwargs[{key!r}]", 1)
        for key, value in kwargs.items()
    }
    if TAG in encoded_kwargs:  # a keyword argument literally named "__type__"
        return encoded_args, {TAG: "dict", "items": encoded_kwargs}
    return encoded_args, encoded_kwargs


def decode_arguments(args: JSONValue, kwargs: JSONValue) -> tuple[list[Any], dict[str, Any]]:
    """Decode stored arguments; raises ``DecodingError`` unless they are a list and a str-keyed dict."""
    decoded_args, decoded_kwargs = decode(args), decode(kwargs)
    if not isinstance(decoded_args, list):
        raise DecodingError(f"Stored positional arguments are a {type(decoded_args).__name__}, not a list.")
    if not isinstance(decoded_kwargs, dict) or not all(isinstance(key, str) for key in decoded_kwargs):
        raise DecodingError(f"Stored keyword arguments are a {type(decoded_kwargs).__name__}, not a dict.")
    return decoded_args, decoded_kwargs


def _check_text(text: str, what: str) -> str:
    if "\x00" in text:
        # PostgreSQL's jsonb cannot store NUL characters; refuse everywhere for one behaviour.
        raise EncodingError(f"{what} contains a NUL character (\\x00), which cannot be stored.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EncodingError(
            f"{what} contains a surrogate code point ({text[exc.start]!r}), which is not valid "
            "UTF-8 and cannot be stored; join surrogate pairs into one character first."
        ) from exc
    return text


def _encode(value: Any, path: str, depth: int) -> JSONValue:
    if depth > MAX_DEPTH:
        raise EncodingError(f"{path} is nested more than {MAX_DEPTH} levels deep.")
    kind = type(value)
    if value is None or kind is bool:
        return value
    if kind is int:
        if value.bit_length() > 64:
            try:
                str(value)
            except ValueError as exc:  # Python refuses int <-> str beyond 4300 digits
                raise EncodingError(f"{path} is an int too large to store as text: {exc}") from exc
        return value
    if kind is str:
        return _check_text(value, f"{path} (a str)")
    if kind is float:
        if not math.isfinite(value):
            raise EncodingError(f"{path} is the float {value!r}; only finite floats can be stored in JSON.")
        text = repr(value)
        if "e" in text or (value == 0 and math.copysign(1.0, value) < 0):
            # PostgreSQL's jsonb would give 1e16 back as the int 10000000000000000 and -0.0 as 0.
            return {TAG: "float", "value": text}
        return value
    if kind is list:
        return [_encode(item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value)]
    if kind is tuple:
        return {
            TAG: "tuple",
            "items": [_encode(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)],
        }
    if kind is dict:
        encoded: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise EncodingError(
                    f"{path} has a key {key!r} of type {type(key).__name__}; dict keys must be str."
                )
            encoded[_check_text(key, f"a key of {path}")] = _encode(item, f"{path}[{key!r}]", depth + 1)
        if TAG in encoded:
            return {TAG: "dict", "items": encoded}
        return encoded
    if kind is datetime.datetime:
        return _encode_datetime(value, path)
    if kind is datetime.date:
        return {TAG: "date", "value": value.isoformat()}
    if kind is datetime.time:
        return _encode_time(value, path)
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
    if kind is ResultOf:
        return {TAG: "result_of", "call": value.call_id, "db": value.database}
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


def _encode_datetime(value: datetime.datetime, path: str) -> JSONValue:
    if value.tzinfo is None or value.utcoffset() is None:
        raise EncodingError(
            f"{path} is a naive datetime ({value.isoformat()}); pass an aware datetime "
            "(django.utils.timezone.now(), or datetime.replace(tzinfo=...))."
        )
    tagged: dict[str, Any] = {TAG: "datetime", "value": value.isoformat()}
    if isinstance(value.tzinfo, zoneinfo.ZoneInfo) and value.tzinfo.key is not None:
        # Keep the zone, and rebuild from the wall time so that times in a DST gap or fold
        # come back exactly as they were passed (astimezone() would normalise them).
        tagged["zone"] = value.tzinfo.key
    if value.fold:
        tagged["fold"] = 1
    return tagged


def _encode_time(value: datetime.time, path: str) -> JSONValue:
    if value.tzinfo is not None and value.utcoffset() is None:
        raise EncodingError(
            f"{path} is a time in the zone {value.tzinfo!r}, which has no fixed offset without a "
            "date; pass a datetime, or a time with a fixed offset (datetime.timezone)."
        )
    tagged: dict[str, Any] = {TAG: "time", "value": value.isoformat()}
    if value.fold:
        tagged["fold"] = 1
    return tagged


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

    Raises ``DecodingError`` for an unknown tag, a malformed value, a model that is not
    installed, or a referenced row that no longer exists.
    """
    try:
        return _decode(value)
    except RecursionError as exc:  # a forged row nested beyond what encode() would write
        raise DecodingError("Stored value is nested too deeply to decode.") from exc


def _decode(value: JSONValue) -> Any:
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(TAG)
    if tag is None:
        return {key: _decode(item) for key, item in value.items()}
    try:
        return _decode_tagged(tag, value)
    except DecodingError:
        raise
    except Exception as exc:  # any malformed or forged row: report it, never crash the job
        raise DecodingError(f"Malformed stored value with tag {tag!r}: {exc!r}") from exc


def _decode_tagged(tag: str, value: dict[str, Any]) -> Any:
    if tag == "dict":
        return {key: _decode(item) for key, item in value["items"].items()}
    if tag == "tuple":
        return tuple(_decode(item) for item in value["items"])
    if tag == "datetime":
        moment = datetime.datetime.fromisoformat(value["value"])
        if "zone" in value:
            moment = moment.replace(tzinfo=zoneinfo.ZoneInfo(value["zone"]))
        return moment.replace(fold=value.get("fold", 0))
    if tag == "date":
        return datetime.date.fromisoformat(value["value"])
    if tag == "time":
        return datetime.time.fromisoformat(value["value"]).replace(fold=value.get("fold", 0))
    if tag == "float":
        return float(value["value"])
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
    if tag == "result_of":
        return _decode_result_of(value)
    raise DecodingError(f"Unknown tag {tag!r} in a stored value.")


def _decode_model(value: dict[str, Any]) -> models.Model:
    try:
        model = apps.get_model(value["model"])
    except LookupError as exc:
        raise DecodingError(
            f"Stored reference to {value['model']}, which is not an installed model."
        ) from exc
    pk = _decode(value["pk"])
    manager = model._base_manager.db_manager(value["db"])
    try:
        instance: models.Model = manager.get(pk=pk)
    except ObjectDoesNotExist as exc:
        raise DecodingError(
            f"{model._meta.label} with pk={pk!r} no longer exists (it was passed as an argument)."
        ) from exc
    return instance


def _decode_result_of(value: dict[str, Any]) -> Any:
    """The result of an earlier call (``asyncmodels.dependencies.result_of``), read now."""
    from .models import CallState, MethodCall

    call_id = int(value["call"])
    row = (
        MethodCall.objects.using(value["db"])
        .filter(pk=call_id)
        .values("state", "result", "result_note", "method")
        .first()
    )
    if row is None:
        raise DecodingError(
            f"The result of call #{call_id} was passed as an argument, but that call is gone."
        )
    if row["state"] != CallState.SUCCEEDED:
        raise DecodingError(
            f"The result of call #{call_id} ({row['method']}) was passed as an argument, but that call "
            f"is {row['state']}, not succeeded."
        )
    if row["result_note"]:
        raise DecodingError(
            f"The result of call #{call_id} ({row['method']}) was passed as an argument, but it could not "
            f"be stored: {row['result_note']}"
        )
    return _decode(row["result"])
