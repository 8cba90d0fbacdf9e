"""Durable, model-backed async method calls for Django, run by RQ workers.

``from asyncmodels import async_method`` is the public entry point; ``MethodCall`` lives in
``asyncmodels.models`` (import it from there, after Django has set up its apps).
"""

from __future__ import annotations

from .context import current_call
from .decorator import async_method
from .dependencies import result_of

# The reasons asyncmodels records as "asyncmodels.<Name>" (MethodCall.error_type, a task's
# TaskError.exception_class_path) import from here as their classes.
from .exceptions import (
    ArgumentsUnavailable,
    CallCancelledError,
    ContentTypeMismatch,
    InvalidObjectId,
    MethodNotRegistered,
    ObjectDoesNotExist,
    RecordedError,
    RowUnreadable,
    TaskBackendUnknown,
    TaskNotFound,
    TasksUnavailable,
    UnknownQueue,
    WorkerLost,
)

__all__ = [
    "ArgumentsUnavailable",
    "CallCancelledError",
    "ContentTypeMismatch",
    "InvalidObjectId",
    "MethodNotRegistered",
    "ObjectDoesNotExist",
    "RecordedError",
    "RowUnreadable",
    "TaskBackendUnknown",
    "TaskNotFound",
    "TasksUnavailable",
    "UnknownQueue",
    "WorkerLost",
    "async_method",
    "current_call",
    "result_of",
]
__version__ = "0.1.0"
