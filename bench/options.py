"""The command-line options that the benchmarks with rounds, Redis and databases of their own share."""

from __future__ import annotations

import argparse


def benchmark_parser(description: str | None, redis_db: int) -> argparse.ArgumentParser:
    """A parser with ``--repeat``, ``--redis-db`` (default ``redis_db``) and ``--keep``; add the rest."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the table shows medians (3)")
    parser.add_argument(
        "--redis-db", type=int, default=redis_db, help=f"Redis database number, flushed ({redis_db})"
    )
    parser.add_argument("--keep", action="store_true", help="keep the benchmark databases afterwards")
    return parser
