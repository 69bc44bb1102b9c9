"""Green's post-data section: taken off before the initial copy, rebuilt after it.

Loading rows into a table that already has its indexes costs several times more
than loading a bare heap and building each index once with a sort, and foreign keys
cannot be checked row by row cheaper than in one join afterwards. pg_restore knows
this (its post-data section), but orchestrate cannot use blue's dump for it: the
``migrate`` state runs the release's migrations on green between provisioning and
the copy, so the indexes and constraints green must end with are green's own
(a migration may have added, dropped or renamed some). They are therefore read
from green's catalog right before the copy (``pg_get_indexdef`` /
``pg_get_constraintdef`` of the same server that will run them again), written to
a table in orchestrate's schema on green and dropped, all in one transaction; after
the copy ``restore_post_data`` runs them again, several sessions at once.

Every step can be repeated after a crash: an object counts as restored when it
exists in green's catalog (a non-concurrent CREATE INDEX or ALTER TABLE commits
whole or not at all), so a rerun builds only what is missing, and the recorded
definitions are deleted only when everything is back.

What is taken off, on the copied (non-partitioned) tables:
- plain indexes (rebuilt in parallel, largest table first);
- primary-key and unique constraints: their index is built like a plain one (so
  several indexes of one table build at once, CREATE INDEX only takes a SHARE lock)
  and then attached with ``ADD CONSTRAINT .. USING INDEX``;
- exclusion constraints (re-added as they were);
- foreign keys from or to a copied table: re-added NOT VALID and then validated, so
  a validation holds only SHARE UPDATE EXCLUSIVE and several run at once.
Kept in place: CHECK and NOT NULL constraints (checked per row, cheap), triggers
(the copy runs with session_replication_role = replica, so they do not fire, as in
logical replication's apply), and anything of a partitioned table, whose index tree
(ON ONLY + ATTACH PARTITION) is not worth re-creating here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from orchestrator.config import DatabaseConfig
from orchestrator.errors import ReleaseFailed
from orchestrator.logging import scrub
from orchestrator.pg.conn import connect
from orchestrator.pg.control_schema import DEFERRED_TABLE, ensure_green

# Steps, run in this order; items of one step run in parallel.
STEP_BUILD = 1  # CREATE INDEX, ADD exclusion constraint
STEP_ATTACH = 2  # ADD CONSTRAINT .. USING INDEX, then CLUSTER ON, REPLICA IDENTITY, comments
STEP_FOREIGN_KEYS = 3  # ADD .. NOT VALID, VALIDATE CONSTRAINT

Progress = Callable[[str, int, int], None]
_U = TypeVar("_U")


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


@dataclass
class DeferReport:
    indexes: int = 0
    constraints: int = 0
    foreign_keys: int = 0
    # Objects left in place, with the reason, e.g. a key referenced from a
    # partitioned table.
    kept: list[str] = field(default_factory=list)


@dataclass
class PostDataStats:
    items: int = 0
    skipped: int = 0  # already present (a rerun)
    seconds: float = 0.0
    seconds_by_step: dict[str, float] = field(default_factory=dict)


def ensure_table(conn: psycopg.Connection[Any], control_schema: str) -> None:
    ensure_green(conn, control_schema)


def _q(conn: psycopg.Connection[Any], obj: sql.Composable) -> str:
    return obj.as_string(conn)


def _rel(schema: str, name: str) -> sql.Composed:
    return sql.SQL(".").join([sql.Identifier(schema), sql.Identifier(name)])


# --------------------------------------------------------------------- defer

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
        fks = conn.execute(
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
        # A key some foreign key depends on can only go if that foreign key goes too.
        pinned: set[int] = set()
        drop_fks: list[tuple[str, str, str]] = []
        records: list[tuple[int, str, str, str, str, list[str], bool, str | None,
                            str | None]] = []
        for (_oid, conname, nsp, rel, condef, validated, relkind, inherited, frelkind,
             conindid, fnsp, frel) in fks:
            if relkind != "r" or inherited or frelkind != "r":
                pinned.add(conindid)
                report.kept.append(f"foreign key {conname} on {nsp}.{rel} (partitioned)")
                continue
            table = _rel(nsp, rel)
            ident = sql.Identifier(conname)
            enforced = "NOT ENFORCED" not in condef  # PostgreSQL 18 can keep an FK unchecked
            check = validated and enforced
            add = sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}{}").format(
                table, ident, sql.SQL(condef),
                sql.SQL(" NOT VALID") if check else sql.SQL(""))
            stmts = [_q(conn, add)]
            if check:
                stmts.append(_q(conn, sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
                    table, ident)))
            records.append((STEP_FOREIGN_KEYS, "fk", nsp, rel, conname, stmts, check, fnsp,
                            frel))
            drop_fks.append((nsp, rel, conname))
            report.foreign_keys += 1

        keys = conn.execute(
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
        drop_keys: list[tuple[str, str, str]] = []
        key_indexes: set[int] = set()
        for (conname, nsp, rel, contype, conindid, condef, indexdef, deferrable, deferred,
             tablespace, comment, index_name) in keys:
            key_indexes.add(conindid)
            if conindid in pinned:
                report.kept.append(f"constraint {conname} on {nsp}.{rel} (referenced from a "
                                   "partitioned table)")
                continue
            table = _rel(nsp, rel)
            ident = sql.Identifier(conname)
            ts = _q(conn, sql.SQL("SET LOCAL default_tablespace = {}").format(
                sql.Literal(tablespace)))
            if contype == "x":
                records.append((STEP_BUILD, "constraint", nsp, rel, conname, [ts, _q(
                    conn, sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                        table, ident, sql.SQL(condef)))], False, None, None))
            else:
                # Built under the constraint's name: USING INDEX renames it anyway.
                build = indexdef if index_name == conname else _rename_index(
                    conn, indexdef, index_name, conname)
                records.append((STEP_BUILD, "index", nsp, rel, conname, [ts, build], False,
                                None, None))
                attach = sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {} USING INDEX {}{}{}").format(
                    table, ident, sql.SQL("PRIMARY KEY" if contype == "p" else "UNIQUE"), ident,
                    sql.SQL(" DEFERRABLE") if deferrable else sql.SQL(""),
                    sql.SQL(" INITIALLY DEFERRED") if deferred else sql.SQL(""))
                records.append((STEP_ATTACH, "attach", nsp, rel, conname, [_q(conn, attach)],
                                False, None, None))
            if comment is not None:
                records.append((STEP_ATTACH, "extra", nsp, rel, f"comment:{conname}", [_q(
                    conn, sql.SQL("COMMENT ON CONSTRAINT {} ON {} IS {}").format(
                        ident, table, sql.Literal(comment)))], False, None, None))
            drop_keys.append((nsp, rel, conname))
            report.constraints += 1

        indexes = conn.execute(
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
        drop_indexes: list[tuple[str, str]] = []
        for (indexrelid, iname, nsp, rel, indexdef, tablespace, clustered, replident,
             comment, stattargets) in indexes:
            table = _rel(nsp, rel)
            index = _rel(nsp, iname)
            owner_is_key = indexrelid in key_indexes
            if indexrelid in pinned:
                if not owner_is_key:
                    report.kept.append(f"index {nsp}.{iname} (referenced from a partitioned "
                                       "table)")
                continue
            if not owner_is_key:
                ts = _q(conn, sql.SQL("SET LOCAL default_tablespace = {}").format(
                    sql.Literal(tablespace)))
                records.append((STEP_BUILD, "index", nsp, rel, iname, [ts, indexdef], False,
                                None, None))
                drop_indexes.append((nsp, iname))
                report.indexes += 1
            extras: list[str] = []
            if clustered:
                extras.append(_q(conn, sql.SQL("ALTER TABLE {} CLUSTER ON {}").format(
                    table, sql.Identifier(iname))))
            if replident:
                extras.append(_q(conn, sql.SQL("ALTER TABLE {} REPLICA IDENTITY USING INDEX {}"
                                               ).format(table, sql.Identifier(iname))))
            if comment is not None and not owner_is_key:
                extras.append(_q(conn, sql.SQL("COMMENT ON INDEX {} IS {}").format(
                    index, sql.Literal(comment))))
            for item in stattargets or []:
                attnum, target = item.split(":")
                extras.append(_q(conn, sql.SQL(
                    "ALTER INDEX {} ALTER COLUMN {} SET STATISTICS {}").format(
                        index, sql.Literal(int(attnum)), sql.Literal(int(target)))))
            if extras:
                records.append((STEP_ATTACH, "extra", nsp, rel, f"index:{iname}", extras, False,
                                None, None))

        for record in records:
            conn.execute(sql.SQL(
                "INSERT INTO {}.{} (step, kind, schema_name, table_name, object_name, "
                "statements, validate, ref_schema, ref_table) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (kind, schema_name, table_name, object_name) DO NOTHING"
            ).format(sql.Identifier(control_schema), sql.Identifier(DEFERRED_TABLE)), record)
        for nsp, rel, name in drop_fks + drop_keys:
            conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                _rel(nsp, rel), sql.Identifier(name)))
        for nsp, name in drop_indexes:
            conn.execute(sql.SQL("DROP INDEX {}").format(_rel(nsp, name)))
    return report


def _rename_index(conn: psycopg.Connection[Any], indexdef: str, old: str, new: str) -> str:
    """pg_get_indexdef output with the index named ``new`` instead of ``old``."""
    row = conn.execute("SELECT quote_ident(%s), quote_ident(%s)", (old, new)).fetchone()
    assert row is not None
    for prefix in ("CREATE UNIQUE INDEX ", "CREATE INDEX "):
        head = f"{prefix}{row[0]} ON "
        if indexdef.startswith(head):
            return f"{prefix}{row[1]} ON {indexdef[len(head):]}"
    raise ReleaseFailed(f"unexpected index definition for {old}: {indexdef[:120]}")


def pending(conn: psycopg.Connection[Any], control_schema: str) -> list[Deferred]:
    """Recorded objects, restored or not (empty when nothing was deferred)."""
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (_q(conn, _rel(
        control_schema, DEFERRED_TABLE)),)).fetchone()
    if not exists or not exists[0]:
        return []
    rows = conn.execute(sql.SQL(
        "SELECT id, step, kind, schema_name, table_name, object_name, statements, validate, "
        "ref_schema, ref_table FROM {}.{} ORDER BY step, id").format(
            sql.Identifier(control_schema), sql.Identifier(DEFERRED_TABLE))).fetchall()
    return [Deferred(r[0], r[1], r[2], r[3], r[4], r[5], list(r[6]), r[7], r[8], r[9])
            for r in rows]


# --------------------------------------------------------------------- restore


def _index_exists(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    return conn.execute(
        "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('i', 'I')",
        (schema, name)).fetchone() is not None


def _constraint_state(conn: psycopg.Connection[Any], schema: str, table: str, name: str
                      ) -> bool | None:
    """None when missing, else whether it is validated."""
    row = conn.execute(
        "SELECT con.convalidated FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND con.conname = %s",
        (schema, table, name)).fetchone()
    return None if row is None else bool(row[0])


def run_item(conn: psycopg.Connection[Any], item: Deferred) -> bool:
    """Bring one object back unless it is there already. True if work was done
    ("extra" items are idempotent and always run)."""
    if item.kind == "index":
        if _index_exists(conn, item.schema, item.name):
            return False
        try:
            with conn.transaction():
                for stmt in item.statements:
                    conn.execute(stmt.encode())
        except psycopg.errors.DuplicateTable:
            # Built meanwhile by a session of an earlier, crashed run.
            return False
        return True
    if item.kind in {"constraint", "attach"}:
        if _constraint_state(conn, item.schema, item.table, item.name) is not None:
            return False
        with conn.transaction():
            for stmt in item.statements:
                conn.execute(stmt.encode())
        return True
    if item.kind == "fk":
        state = _constraint_state(conn, item.schema, item.table, item.name)
        if state is None:
            # Its own transaction: the strong lock of ADD CONSTRAINT is released before
            # the long validation, which only needs SHARE UPDATE EXCLUSIVE.
            conn.execute(item.statements[0].encode())
        elif state or not item.validate:
            return False
        for stmt in item.statements[1:]:
            conn.execute(stmt.encode())
        return True
    # "extra": idempotent statements, repeated every time.
    with conn.transaction():
        for stmt in item.statements:
            conn.execute(stmt.encode())
    return True


def session(db: DatabaseConfig, *, maintenance_work_mem: str, parallel_workers: int,
             tag: str) -> psycopg.Connection[Any]:
    # An index build may legitimately run for hours: no client deadline.
    return connect(db, role="green", application_name=tag[:63], lock_timeout_ms=300_000,
                   statement_timeout_ms=0, deadline=None, settings={
                       "maintenance_work_mem": maintenance_work_mem,
                       "max_parallel_maintenance_workers": str(parallel_workers),
                       # Nobody waits for these commits: a crash before the end reruns
                       # the step.
                       "synchronous_commit": "off",
                       # A backend whose orchestrator died notices it within a second
                       # and stops, instead of building an index nobody will use.
                       "client_connection_check_interval": "1000"})


def done_ids(conn: psycopg.Connection[Any], control_schema: str, ids: list[int]) -> None:
    """Forget recorded objects that are back."""
    if ids:
        conn.execute(sql.SQL("DELETE FROM {}.{} WHERE id = ANY(%s)").format(
            sql.Identifier(control_schema), sql.Identifier(DEFERRED_TABLE)), (ids,))


def _table_sizes(conn: psycopg.Connection[Any], items: list[Deferred]) -> dict[tuple[str, str],
                                                                                  int]:
    pairs = sorted({(i.schema, i.table) for i in items})
    rows = conn.execute(
        "SELECT q.s, q.t, coalesce(pg_relation_size(c.oid), 0) "
        "FROM unnest(%s::text[], %s::text[]) AS q(s, t) "
        "LEFT JOIN pg_namespace n ON n.nspname = q.s "
        "LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = q.t",
        ([p[0] for p in pairs], [p[1] for p in pairs])).fetchall()
    return {(r[0], r[1]): int(r[2]) for r in rows}


def restore_post_data(
    db: DatabaseConfig,
    *,
    control_schema: str,
    jobs: int,
    maintenance_work_mem: str = "512MB",
    max_parallel_maintenance_workers: int = 1,
    analyze: list[tuple[str, str]] | None = None,
    progress: Progress | None = None,
    timeout: float = 6 * 3600.0,
    tag: str = "orch-post-data",
) -> PostDataStats:
    """Rebuild every recorded object with ``jobs`` sessions; then ANALYZE ``analyze``.

    Safe to run again at any point, and a no-op when nothing is recorded.
    """
    started = time.monotonic()
    stats = PostDataStats()
    with connect(db, role="green", application_name=tag[:63]) as conn:
        items = pending(conn, control_schema)
        if not items:
            # Nothing was left over by ``copy_initial``: its ANALYZE ran too.
            return stats
        sizes = _table_sizes(conn, items)
    stats.items = len(items)
    deadline = started + timeout
    done = 0
    total = len(items) + len(analyze or [])
    jobs = max(1, jobs)
    sessions: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(jobs):
            sessions.append(session(db, maintenance_work_mem=maintenance_work_mem,
                                     parallel_workers=max_parallel_maintenance_workers,
                                     tag=tag))
        for step, label in ((STEP_BUILD, "indexes"), (STEP_ATTACH, "constraints"),
                            (STEP_FOREIGN_KEYS, "foreign keys")):
            step_started = time.monotonic()
            todo = [i for i in items if i.step == step]
            # Largest table first: the longest build starts at once and the small ones
            # fill the other sessions around it.
            todo.sort(key=lambda i: -sizes.get((i.schema, i.table), 0))
            if step == STEP_ATTACH:
                # One table's ALTERs take its ACCESS EXCLUSIVE lock: run them in one
                # session, one table after another, different tables side by side.
                groups: dict[tuple[str, str], list[Deferred]] = {}
                for item in todo:
                    groups.setdefault((item.schema, item.table), []).append(item)
                units = list(groups.values())
            else:
                units = [[i] for i in todo]

            def _unit(unit: list[Deferred], conn: psycopg.Connection[Any]) -> int:
                worked = 0
                for item in unit:
                    try:
                        worked += int(run_item(conn, item))
                    except psycopg.Error as exc:
                        raise ReleaseFailed(
                            f"restoring {item.kind} {item.schema}.{item.name} on green failed: "
                            f"{scrub(str(exc)).strip()}",
                            hint="a migration may have made an index or constraint that "
                            "blue's data violates; fix the migration") from exc
                return worked

            worked = _parallel(units, sessions, _unit, deadline,
                               on_done=_reporter(progress, done, total))
            done += len(todo)
            stats.skipped += len(todo) - worked
            stats.seconds_by_step[label] = round(time.monotonic() - step_started, 3)
        if analyze:
            step_started = time.monotonic()
            tables = [[t] for t in analyze]

            def _analyze(unit: list[tuple[str, str]], conn: psycopg.Connection[Any]) -> int:
                conn.execute(sql.SQL("ANALYZE {}").format(_rel(*unit[0])))
                return 1

            _parallel(tables, sessions, _analyze, deadline,
                      on_done=_reporter(progress, done, total))
            stats.seconds_by_step["analyze"] = round(time.monotonic() - step_started, 3)
        with connect(db, role="green", application_name=tag[:63]) as conn:
            done_ids(conn, control_schema, [i.id for i in items])
    finally:
        for s in sessions:
            s.close()
    stats.seconds = round(time.monotonic() - started, 3)
    return stats


def _reporter(progress: Progress | None, base: int, total: int) -> Callable[[int], None]:
    def report(finished: int) -> None:
        if progress:
            progress("post-data", base + finished, total)
    return report


def _parallel(units: list[_U], sessions: list[psycopg.Connection[Any]],
                 fn: Callable[[_U, psycopg.Connection[Any]], int], deadline: float,
                 on_done: Callable[[int], None]) -> int:
    """Run ``fn`` on every unit, each session doing one unit at a time."""
    if not units:
        return 0
    free = list(sessions)
    queue = list(units)
    running: dict[Future[int], psycopg.Connection[Any]] = {}
    worked = 0
    finished = 0
    with ThreadPoolExecutor(max_workers=len(sessions)) as pool:
        try:
            while queue or running:
                while queue and free:
                    conn = free.pop()
                    running[pool.submit(fn, queue.pop(0), conn)] = conn
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ReleaseFailed("restoring green's indexes and constraints timed out",
                                        hint="raise sync.initial_copy_timeout")
                done, _ = wait(list(running), timeout=remaining, return_when=FIRST_COMPLETED)
                for fut in done:
                    free.append(running.pop(fut))
                    worked += fut.result()
                    finished += 1
                    on_done(finished)
        except BaseException:
            # Stop the statements still running: the step is redone on the next run.
            for conn in running.values():
                with contextlib.suppress(psycopg.Error, OSError):
                    conn.cancel_safe(timeout=5)
            raise
    return worked
