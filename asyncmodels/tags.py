"""Tags: what else a call is about, besides its own object (``@async_method(tags=...)``).

A tag is stored as text in ``MethodCallTag.tag``. A model instance becomes
``"<app_label>.<model_name>:<pk>"`` (``"cloud.account:121"``): the concrete model's label in
lower case, so the same row gets the same tag on every database and through any proxy model. A string is
stored as given (``"region:eu"``). ``MethodCall.objects.for_object(account)`` finds the calls of
the object itself and the calls tagged with it; ``.tagged("region:eu")`` finds calls by any tag.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

from django.db import models

from .exceptions import InvalidTagError

#: A tag is at most this many characters (the column's length).
MAX_TAG_LENGTH = 255
#: A call carries at most this many tags: tags say what a call is about, they are not a payload.
MAX_TAGS = 50

TagSource = Callable[[models.Model], Iterable[Any]] | Iterable[str]


def tag_for(value: models.Model | str) -> str:
    """The stored text of one tag: a saved model instance or a non-empty string.

    Raises ``InvalidTagError`` for an unsaved instance, an empty or over-long string (more than
    ``MAX_TAG_LENGTH`` characters), a NUL character, or a value of any other type.
    """
    if isinstance(value, models.Model):
        if value._state.adding or value.pk is None:
            raise InvalidTagError(f"a tag is an unsaved {value._meta.label}; save it first.")
        return object_tag(value)
    if type(value) is str:
        tag = value
    else:
        raise InvalidTagError(
            f"a tag must be a saved model instance or a str, not {type(value).__name__} {value!r}."
        )
    if not tag or tag.strip() != tag:
        raise InvalidTagError(f"a tag must be non-empty text without surrounding spaces, not {tag!r}.")
    if len(tag) > MAX_TAG_LENGTH:
        raise InvalidTagError(f"a tag is at most {MAX_TAG_LENGTH} characters; {tag[:40]!r}... is {len(tag)}.")
    if "\x00" in tag:
        raise InvalidTagError("a tag contains a NUL character (\\x00), which cannot be stored.")
    try:
        tag.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidTagError(f"a tag is not valid UTF-8 text: {exc}") from exc
    return tag


def object_tag(instance: models.Model) -> str:
    """The tag of a saved model instance: ``"<app_label>.<model_name>:<pk>"`` of its concrete
    model (through a proxy too, the row's own tag). Any primary key fits: one whose tag would
    be longer than ``MAX_TAG_LENGTH`` is replaced by its SHA-256 (``"<label>:sha256:<hex>"``)."""
    concrete = instance._meta.concrete_model or type(instance)
    label = concrete._meta.label_lower
    tag = f"{label}:{instance.pk}"
    if len(tag) > MAX_TAG_LENGTH:
        tag = f"{label}:sha256:{hashlib.sha256(str(instance.pk).encode()).hexdigest()}"
    return tag


def tags_of(source: TagSource | None, instance: models.Model, label: str) -> list[str]:
    """The tags a call of ``label`` on ``instance`` carries, in order, without repeats.

    ``source`` is the decorator's ``tags=``: a callable given the instance (returning model
    instances, strings, or ``None`` for "no tag", such as an empty foreign key), or a fixed
    list of strings. Raises ``InvalidTagError`` (naming ``label``) if the callable raises or
    yields a bad tag; the call is then refused before anything is written.
    """
    if source is None:
        return []
    try:
        returned = source(instance) if callable(source) else source
        if isinstance(returned, (str, models.Model)) or returned is None:
            returned = [returned]  # one tag (or none) rather than a list of them
        elif isinstance(returned, (bytes, dict)):
            raise InvalidTagError(
                f"{label}(): tags= must give a list of tags, not a {type(returned).__name__}."
            )
        values = list(returned)
    except InvalidTagError:
        raise
    except Exception as exc:
        raise InvalidTagError(f"{label}(): tags= raised {type(exc).__name__}: {exc}") from exc
    tags: list[str] = []
    for value in values:
        if value is None:
            continue
        try:
            tag = tag_for(value)
        except InvalidTagError as exc:
            raise InvalidTagError(f"{label}(): {exc}") from None
        if tag not in tags:
            tags.append(tag)
    if len(tags) > MAX_TAGS:
        raise InvalidTagError(f"{label}(): {len(tags)} tags; a call carries at most {MAX_TAGS}.")
    return tags
