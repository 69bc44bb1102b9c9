"""Resumable progress: the copy's phase per slot, kept on green (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.pg.conn import scalar
from orchestrator.pg.control_schema import COPY_STATE_TABLE, ensure_green

STATE_TABLE = COPY_STATE_TABLE
# Every session of a copy carries this prefix and the slot in its application name,
# so that a rerun can end the sessions a dead run left (their psql may outlive it).
COPY_APP_PREFIX = "orch-copy:"


def app_name(slot: str) -> str:
    return (COPY_APP_PREFIX + slot)[:63]


@dataclass(frozen=True)
class CopyState:
    slot: str
    phase: str  # copying | copied | streaming
    consistent_point: str | None


def ident(*parts: str) -> sql.Composed:
    return sql.SQL(".").join([sql.Identifier(p) for p in parts])


def ensure_state_tables(conn: psycopg.Connection[Any], control_schema: str) -> None:
    """The copy's progress and deferred post-data tables (with the rest of green's)."""
    ensure_green(conn, control_schema)


def copy_state(conn: psycopg.Connection[Any], control_schema: str, slot: str
               ) -> CopyState | None:
    exists = scalar(conn, "SELECT to_regclass(%s) IS NOT NULL",
                    ident(control_schema, STATE_TABLE).as_string(conn))
    if not exists:
        return None
    row = conn.execute(sql.SQL("SELECT slot, phase, consistent_point FROM {} WHERE slot = %s"
                               ).format(ident(control_schema, STATE_TABLE)), (slot,)).fetchone()
    return None if row is None else CopyState(row[0], row[1], row[2])


def set_phase(conn: psycopg.Connection[Any], control_schema: str, slot: str, phase: str,
              **values: Any) -> None:
    conn.execute(sql.SQL(
        "INSERT INTO {} AS s (slot, phase, consistent_point, jobs) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (slot) DO UPDATE SET phase = excluded.phase, "
        "consistent_point = coalesce(excluded.consistent_point, s.consistent_point), "
        "jobs = coalesce(excluded.jobs, s.jobs), updated_at = now()"
    ).format(ident(control_schema, STATE_TABLE)),
        (slot, phase, values.get("consistent_point"), values.get("jobs")))


def slot_exists(conn: psycopg.Connection[Any], slot: str) -> bool:
    return bool(scalar(conn, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", slot))


def subscription_on_slot(conn: psycopg.Connection[Any], slot: str) -> bool:
    return bool(scalar(conn, "SELECT 1 FROM pg_subscription WHERE subslotname = %s "
                       "AND subdbid = (SELECT oid FROM pg_database "
                       "WHERE datname = current_database())", slot))


def end_copy_sessions(conn: psycopg.Connection[Any], slot: str) -> int:
    """End sessions of an earlier run's copy pipes (their psql may outlive it)."""
    rows = conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = %s AND pid <> pg_backend_pid()",
        (app_name(slot),)).fetchall()
    return len(rows)

