"""asyncmodels.exceptions: every error type name the library records imports as its class."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from django.utils.module_loading import import_string

import asyncmodels
from asyncmodels import exceptions

LIBRARY = Path(asyncmodels.__file__).resolve().parent

#: A dotted name of a class of asyncmodels ("asyncmodels.WorkerLost",
#: "asyncmodels.exceptions.CallCancelledError"), not a check id ("asyncmodels.E004").
RECORDED_NAME = re.compile(r"asyncmodels(?:\.[a-z_]+)*\.(?![EW]\d{3}$)[A-Z]\w*")


def recorded_error_names() -> set[str]:
    """Every string literal of the library's code that is the dotted name of one of its classes:
    the error types it writes on rows (``error_type``, a task attempt's ``exception_class_path``)."""
    names = set()
    for path in LIBRARY.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            value = node.value if isinstance(node, ast.Constant) else None
            if isinstance(value, str) and RECORDED_NAME.fullmatch(value):
                names.add(value)
    return names


def test_the_walk_finds_the_names_the_library_writes() -> None:
    names = recorded_error_names()
    assert {
        "asyncmodels.WorkerLost",
        "asyncmodels.UnknownQueue",
        "asyncmodels.ObjectDoesNotExist",
        "asyncmodels.TasksUnavailable",
        "asyncmodels.ArgumentsUnavailable",
        "asyncmodels.TaskNotFound",
    } <= names


@pytest.mark.parametrize("name", sorted(recorded_error_names()))
def test_every_recorded_error_type_imports_as_an_exception_class(name: str) -> None:
    found = import_string(name)  # what TaskError.exception_class does
    assert isinstance(found, type)
    assert issubclass(found, exceptions.AsyncModelsError)


def test_a_recorded_object_does_not_exist_is_also_djangos() -> None:
    from django.core.exceptions import ObjectDoesNotExist

    assert issubclass(asyncmodels.ObjectDoesNotExist, ObjectDoesNotExist)
    assert issubclass(asyncmodels.WorkerLost, asyncmodels.RecordedError)
