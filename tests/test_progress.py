"""Progress bars of the long-running commands: drawn on a terminal, silent in CI and pipes."""

from __future__ import annotations

import datetime
import io
import sys
from io import StringIO

import pytest
from django.core.management import call_command

from asyncmodels.management.progress import progress_bar, progress_enabled

from .seeded_calls import make_call


class Terminal(io.StringIO):
    """A captured stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_no_bar_unless_both_streams_are_terminals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", StringIO())
    assert not progress_enabled(Terminal())
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not progress_enabled(StringIO())
    assert progress_enabled(Terminal())


def test_the_bar_is_drawn_on_stderr_and_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    with progress_bar(Terminal(), total=10, unit="call", desc="pruning") as advance:
        advance(4)
        advance(6)
    assert "pruning" in stderr.getvalue()
    assert "10/10" in stderr.getvalue()


@pytest.mark.django_db(transaction=True)
def test_prune_is_quiet_when_not_on_a_terminal_and_shows_a_bar_on_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for _ in range(3):
        make_call("succeeded", age=datetime.timedelta(days=10))
    stderr = Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    out = StringIO()
    call_command("asyncmodels_prune", "--succeeded", "7d", "--batch-size", "2", stdout=out)
    assert stderr.getvalue() == ""
    assert (
        out.getvalue()
        == "Prune on 'default' (succeeded older than 7d): deleted 3 call(s) in 2 batch(es): succeeded 3.\n"
    )
    for _ in range(3):
        make_call("succeeded", age=datetime.timedelta(days=10))
    call_command("asyncmodels_prune", "--succeeded", "7d", "--batch-size", "2", stdout=Terminal())
    assert "pruning" in stderr.getvalue() and "3/3" in stderr.getvalue()
