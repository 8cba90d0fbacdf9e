"""Read-only admin for ``MethodCall``: what ran, when, on what, and how it ended."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.contrib.admin.utils import quote
from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from .models import MethodCall

if TYPE_CHECKING:
    MethodCallAdminBase = admin.ModelAdmin[MethodCall]
else:  # ModelAdmin is generic only in django-stubs
    MethodCallAdminBase = admin.ModelAdmin


def _pretty_json(value: Any) -> SafeString:
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


@admin.register(MethodCall)
class MethodCallAdmin(MethodCallAdminBase):
    list_display = (
        "id",
        "state",
        "method",
        "target",
        "queue",
        "attempts",
        "created_at",
        "started_at",
        "finished_at",
        "error_summary",
    )
    list_filter = ("state", "queue")
    search_fields = ("=object_id", "method", "error")
    list_select_related = ("content_type",)
    ordering = ("-id",)
    date_hierarchy = None
    fields = (
        "state",
        "state_reason",
        "method",
        "target",
        "queue",
        "attempts",
        "worker",
        "created_at",
        "enqueued_at",
        "run_after",
        "started_at",
        "lease_expires_at",
        "finished_at",
        "duration",
        "policy_json",
        "args_json",
        "kwargs_json",
        "result_json",
        "result_note",
        "error_type",
        "error",
        "traceback_block",
        "attempt_history",
    )
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: MethodCall | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: MethodCall | None = None) -> bool:
        return False

    @admin.display(description="object")
    def target(self, call: MethodCall) -> str:
        label = f"{call.content_type.app_label}.{call.content_type.model} {call.object_id}"
        try:
            url = reverse(
                f"admin:{call.content_type.app_label}_{call.content_type.model}_change",
                args=[quote(call.object_id)],
            )
        except NoReverseMatch:
            return label
        return format_html('<a href="{}">{}</a>', url, label)

    @admin.display(description="error")
    def error_summary(self, call: MethodCall) -> str:
        first_line = call.error.splitlines()[0] if call.error else ""
        return first_line[:120]

    @admin.display(description="args")
    def args_json(self, call: MethodCall) -> SafeString:
        return _pretty_json(call.args)

    @admin.display(description="kwargs")
    def kwargs_json(self, call: MethodCall) -> SafeString:
        return _pretty_json(call.kwargs)

    @admin.display(description="result")
    def result_json(self, call: MethodCall) -> SafeString:
        return _pretty_json(call.result)

    @admin.display(description="policy")
    def policy_json(self, call: MethodCall) -> SafeString:
        return _pretty_json(call.policy)

    @admin.display(description="attempts, oldest first")
    def attempt_history(self, call: MethodCall) -> SafeString | str:
        if not call.attempt_log:
            return "-"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    entry.get("attempt"),
                    entry.get("worker") or "-",
                    entry.get("started_at") or "-",
                    "-" if entry.get("duration") is None else f"{entry['duration']:.3f} s",
                    entry.get("outcome"),
                    entry.get("error") or "",
                )
                for entry in call.attempt_log
                if isinstance(entry, dict)
            ),
        )
        return format_html(
            "<table><thead><tr><th>#</th><th>worker</th><th>started</th><th>duration</th><th>outcome</th>"
            "<th>error</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    @admin.display(description="traceback")
    def traceback_block(self, call: MethodCall) -> SafeString | str:
        return format_html("<pre>{}</pre>", call.traceback) if call.traceback else "-"
