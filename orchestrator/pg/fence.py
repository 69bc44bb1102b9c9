"""Fencing the application's writes on one side during a switchover or rollback.

The fence makes the application role's sessions read-only in that database
(``ALTER ROLE .. IN DATABASE .. SET default_transaction_read_only``) and ends the
sessions that exist, so that pooled connections come back read-only. Reads keep
working; writes fail fast instead of landing on the side that is being left,
which is what guarantees that no acknowledged write is missed by the final
catch-up. A role that turns read-only off by itself defeats it: see docs/.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, cast

import psycopg
from psycopg import sql

# The role's client sessions in this database (ours excepted) begun before a moment.
_END_OLDER_SESSIONS = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
    "WHERE usename = %s AND datname = current_database() AND pid <> pg_backend_pid() "
    "AND backend_type = 'client backend' AND backend_start < %s"
)


def _now(conn: psycopg.Connection[Any]) -> datetime:
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return cast(datetime, row[0])


def fence_sql(role: str, dbname: str) -> sql.Composed:
    return sql.SQL("ALTER ROLE {} IN DATABASE {} SET default_transaction_read_only = on").format(
        sql.Identifier(role), sql.Identifier(dbname))


def fence(conn: psycopg.Connection[Any], role: str, *, wait: float = 10.0) -> int:
    """Fence ``role`` in the current database. Returns how many sessions were ended.

    Only sessions that began before the fence are ended: the ones an application pool
    opens right after it are already read-only, and ending them again would only
    lengthen the pause.
    """
    conn.execute(fence_sql(role, conn.info.dbname))
    fenced_at = _now(conn)
    ended = 0
    deadline = time.monotonic() + wait
    while True:
        rows = conn.execute(_END_OLDER_SESSIONS, (role, fenced_at)).fetchall()
        ended += len(rows)
        if not rows or time.monotonic() > deadline:
            return ended
        time.sleep(0.01)


def unfence(conn: psycopg.Connection[Any], role: str, *, wait: float = 5.0) -> int:
    """Lift the fence and recycle the sessions opened under it (they stay read-only
    until they reconnect). Idle ones go first; busy ones are given ``wait`` seconds
    to finish their request. Returns how many sessions were ended."""
    conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} RESET default_transaction_read_only"
                         ).format(sql.Identifier(role), sql.Identifier(conn.info.dbname)))
    lifted_at = _now(conn)
    ended = 0
    deadline = time.monotonic() + wait
    while True:
        force = time.monotonic() > deadline
        rows = conn.execute(
            _END_OLDER_SESSIONS + " AND (%s OR state IN ('idle', 'idle in transaction (aborted)'))",
            (role, lifted_at, force),
        ).fetchall()
        ended += len(rows)
        remaining = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s "
            "AND datname = current_database() AND backend_start < %s "
            "AND backend_type = 'client backend'", (role, lifted_at)).fetchone()
        if not remaining or remaining[0] == 0 or force:
            return ended
        time.sleep(0.05)
