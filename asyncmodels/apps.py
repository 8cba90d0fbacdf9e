from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class AsyncModelsConfig(AppConfig):
    name = "asyncmodels"
    verbose_name = _("Async method calls")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks, log, metrics  # checks registers the system checks

        checks.register_tasks_framework_check()
        log.connect()  # the per-transition log lines (asyncmodels.calls)
        metrics.install()  # Prometheus metrics, if prometheus_client is installed; else nothing
