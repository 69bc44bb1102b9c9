"""Reading what a database holds: tables, keys, columns, sequences, settings."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from orchestrator.pg.names import ColumnRef, QualifiedName, parse_tables

# Schemas that belong to PostgreSQL itself or to extensions' internals, never replicated.
# Schemas of PostgreSQL itself: never the application's, never compared or copied.
SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast")


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    not_null: bool
    generated: bool


@dataclass
class Table:
    schema: str
    name: str
    primary_key: list[str] = field(default_factory=list)
    replica_identity: str = "d"  # d default, n nothing, f full, i index
    identity_index_columns: list[str] = field(default_factory=list)
    columns: list[Column] = field(default_factory=list)
    est_rows: int = 0
    bytes: int = 0

    @property
    def qname(self) -> QualifiedName:
        return QualifiedName(self.schema, self.name)

    @property
    def key(self) -> list[str]:
        """The columns identifying a row for replication and chunked comparison."""
        if self.replica_identity == "i" and self.identity_index_columns:
            return self.identity_index_columns
        return self.primary_key

    @property
    def replicable(self) -> bool:
        # UPDATE/DELETE need an identity on the publisher; FULL works but is slow.
        return bool(self.key) or self.replica_identity == "f"


@dataclass(frozen=True)
class Sequence:
    schema: str
    name: str
    last_value: int | None
    increment: int
    owned_by: ColumnRef | None  # the serial or identity column it feeds

    @property
    def qname(self) -> QualifiedName:
        return QualifiedName(self.schema, self.name)


def user_tables(
    conn: psycopg.Connection[Any], *, exclude_schemas: tuple[str, ...] = (),
    exclude_tables: Iterable[str | QualifiedName] = ()
) -> list[Table]:
    """Ordinary and partitioned tables outside system schemas, with their keys.

    ``exclude_tables``: names, or ``sync.exclude_tables`` entries (names.parse_qualified).

    Partitions are skipped: the partitioned parent stands for them (replication
    publishes through the root with publish_via_partition_root).
    """
    skip = list(SYSTEM_SCHEMAS) + list(exclude_schemas)
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname, c.relreplident, c.reltuples::bigint,
               pg_total_relation_size(c.oid),
               coalesce((SELECT array_agg(a.attname ORDER BY k.ord)
                  FROM pg_index i
                  CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
                  WHERE i.indrelid = c.oid AND i.indisprimary), '{}') AS pk,
               coalesce((SELECT array_agg(a.attname ORDER BY k.ord)
                  FROM pg_index i
                  CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
                  WHERE i.indrelid = c.oid AND i.indisreplident), '{}') AS ri
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND n.nspname <> ALL(%s) AND n.nspname NOT LIKE 'pg_temp%%'
          AND n.nspname NOT LIKE 'pg_toast_temp%%'
          AND NOT EXISTS (SELECT 1 FROM pg_depend d
                          WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                            AND d.deptype = 'e')
        ORDER BY n.nspname, c.relname
        """,
        (skip,),
    ).fetchall()
    excluded = parse_tables(exclude_tables)
    tables = []
    for schema, name, ident, est, size, pk, ri in rows:
        if QualifiedName(schema, name) in excluded:
            continue
        t = Table(schema, name, list(pk), ident, list(ri), est_rows=max(0, est), bytes=size)
        t.columns = columns(conn, t.qname)
        tables.append(t)
    return tables


def columns(conn: psycopg.Connection[Any], table: QualifiedName) -> list[Column]:
    rows = conn.execute(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               a.attgenerated <> ''
        FROM pg_attribute a
        WHERE a.attrelid = format('%%I.%%I', %s::text, %s::text)::regclass
          AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        (table.schema, table.name),
    ).fetchall()
    return [Column(r[0], r[1], r[2], r[3]) for r in rows]


def sequences(conn: psycopg.Connection[Any], *, exclude_schemas: tuple[str, ...] = ()
              ) -> list[Sequence]:
    skip = list(SYSTEM_SCHEMAS) + list(exclude_schemas)
    rows = conn.execute(
        """
        SELECT s.schemaname, s.sequencename, s.last_value, s.increment_by,
               o.nspname, o.relname, o.attname
        FROM pg_sequences s
        -- The owning column's parts stay apart: joined with dots they could not be
        -- told apart again when a name holds a dot.
        LEFT JOIN LATERAL (
            SELECT dn.nspname, dc.relname, a.attname
              FROM pg_depend d
              JOIN pg_class dc ON dc.oid = d.refobjid
              JOIN pg_namespace dn ON dn.oid = dc.relnamespace
              JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
             WHERE d.classid = 'pg_class'::regclass
               AND d.objid = format('%%I.%%I', s.schemaname, s.sequencename)::regclass
               AND d.deptype IN ('a', 'i') LIMIT 1) o ON true
        WHERE s.schemaname <> ALL(%s)
        ORDER BY 1, 2
        """,
        (skip,),
    ).fetchall()
    return [Sequence(r[0], r[1], r[2], r[3],
                     ColumnRef(QualifiedName(r[4], r[5]), r[6]) if r[4] is not None else None)
            for r in rows]


def setting(conn: psycopg.Connection[Any], name: str) -> str:
    row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    return str(row[0]) if row else ""


def extensions(conn: psycopg.Connection[Any]) -> dict[str, str]:
    rows = conn.execute("SELECT extname, extversion FROM pg_extension").fetchall()
    return {r[0]: r[1] for r in rows}


def available_extensions(conn: psycopg.Connection[Any]) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM pg_available_extensions").fetchall()}


def database_exists(conn: psycopg.Connection[Any], name: str) -> bool:
    row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return row is not None


def role_exists(conn: psycopg.Connection[Any], name: str) -> bool:
    row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
    return row is not None


def referenced_roles(conn: psycopg.Connection[Any], exclude_schemas: tuple[str, ...] = ()
                     ) -> set[str]:
    """Roles that own or hold grants on the objects a schema copy would recreate."""
    skip = list(SYSTEM_SCHEMAS) + list(exclude_schemas)
    rows = conn.execute(
        """
        SELECT DISTINCT r.rolname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        CROSS JOIN LATERAL (
            SELECT c.relowner AS oid
            UNION SELECT (aclexplode(c.relacl)).grantee
        ) g
        JOIN pg_roles r ON r.oid = g.oid
        WHERE n.nspname <> ALL(%s) AND n.nspname NOT LIKE 'pg_temp%%'
        UNION
        SELECT r.rolname FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner
        WHERE n.nspname <> ALL(%s) AND n.nspname NOT LIKE 'pg\\_%%'
        """,
        (skip, skip),
    ).fetchall()
    return {r[0] for r in rows}
