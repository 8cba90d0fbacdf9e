"""The call whose method is running now: ``asyncmodels.current_call()``.

The job sets it around the method (in the worker's thread, or the caller's with the immediate
backend) and resets it afterwards, so nested calls each see their own. A ``contextvars``
variable, so threads and asyncio tasks keep theirs apart.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import MethodCall

_current: contextvars.ContextVar[MethodCall | None] = contextvars.ContextVar(
    "asyncmodels_current_call", default=None
)


def current_call() -> MethodCall | None:
    """The ``MethodCall`` whose method is running in this context, or ``None`` outside one.

    Inside a method: ``current_call().pk``, ``.attempts`` (this attempt's number, from 1), and
    ``.raise_if_cancel_requested()`` at safe points, to stop when someone asked it to.
    """
    return _current.get()


@contextmanager
def running(call: MethodCall) -> Iterator[None]:
    """Make ``call`` the current call for the ``with`` block (used by the job)."""
    token = _current.set(call)
    try:
        yield
    finally:
        _current.reset(token)
