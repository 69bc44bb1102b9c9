"""The recorded post-data objects: what one is, and the table on green that keeps them.

``post_data_defer`` writes the records and ``post_data_restore`` runs them again;
the whole design is in ``orchestrator.pg.schema_sections``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.pg.control_schema import DEFERRED_TABLE, ensure_green

# Steps, run in this order; items of one step run in parallel.
STEP_BUILD = 1  # CREATE INDEX, ADD exclusion constraint
STEP_ATTACH = 2  # ADD CONSTRAINT .. USING INDEX, then CLUSTER ON, REPLICA IDENTITY, comments
STEP_FOREIGN_KEYS = 3  # ADD .. NOT VALID, VALIDATE CONSTRAINT


@dataclass(frozen=True)
class Deferred:
    """One recorded post-data object and the statements that bring it back."""

    id: int
    step: int
    kind: str  # index | constraint | attach | fk | extra
    schema: str
    table: str
    name: str
    statements: list[str]
    validate: bool
    ref_schema: str | None = None  # foreign keys: the referenced table
    ref_table: str | None = None

    @property
    def qualified_table(self) -> tuple[str, str]:
        return self.schema, self.table


def ensure_table(conn: psycopg.Connection[Any], control_schema: str) -> None:
    ensure_green(conn, control_schema)


def as_text(conn: psycopg.Connection[Any], obj: sql.Composable) -> str:
    return obj.as_string(conn)


def relation(schema: str, name: str) -> sql.Composed:
    return sql.SQL(".").join([sql.Identifier(schema), sql.Identifier(name)])


def pending(conn: psycopg.Connection[Any], control_schema: str) -> list[Deferred]:
    """Recorded objects, restored or not (empty when nothing was deferred)."""
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (as_text(conn, relation(
        control_schema, DEFERRED_TABLE)),)).fetchone()
    if not exists or not exists[0]:
        return []
    rows = conn.execute(sql.SQL(
        "SELECT id, step, kind, schema_name, table_name, object_name, statements, validate, "
        "ref_schema, ref_table FROM {}.{} ORDER BY step, id").format(
            sql.Identifier(control_schema), sql.Identifier(DEFERRED_TABLE))).fetchall()
    return [Deferred(r[0], r[1], r[2], r[3], r[4], r[5], list(r[6]), r[7], r[8], r[9])
            for r in rows]


def done_ids(conn: psycopg.Connection[Any], control_schema: str, ids: list[int]) -> None:
    """Forget recorded objects that are back."""
    if ids:
        conn.execute(sql.SQL("DELETE FROM {}.{} WHERE id = ANY(%s)").format(
            sql.Identifier(control_schema), sql.Identifier(DEFERRED_TABLE)), (ids,))
