"""The admin: every call and its fate, per object too; safe retry and cancel; an overview.

``MethodCallAdmin`` is read-only (nobody edits a call by hand). Its only writes are the retry and
cancel actions, each a compare-and-set on the row (``MethodCall.retry()``, ``MethodCall.cancel()``)
behind its own permission, ``asyncmodels.retry_methodcall`` and ``asyncmodels.cancel_methodcall``.
The list stays cheap on a table of millions of rows: filters take their choices from settings and
the registry (no ``SELECT DISTINCT``), the row count is bounded (``BoundedCountPaginator``), and
each filter has an index that serves it in ``-id`` order.

``MethodCallsAdminMixin`` puts an object's calls on its own change page:
``class InstanceAdmin(MethodCallsAdminMixin, admin.ModelAdmin): ...``.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any
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
from .exceptions import UnknownQueueError
from .models import CallState, MethodCall
from .overview import OVERDUE_AFTER

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
    url = reverse(f"{site_name}:asyncmodels_methodcall_change", args=[quote(call.pk)])
    query = database_query(call._state.db or DEFAULT_DB_ALIAS)
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
    """The call's object as "Model <pk>", linked to the object's admin page when it has one."""
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


class MethodCallChangeList(ChangeList):
    """The call list; it sorts only by ``sortable_by``, so ``?o=`` can't ask for an unindexed
    sort of the whole table (Django's ``sortable_by`` alone only hides the header links)."""

    def get_ordering_field(self, field_name: Any) -> Any:
        if self.sortable_by is not None and field_name not in self.sortable_by:
            return None
        return super().get_ordering_field(field_name)


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
        try:  # from the content type cache: the filter is then on the indexed column, no join
            content_type = ContentType.objects.db_manager(queryset.db).get_by_natural_key(app_label, model)
        except ContentType.DoesNotExist:
            return queryset.none()
        return queryset.filter(content_type=content_type)


class ObjectFilter(admin.SimpleListFilter):
    """The calls of one object (``?object=<content type id>:<pk>``), as linked from its page."""

    title = "object"
    parameter_name = "object"

    def _parse(self) -> tuple[int, str] | None:
        content_type_id, _, object_id = str(self.value() or "").partition(":")
        if not (content_type_id.isascii() and content_type_id.isdigit()) or not 0 < len(object_id) <= 255:
            return None
        if int(content_type_id) > 2**31 - 1:  # no database holds such an id (or could bind it)
            return None
        return int(content_type_id), object_id

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        if self.value() is None:
            return []  # shown only while it filters
        parsed = self._parse()
        if parsed is None:
            return [(str(self.value()), str(self.value()))]
        database = model_admin.database_for(request)
        try:  # content type ids differ between databases: look it up where the calls are
            content_type = ContentType.objects.db_manager(database).get_for_id(parsed[0])
        except ContentType.DoesNotExist:
            return [(str(self.value()), str(self.value()))]
        return [(str(self.value()), f"{capfirst(content_type.name)} {parsed[1]}")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() is None:
            return queryset
        parsed = self._parse()
        if parsed is None:
            return queryset.none()
        return queryset.filter(content_type_id=parsed[0], object_id=parsed[1])


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


class MethodCallsAdminMixin(MixinBase):
    """Show an object's method calls, newest first, on its own admin change page.

    Add it in one line: ``class InstanceAdmin(MethodCallsAdminMixin, admin.ModelAdmin)``. The
    calls appear as a last fieldset ("Method calls") with their state, method, times and first
    line of error, each linked to its call page, and a link to all of the object's calls in the
    call list. ``method_calls_limit`` (int, default 10) caps how many are listed. Users without
    view permission on method calls see nothing of it.
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
        rows = format_html_join(
            "",
            '<tr><td><a href="{}">#{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>'
            "<td>{}</td><td>{}</td></tr>",
            (
                (
                    call_url(call, site) if list_url else "",
                    call.pk,
                    call.method,
                    state_badge(call.state),
                    call.attempts,
                    _format_time(call.created_at),
                    _format_time(call.finished_at),
                    _first_line(call.error, 80),
                )
                for call in shown
            ),
        )
        more = "all calls of this object" if len(calls) > len(shown) else "these calls in the call list"
        table = format_html(
            '<table class="asyncmodels-calls-table"><thead><tr><th>call</th><th>method</th><th>state</th>'
            "<th>attempts</th><th>created</th><th>finished</th><th>error</th></tr></thead>"
            "<tbody>{}</tbody></table>",
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
        MethodFilter,
        ModelFilter,
        CreatedFilter,
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
        (None, {"fields": ("state_display", "state_reason", "method", "target", "queue", "related_calls")}),
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
    readonly_fields = tuple(str(field) for _name, options in fieldsets for field in options["fields"])

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
        if call.state == CallState.RUNNING and call.cancel_requested_at is not None:
            return format_html(
                '{} <span class="asyncmodels-stopping">asked to stop</span>', state_badge(call.state)
            )
        return state_badge(call.state)

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
        value = f"{call.content_type_id}:{call.object_id}"
        database = call._state.db or DEFAULT_DB_ALIAS
        site = self.admin_site.name
        same_method = calls_url(database, site, object=value, method=call.method)
        return format_html(
            '<a href="{}">all calls of this object</a> · <a href="{}">its {} calls</a>',
            calls_url(database, site, object=value),
            same_method,
            call.method,
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
