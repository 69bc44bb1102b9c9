"""Recording and dropping green's post-data objects right before the initial copy.

What is taken off, what is kept in place, and why: ``orchestrator.pg.schema_sections``.
The catalog is read in three passes, foreign keys first: a key or index that a kept
foreign key depends on must be known as pinned before the keys and indexes are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

from orchestrator.errors import ReleaseFailed
from orchestrator.pg.control_schema import DEFERRED_TABLE
from orchestrator.pg.post_data import (
    STEP_ATTACH,
    STEP_BUILD,
    STEP_FOREIGN_KEYS,
    as_text,
    ensure_table,
    relation,
)

# One row of the deferred table: step, kind, schema_name, table_name, object_name,
# statements, validate, ref_schema, ref_table.
_Record = tuple[int, str, str, str, str, list[str], bool, str | None, str | None]


@dataclass
class DeferReport:
    indexes: int = 0
    constraints: int = 0
    foreign_keys: int = 0
    # Objects left in place, with the reason, e.g. a key referenced from a
    # partitioned table.
    kept: list[str] = field(default_factory=list)


@dataclass
class _Deferral:
    """What one ``defer_post_data`` run records and drops, gathered in catalog order."""

    report: DeferReport
    records: list[_Record] = field(default_factory=list)
    # A key some foreign key depends on can only go if that foreign key goes too.
    pinned: set[int] = field(default_factory=set)
    key_indexes: set[int] = field(default_factory=set)
    # Foreign keys first, then the keys they may depend on.
    drop_constraints: list[tuple[str, str, str]] = field(default_factory=list)
    drop_indexes: list[tuple[str, str]] = field(default_factory=list)


_OIDS = """
SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN unnest(%s::text[], %s::text[]) AS q(s, t) ON q.s = n.nspname AND q.t = c.relname
WHERE c.relkind = 'r'
"""


def defer_post_data(conn: psycopg.Connection[Any], tables: list[tuple[str, str]], *,
                    control_schema: str) -> DeferReport:
    """Record and drop the post-data objects of ``tables`` ((schema, name) pairs).

    One transaction: either every dropped object is recorded, or nothing changed.
    Objects already recorded by an earlier run stay recorded once; objects that an
    earlier ``restore_post_data`` already rebuilt are dropped again.
    """
    ensure_table(conn, control_schema)
    report = DeferReport()
    schemas = [s for s, _ in tables]
    names = [t for _, t in tables]
    with conn.transaction():
        oids = [r[0] for r in conn.execute(_OIDS, (schemas, names)).fetchall()]
        if not oids:
            return report
        deferral = _Deferral(report)
        _defer_foreign_keys(conn, oids, deferral)
        _defer_keys(conn, oids, deferral)
        _defer_indexes(conn, oids, deferral)
        _record(conn, control_schema, deferral.records)
        _drop(conn, deferral)
    return report


def _default_tablespace(conn: psycopg.Connection[Any], tablespace: str) -> str:
    return as_text(conn, sql.SQL("SET LOCAL default_tablespace = {}").format(
        sql.Literal(tablespace)))


# --------------------------------------------------------------------- foreign keys


class _ForeignKey(NamedTuple):
    oid: int
    conname: str
    nsp: str
    rel: str
    condef: str
    validated: bool
    relkind: str
    inherited: bool
    frelkind: str
    conindid: int
    fnsp: str
    frel: str


def _defer_foreign_keys(conn: psycopg.Connection[Any], oids: list[int],
                        deferral: _Deferral) -> None:
    rows = conn.execute(
        """
        SELECT con.oid, con.conname, n.nspname, c.relname, pg_get_constraintdef(con.oid),
               con.convalidated, c.relkind, con.conparentid <> 0, fc.relkind, con.conindid,
               fn.nspname, fc.relname
        FROM pg_constraint con
        JOIN pg_class c ON c.oid = con.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_class fc ON fc.oid = con.confrelid
        JOIN pg_namespace fn ON fn.oid = fc.relnamespace
        WHERE con.contype = 'f' AND (con.conrelid = ANY(%s) OR con.confrelid = ANY(%s))
        ORDER BY 1
        """, (oids, oids)).fetchall()
    for fk in map(_ForeignKey._make, rows):
        if fk.relkind != "r" or fk.inherited or fk.frelkind != "r":
            deferral.pinned.add(fk.conindid)
            deferral.report.kept.append(
                f"foreign key {fk.conname} on {fk.nsp}.{fk.rel} (partitioned)")
            continue
        deferral.records.append(_foreign_key_record(conn, fk))
        deferral.drop_constraints.append((fk.nsp, fk.rel, fk.conname))
        deferral.report.foreign_keys += 1


def _foreign_key_record(conn: psycopg.Connection[Any], fk: _ForeignKey) -> _Record:
    table = relation(fk.nsp, fk.rel)
    ident = sql.Identifier(fk.conname)
    enforced = "NOT ENFORCED" not in fk.condef  # PostgreSQL 18 can keep an FK unchecked
    check = fk.validated and enforced
    add = sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}{}").format(
        table, ident, sql.SQL(fk.condef),
        sql.SQL(" NOT VALID") if check else sql.SQL(""))
    stmts = [as_text(conn, add)]
    if check:
        stmts.append(as_text(conn, sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
            table, ident)))
    return (STEP_FOREIGN_KEYS, "fk", fk.nsp, fk.rel, fk.conname, stmts, check, fk.fnsp,
            fk.frel)


# --------------------------------------------------------------------- keys


class _Key(NamedTuple):
    conname: str
    nsp: str
    rel: str
    contype: str
    conindid: int
    condef: str
    indexdef: str
    deferrable: bool
    deferred: bool
    tablespace: str
    comment: str | None
    index_name: str


def _defer_keys(conn: psycopg.Connection[Any], oids: list[int], deferral: _Deferral) -> None:
    rows = conn.execute(
        """
        SELECT con.conname, n.nspname, c.relname, con.contype, con.conindid,
               pg_get_constraintdef(con.oid), pg_get_indexdef(con.conindid),
               con.condeferrable, con.condeferred, coalesce(ts.spcname, ''),
               obj_description(con.oid, 'pg_constraint'), ic.relname
        FROM pg_constraint con
        JOIN pg_class c ON c.oid = con.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_class ic ON ic.oid = con.conindid
        LEFT JOIN pg_tablespace ts ON ts.oid = ic.reltablespace
        WHERE con.contype IN ('p', 'u', 'x') AND con.conrelid = ANY(%s)
          AND con.conparentid = 0
        ORDER BY 1
        """, (oids,)).fetchall()
    for key in map(_Key._make, rows):
        deferral.key_indexes.add(key.conindid)
        if key.conindid in deferral.pinned:
            deferral.report.kept.append(f"constraint {key.conname} on {key.nsp}.{key.rel} "
                                        "(referenced from a partitioned table)")
            continue
        deferral.records.extend(_key_records(conn, key))
        deferral.drop_constraints.append((key.nsp, key.rel, key.conname))
        deferral.report.constraints += 1


def _key_records(conn: psycopg.Connection[Any], key: _Key) -> list[_Record]:
    """An exclusion constraint is re-added as it was; a primary or unique key has its
    index built like a plain one and then attached; a comment follows either."""
    table = relation(key.nsp, key.rel)
    ident = sql.Identifier(key.conname)
    ts = _default_tablespace(conn, key.tablespace)
    records: list[_Record] = []
    if key.contype == "x":
        records.append((STEP_BUILD, "constraint", key.nsp, key.rel, key.conname, [ts, as_text(
            conn, sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                table, ident, sql.SQL(key.condef)))], False, None, None))
    else:
        # Built under the constraint's name: USING INDEX renames it anyway.
        build = key.indexdef if key.index_name == key.conname else _rename_index(
            conn, key.indexdef, key.index_name, key.conname)
        records.append((STEP_BUILD, "index", key.nsp, key.rel, key.conname, [ts, build],
                        False, None, None))
        attach = sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {} USING INDEX {}{}{}").format(
            table, ident, sql.SQL("PRIMARY KEY" if key.contype == "p" else "UNIQUE"), ident,
            sql.SQL(" DEFERRABLE") if key.deferrable else sql.SQL(""),
            sql.SQL(" INITIALLY DEFERRED") if key.deferred else sql.SQL(""))
        records.append((STEP_ATTACH, "attach", key.nsp, key.rel, key.conname,
                        [as_text(conn, attach)], False, None, None))
    if key.comment is not None:
        records.append((STEP_ATTACH, "extra", key.nsp, key.rel, f"comment:{key.conname}", [
            as_text(conn, sql.SQL("COMMENT ON CONSTRAINT {} ON {} IS {}").format(
                ident, table, sql.Literal(key.comment)))], False, None, None))
    return records


def _rename_index(conn: psycopg.Connection[Any], indexdef: str, old: str, new: str) -> str:
    """pg_get_indexdef output with the index named ``new`` instead of ``old``."""
    row = conn.execute("SELECT quote_ident(%s), quote_ident(%s)", (old, new)).fetchone()
    assert row is not None
    for prefix in ("CREATE UNIQUE INDEX ", "CREATE INDEX "):
        head = f"{prefix}{row[0]} ON "
        if indexdef.startswith(head):
            return f"{prefix}{row[1]} ON {indexdef[len(head):]}"
    raise ReleaseFailed(f"unexpected index definition for {old}: {indexdef[:120]}")


# --------------------------------------------------------------------- indexes


class _Index(NamedTuple):
    indexrelid: int
    iname: str
    nsp: str
    rel: str
    indexdef: str
    tablespace: str
    clustered: bool
    replident: bool
    comment: str | None
    stattargets: list[str] | None


def _defer_indexes(conn: psycopg.Connection[Any], oids: list[int],
                   deferral: _Deferral) -> None:
    rows = conn.execute(
        """
        SELECT i.indexrelid, ic.relname, n.nspname, c.relname,
               pg_get_indexdef(i.indexrelid), coalesce(ts.spcname, ''),
               i.indisclustered, i.indisreplident,
               obj_description(i.indexrelid, 'pg_class'),
               (SELECT array_agg(a.attnum::text || ':' || a.attstattarget::text
                                 ORDER BY a.attnum)
                  FROM pg_attribute a WHERE a.attrelid = i.indexrelid
                   AND coalesce(a.attstattarget::int, -1) >= 0)
        FROM pg_index i
        JOIN pg_class ic ON ic.oid = i.indexrelid
        JOIN pg_class c ON c.oid = i.indrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_tablespace ts ON ts.oid = ic.reltablespace
        WHERE i.indrelid = ANY(%s) AND i.indisvalid
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                          AND d.objid = i.indexrelid AND d.deptype = 'e')
        ORDER BY 1
        """, (oids,)).fetchall()
    for index in map(_Index._make, rows):
        _defer_index(conn, index, deferral)


def _defer_index(conn: psycopg.Connection[Any], index: _Index, deferral: _Deferral) -> None:
    """A plain index is rebuilt; a key's index is the key's (``_key_records``), but
    either may carry settings of its own that come back after it."""
    owner_is_key = index.indexrelid in deferral.key_indexes
    if index.indexrelid in deferral.pinned:
        if not owner_is_key:
            deferral.report.kept.append(f"index {index.nsp}.{index.iname} (referenced from "
                                        "a partitioned table)")
        return
    if not owner_is_key:
        ts = _default_tablespace(conn, index.tablespace)
        deferral.records.append((STEP_BUILD, "index", index.nsp, index.rel, index.iname,
                                 [ts, index.indexdef], False, None, None))
        deferral.drop_indexes.append((index.nsp, index.iname))
        deferral.report.indexes += 1
    extras = _index_extras(conn, index, owner_is_key=owner_is_key)
    if extras:
        deferral.records.append((STEP_ATTACH, "extra", index.nsp, index.rel,
                                 f"index:{index.iname}", extras, False, None, None))


def _index_extras(conn: psycopg.Connection[Any], index: _Index, *,
                  owner_is_key: bool) -> list[str]:
    """CLUSTER ON, REPLICA IDENTITY, comment and per-column statistics targets."""
    table = relation(index.nsp, index.rel)
    qualified = relation(index.nsp, index.iname)
    extras: list[str] = []
    if index.clustered:
        extras.append(as_text(conn, sql.SQL("ALTER TABLE {} CLUSTER ON {}").format(
            table, sql.Identifier(index.iname))))
    if index.replident:
        extras.append(as_text(conn, sql.SQL("ALTER TABLE {} REPLICA IDENTITY USING INDEX {}"
                                            ).format(table, sql.Identifier(index.iname))))
    if index.comment is not None and not owner_is_key:
        extras.append(as_text(conn, sql.SQL("COMMENT ON INDEX {} IS {}").format(
            qualified, sql.Literal(index.comment))))
    for item in index.stattargets or []:
        attnum, target = item.split(":")
        extras.append(as_text(conn, sql.SQL(
            "ALTER INDEX {} ALTER COLUMN {} SET STATISTICS {}").format(
                qualified, sql.Literal(int(attnum)), sql.Literal(int(target)))))
    return extras


# --------------------------------------------------------------------- write and drop


def _record(conn: psycopg.Connection[Any], control_schema: str,
            records: list[_Record]) -> None:
    for record in records:
        conn.execute(sql.SQL(
            "INSERT INTO {}.{} (step, kind, schema_name, table_name, object_name, "
            "statements, validate, ref_schema, ref_table) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (kind, schema_name, table_name, object_name) DO NOTHING"
        ).format(sql.Identifier(control_schema), sql.Identifier(DEFERRED_TABLE)), record)


def _drop(conn: psycopg.Connection[Any], deferral: _Deferral) -> None:
    for nsp, rel, name in deferral.drop_constraints:
        conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
            relation(nsp, rel), sql.Identifier(name)))
    for nsp, name in deferral.drop_indexes:
        conn.execute(sql.SQL("DROP INDEX {}").format(relation(nsp, name)))
