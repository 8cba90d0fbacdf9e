"""The figures of the admin's overview page: what is queued, what is stuck, what failed lately.

Every figure is one indexed query on a table of any size: unfinished states are read through the
``(state, -id)`` index and the per-state partial indexes (they hold few rows); finished calls only
for the last day, through the ``created_at`` index. All-time totals of finished calls are not
shown: counting millions of rows on each page view is what this page must not do.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pygal
from django.db.models import Count, Q, QuerySet
from django.db.models.functions import TruncHour
from django.utils import timezone
from django.utils.timesince import timesince
from pygal.style import Style

from .models import FINISHED_ORDER, UNFINISHED_ORDER, CallState, MethodCall

#: How far back the finished counts and the hourly chart look.
WINDOW = datetime.timedelta(hours=24)
#: A scheduled call this late past its run_after is overdue (recovery pushes due calls every
#: RECOVERY_INTERVAL_SECONDS, 10 s by default).
OVERDUE_AFTER = datetime.timedelta(minutes=1)


@dataclass
class Cell:
    """One figure and the filtered call list it links to."""

    count: int
    url: str


@dataclass
class Attention:
    """One "needs attention" line: a call (or none) with its page, or a count with its list."""

    label: str
    call: MethodCall | None = None
    detail: str = ""
    url: str = ""
    count: int | None = None


@dataclass
class Overview:
    """Everything the overview template shows."""

    states: list[str]
    rows: list[tuple[str, list[Cell]]]
    totals: list[Cell]
    attention: list[Attention]
    hours: list[tuple[datetime.datetime, Cell, Cell]] = field(default_factory=list)
    chart_svg: str = ""

    @property
    def hours_newest_first(self) -> list[tuple[datetime.datetime, Cell, Cell]]:
        """``hours`` in reverse order, for the table under the chart."""
        return self.hours[::-1]


def _hour_key(moment: datetime.datetime) -> str:
    return timezone.localtime(moment).strftime("%Y-%m-%dT%H:00")


def build_overview(queryset: QuerySet[MethodCall], site_name: str = "admin") -> Overview:
    """Read the overview's figures from ``queryset`` (the admin's, so its database and scoping).

    Links point into admin site ``site_name``.
    """
    from .admin import ATTENTION_OVERDUE, LEASE_EXPIRED, call_url, calls_url

    database = queryset.db

    def link(**filters: str) -> str:
        return calls_url(database, site_name, **filters)

    now = timezone.now()
    # The window starts on a local hour boundary (zones may be 30 or 45 minutes off UTC), 24
    # hours back from the start of the current local hour.
    this_hour = timezone.localtime(now).replace(minute=0, second=0, microsecond=0)
    since = this_hour.astimezone(datetime.UTC) - WINDOW + datetime.timedelta(hours=1)
    counts: dict[tuple[str, str], int] = {}
    for selection in (
        queryset.filter(state__in=UNFINISHED_ORDER),
        queryset.filter(state__in=FINISHED_ORDER, created_at__gte=now - WINDOW),
    ):
        for row in selection.values("queue", "state").annotate(n=Count("id")).order_by():
            counts[(row["queue"], row["state"])] = row["n"]

    states = [str(state) for state in (*UNFINISHED_ORDER, *FINISHED_ORDER)]
    finished = {str(state) for state in FINISHED_ORDER}

    def cell(count: int, state: str, queue: str | None = None) -> Cell:
        filters = {"state__exact": state}
        if queue is not None:
            filters["queue"] = queue
        if state in finished:
            filters["created"] = "24h"
        return Cell(count, link(**filters))

    queues = sorted({queue for queue, _state in counts})
    rows = [
        (queue, [cell(counts.get((queue, state), 0), state, queue) for state in states]) for queue in queues
    ]
    totals = [cell(sum(n for (_q, s), n in counts.items() if s == state), state) for state in states]

    def oldest(label: str, state: str, order: str, verb: str) -> Attention:
        call = queryset.filter(state=state).order_by(order).first()
        if call is None:
            return Attention(label)
        moment = getattr(call, order)
        detail = f"{verb} {timesince(moment)} ago" if moment else ""
        if state == CallState.RUNNING:
            detail = f"on {call.worker or 'an unknown worker'}, {detail}"
        return Attention(label, call, detail, call_url(call, site_name))

    overdue_since = now - OVERDUE_AFTER
    attention = [
        oldest("Oldest pending (committed, not pushed yet)", CallState.PENDING, "created_at", "created"),
        oldest(
            "Oldest enqueued (pushed, not claimed by a worker yet)",
            CallState.ENQUEUED,
            "enqueued_at",
            "enqueued",
        ),
        oldest("Longest running", CallState.RUNNING, "started_at", "started"),
        Attention(
            "Running calls whose lease expired (worker presumed lost; recovery ends their attempt)",
            url=link(attention=LEASE_EXPIRED),
            count=queryset.filter(state=CallState.RUNNING, lease_expires_at__lt=now).count(),
        ),
        Attention(
            "Scheduled calls overdue by more than a minute (is a worker or asyncmodels_recover running?)",
            url=link(attention=ATTENTION_OVERDUE),
            count=queryset.filter(state=CallState.SCHEDULED, run_after__lt=overdue_since).count(),
        ),
    ]
    hours = _hourly(queryset, since, link)
    return Overview(states, rows, totals, attention, hours, render_chart(hours))


def _hourly(
    queryset: QuerySet[MethodCall], since: datetime.datetime, link: Callable[..., str]
) -> list[tuple[datetime.datetime, Cell, Cell]]:
    """Calls created per hour over the window, and how many of them failed; one entry per hour."""
    per_hour: dict[str, tuple[int, int]] = {}
    for row in (
        queryset.filter(created_at__gte=since)
        .annotate(hour=TruncHour("created_at"))
        .values("hour")
        .annotate(calls=Count("id"), failures=Count("id", filter=Q(state=CallState.FAILED)))
        .order_by()
    ):
        key = _hour_key(row["hour"])
        calls, failures = per_hour.get(key, (0, 0))  # two UTC hours may share a local label (DST)
        per_hour[key] = (calls + row["calls"], failures + row["failures"])
    hours = []
    for offset in range(int(WINDOW / datetime.timedelta(hours=1))):
        start = since + datetime.timedelta(hours=offset)
        key = _hour_key(start)
        # pop: when a clock is set back (DST), two hours share a local label; count them once.
        calls, failures = per_hour.pop(key, (0, 0))
        hours.append(
            (
                start,
                Cell(calls, link(created=key)),
                Cell(failures, link(created=key, state__exact=CallState.FAILED)),
            )
        )
    return hours


def _without_scripts(root: Any) -> Any:
    """A pygal XML filter: remove every ``<script>`` element from the rendered tree."""
    for parent in list(root.iter()):
        for child in list(parent):
            if str(child.tag).rpartition("}")[2] == "script":
                parent.remove(child)
    return root


def render_chart(hours: list[tuple[datetime.datetime, Cell, Cell]]) -> str:
    """The calls and failures per hour as an inline SVG bar chart, each bar linked to its calls.

    Rendered by pygal on the server. Its default config loads a tooltip script from a CDN:
    ``js=[]`` turns that off, so the page loads nothing from the internet, and an XML filter
    drops the inline config script pygal writes for that tooltip script: the chart is plain SVG.
    """
    # Text and guide lines take the admin's own colours (CSS variables), so the chart stays
    # readable in the admin's dark theme too.
    style = Style(
        background="transparent",
        plot_background="transparent",
        foreground="var(--body-fg, #333)",
        foreground_strong="var(--body-fg, #333)",
        foreground_subtle="var(--body-quiet-color, #888)",
        colors=("#417690", "#ba2121"),
        font_family="system-ui, sans-serif",
        label_font_size=11,
        major_label_font_size=11,
        legend_font_size=12,
    )
    chart = pygal.Bar(
        js=[],
        disable_xml_declaration=True,
        width=960,
        height=300,
        explicit_size=True,
        style=style,
        x_label_rotation=-45,
        legend_at_bottom=True,
        show_y_guides=True,
        print_values=False,
        title=None,
        margin=10,
        margin_top=20,
    )
    chart.x_labels = [timezone.localtime(start).strftime("%H:00") for start, _calls, _failed in hours]

    def bars(cells: list[Cell]) -> list[dict[str, Any]]:
        return [{"value": c.count, "xlink": {"href": c.url, "target": "_self"}} for c in cells]

    chart.add_xml_filter(_without_scripts)
    chart.add("calls created", bars([calls for _start, calls, _failed in hours]))
    chart.add("of which failed", bars([failed for _start, _calls, failed in hours]))
    return str(chart.render(is_unicode=True))
