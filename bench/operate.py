"""Benchmark: the on-call commands' statements over a million calls on PostgreSQL (issue 8).

    .venv/bin/python bench/operate.py [--rows 1000000] [--keep]

Seeds ``--rows`` calls (``bench/seeding.py``: 30 days of mostly succeeded calls, 3 % failed, the
newest 70 unfinished) in a database of its own (``asyncmodels_bench_operate``, or
``$ASYNCMODELS_BENCH_DB``, and its ``_other`` twin that the settings open; made with a marker
comment, dropped at the end unless ``--keep``; a database of that name it did not make is
refused), then captures every statement that ``read_status()`` (``asyncmodels_status``), a
retry selection (``asyncmodels_retry --method … --error … --since 1d``), a dry-run prune and two
batches of a real prune (7 days for succeeded calls, 30 for failed; ``asyncmodels_prune``) send,
times each, and EXPLAINs each (``ANALYZE`` for reads, plain for writes and locking reads). A
statement is flagged if its plan has a sequential scan of the calls table, except the dry-run's
counts: they count every prunable row (three quarters of the seeded table), where PostgreSQL
rightly prefers a scan.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATABASE = os.environ.get("ASYNCMODELS_BENCH_DB", "asyncmodels_bench_operate")
MARKER = "made by asyncmodels bench/operate.py"
DATABASES = (DATABASE, DATABASE + "_other")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--rows", type=int, default=1_000_000, help="calls to seed (1000000)")
parser.add_argument("--keep", action="store_true", help="keep the databases afterwards")
ARGS = parser.parse_args()
os.environ.update(
    DJANGO_SETTINGS_MODULE="testproject.settings", ASYNCMODELS_DB="postgres", ASYNCMODELS_PG_NAME=DATABASE
)

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402
from tabulate import tabulate  # noqa: E402

from asyncmodels.bulk_retry import CallSelection, select_calls  # noqa: E402
from asyncmodels.retention import count_prunable, prune_finished_calls  # noqa: E402
from asyncmodels.status import read_status  # noqa: E402
from bench.databases import create_databases, drop_databases  # noqa: E402
from bench.seeding import seed_calls  # noqa: E402

DAY = datetime.timedelta(days=1)
RETENTION = {"succeeded": 7 * DAY, "failed": 30 * DAY}


def scans(node: dict[str, Any]) -> list[str]:
    """The scan nodes of a plan: ``Index Scan asyncmodels_call_pending (12 rows)``."""
    found = []
    kind = str(node.get("Node Type", ""))
    if "Scan" in kind and (node.get("Index Name") or node.get("Relation Name")):
        rows = node.get("Actual Rows", node.get("Plan Rows"))
        found.append(f"{kind} {node.get('Index Name') or node.get('Relation Name')} ({rows} rows)")
    for child in node.get("Plans", []):
        found += scans(child)
    return found


def explain(source: str, action: Any) -> list[list[str]]:
    """Run ``action``; one row per statement it sent on the calls table: time, plan, verdict."""
    with CaptureQueriesContext(connection) as captured:
        action()
    rows = []
    for query in captured.captured_queries:
        sql = query["sql"]
        if "asyncmodels_methodcall" not in sql or not sql.startswith(("SELECT", "DELETE")):
            continue
        reads = sql.startswith("SELECT") and "FOR UPDATE" not in sql
        with connection.cursor() as cursor:
            cursor.execute(f"EXPLAIN ({'ANALYZE, ' if reads else ''}FORMAT JSON) {sql}")
            (plan,) = cursor.fetchone() or ("[{}]",)
        plan = json.loads(plan) if isinstance(plan, str) else plan
        found = scans(plan[0]["Plan"])
        verdict = "SEQ SCAN" if any(s.startswith("Seq Scan asyncmodels_methodcall ") for s in found) else "ok"
        if verdict != "ok" and source.startswith("prune --dry-run") and "COUNT(" in sql:
            verdict = "ok (counts them)"  # a count of most of the table: a scan is the right plan
        short = re.sub(r'"asyncmodels_methodcall"\.', "", sql)
        short = re.sub(r"SELECT .*? FROM", "SELECT … FROM", short, count=1, flags=re.S)
        rows.append(
            [source, f"{float(query['time']) * 1000:.1f}", short[:160], "\n".join(found[:4]), verdict]
        )
    return rows


def main() -> int:
    create_databases(DATABASES, MARKER, "set ASYNCMODELS_BENCH_DB to another name")
    try:
        call_command("migrate", verbosity=0)
        seed_calls(ARGS.rows, unfinished=True)
        rows: list[list[str]] = []
        rows += explain("status", lambda: read_status("default"))
        selection = CallSelection(
            methods=("cloud.Instance.provision",), error="xl-7", finished_after=datetime.timedelta(days=1)
        )
        rows += explain("retry selection", lambda: select_calls(selection, limit=10_000))
        rows += explain("prune --dry-run", lambda: count_prunable(RETENTION))
        started = time.perf_counter()
        rows += explain("prune (2 batches)", lambda: prune_finished_calls(RETENTION, max_batches=2))
        print(f"prune of 2 batches of 1000: {time.perf_counter() - started:.2f} s with EXPLAINs")
        print(
            tabulate(
                rows, headers=["by", "ms", "statement", "scans", "verdict"], maxcolwidths=[12, 6, 70, 60, 8]
            )
        )
        return int(any(not row[-1].startswith("ok") for row in rows))
    finally:
        if not ARGS.keep:
            drop_databases(DATABASES, MARKER)


if __name__ == "__main__":
    sys.exit(main())
