"""The PostgreSQL databases a benchmark makes for itself, marked so that it drops only its own.

Each script passes its own marker (a comment written on the databases it creates); a database of
one of its names that lacks that marker is refused, never used nor dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg


def connect(dbname: str) -> psycopg.Connection[Any]:
    """An autocommit connection to ``dbname`` on 127.0.0.1:5432 as user postgres."""
    return psycopg.connect(host="127.0.0.1", user="postgres", dbname=dbname, autocommit=True)


def _marker_of(conn: psycopg.Connection[Any], name: str) -> tuple[str | None] | None:
    return conn.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", [name]
    ).fetchone()


def create_databases(names: Iterable[str], marker: str, hint: str) -> None:
    """Create the databases ``names`` carrying ``marker``, or reuse ones an earlier run made (and kept).

    Raises ``SystemExit`` (with ``hint``, how to choose other names) if one exists without ``marker``.
    """
    with connect("postgres") as conn:
        for name in names:
            found = _marker_of(conn, name)
            if found is None:
                conn.execute(f'CREATE DATABASE "{name}"')
                conn.execute(f"COMMENT ON DATABASE \"{name}\" IS '{marker}'")
            elif found[0] != marker:
                raise SystemExit(f"database {name!r} exists and was not made by this benchmark; {hint}")


def drop_databases(names: Iterable[str], marker: str) -> None:
    """Drop those of the databases ``names`` that carry ``marker``; close Django's connections first."""
    from django.db import connections

    connections.close_all()
    with connect("postgres") as conn:
        for name in names:
            found = _marker_of(conn, name)
            if found is not None and found[0] == marker:
                conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
