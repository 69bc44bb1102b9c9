"""Materialized views: logical replication does not carry their contents.

Green's schema comes from a schema-only dump, so every materialized view arrives
there empty and unpopulated, and a refresh written as a migration runs before the
copy and fills it from empty tables. ``refresh_all`` therefore refreshes them on green
after the initial copy and before green takes traffic: a view over another view
after the one it reads, ``CONCURRENTLY`` where that is allowed (already populated, and
a unique index over plain columns without a WHERE clause), plainly otherwise.

``contents`` and ``definition_contents`` give an order-independent count and checksum
of a view's rows, and of the rows its query gives now, for validation.
"""

from __future__ import annotations

import graphlib
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.errors import ReleaseFailed
from orchestrator.pg.catalog import SYSTEM_SCHEMAS
from orchestrator.pg.diff import SESSION_SETTINGS
from orchestrator.pg.names import QualifiedName


@dataclass(frozen=True)
class MatView:
    schema: str
    name: str
    populated: bool
    # A unique index of plain columns without WHERE: what CONCURRENTLY needs.
    concurrent_ok: bool

    @property
    def qname(self) -> QualifiedName:
        return QualifiedName(self.schema, self.name)

    @property
    def qualified(self) -> str:
        """For messages and reports: quoted as PostgreSQL quotes it."""
        return self.qname.display

    @property
    def ident(self) -> sql.Identifier:
        return self.qname.ident


@dataclass(frozen=True)
class Refreshed:
    matview: str
    mode: str  # "concurrently", "plain" or "skipped (unpopulated on blue)"
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"matview": self.matview, "mode": self.mode, "seconds": round(self.seconds, 3)}


def matviews(conn: psycopg.Connection[Any], *, exclude_schemas: tuple[str, ...] = ()
             ) -> list[MatView]:
    """The materialized views outside system and excluded schemas, each after every
    materialized view it reads (directly or through plain views)."""
    skip = [*SYSTEM_SCHEMAS, *exclude_schemas]
    rows = conn.execute(
        """
        SELECT c.oid, n.nspname, c.relname, c.relispopulated,
               EXISTS (SELECT 1 FROM pg_index i
                       WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid
                         AND i.indpred IS NULL AND i.indexprs IS NULL)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'm' AND n.nspname <> ALL(%s)
          AND NOT EXISTS (SELECT 1 FROM pg_depend d
                          WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                            AND d.deptype = 'e')
        """,
        (skip,),
    ).fetchall()
    views = {r[0]: MatView(r[1], r[2], bool(r[3]), bool(r[4])) for r in rows}
    # What each view or materialized view reads, from its rewrite rule's dependencies.
    edges: dict[int, set[int]] = {}
    kinds: dict[int, str] = {}
    for dependent, referenced, kind in conn.execute(
        """
        SELECT DISTINCT r.ev_class, d.refobjid, rc.relkind::text
        FROM pg_rewrite r
        JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                        AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class
        JOIN pg_class rc ON rc.oid = d.refobjid
        WHERE rc.relkind IN ('m', 'v')
        """
    ).fetchall():
        edges.setdefault(dependent, set()).add(referenced)
        kinds[referenced] = kind

    def read_matviews(oid: int, seen: set[int]) -> set[int]:
        found: set[int] = set()
        for ref in edges.get(oid, ()):
            if ref in seen:
                continue
            seen.add(ref)
            if kinds.get(ref) == "m":
                found.add(ref)
            else:  # a plain view: what it reads counts too
                found |= read_matviews(ref, seen)
        return found

    graph = graphlib.TopologicalSorter(
        {oid: read_matviews(oid, set()) & views.keys() for oid in sorted(views)})
    return [views[oid] for oid in graph.static_order()]


def refresh_all(green: psycopg.Connection[Any], *, exclude_schemas: tuple[str, ...],
                populated_on_blue: set[str], timeout: float) -> list[Refreshed]:
    """Refresh green's materialized views from green's (copied) tables.

    A view blue has never populated (``WITH NO DATA``) stays unpopulated on green too:
    its owner refreshes it when it is meant to be read.
    """
    done = []
    for mv in matviews(green, exclude_schemas=exclude_schemas):
        started = time.monotonic()
        if mv.qualified not in populated_on_blue:
            done.append(Refreshed(mv.qualified, "skipped (unpopulated on blue)", 0.0))
            continue
        concurrently = mv.populated and mv.concurrent_ok
        statement = sql.SQL("REFRESH MATERIALIZED VIEW {}{}").format(
            sql.SQL("CONCURRENTLY ") if concurrently else sql.SQL(""), mv.ident)
        try:
            with green.transaction():
                green.execute("SELECT set_config('statement_timeout', %s, true)",
                              (f"{int(timeout * 1000)}",))
                green.execute(statement)
        except psycopg.Error as exc:
            raise ReleaseFailed(
                f"refreshing materialized view {mv.qualified} on green failed: "
                f"{str(exc).strip()}",
                hint="check that the view's query runs on green (a migration may have "
                "changed a table it reads), and that orchestrate's green role owns it or "
                "has MAINTAIN on it") from exc
        done.append(Refreshed(mv.qualified, "concurrently" if concurrently else "plain",
                              time.monotonic() - started))
    return done


@dataclass(frozen=True)
class Contents:
    rows: int
    checksum: str

    def __str__(self) -> str:
        return f"{self.rows} rows, checksum {self.checksum[:12]}"


def _checksum(conn: psycopg.Connection[Any], source: sql.Composable) -> Contents:
    # md5 of each row's text form, summed as numbers: independent of row order, and
    # a duplicated row counts twice. The text forms are pinned like the table diff's.
    query = sql.SQL(
        "SELECT count(*), coalesce(sum(('x' || substr(md5(t::text), 1, 15))::bit(60)"
        "::bigint::numeric), 0)::text FROM {} AS t").format(source)
    row = conn.execute(query).fetchone()
    assert row is not None
    return Contents(int(row[0]), str(row[1]))


def _pinned(conn: psycopg.Connection[Any]) -> None:
    for name, value in SESSION_SETTINGS:
        conn.execute("SELECT pg_catalog.set_config(%s, %s, true)", (name, value))


def contents(conn: psycopg.Connection[Any], mv: MatView) -> Contents:
    with conn.transaction():
        _pinned(conn)
        return _checksum(conn, mv.ident)


def contents_and_definition(conn: psycopg.Connection[Any], mv: MatView
                            ) -> tuple[Contents, Contents]:
    """The view's rows and the rows its query gives now, in one snapshot, read-only:
    tells a view that is older than its tables from one that is wrong."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        _pinned(conn)
        stored = _checksum(conn, mv.ident)
        text = conn.execute("SELECT pg_get_viewdef(%s::regclass)",
                            (mv.ident.as_string(conn),)).fetchone()
        assert text is not None
        query = str(text[0]).strip().rstrip(";")
        return stored, _checksum(conn, sql.SQL("({})").format(sql.SQL(query)))
