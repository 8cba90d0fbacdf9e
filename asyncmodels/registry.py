"""The registry of decorated methods: the only place the generic job looks a method up.

A stored call names its method by registry name (``"app_label.ModelName.method"`` unless the
decorator was given ``name=``). The job resolves that name here and never with ``getattr`` on a
stored string, so only ``@async_method`` methods can ever run from a row (README, Guarantees: 4).

Models register when Django prepares them (the ``class_prepared`` signal), so a concrete model
inheriting a decorated method from an abstract or concrete parent gets its own entry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.db import models
from django.db.models.signals import class_prepared

from .exceptions import RegistrationError
from .options import MethodOptions

if TYPE_CHECKING:
    from .decorator import AsyncMethod


@dataclass(frozen=True)
class RegisteredMethod:
    """One decorated method of one concrete model."""

    name: str
    model: type[models.Model]
    attribute: str
    function: Callable[..., Any]
    signature: inspect.Signature
    options: MethodOptions


_by_name: dict[str, RegisteredMethod] = {}
_by_model_attribute: dict[tuple[type[models.Model], str], RegisteredMethod] = {}


def get_method(name: str) -> RegisteredMethod | None:
    """Return the method registered under ``name``, or ``None``."""
    return _by_name.get(name)


def get_method_for(model: type[models.Model], attribute: str) -> RegisteredMethod | None:
    """Return the entry for ``attribute`` of the concrete ``model``, or ``None``."""
    return _by_model_attribute.get((model, attribute))


def all_methods() -> Iterator[RegisteredMethod]:
    """Yield every registered method, in registration order."""
    yield from list(_by_name.values())


def register(model: type[models.Model], attribute: str, descriptor: AsyncMethod) -> RegisteredMethod:
    """Register ``descriptor`` (found as ``attribute`` on ``model``) and return its entry.

    Raises ``RegistrationError`` when the registry name is already taken by another method.
    Registering the same model attribute again (a model module imported twice) replaces it.
    """
    explicit = descriptor.name if descriptor.owner is model else None
    name = explicit or f"{model._meta.label}.{attribute}"
    existing = _by_name.get(name)
    if existing is not None and (existing.model._meta.label, existing.attribute) != (
        model._meta.label,
        attribute,
    ):
        raise RegistrationError(
            f"Two async methods share the registry name {name!r}: "
            f"{existing.model._meta.label}.{existing.attribute} and {model._meta.label}.{attribute}. "
            "Give one of them a different name= in @async_method(...)."
        )
    entry = RegisteredMethod(
        name=name,
        model=model,
        attribute=attribute,
        function=descriptor.function,
        signature=inspect.signature(descriptor.function),
        options=descriptor.options,
    )
    if existing is not None:
        _by_model_attribute.pop((existing.model, existing.attribute), None)
    _by_name[name] = entry
    _by_model_attribute[(model, attribute)] = entry
    return entry


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (for tests that define throwaway models)."""
    entry = _by_name.pop(name, None)
    if entry is not None:
        _by_model_attribute.pop((entry.model, entry.attribute), None)


def _register_prepared_model(sender: type[models.Model], **kwargs: Any) -> None:
    from .decorator import AsyncMethod

    seen: set[str] = set()
    for klass in sender.__mro__:
        for attribute, value in vars(klass).items():
            if attribute in seen:
                continue
            seen.add(attribute)
            if isinstance(value, AsyncMethod):
                register(sender, attribute, value)


class_prepared.connect(_register_prepared_model, dispatch_uid="asyncmodels.registry")
