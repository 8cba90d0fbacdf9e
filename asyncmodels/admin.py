"""The admin: every call and its fate, per object too; safe retry and cancel; an overview.

``MethodCallAdmin`` is read-only (nobody edits a call by hand). Its only writes are the retry and
cancel actions, each a compare-and-set on the row (``MethodCall.retry()``, ``MethodCall.cancel()``)
behind its own permission, ``asyncmodels.retry_methodcall`` and ``asyncmodels.cancel_methodcall``.
The list stays cheap on a table of millions of rows: filters take their choices from settings and
the registry (no ``SELECT DISTINCT``), the row count is bounded (``BoundedCountPaginator``), and
each filter has an index that serves it in ``-id`` order.

``MethodCallsAdminMixin`` puts an object's calls on its own change page (its own calls and the
calls tagged with it): ``class InstanceAdmin(MethodCallsAdminMixin, admin.ModelAdmin): ...``.

The call page also shows a call's tags (each linked to the list filtered by it), its unique and
exclusive keys, its progress, the calls it runs after and those that follow it, and, for a call
in a workflow, every connected call in order of its steps (a walk bounded in calls and queries).
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.admin.utils import quote, unquote
from django.contrib.admin.views.main import ChangeList
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import DEFAULT_DB_ALIAS
from django.db.models import Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, QueryDict
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.text import capfirst
from django.views.decorators.http import require_POST

from . import conf, registry
from .exceptions import InvalidTagError, UnknownQueueError
from .models import (
    TERMINAL_STATES,
    CallState,
    MethodCall,
    MethodCallDependency,
    MethodCallQuerySet,
    MethodCallTag,
)
from .overview import OVERDUE_AFTER
from .tags import tag_for

if TYPE_CHECKING:
    from django.db.models import Model

    MethodCallAdminBase = admin.ModelAdmin[MethodCall]
    MixinBase = admin.ModelAdmin[Any]
else:  # ModelAdmin is generic only in django-stubs
    MethodCallAdminBase = admin.ModelAdmin
    MixinBase = object

#: Longer durations are shown in seconds rather than as a timedelta (which would overflow).
MAX_SHOWN_SECONDS = 1e9
#: The query parameter that picks the database whose calls the admin shows (default: ``default``).
DATABASE_PARAM = "db"
ADMIN_CSS = "asyncmodels/admin.css"


def state_badge(state: str) -> SafeString:
    """A call's state as a coloured badge (the colours are in ``asyncmodels/admin.css``)."""
    return format_html('<span class="asyncmodels-state asyncmodels-state-{}">{}</span>', state, state)


def displayable(text: str) -> str:
    """``text`` as a page can send it: lone surrogates (only forged or legacy rows hold them,
    the encoder refuses them) become backslash escapes instead of failing the response."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _pretty_json(value: Any) -> SafeString:
    return format_html(
        '<pre class="asyncmodels-json">{}</pre>',
        displayable(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)),
    )


TIME_FORMAT = "%Y-%m-%d %H:%M:%S %Z"


def _format_time(value: datetime.datetime | None) -> str:
    if value is None:
        return "-"
    try:
        return timezone.localtime(value).strftime(TIME_FORMAT)
    except (OverflowError, ValueError):  # near datetime's limits, in a zone east of UTC
        return value.isoformat()


def _short_time(value: datetime.datetime | None) -> SafeString | str:
    """A list cell: the time for today, else the day and minute; the full timestamp on hover."""
    if value is None:
        return "-"
    try:
        local = timezone.localtime(value)
    except (OverflowError, ValueError):
        return value.isoformat()
    today = local.date() == timezone.localdate()
    return format_html(
        '<time datetime="{}" title="{}">{}</time>',
        value.isoformat(),
        local.strftime(TIME_FORMAT),
        local.strftime("%H:%M:%S" if today else "%b %d %H:%M"),
    )


def _format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds >= MAX_SHOWN_SECONDS:
        return f"{seconds:.3g} s"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return str(datetime.timedelta(seconds=round(seconds)))


def _first_line(text: str, limit: int = 120) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def database_query(database: str) -> dict[str, str]:
    """The list's query parameters that select ``database``: none for ``default``, else ``db``."""
    return {} if database == DEFAULT_DB_ALIAS else {DATABASE_PARAM: database}


def calls_url(database: str = DEFAULT_DB_ALIAS, site_name: str = "admin", **filters: str) -> str:
    """The call list's URL on admin site ``site_name``, with ``filters`` (its query parameters).

    Calls on another database than ``default`` are listed with ``?db=<alias>``. Raises
    ``NoReverseMatch`` if ``MethodCall`` is not registered on that site.
    """
    filters = {**database_query(database), **filters}
    url = reverse(f"{site_name}:asyncmodels_methodcall_changelist")
    return f"{url}?{urlencode(filters)}" if filters else url


def call_url(call: MethodCall, site_name: str = "admin") -> str:
    """The call page of ``call`` on admin site ``site_name``, on the database it was read from.

    The database travels as a preserved list filter (``?_changelist_filters=db%3D<alias>``), so
    the page's breadcrumbs, History link and buttons stay on it too. Raises ``NoReverseMatch``
    if ``MethodCall`` is not registered on that site.
    """
    return _call_page_url(call.pk, call._state.db or DEFAULT_DB_ALIAS, site_name)


def _call_page_url(pk: int, database: str, site_name: str) -> str:
    url = reverse(f"{site_name}:asyncmodels_methodcall_change", args=[quote(pk)])
    query = database_query(database)
    return f"{url}?{urlencode({'_changelist_filters': urlencode(query)})}" if query else url


def call_databases() -> list[str]:
    """The database aliases that may hold calls (those the routers let asyncmodels migrate on)."""
    from .recovery import recovery_databases

    return recovery_databases()


def object_filter_value(obj: Model) -> str:
    """The call list's ``object`` filter value for ``obj``: ``"<content type id>:<primary key>"``."""
    content_type = ContentType.objects.db_manager(obj._state.db).get_for_model(obj)
    return f"{content_type.pk}:{obj.pk}"


def _object_link(admin_site: admin.AdminSite, call: MethodCall) -> SafeString | str:
    """The call's object as "Model <pk>", linked to the object's admin page when it has one; for a
    task of Django's tasks framework (no object), "task" and its ``TASKS`` alias."""
    if call.content_type_id is None:
        return format_html('<span class="asyncmodels-quiet">task · {}</span>', call.task_backend)
    content_type = ContentType.objects.db_manager(call._state.db).get_for_id(call.content_type_id)
    model = content_type.model_class()
    if model is None:
        return f"{content_type.app_label}.{content_type.model} {call.object_id}"
    label = f"{capfirst(model._meta.verbose_name)} {call.object_id}"
    database = call._state.db or DEFAULT_DB_ALIAS
    if database != DEFAULT_DB_ALIAS:
        return f"{label} (on {database})"  # a ModelAdmin page would show the default database's row
    if not admin_site.is_registered(model):
        return label
    try:
        url = reverse(
            f"{admin_site.name}:{content_type.app_label}_{content_type.model}_change",
            args=[quote(call.object_id)],
        )
    except NoReverseMatch:
        return label
    return format_html('<a href="{}">{}</a>', url, label)


#: The call page lists at most this many calls under "Runs after", and as many under "Followed by".
NEIGHBOURS_SHOWN = 50
#: The call page's workflow section: at most this many calls, found in at most this many rounds
#: (one query each) from the call outwards, reading at most this many dependency rows per round.
WORKFLOW_MAX_CALLS = 200
WORKFLOW_MAX_ROUNDS = 20
WORKFLOW_MAX_EDGES = 2000
#: The call page shows at most this many of a call's tags (a call made by the library has at most 50).
TAGS_SHOWN = 100

Neighbour = tuple[int, str, str]  # a call's id, method and state


@dataclass
class Workflow:
    """The calls connected to one call by dependencies, each with its step (its topological level:
    1 + the highest step among the calls it waits for)."""

    calls: list[MethodCall]
    steps: dict[int, int]
    waits_for: dict[int, list[int]]
    truncated: bool = False
    cyclic: bool = False


@dataclass
class CallLinks:
    """What the call page shows of a call's dependencies; read once per page (``call_links()``)."""

    runs_after: list[Neighbour]
    runs_after_total: int
    followed_by: list[Neighbour]
    followed_by_total: int
    workflow: Workflow | None = None


def call_links(call: MethodCall) -> CallLinks:
    """The calls ``call`` waits for and the calls waiting for it (at most ``NEIGHBOURS_SHOWN`` of
    each, with their totals): two queries, once per call object."""
    cached = getattr(call, "_asyncmodels_links", None)
    if isinstance(cached, CallLinks):
        return cached
    dependencies = MethodCallDependency._default_manager.using(call._state.db)
    runs_after = list(
        dependencies.filter(call=call.pk)
        .order_by("depends_on_id")
        .values_list("depends_on_id", "depends_on__method", "depends_on__state")[: NEIGHBOURS_SHOWN + 1]
    )
    followed_by = list(
        dependencies.filter(depends_on=call.pk)
        .order_by("call_id")
        .values_list("call_id", "call__method", "call__state")[: NEIGHBOURS_SHOWN + 1]
    )
    links = CallLinks(
        runs_after=runs_after[:NEIGHBOURS_SHOWN],
        runs_after_total=len(runs_after),
        followed_by=followed_by[:NEIGHBOURS_SHOWN],
        followed_by_total=len(followed_by),
    )
    # Past the limit, count them all (a call waits for at most 1,000 calls: a bounded count).
    if len(runs_after) > NEIGHBOURS_SHOWN:
        links.runs_after_total = dependencies.filter(call=call.pk).count()
    if len(followed_by) > NEIGHBOURS_SHOWN:
        links.followed_by_total = dependencies.filter(depends_on=call.pk).count()
    call._asyncmodels_links = links  # type: ignore[attr-defined]
    return links


def call_workflow(call: MethodCall) -> Workflow:
    """The group of calls connected to ``call`` by dependencies, in both directions.

    Bounded: at most ``WORKFLOW_MAX_CALLS`` calls, found in at most ``WORKFLOW_MAX_ROUNDS``
    rounds of one query each (the dependency rows of the calls found in the previous round, at
    most ``WORKFLOW_MAX_EDGES`` of them), then one query for the calls' rows. A larger group is
    cut (``truncated``). Forged rows may form a cycle (the library cannot): its calls get a step
    after all the others (``cyclic``).
    """
    links = call_links(call)
    if links.workflow is not None:
        return links.workflow
    database = call._state.db
    dependencies = MethodCallDependency._default_manager.using(database)
    nodes: set[int] = {call.pk}
    edges: set[tuple[int, int]] = set()  # (call, the call it waits for)
    for other, _method, _state in links.runs_after:
        nodes.add(other)
        edges.add((call.pk, other))
    for other, _method, _state in links.followed_by:
        nodes.add(other)
        edges.add((other, call.pk))
    complete = links.runs_after_total <= NEIGHBOURS_SHOWN and links.followed_by_total <= NEIGHBOURS_SHOWN
    frontier = (nodes - {call.pk}) if complete else set(nodes)
    truncated = False
    rounds = 0
    while frontier:
        if rounds >= WORKFLOW_MAX_ROUNDS:
            truncated = True
            break
        rounds += 1
        batch = sorted(frontier)
        rows = list(
            dependencies.filter(Q(call__in=batch) | Q(depends_on__in=batch))
            .order_by("id")
            .values_list("call_id", "depends_on_id")[: WORKFLOW_MAX_EDGES + 1]
        )
        if len(rows) > WORKFLOW_MAX_EDGES:
            truncated = True
            rows = rows[:WORKFLOW_MAX_EDGES]
        found: set[int] = set()
        for waiting, waited_for in rows:
            for node in (waiting, waited_for):
                if node in nodes:
                    continue
                if len(nodes) >= WORKFLOW_MAX_CALLS:
                    truncated = True
                    continue
                nodes.add(node)
                found.add(node)
            if waiting in nodes and waited_for in nodes:
                edges.add((waiting, waited_for))
        frontier = found
    calls = {
        row.pk: row
        for row in MethodCall._default_manager.using(database)
        .filter(pk__in=sorted(nodes))
        .only(
            "id",
            "method",
            "state",
            "content_type_id",
            "object_id",
            "created_at",
            "started_at",
            "finished_at",
        )
    }
    waits_for: dict[int, list[int]] = {node: [] for node in calls}
    for waiting, waited_for in sorted(edges):
        if waiting in calls and waited_for in calls:
            waits_for[waiting].append(waited_for)
    steps, cyclic = _steps(waits_for)
    ordered = sorted(calls.values(), key=lambda row: (steps[row.pk], row.pk))
    links.workflow = Workflow(
        calls=ordered,
        steps=steps,
        waits_for=waits_for,
        truncated=truncated,
        cyclic=cyclic,
    )
    return links.workflow


def _steps(waits_for: dict[int, list[int]]) -> tuple[dict[int, int], bool]:
    """Each call's step: 1 for a call that waits for none of the others, else 1 + the highest
    step among those it waits for (Kahn's algorithm). Calls on a cycle (forged rows only) get the
    step after the last; the flag says there was one."""
    dependents: dict[int, list[int]] = {node: [] for node in waits_for}
    remaining: dict[int, int] = {}
    for node, earlier in waits_for.items():
        others = {other for other in earlier if other != node}
        remaining[node] = len(others)
        for other in others:
            dependents[other].append(node)
    steps: dict[int, int] = {}
    ready = sorted(node for node, count in remaining.items() if count == 0)
    while ready:
        node = ready.pop()
        steps[node] = 1 + max((steps[other] for other in waits_for[node] if other in steps), default=0)
        for later in dependents[node]:
            remaining[later] -= 1
            if remaining[later] == 0:
                ready.append(later)
    left = [node for node in waits_for if node not in steps]
    last = max(steps.values(), default=0)
    for node in left:
        steps[node] = last + 1
    cyclic = bool(left) or any(node in earlier for node, earlier in waits_for.items())
    return steps, cyclic


class MethodCallChangeList(ChangeList):
    """The call list; it sorts only by ``sortable_by``, so ``?o=`` can't ask for an unindexed
    sort of the whole table (Django's ``sortable_by`` alone only hides the header links).

    A query parameter holding a NUL character lists nothing: no column holds one, and PostgreSQL
    refuses it even in a query (``?queue=a%00b`` would otherwise fail with a 500).
    """

    def get_ordering_field(self, field_name: Any) -> Any:
        if self.sortable_by is not None and field_name not in self.sortable_by:
            return None
        return super().get_ordering_field(field_name)

    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet[Any]:
        queryset = super().get_queryset(request, exclude_parameters)  # lazy: nothing ran yet
        if any("\x00" in value for _key, values in request.GET.lists() for value in values):
            return queryset.none()
        return queryset


def _progress_bar(call: MethodCall) -> SafeString | str:
    """A running call's last reported progress, for the list: a small bar and its percentage,
    the message as its tooltip; nothing if the call reported no fraction."""
    fraction = call.progress
    if fraction is None or not math.isfinite(fraction):
        return ""
    percent = f"{min(max(fraction, 0.0), 1.0) * 100:.0f}"
    return format_html(
        '<span class="asyncmodels-list-progress" title="{}">'
        '<progress class="asyncmodels-progress" max="100" value="{}">{}%</progress> {}%</span>',
        displayable(call.progress_message),
        percent,
        percent,
        percent,
    )


class BoundedCountPaginator(Paginator):  # type: ignore[type-arg]
    """A paginator that counts at most ``limit`` rows, so no page view runs a full ``COUNT(*)``.

    ``count`` is ``SELECT COUNT(*) FROM (... LIMIT limit + 1)``: on a table of millions of calls
    it reads at most ``limit + 1`` index entries. When there are more, ``count`` is
    ``limit + 1``, ``is_bounded`` is ``True`` and the list says "more than <limit>"; pages past
    the limit are reached by narrowing the filters. The idea is the admin's own
    ``show_full_result_count = False``, carried over to the filtered count too.
    """

    limit = 1_000

    @cached_property
    def count(self) -> int:
        """The number of rows, or ``limit + 1`` if there are more than ``limit``."""
        return int(self.object_list[: self.limit + 1].count())  # type: ignore[attr-defined]

    @property
    def is_bounded(self) -> bool:
        """Whether there are more rows than ``limit`` (so ``count`` is not exact)."""
        return self.count > self.limit


class DatabaseFilter(admin.SimpleListFilter):
    """Which database's calls to list (``?db=<alias>``); shown only when there are several.

    The choice itself is applied in ``MethodCallAdmin.get_queryset()``, so that the call page,
    the actions and the overview read the same database as the list.
    """

    title = "database"
    parameter_name = DATABASE_PARAM

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        aliases = call_databases()
        return [(alias, alias) for alias in aliases] if len(aliases) > 1 or self.value() else []

    def choices(self, changelist: Any) -> Any:
        # Skip the first choice ("All", translated): calls are listed from one database at a time.
        for choice in itertools.islice(super().choices(changelist), 1, None):
            if self.value() is None and choice["display"] == DEFAULT_DB_ALIAS:
                choice["selected"] = True
            yield choice

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset


class QueueFilter(admin.SimpleListFilter):
    """Filter by queue; the choices are the queues in ``settings.RQ_QUEUES`` (no query)."""

    title = "queue"
    parameter_name = "queue"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        names = sorted(conf.get_rq_queue_names())
        if self.value() and self.value() not in names:
            names.append(str(self.value()))  # a removed queue still has calls to look at
        return [(name, name) for name in names]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(queue=self.value()) if self.value() else queryset


class MethodFilter(admin.SimpleListFilter):
    """Filter by method; the choices are the registered ``@async_method`` names (no query)."""

    title = "method"
    parameter_name = "method"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        names = sorted(entry.name for entry in registry.all_methods())
        if self.value() and self.value() not in names:
            names.append(str(self.value()))
        return [(name, name) for name in names]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(method=self.value()) if self.value() else queryset


class KindFilter(admin.SimpleListFilter):
    """Method calls (``@async_method``) or tasks (Django's tasks framework, no object)."""

    title = "kind"
    parameter_name = "kind"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("method", "method calls"), ("task", "tasks")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "task":
            return queryset.filter(content_type__isnull=True)
        if self.value() == "method":
            return queryset.filter(content_type__isnull=False)
        return queryset


class ModelFilter(admin.SimpleListFilter):
    """Filter by the object's model; the choices are the models with registered methods."""

    title = "model"
    parameter_name = "model"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        models = {entry.model for entry in registry.all_methods()}
        return sorted(
            ((model._meta.label_lower, str(capfirst(model._meta.verbose_name))) for model in models),
            key=lambda choice: choice[0],
        )

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if not value:
            return queryset
        app_label, _, model = str(value).partition(".")
        if "\x00" in value:  # PostgreSQL refuses it even in the content type lookup
            return queryset.none()
        try:  # from the content type cache: the filter is then on the indexed column, no join
            content_type = ContentType.objects.db_manager(queryset.db).get_by_natural_key(app_label, model)
        except ContentType.DoesNotExist:
            return queryset.none()
        return queryset.filter(content_type=content_type)


def _valid_tag(text: str) -> str | None:
    """``text`` if it is a tag that can be stored (and so looked up), else ``None``."""
    try:
        return tag_for(text)
    except InvalidTagError:
        return None


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def calls_about(
    queryset: QuerySet[MethodCall], content_type: ContentType | int, object_id: str
) -> QuerySet[MethodCall]:
    """``queryset``'s calls about one object, given by content type and primary key (as text): made
    on it, or tagged with it. ``MethodCall.objects.for_object()`` without loading the object (it
    may be gone): the ids come from a ``UNION`` of two index scans, as there.
    """
    content_type_id = content_type if isinstance(content_type, int) else content_type.pk
    own = (
        MethodCall._default_manager.using(queryset.db)
        .filter(content_type_id=content_type_id, object_id=object_id)
        .order_by()
        .values("id")
    )
    tag = None
    if isinstance(content_type, ContentType):  # the tag of a model instance: "<app_label.model>:<pk>"
        tag = _valid_tag(f"{content_type.app_label}.{content_type.model}:{object_id}")
    if tag is None:
        return queryset.filter(id__in=own)
    tagged = MethodCallTag._default_manager.using(queryset.db).filter(tag=tag).order_by().values("call_id")
    return queryset.filter(id__in=own.union(tagged))


class ObjectFilter(admin.SimpleListFilter):
    """The calls about one object (``?object=<content type id>:<pk>``), as linked from its page:
    its own calls and the calls tagged with it, as ``MethodCall.objects.for_object()`` finds them."""

    title = "object (own and tagged calls)"
    parameter_name = "object"

    def _parse(self) -> tuple[int, str] | None:
        content_type_id, _, object_id = str(self.value() or "").partition(":")
        if not (content_type_id.isascii() and content_type_id.isdigit()) or not 0 < len(object_id) <= 255:
            return None
        if int(content_type_id) > 2**31 - 1:  # no database holds such an id (or could bind it)
            return None
        if "\x00" in object_id:  # no column holds it (PostgreSQL refuses it even in a query)
            return None
        return int(content_type_id), object_id

    def _content_type(self, database: str, content_type_id: int) -> ContentType | None:
        try:  # content type ids differ between databases: look it up where the calls are
            return ContentType.objects.db_manager(database).get_for_id(content_type_id)
        except ContentType.DoesNotExist:
            return None

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        if self.value() is None:
            return []  # shown only while it filters
        parsed = self._parse()
        shown = _shorten(str(self.value()))
        if parsed is None:
            return [(str(self.value()), shown)]
        content_type = self._content_type(model_admin.database_for(request), parsed[0])
        if content_type is None:
            return [(str(self.value()), shown)]
        return [(str(self.value()), _shorten(f"{capfirst(content_type.name)} {parsed[1]}"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() is None:
            return queryset
        parsed = self._parse()
        if parsed is None:
            return queryset.none()
        content_type = self._content_type(queryset.db, parsed[0])
        return calls_about(queryset, content_type or parsed[0], parsed[1])


class TagFilter(admin.SimpleListFilter):
    """The calls carrying one tag (``?tag=cloud.account:7``, ``?tag=region:eu``), as
    ``MethodCall.objects.tagged()`` finds them (an indexed subquery on the tag table).

    The choices are the distinct tags among the latest ``recent_rows`` tag rows (one query that
    reads that many entries of the tag table's primary key, newest first), at most
    ``max_choices`` of them, and the value in use. A value that is no tag (empty, over 255
    characters, a NUL) lists nothing.
    """

    title = "tag"
    parameter_name = "tag"
    recent_rows = 200
    max_choices = 20

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        recent = (
            MethodCallTag._default_manager.using(model_admin.database_for(request))
            .order_by("-id")
            .values_list("tag", flat=True)[: self.recent_rows]
        )
        tags: set[str] = set()
        for tag in recent:
            if len(tags) >= self.max_choices:
                break
            if _valid_tag(tag) is not None:  # a forged row's text may not even go into a URL
                tags.add(tag)
        choices = [(tag, _shorten(tag)) for tag in sorted(tags)]
        value = self.value()
        if value is not None and value not in tags:
            choices.append((value, _shorten(value.replace("\x00", "\\x00"))))
        return choices

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() is None:
            return queryset
        tag = _valid_tag(str(self.value()))
        if tag is None:
            return queryset.none()
        return cast(MethodCallQuerySet, queryset).tagged(tag)


class CreatedFilter(admin.SimpleListFilter):
    """Filter by creation time: the last hour, day or week, or one hour (``?created=<ISO hour>``)."""

    title = "created"
    parameter_name = "created"
    presets = {"1h": ("last hour", 1), "24h": ("last 24 hours", 24), "7d": ("last 7 days", 24 * 7)}

    def _hour(self) -> datetime.datetime | None:
        """The hour named by the value, or ``None`` when it names none (nonsense never fails)."""
        try:
            value = parse_datetime(str(self.value() or ""))
            if value is None or not 1 < value.year < 9999:
                return None
            if timezone.is_naive(value):
                value = timezone.make_aware(value)
            value.astimezone(datetime.UTC)  # a UTC offset beyond the calendar's ends raises here
        except (ValueError, OverflowError):
            return None
        return value

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        choices = [(key, label) for key, (label, _hours) in self.presets.items()]
        hour = self._hour()
        if hour is not None:
            choices.append((str(self.value()), f"hour from {_format_time(hour)}"))
        return choices

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if not value:
            return queryset
        if value in self.presets:
            since = timezone.now() - datetime.timedelta(hours=self.presets[value][1])
            return queryset.filter(created_at__gte=since)
        hour = self._hour()
        if hour is None:
            return queryset.none()
        return queryset.filter(created_at__gte=hour, created_at__lt=hour + datetime.timedelta(hours=1))


def history_key(call: MethodCall) -> str:
    """The ``LogEntry.object_id`` of ``call``'s admin history: its pk, or ``"<alias>:<pk>"`` for a
    call on another database than ``default`` (pks repeat across databases; log entries live on
    ``default``)."""
    database = call._state.db or DEFAULT_DB_ALIAS
    return str(call.pk) if database == DEFAULT_DB_ALIAS else f"{database}:{call.pk}"


def log_call_change(request: HttpRequest, call: MethodCall, message: str) -> None:
    """Write ``message`` to ``call``'s admin history ("History" on its page), as the request's user."""
    user_id = request.user.pk
    if user_id is None:  # an anonymous user never gets past the admin's login
        return
    LogEntry.objects.create(
        user_id=user_id,
        content_type_id=ContentType.objects.get_for_model(MethodCall).pk,
        object_id=history_key(call),
        object_repr=str(call)[:200],
        action_flag=CHANGE,
        change_message=message,
    )


LEASE_EXPIRED = "lease-expired"
ATTENTION_OVERDUE = "overdue"


class AttentionFilter(admin.SimpleListFilter):
    """Calls that need a look: running with an expired lease, or scheduled and overdue.

    Each is served by its state's partial index (``asyncmodels_call_lease``, ``asyncmodels_call_due``).
    """

    title = "needs attention"
    parameter_name = "attention"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            (LEASE_EXPIRED, "running, lease expired"),
            (ATTENTION_OVERDUE, f"scheduled, overdue by {OVERDUE_AFTER.total_seconds():.0f} s"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        now = timezone.now()
        if self.value() == LEASE_EXPIRED:
            return queryset.filter(state=CallState.RUNNING, lease_expires_at__lt=now)
        if self.value() == ATTENTION_OVERDUE:
            return queryset.filter(state=CallState.SCHEDULED, run_after__lt=now - OVERDUE_AFTER)
        return queryset


class CallActionsMixin(MixinBase):
    """Retry and cancel, each behind its own permission; used by the list and the call page."""

    def has_retry_permission(self, request: HttpRequest, obj: MethodCall | None = None) -> bool:
        """Whether the user holds ``asyncmodels.retry_methodcall`` (the list action's permission)."""
        return bool(request.user.has_perm("asyncmodels.retry_methodcall"))

    def has_cancel_permission(self, request: HttpRequest, obj: MethodCall | None = None) -> bool:
        """Whether the user holds ``asyncmodels.cancel_methodcall`` (the list action's permission)."""
        return bool(request.user.has_perm("asyncmodels.cancel_methodcall"))

    def _who(self, request: HttpRequest) -> str:
        return str(request.user.get_username() or "a staff user")

    def _apply(
        self, request: HttpRequest, calls: Iterable[MethodCall], verb: str
    ) -> tuple[list[MethodCall], list[MethodCall]]:
        done: list[MethodCall] = []
        refused: list[MethodCall] = []
        reason = f"{verb.capitalize()} in the admin by {self._who(request)}."
        for call in calls:
            try:
                acted = call.retry(reason=reason) if verb == "retried" else call.cancel(reason=reason)
            except UnknownQueueError as exc:  # its queue left RQ_QUEUES: a retry could only fail again
                self.message_user(request, f"Call #{call.pk} was not retried: {exc}", messages.WARNING)
                continue
            (done if acted else refused).append(call)
            if acted:
                log_call_change(request, call, reason)
        return done, refused

    def _report(
        self, request: HttpRequest, done: Sequence[MethodCall], refused: Sequence[MethodCall], verb: str
    ) -> None:
        """One message for what was done, and one per reason for what was not."""
        asked = [call for call in done if call.state == CallState.RUNNING]  # cancel() of a running call
        done = [call for call in done if call.state != CallState.RUNNING]
        if done:
            what = f"call #{done[0].pk}" if len(done) == 1 else f"{len(done)} calls: {_id_list(done)}"
            self.message_user(request, f"{verb.capitalize()} {what}.", messages.SUCCESS)
        if asked:
            self.message_user(
                request,
                f"Asked running call{'s' if len(asked) > 1 else ''} {_id_list(asked)} to stop: no further "
                "attempt will follow, and each ends cancelled unless its method returns first.",
                messages.SUCCESS,
            )
        by_state: dict[str, list[MethodCall]] = {}
        for call in refused:
            by_state.setdefault(call.state, []).append(call)
        for state, calls in by_state.items():
            self.message_user(request, self._refusal(calls, state, verb), messages.WARNING)

    @staticmethod
    def _refusal(calls: Sequence[MethodCall], state: str, verb: str) -> str:
        which = f"Call #{calls[0].pk} was" if len(calls) == 1 else f"Calls {_id_list(calls)} were"
        if verb == "retried":
            if state == CallState.SUCCEEDED:
                return (
                    f"{which} not retried: succeeded calls are never run again. Make a new call if "
                    "the work must be done again."
                )
            return f"{which} not retried: {state}, not failed or cancelled."
        if state == CallState.RUNNING:
            return f"{which} already asked to stop."
        return f"{which} not cancelled: already {state}."


def _id_list(calls: Sequence[MethodCall], limit: int = 20) -> str:
    ids = ", ".join(f"#{call.pk}" for call in calls[:limit])
    return ids + (f" and {len(calls) - limit} more" if len(calls) > limit else "")


TAGGED_NOTE = 'Its own calls, and calls on other objects tagged with it ("tagged").'


class MethodCallsAdminMixin(MixinBase):
    """Show an object's method calls, newest first, on its own admin change page.

    Add it in one line: ``class InstanceAdmin(MethodCallsAdminMixin, admin.ModelAdmin)``. The
    calls appear as a last fieldset ("Method calls") with their state, method, times and first
    line of error, each linked to its call page, and a link to all of the object's calls in the
    call list. They are the calls ``MethodCall.objects.for_object()`` finds: the object's own,
    and calls on other objects tagged with it (shown with that object, marked "tagged").
    ``method_calls_limit`` (int, default 10) caps how many are listed. Users without view
    permission on method calls see nothing of it.
    """

    method_calls_limit = 10
    method_calls_field = "asyncmodels_method_calls"

    class Media:
        css = {"all": (ADMIN_CSS,)}

    def get_readonly_fields(self, request: HttpRequest, obj: Model | None = None) -> tuple[str, ...]:
        fields = tuple(super().get_readonly_fields(request, obj))
        if obj is None or not self._may_view_calls(request):
            return fields
        return (*fields, self.method_calls_field)

    def get_fieldsets(self, request: HttpRequest, obj: Model | None = None) -> Any:
        fieldsets = list(super().get_fieldsets(request, obj))
        if obj is None or not self._may_view_calls(request):
            return fieldsets
        # get_fields() (which get_fieldsets() uses when none are declared) already lists every
        # read-only field, ours included: take it out of the first fieldset, give it its own.
        cleaned = []
        for name, options in fieldsets:
            fields = [field for field in options.get("fields", ()) if field != self.method_calls_field]
            cleaned.append((name, {**options, "fields": fields}))
        cleaned.append(
            ("Method calls", {"fields": [self.method_calls_field], "classes": ["asyncmodels-calls"]})
        )
        return cleaned

    def _may_view_calls(self, request: HttpRequest) -> bool:
        return bool(
            request.user.has_perm("asyncmodels.view_methodcall")
            or request.user.has_perm("asyncmodels.change_methodcall")
        )

    @admin.display(description="calls")
    def asyncmodels_method_calls(self, obj: Model) -> SafeString | str:
        calls = list(
            MethodCall.objects.using(obj._state.db)
            .for_object(obj)
            .only(
                "id",
                "method",
                "state",
                "attempts",
                "created_at",
                "finished_at",
                "error",
                "queue",
                "content_type_id",
                "object_id",
            )
            .order_by("-id")[: self.method_calls_limit + 1]
        )
        if not calls:
            return "No calls yet."
        shown = calls[: self.method_calls_limit]
        site = self.admin_site.name
        try:
            list_url = calls_url(obj._state.db or DEFAULT_DB_ALIAS, site, object=object_filter_value(obj))
        except NoReverseMatch:  # MethodCall is not registered on this admin site: no links
            list_url = ""
        own_type = ContentType.objects.db_manager(obj._state.db).get_for_model(obj).pk
        own_id = str(obj.pk)
        tagged = 0

        def about(call: MethodCall) -> SafeString:
            nonlocal tagged
            if call.content_type_id == own_type and call.object_id == own_id:
                return format_html('<span class="asyncmodels-quiet">{}</span>', "this object")
            tagged += 1
            return format_html(
                '{} <span class="asyncmodels-tagged" title="{}">tagged</span>',
                _object_link(self.admin_site, call),
                "A call on another object, tagged with this one",
            )

        rows = format_html_join(
            "",
            '<tr><td><a href="{}">#{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>'
            "<td>{}</td><td>{}</td></tr>",
            [
                (
                    call_url(call, site) if list_url else "",
                    call.pk,
                    call.method,
                    about(call),
                    state_badge(call.state),
                    call.attempts,
                    _format_time(call.created_at),
                    _format_time(call.finished_at),
                    _first_line(call.error, 80),
                )
                for call in shown
            ],
        )
        more = "all calls of this object" if len(calls) > len(shown) else "these calls in the call list"
        table = format_html(
            '{}<table class="asyncmodels-calls-table"><thead><tr><th>call</th><th>method</th><th>object</th>'
            "<th>state</th><th>attempts</th><th>created</th><th>finished</th><th>error</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            format_html('<p class="asyncmodels-note">{}</p>', TAGGED_NOTE) if tagged else "",
            rows,
        )
        if not list_url:
            return table
        return format_html('{}<p><a href="{}">{} →</a></p>', table, list_url, more.capitalize())


@admin.register(MethodCall)
class MethodCallAdmin(CallActionsMixin, MethodCallAdminBase):
    """The call list, the call page, retry and cancel, and the overview page."""

    list_display = (
        "id",
        "state_display",
        "method",
        "target",
        "error_summary",  # before the times: on a narrow screen, what went wrong stays in view
        "queue",
        "attempts",
        "created",
        "started",
        "finished",
        "duration_display",
    )
    list_display_links = ("id",)
    list_filter = (
        "state",
        AttentionFilter,
        QueueFilter,
        KindFilter,
        MethodFilter,
        ModelFilter,
        CreatedFilter,
        TagFilter,
        ObjectFilter,
        DatabaseFilter,
    )
    search_help_text = "An object's primary key (exact), or text in the error message."
    search_fields = ("object_id", "error")  # matched in get_search_results(), see there
    # No join: each row's content type comes from ContentType's cache (_object_link).
    ordering = ("-id",)
    sortable_by = ("id",)
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # facet counts are a COUNT per filter choice per page view
    paginator = BoundedCountPaginator
    list_per_page = 50
    list_max_show_all = 500
    actions = ("retry_calls", "cancel_calls")
    change_form_template = "admin/asyncmodels/methodcall/change_form.html"
    change_list_template = "admin/asyncmodels/methodcall/change_list.html"
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "state_display",
                    "progress_display",
                    "state_reason",
                    "method",
                    "target",
                    "queue",
                    "unique_display",
                    "exclusive_display",
                    "tags_display",
                    "related_calls",
                )
            },
        ),
        ("Workflow", {"fields": ("runs_after", "followed_by", "workflow_steps")}),
        (
            "Timing",
            {
                "fields": (
                    "created_time",
                    "enqueued_time",
                    "run_after_time",
                    "started_time",
                    "lease_display",
                    "cancel_requested_time",
                    "finished_time",
                    "duration_detail",
                )
            },
        ),
        ("Arguments", {"fields": ("args_json", "kwargs_json")}),
        ("Outcome", {"fields": ("result_json", "result_note", "error_type", "error", "traceback_block")}),
        ("Attempts", {"fields": ("attempts", "worker", "attempt_history")}),
        ("Options", {"fields": ("policy_json",), "classes": ("collapse",)}),
    )
    readonly_fields = tuple(str(name) for _title, options in fieldsets for name in options["fields"])

    class Media:
        css = {"all": (ADMIN_CSS,)}

    # Read-only: a call's fields change only through its own state machine.

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: MethodCall | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: MethodCall | None = None) -> bool:
        return False

    def database_for(self, request: HttpRequest) -> str:
        """The database alias this request looks at: ``?db=``, also inside preserved list filters.

        Raises ``Http404`` for an alias that holds no calls (not in ``DATABASES``, or the routers
        keep asyncmodels off it).
        """
        alias = request.GET.get(DATABASE_PARAM)
        if alias is None:
            alias = QueryDict(request.GET.get("_changelist_filters", "")).get(DATABASE_PARAM)
        if alias is None:
            return DEFAULT_DB_ALIAS
        if alias not in call_databases():
            raise Http404(f"No database {alias!r} holds method calls.")
        return alias

    def get_fieldsets(self, request: HttpRequest, obj: MethodCall | None = None) -> Any:
        """The call page's sections, without the rows that say nothing about this call: progress,
        unique, exclusive, and the workflow (shown for a call with dependencies or dependents)."""
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None:
            return fieldsets
        links = call_links(obj)
        shown = {
            "progress_display": obj.progress is not None or bool(obj.progress_message),
            "unique_display": obj.unique_key is not None,
            "exclusive_display": obj.exclusive_key is not None,
            "runs_after": bool(links.runs_after),
            "followed_by": bool(links.followed_by),
            "workflow_steps": bool(links.runs_after or links.followed_by),
        }
        kept = []
        for title, options in fieldsets:
            fields = [name for name in options["fields"] if shown.get(str(name), True)]
            if fields:
                kept.append((title, {**options, "fields": fields}))
        return kept

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return MethodCallChangeList

    def get_queryset(self, request: HttpRequest) -> QuerySet[MethodCall]:
        return super().get_queryset(request).using(self.database_for(request))

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[MethodCall], search_term: str
    ) -> tuple[QuerySet[MethodCall], bool]:
        """An exact object id (served by the object index) or error text (a scan: only on search)."""
        term = search_term.strip()
        if not term:
            return queryset, False
        # ~Q(error="") matches the partial index asyncmodels_call_has_error, so the text search
        # scans only calls that have an error, not the whole table.
        return queryset.filter(Q(object_id=term) | (~Q(error="") & Q(error__icontains=term))), False

    # URLs: the overview, and POST-only retry and cancel for one call.

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        return [
            path("overview/", wrap(self.overview_view), name="asyncmodels_methodcall_overview"),
            path("<path:object_id>/retry/", wrap(self.retry_view), name="asyncmodels_methodcall_retry"),
            path("<path:object_id>/cancel/", wrap(self.cancel_view), name="asyncmodels_methodcall_cancel"),
            *super().get_urls(),
        ]

    # List columns.

    @admin.display(description="state", ordering="state")
    def state_display(self, call: MethodCall) -> SafeString:
        badge = state_badge(call.state)
        if call.state != CallState.RUNNING:
            return badge
        if call.cancel_requested_at is not None:
            badge = format_html('{} <span class="asyncmodels-stopping">asked to stop</span>', badge)
        return format_html("{}{}", badge, _progress_bar(call))

    @admin.display(description="object")
    def target(self, call: MethodCall) -> SafeString | str:
        return _object_link(self.admin_site, call)

    @admin.display(description="created")
    def created(self, call: MethodCall) -> SafeString | str:
        return _short_time(call.created_at)

    @admin.display(description="started")
    def started(self, call: MethodCall) -> SafeString | str:
        return _short_time(call.started_at)

    @admin.display(description="finished")
    def finished(self, call: MethodCall) -> SafeString | str:
        return _short_time(call.finished_at)

    @admin.display(description="duration")
    def duration_display(self, call: MethodCall) -> str:
        duration = call.duration
        return _format_seconds(duration.total_seconds() if duration is not None else None)

    @admin.display(description="error")
    def error_summary(self, call: MethodCall) -> str:
        return _first_line(call.error)

    # Call page fields.

    @admin.display(description="calls of this object")
    def related_calls(self, call: MethodCall) -> SafeString:
        database = call._state.db or DEFAULT_DB_ALIAS
        site = self.admin_site.name
        if call.content_type_id is None:  # a task: no object, but other calls of the same task
            return format_html(
                '<a href="{}">all calls of the task {}</a>',
                calls_url(database, site, method=call.method),
                call.method,
            )
        value = f"{call.content_type_id}:{call.object_id}"
        same_method = calls_url(database, site, object=value, method=call.method)
        return format_html(
            '<a href="{}">all calls of this object</a> (its own, and those tagged with it) · '
            '<a href="{}">its {} calls</a>',
            calls_url(database, site, object=value),
            same_method,
            call.method,
        )

    @admin.display(description="progress")
    def progress_display(self, call: MethodCall) -> SafeString | str:
        fraction = call.progress
        reported = f"reported {_format_time(call.progress_at)}" if call.progress_at else ""
        message = displayable(call.progress_message)
        if fraction is None or not math.isfinite(fraction):  # a message alone, or a forged value
            return " · ".join(part for part in (message, reported) if part) or "-"
        percent = f"{min(max(fraction, 0.0), 1.0) * 100:.0f}"
        return format_html(
            '<progress class="asyncmodels-progress" max="100" value="{}">{}%</progress> {}%{}{}',
            percent,
            percent,
            percent,
            format_html(" · {}", message) if message else "",
            format_html(' <span class="asyncmodels-quiet">({})</span>', reported) if reported else "",
        )

    @admin.display(description="unique")
    def unique_display(self, call: MethodCall) -> SafeString | str:
        if call.unique_key is None:
            return "no"
        if call.state in TERMINAL_STATES:
            now = "this one has finished, so the same call now makes a new one"
        else:
            now = "while this one is unfinished, making the same call again returns it"
        return format_html(
            'yes (one unfinished call per key): {}. <span class="asyncmodels-quiet">Key {}</span>',
            now,
            displayable(call.unique_key),
        )

    @admin.display(description="exclusive group key")
    def exclusive_display(self, call: MethodCall) -> SafeString | str:
        key = call.exclusive_key
        if key is None:
            return "-"
        holder = (
            MethodCall._default_manager.using(call._state.db)
            .filter(exclusive_key=key, state=CallState.RUNNING)
            .values_list("pk", "method")
            .first()
        )
        if holder is None:
            now = format_html("{}", "No call holds it now.")
        elif holder[0] == call.pk:
            now = format_html("{}", "This call holds it now.")
        else:
            url = _call_page_url(holder[0], call._state.db or DEFAULT_DB_ALIAS, self.admin_site.name)
            now = format_html('Held now by <a href="{}">#{}</a> {}.', url, holder[0], holder[1])
        return format_html(
            "<code>{}</code>: calls with this key run one at a time. {}", displayable(key), now
        )

    @admin.display(description="tags")
    def tags_display(self, call: MethodCall) -> SafeString | str:
        tags = list(
            MethodCallTag._default_manager.using(call._state.db)
            .filter(call=call.pk)
            .order_by("id")
            .values_list("tag", flat=True)[: TAGS_SHOWN + 1]
        )
        if not tags:
            return "none"
        database = call._state.db or DEFAULT_DB_ALIAS
        shown = []
        for tag in tags[:TAGS_SHOWN]:
            if _valid_tag(tag) is None:  # a forged row: shown, not linked
                shown.append(format_html('<span class="asyncmodels-tag">{}</span>', displayable(tag)))
            else:
                url = calls_url(database, self.admin_site.name, tag=tag)
                shown.append(
                    format_html(
                        '<a class="asyncmodels-tag" href="{}" title="{}">{}</a>',
                        url,
                        "Calls with this tag",
                        tag,
                    )
                )
        more = " and more" if len(tags) > TAGS_SHOWN else ""
        return format_html("{}{}", format_html_join(" ", "{}", ((item,) for item in shown)), more)

    def _neighbours(self, call: MethodCall, neighbours: list[Neighbour], total: int) -> SafeString:
        database = call._state.db or DEFAULT_DB_ALIAS
        items = format_html_join(
            "",
            '<li><a href="{}">#{}</a> {} {}</li>',
            (
                (_call_page_url(pk, database, self.admin_site.name), pk, method, state_badge(state))
                for pk, method, state in neighbours
            ),
        )
        more = (
            format_html("<li>… and {} more</li>", total - len(neighbours)) if total > len(neighbours) else ""
        )
        return format_html('<ul class="asyncmodels-neighbours">{}{}</ul>', items, more)

    @admin.display(description="runs after")
    def runs_after(self, call: MethodCall) -> SafeString | str:
        links = call_links(call)
        if not links.runs_after:
            return "-"
        return self._neighbours(call, links.runs_after, links.runs_after_total)

    @admin.display(description="followed by")
    def followed_by(self, call: MethodCall) -> SafeString | str:
        links = call_links(call)
        if not links.followed_by:
            return "-"
        return self._neighbours(call, links.followed_by, links.followed_by_total)

    @admin.display(description="steps, in order")
    def workflow_steps(self, call: MethodCall) -> SafeString | str:
        links = call_links(call)
        if not (links.runs_after or links.followed_by):
            return "-"
        workflow = call_workflow(call)
        database = call._state.db or DEFAULT_DB_ALIAS
        site = self.admin_site.name

        def after(pk: int) -> str:
            earlier = workflow.waits_for.get(pk, [])
            shown = ", ".join(f"#{other}" for other in earlier[:5])
            return shown + (f" and {len(earlier) - 5} more" if len(earlier) > 5 else "") or "-"

        rows = format_html_join(
            "",
            '<tr class="{}"><td>{}</td><td><a href="{}">#{}</a>{}</td><td>{}</td><td>{}</td><td>{}</td>'
            "<td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    "asyncmodels-current" if row.pk == call.pk else "",
                    workflow.steps[row.pk],
                    _call_page_url(row.pk, database, site),
                    row.pk,
                    " (this call)" if row.pk == call.pk else "",
                    row.method,
                    _object_link(self.admin_site, row),
                    state_badge(row.state),
                    after(row.pk),
                    _format_time(row.started_at),
                    _format_time(row.finished_at),
                )
                for row in workflow.calls
            ),
        )
        step_count = max(workflow.steps.values(), default=0)
        notes = []
        if workflow.truncated:
            notes.append(
                f"The workflow is larger: only the {len(workflow.calls)} calls nearest to this one are "
                "shown, and their steps count from the first of them."
            )
        if workflow.cyclic:
            notes.append("Some calls wait for each other in a cycle (damaged rows); they are listed last.")
        summary = format_html(
            '<p class="asyncmodels-workflow-summary">{} calls in {} step{}; this call is step {}. '
            "A call runs once every call it waits for (after) has succeeded.</p>",
            len(workflow.calls),
            step_count,
            "" if step_count == 1 else "s",
            workflow.steps.get(call.pk, "?"),
        )
        return format_html(
            '{}<div class="asyncmodels-workflow-scroll"><table class="asyncmodels-workflow"><thead><tr>'
            "<th>step</th><th>call</th><th>method</th><th>object</th><th>state</th><th>after</th>"
            "<th>started</th><th>finished</th></tr></thead><tbody>{}</tbody></table></div>{}",
            summary,
            rows,
            format_html_join("", '<p class="asyncmodels-note">{}</p>', ((note,) for note in notes)),
        )

    @admin.display(description="created")
    def created_time(self, call: MethodCall) -> str:
        return _format_time(call.created_at)

    @admin.display(description="enqueued")
    def enqueued_time(self, call: MethodCall) -> str:
        return _format_time(call.enqueued_at)

    @admin.display(description="run after")
    def run_after_time(self, call: MethodCall) -> str:
        if call.run_after is None:
            return "-"
        due = "due" if call.run_after <= timezone.now() else "not due yet"
        return (
            f"{_format_time(call.run_after)} ({due})"
            if call.state == CallState.SCHEDULED
            else _format_time(call.run_after)
        )

    @admin.display(description="started (last attempt)")
    def started_time(self, call: MethodCall) -> str:
        return _format_time(call.started_at)

    @admin.display(description="finished")
    def finished_time(self, call: MethodCall) -> str:
        return _format_time(call.finished_at)

    @admin.display(description="duration (last attempt, started to finished)")
    def duration_detail(self, call: MethodCall) -> str:
        return self.duration_display(call)

    @admin.display(description="asked to stop")
    def cancel_requested_time(self, call: MethodCall) -> str:
        return _format_time(call.cancel_requested_at)

    @admin.display(description="lease")
    def lease_display(self, call: MethodCall) -> str:
        if call.lease_expires_at is None:
            return "-" if call.state != CallState.RUNNING else "none (taken before leases existed)"
        left = (call.lease_expires_at - timezone.now()).total_seconds()
        when = _format_time(call.lease_expires_at)
        if left >= 0:
            return f"held by {call.worker or 'a worker'} until {when} ({left:.0f} s left)"
        return f"expired at {when}, {-left:.0f} s ago: its worker is presumed lost"

    @admin.display(description="args")
    def args_json(self, call: MethodCall) -> SafeString:
        return _pretty_json(call.args)

    @admin.display(description="kwargs")
    def kwargs_json(self, call: MethodCall) -> SafeString:
        return _pretty_json(call.kwargs)

    @admin.display(description="result")
    def result_json(self, call: MethodCall) -> SafeString:
        return _pretty_json(call.result)

    @admin.display(description="options")
    def policy_json(self, call: MethodCall) -> SafeString:
        return _pretty_json(call.policy)

    @admin.display(description="traceback")
    def traceback_block(self, call: MethodCall) -> SafeString | str:
        return (
            format_html('<pre class="asyncmodels-traceback">{}</pre>', call.traceback)
            if call.traceback
            else "-"
        )

    @admin.display(description="history, oldest first")
    def attempt_history(self, call: MethodCall) -> SafeString | str:
        log = call.attempt_log if isinstance(call.attempt_log, list) else []
        rows = [self._attempt_row(entry) for entry in log if isinstance(entry, dict)]
        if call.state == CallState.RUNNING:
            rows.append(
                (
                    call.attempts,
                    call.worker or "-",
                    _format_time(call.started_at),
                    "-",
                    "-",
                    state_badge("running"),
                    "",
                )
            )
        if not rows:
            return "No attempt has started yet."
        body = format_html_join("", "<tr>" + "<td>{}</td>" * 7 + "</tr>", rows)
        return format_html(
            '<table class="asyncmodels-attempts"><thead><tr><th>#</th><th>worker</th><th>started</th>'
            "<th>ended</th><th>run time</th><th>outcome</th><th>error</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            body,
        )

    @staticmethod
    def _attempt_row(entry: dict[str, Any]) -> tuple[Any, ...]:
        """One row of the attempt table; a forged or damaged entry shows what it can, never fails."""
        try:
            started = parse_datetime(str(entry.get("started_at") or ""))
        except ValueError:
            started = None
        if started is not None and timezone.is_naive(started):
            started = None
        duration = entry.get("duration")
        seconds = None
        if (
            isinstance(duration, int | float)
            and not isinstance(duration, bool)
            and 0 <= duration < MAX_SHOWN_SECONDS  # false for NaN, and for ints past float's range
        ):
            seconds = float(duration)
        try:
            ended = started + datetime.timedelta(seconds=seconds) if started and seconds is not None else None
        except OverflowError:
            ended = None
        return (
            displayable(str(entry.get("attempt", "?"))),
            displayable(str(entry.get("worker") or "-")),
            _format_time(started),
            _format_time(ended),
            _format_seconds(seconds),
            state_badge(displayable(str(entry.get("outcome") or "unknown"))),
            displayable(str(entry.get("error") or "")),
        )

    # Actions on the list.

    @admin.action(description="Retry selected failed or cancelled calls", permissions=["retry"])
    def retry_calls(self, request: HttpRequest, queryset: QuerySet[MethodCall]) -> None:
        """List action: ``MethodCall.retry()`` each selected call; report what was and was not done."""
        self._act_on_selection(request, queryset, "retried")

    @admin.action(description="Cancel selected calls (ask running ones to stop)", permissions=["cancel"])
    def cancel_calls(self, request: HttpRequest, queryset: QuerySet[MethodCall]) -> None:
        """List action: ``MethodCall.cancel()`` each selected call; report what was and was not done."""
        self._act_on_selection(request, queryset, "cancelled")

    def _act_on_selection(self, request: HttpRequest, queryset: QuerySet[MethodCall], verb: str) -> None:
        # Read once, at most limit + 1 rows: "select all" over more calls than the list counts is
        # refused (the page could not say how many, and one request would act on millions).
        limit = BoundedCountPaginator.limit
        calls = list(queryset.order_by("pk")[: limit + 1])
        if len(calls) > limit:
            self.message_user(
                request,
                f"Nothing was {verb}: the selection holds more than {limit} calls. Narrow the filters "
                f"(state, method, time) to at most {limit}, or use MethodCall.retry()/cancel() in code.",
                messages.ERROR,
            )
            return
        done, refused = self._apply(request, calls, verb)
        self._report(request, done, refused, verb)

    # Buttons on the call page (POST only; the admin view wrapper checks staff and CSRF).

    def _one_call_action(self, request: HttpRequest, object_id: str, verb: str) -> HttpResponse:
        allowed = self.has_retry_permission if verb == "retried" else self.has_cancel_permission
        if not (allowed(request) and self.has_view_permission(request)):  # the list actions need both too
            raise PermissionDenied
        call = self.get_object(request, object_id)
        if call is None:
            raise Http404(f"No method call with id {object_id!r}.")
        done, refused = self._apply(request, [call], verb)
        self._report(request, done, refused, verb)
        # Back to the call page, keeping its database and the list's filters.
        page = reverse(f"{self.admin_site.name}:asyncmodels_methodcall_change", args=[quote(call.pk)])
        return HttpResponseRedirect(page + self._page_query(request))

    @staticmethod
    def _page_query(request: HttpRequest) -> str:
        kept = QueryDict(mutable=True)
        for key in (DATABASE_PARAM, "_changelist_filters"):
            if key in request.GET:
                kept[key] = request.GET[key]
        return f"?{kept.urlencode()}" if kept else ""

    def retry_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The call page's Retry button: POST only (else 405). Raises ``PermissionDenied`` (403)
        without both the retry and the view permission, ``Http404`` for an unknown call."""
        return require_POST(lambda request: self._one_call_action(request, object_id, "retried"))(request)

    def cancel_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The call page's Cancel button: POST only (else 405). Raises ``PermissionDenied`` (403)
        without both the cancel and the view permission, ``Http404`` for an unknown call."""
        return require_POST(lambda request: self._one_call_action(request, object_id, "cancelled"))(request)

    def history_view(self, request: HttpRequest, object_id: str, extra_context: Any = None) -> HttpResponse:
        """The admin's History page, reading this call's entries (see ``history_key``)."""
        response = super().history_view(request, object_id, extra_context)
        call = self.get_object(request, unquote(object_id))
        if call is None or history_key(call) == str(call.pk) or not isinstance(response, TemplateResponse):
            return response
        entries = LogEntry.objects.filter(
            object_id=history_key(call), content_type=ContentType.objects.get_for_model(MethodCall)
        ).select_related("user")
        context = response.context_data or {}
        context["action_list"] = self.get_paginator(request, entries.order_by("action_time"), 100).get_page(1)
        response.context_data = context
        return response

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        call = self.get_object(request, object_id)
        context = {
            **(extra_context or {}),
            "show_retry": call is not None and call.can_retry and self.has_retry_permission(request, call),
            "show_cancel": call is not None and call.can_cancel and self.has_cancel_permission(request, call),
            "action_query": self._page_query(request),
        }
        return super().change_view(request, object_id, form_url, context)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        overview_url = reverse(f"{self.admin_site.name}:asyncmodels_methodcall_overview")
        query = database_query(self.database_for(request))
        context = {
            **(extra_context or {}),
            "overview_url": overview_url + (f"?{urlencode(query)}" if query else ""),
        }
        return super().changelist_view(request, context)

    # The overview page.

    def overview_view(self, request: HttpRequest) -> HttpResponse:
        """The overview page (``overview/``); raises ``PermissionDenied`` without view permission."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        from .overview import build_overview

        database = self.database_for(request)
        databases = call_databases()
        context = {
            **self.admin_site.each_context(request),
            "title": "Method calls: overview" + (f" (database {database})" if len(databases) > 1 else ""),
            "database": database,
            "other_databases": [
                (alias, f"?{urlencode(database_query(alias))}") for alias in databases if alias != database
            ],
            "list_url": calls_url(database, self.admin_site.name),
            "opts": self.opts,
            "app_label": self.opts.app_label,
            "overview": build_overview(self.get_queryset(request).order_by(), self.admin_site.name),
        }
        return TemplateResponse(request, "admin/asyncmodels/methodcall/overview.html", context)
