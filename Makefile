# The two quickstart commands: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
# Extra pip requirement, e.g. DJANGO_SPEC='django>=6.0,<6.1' for the Django 6 leg.
DJANGO_SPEC ?= django>=5.2,<5.3
BIN := $(VENV)/bin
MANAGE := $(BIN)/python manage.py

# Real services for `make test-services` (CI starts them; see .ci/run).
PG_NAME ?= asyncmodels_ci
REDIS_TEST_URL ?= redis://127.0.0.1:6379/13

.PHONY: demo test lint pytest test-services install clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]" "$(DJANGO_SPEC)"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(MANAGE) demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy asyncmodels testproject tests bench
	$(MANAGE) makemigrations --check --dry-run
	$(MANAGE) check

pytest: $(BIN)/.installed
	$(BIN)/pytest -q

# The README's test command: lint, type-check, migrations, system checks, then the suite on
# SQLite + fakeredis (no services needed).
test: lint pytest

# Django's own tests/tasks suite (the framework's built-in backends) against the installed Django,
# with asyncmodels and its tasks backend installed beside it: a smoke check for the Django 6 leg.
# The suite comes from the sdist of exactly the installed Django, fetched from the package index
# into a temporary folder (removed at the end), and is never copied into this repository.
.PHONY: django-tasks-suite
django-tasks-suite: $(BIN)/.installed
	@set -e; \
	version=$$($(BIN)/python -c 'import django; print(django.__version__)'); \
	$(BIN)/python -c 'import django.tasks' 2>/dev/null \
		|| { echo "django-tasks-suite needs Django >= 6.0; $(VENV) has Django $$version"; exit 1; }; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo "Django $$version: fetching its sdist for tests/tasks"; \
	$(BIN)/python -m pip download -q --no-binary :all: --no-deps "django==$$version" -d "$$tmp"; \
	tar -xzf "$$tmp"/*.tar.gz -C "$$tmp" --wildcards '*/tests/*'; \
	cd "$$tmp"/*/tests && "$(abspath $(BIN))/python" runtests.py tasks

# The test project against the built wheel, installed in a fresh virtualenv, not against this
# source tree: the sdist and wheel are built (python -m build), the wheel's files are compared with
# `git ls-files asyncmodels`, and check, makemigrations --check, migrate, collectstatic and the demo
# run in a temporary copy of testproject/ (see .ci/wheel-check). Everything is temporary.
.PHONY: wheel-check
wheel-check: $(BIN)/.installed
	bash .ci/wheel-check "$(BIN)/python" "$(DJANGO_SPEC)"

# The same suite on PostgreSQL and Redis on loopback, with real rqworker processes.
test-services: $(BIN)/.installed
	ASYNCMODELS_DB=postgres ASYNCMODELS_PG_NAME=$(PG_NAME) \
	ASYNCMODELS_TEST_SERVICES=real ASYNCMODELS_REDIS_URL=$(REDIS_TEST_URL) \
	$(BIN)/pytest -q

# The admin over a million calls on PostgreSQL (its own database, dropped at the end), against a
# stock ModelAdmin on the same rows; prints ratios and query plans. BENCH_ARGS='--rows 100000'.
BENCH_ARGS ?=

.PHONY: bench-admin
bench-admin: $(BIN)/.installed
	$(BIN)/python bench/admin_list.py $(BENCH_ARGS)

# Issue 6's scale targets on PostgreSQL + Redis (db 7): a recovery pass over a million finished
# calls with a hundred stranded ones (against the same pass over a table holding only them), the
# plan of every statement recovery, a call, the job and the admin list send, and three real workers' (forking, simple, lean)
# memory after 100 and 10,000 calls. Its own database (asyncmodels_bench_scale, or
# $$ASYNCMODELS_BENCH_DB), dropped at the end. SCALE_ARGS='--quick' is the < 60 s smoke test.
SCALE_ARGS ?=

.PHONY: bench-scale
bench-scale: $(BIN)/.installed
	$(BIN)/python bench/scale.py $(SCALE_ARGS)

# The statements of asyncmodels_status, asyncmodels_retry's selection and asyncmodels_prune on a
# million seeded calls, timed and EXPLAINed (its own database, asyncmodels_bench_operate or
# $$ASYNCMODELS_BENCH_DB, dropped at the end); fails if one scans the calls table.
OPERATE_ARGS ?=

.PHONY: bench-operate
bench-operate: $(BIN)/.installed
	$(BIN)/python bench/operate.py $(OPERATE_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) var .mypy_cache .ruff_cache .pytest_cache

# The chaos run on PostgreSQL: 500 calls drain while real workers are killed mid-call, the Redis
# (its own server, never 6379) is flushed and restarted and the database connections are dropped;
# it fails if any call was lost or ran twice. The database (and its "_other" twin, which the
# settings also open) is created first if missing. CHAOS_ARGS='-v 2' shows every fault.
CHAOS_PG_NAME ?= asyncmodels_chaos
CHAOS_ARGS ?=

.PHONY: chaos
chaos: $(BIN)/.installed
	@for db in $(CHAOS_PG_NAME) $(CHAOS_PG_NAME)_other; do \
	    psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$$db'" \
	        | grep -q 1 || createdb -h 127.0.0.1 -U postgres "$$db" || exit 1; \
	done
	ASYNCMODELS_DB=postgres ASYNCMODELS_PG_NAME=$(CHAOS_PG_NAME) $(MANAGE) chaos --calls 500 $(CHAOS_ARGS)

# Throughput on PostgreSQL + Redis (db 4) with real workers: enqueue (1 and 100 calls per
# transaction), bulk_call, execution with 1 and 2 forking / non-forking workers, each against
# bare RQ and hand-written baselines measured in the same run; prints one table of ratios.
# Its own database (asyncmodels_bench_tp, or $ASYNCMODELS_BENCH_DB), dropped at the end.
# BENCH_ARGS='--quick' is the < 30 s smoke test; BENCH_ARGS='--repeat 5 --jobs 2000' and so on.
.PHONY: bench
bench: $(BIN)/.installed
	$(BIN)/python bench/throughput.py $(BENCH_ARGS)

# Execution with one worker against two durable peers, django-tasks' database backend
# (django-tasks-db's db_worker) and Procrastinate, draining the same no-op calls; prints the
# ratios. The peers go into a virtualenv of the benchmark's own ($(BENCH_VENV)), never into the
# library's dependencies. PostgreSQL databases asyncmodels_bench_peers* (dropped at the end),
# Redis db 6. BENCH_PEERS_ARGS='--quick' is the < 60 s smoke test; '--calls 1000 --repeat 5'.
BENCH_VENV ?= .venv-bench
BENCH_PEERS_ARGS ?=
PEERS_SPEC ?= 'django-tasks>=0.12' 'django-tasks-db>=0.13' 'procrastinate>=3.10'

$(BENCH_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q -e ".[dev]" "$(DJANGO_SPEC)" $(PEERS_SPEC)
	touch $@

.PHONY: bench-peers
bench-peers: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python bench/peers.py $(BENCH_PEERS_ARGS)
