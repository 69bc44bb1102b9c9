"""The column lists of the reverse publication (green -> blue), and the tables whose
REPLICA IDENTITY FULL rules a column list out.

Re-exported by ``orchestrator.pg.replication``, which creates the publication.
"""

from __future__ import annotations

from typing import Any

import psycopg

from orchestrator.errors import ReleaseFailed
from orchestrator.pg.catalog import Table
from orchestrator.pg.names import QualifiedName


def full_identity_tables(conn: psycopg.Connection[Any], tables: list[Table]) -> set[QualifiedName]:
    """The tables (by name) whose replica identity is FULL, on the table
    itself or on any of its partitions: PostgreSQL checks the identity of the leaf a
    row lives in against the column list published through the root."""
    wanted = {t.qname for t in tables}
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND (c.relreplident = 'f' OR EXISTS (
                SELECT 1 FROM pg_partition_tree(c.oid) t JOIN pg_class p ON p.oid = t.relid
                WHERE p.relreplident = 'f'))
        """
    ).fetchall()
    return {QualifiedName(s, n) for s, n in rows} & wanted


def reverse_column_lists(green: psycopg.Connection[Any], blue_tables: list[Table],
                         green_tables: list[Table]) -> dict[QualifiedName, list[str]]:
    """The column list of each table in the reverse publication (green -> blue).

    Green may have columns blue lacks (a migration added them): those stay on green,
    so the table is published with the columns blue has. A table whose replica
    identity is FULL cannot have a column list at all (PostgreSQL then refuses every
    UPDATE and DELETE of the table on green, the forward apply's included), so it is
    published whole, which is right only when both sides have the same columns.
    Otherwise the table cannot replicate in both directions: raised here, so that the
    release stops before green takes writes. Tables absent from the result get no
    column list.
    """
    blue_by = {t.qname: t for t in blue_tables}
    common = [t for t in green_tables if t.qname in blue_by]
    full = full_identity_tables(green, common)
    columns = {t.qname: _blue_has(blue_by[t.qname], t) for t in common if t.qname not in full}
    refused = [f"{t.qname} ({differ})" for t in common
               if t.qname in full and (differ := _differences(blue_by[t.qname], t))]
    if refused:
        raise _full_identity_refused(refused)
    return columns


def _replicated(table: Table) -> list[str]:
    return [c.name for c in table.columns if not c.generated]


def _blue_has(blue: Table, green: Table) -> list[str]:
    """Green's replicated columns that blue has too, in green's order."""
    blue_cols = _replicated(blue)
    return [c for c in _replicated(green) if c in blue_cols]


def _differences(blue: Table, green: Table) -> str:
    """How the replicated columns of the two sides differ ("" when they do not)."""
    blue_cols = _replicated(blue)
    green_cols = _replicated(green)
    only_green = [c for c in green_cols if c not in blue_cols]
    only_blue = [c for c in blue_cols if c not in green_cols]
    parts = ([f"green has {', '.join(only_green)} that blue lacks"] if only_green
             else []) + ([f"blue has {', '.join(only_blue)} that green lacks"]
                         if only_blue else [])
    return "; ".join(parts)


def _full_identity_refused(refused: list[str]) -> ReleaseFailed:
    return ReleaseFailed(
        "table(s) with REPLICA IDENTITY FULL whose columns differ between blue and green: "
        f"{', '.join(refused)}. A FULL identity is the whole row, so replication can "
        "neither leave a column out (PostgreSQL refuses the UPDATEs and DELETEs of such a "
        "table) nor find a row by columns one side does not have",
        hint="give the table a primary key, or a unique index over NOT NULL columns with "
        "ALTER TABLE … REPLICA IDENTITY USING INDEX (on blue, or in a migration of this "
        "release), or leave the column change out of this release; then release again")
