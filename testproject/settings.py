"""Settings of the demo site. Services are chosen by environment variables.

ASYNCMODELS_DB         "sqlite" (default: files under var/) or "postgres"
ASYNCMODELS_PG_NAME    PostgreSQL database name (default "asyncmodels"); a second one,
                       "<name>_other", backs the "other" alias
ASYNCMODELS_PG_HOST    default 127.0.0.1; ASYNCMODELS_PG_PORT default 5432; user postgres
ASYNCMODELS_REDIS_URL  Redis for every RQ queue (default redis://127.0.0.1:6379/0)
ASYNCMODELS_SQLITE_DIR where SQLite files live (default <repo>/var)
ASYNCMODELS_SQLITE_PREFIX  prefix of the SQLite file names ("test_" opens the test databases)
ASYNCMODELS_BACKEND    "rq" (default) or "immediate"
ASYNCMODELS_PG_PREPARED  "1": psycopg's server-side binding with prepared statements
                       (OPTIONS server_side_binding and prepare_threshold 5; see README, Performance)
ASYNCMODELS_LEASE_SECONDS, ASYNCMODELS_LEASE_RENEW_SECONDS, ASYNCMODELS_RECOVERY_INTERVAL_SECONDS,
ASYNCMODELS_PUSH_GRACE_SECONDS, ASYNCMODELS_RECOVERY_BATCH_SIZE
                       override the ASYNCMODELS setting of the same name (seconds)
"""

import os
from importlib.util import find_spec
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "asyncmodels-demo-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]", "testserver"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_rq",
    "asyncmodels",
    "testproject.cloud",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "testproject.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "testproject.wsgi.application"

SQLITE_DIR = Path(os.environ.get("ASYNCMODELS_SQLITE_DIR", BASE_DIR / "var"))

DATABASES: dict[str, dict[str, Any]]
if os.environ.get("ASYNCMODELS_DB", "sqlite") == "postgres":
    _pg_name = os.environ.get("ASYNCMODELS_PG_NAME", "asyncmodels")
    _pg = {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("ASYNCMODELS_PG_HOST", "127.0.0.1"),
        "PORT": os.environ.get("ASYNCMODELS_PG_PORT", "5432"),
        "USER": os.environ.get("ASYNCMODELS_PG_USER", "postgres"),
        "PASSWORD": os.environ.get("ASYNCMODELS_PG_PASSWORD", ""),
        # Persistent connections (Django's CONN_MAX_AGE, seconds; 0, the default, closes each
        # at the end of a request or job), checked before reuse. The benchmarks set 60, as a
        # deployment would: a non-forking worker then keeps one connection across jobs.
        "CONN_MAX_AGE": int(os.environ.get("ASYNCMODELS_CONN_MAX_AGE", "0")),
        "CONN_HEALTH_CHECKS": True,
    }
    if os.environ.get("ASYNCMODELS_PG_PREPARED") == "1":
        # Parameters bound by the server, and a statement run 5 times on a connection prepared
        # there (planned once): what the README suggests for workers not behind a pooler that
        # cannot keep prepared statements.
        _pg["OPTIONS"] = {"server_side_binding": True, "prepare_threshold": 5}
    DATABASES = {
        "default": {**_pg, "NAME": _pg_name},
        "other": {**_pg, "NAME": f"{_pg_name}_other"},
    }
else:
    SQLITE_DIR.mkdir(parents=True, exist_ok=True)
    # A worker process started by the tests sets "test_" to open the test databases.
    _sqlite_prefix = os.environ.get("ASYNCMODELS_SQLITE_PREFIX", "")
    # Files, not :memory:, so that worker processes see what the test or demo committed.
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": SQLITE_DIR / f"{_sqlite_prefix}default.sqlite3",
            "TEST": {"NAME": str(SQLITE_DIR / "test_default.sqlite3")},
            "OPTIONS": {"timeout": 20},
        },
        "other": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": SQLITE_DIR / f"{_sqlite_prefix}other.sqlite3",
            "TEST": {"NAME": str(SQLITE_DIR / "test_other.sqlite3")},
            "OPTIONS": {"timeout": 20},
        },
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("ASYNCMODELS_REDIS_URL", "redis://127.0.0.1:6379/0")
RQ_QUEUES = {
    "default": {"URL": REDIS_URL},
    "provisioning": {"URL": REDIS_URL},
    "urgent": {"URL": REDIS_URL},
}

# Workers run recovery themselves (asyncmodels.W001 warns when they would not).
RQ = {"WORKER_CLASS": "asyncmodels.worker.Worker"}

ASYNCMODELS: dict[str, Any] = {"BACKEND": os.environ.get("ASYNCMODELS_BACKEND", "rq")}
# Tests and the chaos run shorten leases and recovery intervals through the environment.
for _key in (
    "LEASE_SECONDS",
    "LEASE_RENEW_SECONDS",
    "RECOVERY_INTERVAL_SECONDS",
    "PUSH_GRACE_SECONDS",
    "RECOVERY_BATCH_SIZE",
):
    if f"ASYNCMODELS_{_key}" in os.environ:
        ASYNCMODELS[_key] = float(os.environ[f"ASYNCMODELS_{_key}"])

# Django's tasks framework (django.tasks on Django 6; the django-tasks backport, when installed,
# on Django 5.2): plain @task functions (testproject/cloud/tasks.py) run as asyncmodels calls.
TASKS = {
    "default": {
        "BACKEND": "asyncmodels.backends.tasks.AsyncModelsBackend",
        "QUEUES": ["default", "urgent"],
    },
    # Tasks of this backend get two retries, a second apart (their backoff, jittered).
    "retrying": {
        "BACKEND": "asyncmodels.backends.tasks.AsyncModelsBackend",
        "QUEUES": ["default"],
        "OPTIONS": {"RETRIES": 2, "RETRY_BACKOFF": 1, "RETRY_BACKOFF_MAX": 2},
    },
}
if find_spec("django.tasks") is None and find_spec("django_tasks") is not None:
    INSTALLED_APPS.append("django_tasks")  # the backport's system checks (Django 6 has its own)

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "asyncmodels": {"handlers": ["console"], "level": os.environ.get("ASYNCMODELS_LOG_LEVEL", "WARNING")}
    },
}
