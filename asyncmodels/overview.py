"""The figures of the admin's overview page: what is queued, what is stuck, what failed lately.

Every figure is one indexed query on a table of any size: unfinished states are read through the
``(state, -id)`` index and the per-state partial indexes (they hold few rows); finished calls only
for the last day, through the ``created_at`` index. All-time totals of finished calls are not
shown: counting millions of rows on each page view is what this page must not do.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

import pygal
from django.db.models import Count, Q, QuerySet
from django.db.models.functions import TruncHour
from django.utils import timezone
from pygal.style import Style

from .models import CallState, MethodCall

#: How far back the finished counts and the hourly chart look.
WINDOW = datetime.timedelta(hours=24)
UNFINISHED_ORDER = (
    CallState.PENDING,
    CallState.SCHEDULED,
    CallState.WAITING,
    CallState.ENQUEUED,
    CallState.RUNNING,
)
FINISHED_ORDER = (CallState.SUCCEEDED, CallState.FAILED, CallState.CANCELLED)


@dataclass
class Cell:
    """One figure and the filtered call list it links to."""

    count: int
    url: str


@dataclass
class Overview:
    """Everything the overview template shows."""

    since: datetime.datetime
    states: list[str]
    rows: list[tuple[str, list[Cell]]]
    totals: list[Cell]
    oldest_pending: MethodCall | None
    oldest_enqueued: MethodCall | None
    longest_running: MethodCall | None
    expired_leases: Cell
    overdue: Cell
    hours: list[tuple[datetime.datetime, Cell, Cell]] = field(default_factory=list)
    chart_svg: str = ""

    @property
    def hours_newest_first(self) -> list[tuple[datetime.datetime, Cell, Cell]]:
        return self.hours[::-1]


def _list_url(database: str, **filters: str) -> str:
    from .admin import calls_url

    return calls_url(database, **filters)


def _hour_key(moment: datetime.datetime) -> str:
    return timezone.localtime(moment).strftime("%Y-%m-%dT%H:00")


def build_overview(queryset: QuerySet[MethodCall]) -> Overview:
    """Read the overview's figures from ``queryset`` (the admin's, so its database and scoping)."""
    database = queryset.db
    now = timezone.now()
    # The window starts on a local hour boundary (zones may be 30 or 45 minutes off UTC), 24
    # hours back from the start of the current local hour.
    this_hour = timezone.localtime(now).replace(minute=0, second=0, microsecond=0)
    since = this_hour.astimezone(datetime.UTC) - WINDOW + datetime.timedelta(hours=1)
    counts: dict[tuple[str, str], int] = {}
    for row in (
        queryset.filter(state__in=UNFINISHED_ORDER)
        .values("queue", "state")
        .annotate(n=Count("id"))
        .order_by()
    ):
        counts[(row["queue"], row["state"])] = row["n"]
    for row in (
        queryset.filter(state__in=FINISHED_ORDER, created_at__gte=now - WINDOW)
        .values("queue", "state")
        .annotate(n=Count("id"))
        .order_by()
    ):
        counts[(row["queue"], row["state"])] = row["n"]

    states = [str(state) for state in (*UNFINISHED_ORDER, *FINISHED_ORDER)]
    finished = {str(state) for state in FINISHED_ORDER}

    def cell(count: int, state: str, queue: str | None = None) -> Cell:
        filters = {"state__exact": state}
        if queue is not None:
            filters["queue"] = queue
        if state in finished:
            filters["created"] = "24h"
        return Cell(count, _list_url(database, **filters))

    queues = sorted({queue for queue, _state in counts})
    rows = [
        (queue, [cell(counts.get((queue, state), 0), state, queue) for state in states]) for queue in queues
    ]
    totals = [cell(sum(n for (_q, s), n in counts.items() if s == state), state) for state in states]

    overview = Overview(
        since=since,
        states=states,
        rows=rows,
        totals=totals,
        oldest_pending=queryset.filter(state=CallState.PENDING).order_by("created_at").first(),
        oldest_enqueued=queryset.filter(state=CallState.ENQUEUED).order_by("enqueued_at").first(),
        longest_running=queryset.filter(state=CallState.RUNNING).order_by("started_at").first(),
        expired_leases=Cell(
            queryset.filter(state=CallState.RUNNING, lease_expires_at__lt=now).count(),
            _list_url(database, state__exact=CallState.RUNNING),
        ),
        overdue=Cell(
            queryset.filter(
                state=CallState.SCHEDULED, run_after__lt=now - datetime.timedelta(minutes=1)
            ).count(),
            _list_url(database, state__exact=CallState.SCHEDULED),
        ),
    )
    overview.hours = _hourly(queryset, since)
    overview.chart_svg = render_chart(overview.hours)
    return overview


def _hourly(
    queryset: QuerySet[MethodCall], since: datetime.datetime
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
                Cell(calls, _list_url(queryset.db, created=key)),
                Cell(failures, _list_url(queryset.db, created=key, state__exact=CallState.FAILED)),
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
