"""Seeding a benchmark's database in SQL: a million calls in one ``INSERT ... SELECT``.

Django must be set up (on the benchmark's own, marked database: ``bench.databases``) first.
"""

from __future__ import annotations

import time


def seed_calls(rows: int, *, unfinished: bool = True) -> None:
    """Make the default database's calls table hold ``rows`` calls, in one INSERT ... SELECT, then
    VACUUM ANALYZE it: mostly succeeded, 3 % failed, 0.5 % cancelled, created over the last 30
    days, on Instance, Account and Echo objects. With ``unfinished``, the newest 70 are not
    finished (20 pending, 40 enqueued, 10 running), as on a live site. A table already holding
    ``rows`` calls is reused as it is.
    """
    from django.contrib.contenttypes.models import ContentType
    from django.db import connection

    from asyncmodels.models import MethodCall
    from testproject.cloud.models import Account, Echo, Instance

    if MethodCall.objects.count() == rows:
        print(f"reusing {rows:,} seeded calls")
        return
    instance, account, echo = (ContentType.objects.get_for_model(m).pk for m in (Instance, Account, Echo))
    started = time.perf_counter()
    with connection.cursor() as cursor:
        # Not .delete(): Django reads every row into Python to cascade to the tags and links.
        cursor.execute(f"TRUNCATE {MethodCall._meta.db_table} RESTART IDENTITY CASCADE")
        cursor.execute(
            """
            INSERT INTO asyncmodels_methodcall (
                content_type_id, object_id, method, queue, state, args, kwargs, result, result_note,
                error_type, error, traceback, attempts, worker, policy, attempt_log, state_reason,
                waits, progress_message, task_backend, created_at, enqueued_at, started_at, finished_at
            )
            SELECT
                CASE WHEN i %% 10 < 6 THEN %(instance)s WHEN i %% 10 < 8 THEN %(account)s ELSE %(echo)s END,
                (i %% 50000)::text,
                CASE WHEN i %% 10 < 3 THEN 'cloud.Instance.provision'
                     WHEN i %% 10 < 5 THEN 'cloud.Instance.resize'
                     WHEN i %% 10 < 6 THEN 'cloud.Instance.backup'
                     WHEN i %% 10 < 8 THEN 'cloud.Account.send_invoice'
                     ELSE 'cloud.Echo.bump' END,
                CASE WHEN i %% 10007 = 0 THEN 'batch' WHEN i %% 10 < 5 THEN 'provisioning'
                     WHEN i %% 97 = 0 THEN 'urgent' ELSE 'default' END,
                s.state,
                '[]'::jsonb, '{"size": "large"}'::jsonb,
                CASE WHEN s.state = 'succeeded' THEN '"ok"'::jsonb END, '',
                CASE WHEN s.state = 'failed' THEN 'testproject.cloud.models.ProvisioningError' ELSE '' END,
                CASE WHEN s.state = 'failed' THEN 'size ''xl-' || (i %% 1000) || ''' is not offered'
                     ELSE '' END,
                CASE WHEN s.state = 'failed' THEN 'Traceback (most recent call last):\n  ...' ELSE '' END,
                CASE WHEN s.state IN ('pending', 'enqueued', 'scheduled') THEN 0 ELSE 1 END,
                'bench-worker', '{"retries": 0}'::jsonb, '[]'::jsonb, '', 0, '', '',
                s.created, s.created, s.created + interval '1 second', s.created + interval '2 seconds'
            FROM generate_series(1, %(rows)s) AS i,
            LATERAL (
                SELECT now() - ((%(rows)s - i) * interval '30 days' / %(rows)s) AS created,
                       CASE WHEN %(unfinished)s AND i > %(rows)s - 20 THEN 'pending'
                            WHEN %(unfinished)s AND i > %(rows)s - 60 THEN 'enqueued'
                            WHEN %(unfinished)s AND i > %(rows)s - 70 THEN 'running'
                            WHEN i %% 100 < 3 THEN 'failed'
                            WHEN i %% 200 = 7 THEN 'cancelled'
                            ELSE 'succeeded' END AS state
            ) AS s
            """,
            {"rows": rows, "instance": instance, "account": account, "echo": echo, "unfinished": unfinished},
        )
        cursor.execute("VACUUM ANALYZE asyncmodels_methodcall")
    print(f"seeded {rows:,} calls in {time.perf_counter() - started:.1f} s")
