from django.contrib import admin

from asyncmodels.admin import MethodCallsAdminMixin

from .models import Account, Instance, Ledger, Region, Report, Volume


@admin.register(Account)
class AccountAdmin(MethodCallsAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("id", "name")


@admin.register(Instance)
class InstanceAdmin(MethodCallsAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("id", "name", "account", "size", "status")
    list_filter = ("status",)


@admin.register(Ledger)
class LedgerAdmin(MethodCallsAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("id", "name")


@admin.register(Report)
class ReportAdmin(MethodCallsAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("id", "topic", "account")
    list_select_related = ("account",)


admin.site.register(Volume)
admin.site.register(Region)
