"""Exceptions raised by asyncmodels.

Errors a caller can make are raised at call time, before anything is written (README,
Guarantees: 5). Wiring mistakes found at import time subclass Django's ``ImproperlyConfigured``.

The ``RecordedError`` classes below are the reasons asyncmodels itself records on a call that
ended without its code raising (``MethodCall.error_type`` ``"asyncmodels.<Name>"``, and a task's
``TaskError.exception_class_path``): each such name imports as its class, from ``asyncmodels``.
"""

from __future__ import annotations

from django.core import exceptions as django_exceptions
from django.core.exceptions import ImproperlyConfigured


class AsyncModelsError(Exception):
    """Base class of every asyncmodels exception; catch it, do not raise it directly."""


class CallError(AsyncModelsError):
    """A call was refused at call time; no row was written and nothing was enqueued."""


class UnsavedInstanceError(CallError):
    """The instance has no primary key in the database yet, so a worker could not reload it."""


class InvalidArgumentsError(CallError, TypeError):
    """The arguments do not bind to the decorated method's signature."""


class UnsupportedArgumentError(CallError, TypeError):
    """An argument holds a value of a type that cannot be stored in the typed JSON encoding."""


class UnknownQueueError(CallError, ValueError):
    """The queue named for the call is not a key of the ``RQ_QUEUES`` setting."""


class InvalidOptionError(CallError, TypeError):
    """``using()`` was given an option name or value that the decorator does not accept."""


class EncodingError(AsyncModelsError, TypeError):
    """A value cannot be stored in the typed JSON encoding (see ``asyncmodels.serialization``)."""


class DecodingError(AsyncModelsError, ValueError):
    """A stored value could not be turned back into Python (corrupt row or a referenced row is gone)."""


class RegistrationError(AsyncModelsError, ImproperlyConfigured):
    """``@async_method`` was used where it cannot work: outside a model, or a registry name twice."""


class CallCancelledError(AsyncModelsError):
    """Raised by ``MethodCall.raise_if_cancel_requested()`` inside a running method that was asked
    to stop; the attempt then ends, and the call ends ``cancelled`` without a retry."""


class ConfigurationError(AsyncModelsError, ImproperlyConfigured):
    """The ``ASYNCMODELS`` setting holds an unknown key or value."""


class InvalidTagError(CallError, TypeError):
    """A tag (``@async_method(tags=...)`` or a ``tagged()`` lookup) is not a saved model instance
    or a non-empty string, or the ``tags=`` callable raised."""


class InvalidDependencyError(CallError, ValueError):
    """``using(after=...)`` named something that cannot be waited for: not a saved ``MethodCall``,
    a call on another database, or an unknown call."""


class DuplicateCallError(AsyncModelsError):
    """``MethodCall.retry()`` of a ``unique`` call while another unfinished call holds its key."""


class SelectionTooLargeError(AsyncModelsError, ValueError):
    """A bulk action (``asyncmodels.bulk_retry``) selected more calls than its limit; it acted on none."""


class RecordedError(AsyncModelsError):
    """Base class of the reasons asyncmodels records on a call it ended without the call's code
    raising (``error_type`` ``"asyncmodels.<Name>"``). asyncmodels writes them, it never raises
    them: they exist so that a recorded name imports (``TaskError.exception_class``)."""


class WorkerLost(RecordedError):
    """The worker running an attempt was lost: its lease expired without being renewed (a killed
    or frozen worker), so recovery retried the call or failed it."""


class UnknownQueue(RecordedError):
    """The call's queue is no longer a key of ``RQ_QUEUES``: recovery failed it instead of
    pushing it for ever."""


class RowUnreadable(RecordedError):
    """The call's row could not be loaded (corrupt or forged values); nothing was run."""


class MethodNotRegistered(RecordedError):
    """No ``@async_method`` is registered under the row's method name; nothing was run."""


class ContentTypeMismatch(RecordedError):
    """The row's content type is not the model of its registered method; nothing was run."""


class ObjectDoesNotExist(RecordedError, django_exceptions.ObjectDoesNotExist):
    """The call's object was deleted before the call ran; nothing was run (never retried)."""


class InvalidObjectId(RecordedError):
    """The stored object id is not a valid, canonical primary key of the model; nothing was run."""


class ArgumentsUnavailable(RecordedError):
    """The stored arguments no longer decode (a referenced row is gone, a corrupt value);
    nothing was run."""


class TasksUnavailable(RecordedError):
    """A task call reached a worker where no tasks framework (Django 6's ``django.tasks``, the
    django-tasks backport) is installed; nothing was run."""


class TaskBackendUnknown(RecordedError):
    """A task call's ``TASKS`` alias is gone, or no longer asyncmodels' backend; nothing was run."""


class TaskNotFound(RecordedError):
    """A task call's dotted path no longer imports as a ``Task`` (only ``Task`` objects are ever
    run from a row); nothing was run."""
