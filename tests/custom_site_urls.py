"""A second admin site ("ops") for tests of asyncmodels' admin outside the default site."""

from django.contrib import admin
from django.urls import path

from asyncmodels.admin import MethodCallAdmin, MethodCallsAdminMixin
from asyncmodels.models import MethodCall
from testproject.cloud.models import Echo, Instance
from testproject.urls import urlpatterns as project_urlpatterns


class OpsInstanceAdmin(MethodCallsAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    pass


ops = admin.AdminSite(name="ops")
ops.register(MethodCall, MethodCallAdmin)
ops.register(Instance, OpsInstanceAdmin)

bare = admin.AdminSite(name="bare")  # the mixin, but no MethodCallAdmin on this site
bare.register(Echo, OpsInstanceAdmin)

urlpatterns = [path("ops/", ops.urls), path("bare/", bare.urls), *project_urlpatterns]
