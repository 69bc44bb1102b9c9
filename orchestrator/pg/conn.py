"""Opening connections: timeouts, bounded retries, readable errors, no secret leaks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.config import DatabaseConfig
from orchestrator.errors import ExternalError
from orchestrator.logging import scrub
from orchestrator.retry import call_with_retry, pg_retrying

APPLICATION_NAME = "orchestrate"


def connect(
    db: DatabaseConfig,
    *,
    dbname: str | None = None,
    autocommit: bool = True,
    role: str = "",
    lock_timeout_ms: int = 10_000,
    statement_timeout_ms: int = 0,
    attempts: int = 5,
) -> psycopg.Connection[Any]:
    """Connect with retries on transient failures.

    lock_timeout keeps a DDL statement from queueing behind a long transaction and
    blocking every query behind it (the classic migration outage).
    """
    options = f"-c lock_timeout={lock_timeout_ms} -c statement_timeout={statement_timeout_ms}"
    conninfo = db.conninfo(dbname=dbname)
    name = f"{APPLICATION_NAME}{'-' + role if role else ''}"

    def _open() -> psycopg.Connection[Any]:
        return psycopg.connect(
            conninfo, autocommit=autocommit, application_name=name, options=options
        )

    try:
        return call_with_retry(_open, policy=pg_retrying(attempts=attempts))
    except psycopg.Error as exc:
        where = db.describe() if dbname is None else f"{db.user}@{db.host}:{db.port}/{dbname}"
        raise ExternalError(
            f"cannot connect to {where}: {scrub(str(exc)).strip()}",
            hint="check host, port, database, user and the password source in the config",
        ) from exc


@contextmanager
def connection(db: DatabaseConfig, **kwargs: Any) -> Iterator[psycopg.Connection[Any]]:
    conn = connect(db, **kwargs)
    try:
        yield conn
    finally:
        conn.close()


def server_major(conn: psycopg.Connection[Any]) -> int:
    return int(conn.info.server_version) // 10000


def scalar(conn: psycopg.Connection[Any], query: str | sql.Composable, *params: Any) -> Any:
    row = conn.execute(query, params or None).fetchone()  # type: ignore[arg-type]
    return None if row is None else row[0]
