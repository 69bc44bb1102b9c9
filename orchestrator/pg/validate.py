"""Comparing green with blue: row counts and content checksums per table.

The checksum is order-independent (a sum of 64-bit hashes of each row's text form
over the columns both sides share), so blue and green compute it in parallel with
one sequential scan each. While replication streams, a table that differs is
compared again after green has provably applied everything blue committed
(heartbeat), so in-flight changes are not reported as differences.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.config import DatabaseConfig, ValidateConfig
from orchestrator.pg import catalog, sequences
from orchestrator.pg.conn import connect, qualified


@dataclass
class TableResult:
    table: str
    blue_rows: int
    green_rows: int
    blue_sum: str | None
    green_sum: str | None
    compared_columns: list[str]
    green_only_columns: list[str]
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.blue_rows == self.green_rows and self.blue_sum == self.green_sum


@dataclass
class ValidationReport:
    tables: list[TableResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(t.ok for t in self.tables)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": self.problems,
            "notes": self.notes,
            "tables": [
                {"table": t.table, "blue_rows": t.blue_rows, "green_rows": t.green_rows,
                 "checksum_match": t.blue_sum == t.green_sum, "ok": t.ok,
                 "attempts": t.attempts, "green_only_columns": t.green_only_columns}
                for t in self.tables
            ],
        }


def checksum_sql(table: str, cols: list[str], checksums: bool) -> sql.Composed:
    if not checksums or not cols:
        return sql.SQL("SELECT count(*), NULL::text FROM {}").format(qualified(table))
    row = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
    # hashtextextended is 64-bit and stable across majors; summing into numeric cannot
    # overflow and does not depend on scan order.
    return sql.SQL(
        "SELECT count(*), sum(hashtextextended(ROW({row})::text, 0)::numeric)::text FROM {t}"
    ).format(row=row, t=qualified(table))


def _measure(db: DatabaseConfig, table: str, cols: list[str], checksums: bool
             ) -> tuple[int, str | None]:
    conn = connect(db, role="validate", statement_timeout_ms=0)
    try:
        conn.execute("SET extra_float_digits = 3")
        row = conn.execute(checksum_sql(table, cols, checksums)).fetchone()
        assert row is not None
        return int(row[0]), row[1]
    finally:
        conn.close()


def validate(
    blue_db: DatabaseConfig,
    green_db: DatabaseConfig,
    cfg: ValidateConfig,
    *,
    control_schema: str,
    exclude_tables: tuple[str, ...] = (),
    catch_up: Callable[[], None] | None = None,
    retries: int = 3,
) -> ValidationReport:
    report = ValidationReport()
    exclude = (control_schema,)
    with connect(blue_db, role="validate") as blue, connect(green_db, role="validate") as green:
        blue_tables = {t.qualified: t for t in catalog.user_tables(
            blue, exclude_schemas=exclude, exclude_tables=exclude_tables)}
        green_tables = {t.qualified: t for t in catalog.user_tables(
            green, exclude_schemas=exclude, exclude_tables=exclude_tables)}
        for name in sorted(set(blue_tables) - set(green_tables)):
            report.problems.append(f"table {name} is on blue but not on green")
        for name in sorted(set(green_tables) - set(blue_tables)):
            report.notes.append(f"table {name} exists only on green (new in this release)")
        report.problems += _schema_problems(blue, green, exclude)
        for seq, b, g in sequences.compare(blue, green, exclude_schemas=exclude):
            if b is not None and (g is None or g < b):
                report.notes.append(f"sequence {seq} on green ({g}) is behind blue ({b}); it is "
                                    "moved past blue before green takes writes")
    common = sorted(set(blue_tables) & set(green_tables))
    plans: dict[str, tuple[list[str], list[str]]] = {}
    for name in common:
        ignore = set(cfg.ignore_columns.get(name, []))
        b_cols = [c.name for c in blue_tables[name].columns if not c.generated]
        g_cols = {c.name for c in green_tables[name].columns}
        cols = [c for c in b_cols if c in g_cols and c not in ignore]
        green_only = sorted(g_cols - set(b_cols))
        plans[name] = (cols, green_only)

    def run(name: str) -> TableResult:
        cols, green_only = plans[name]
        with ThreadPoolExecutor(max_workers=2) as pool:
            fb = pool.submit(_measure, blue_db, name, cols, cfg.checksums)
            fg = pool.submit(_measure, green_db, name, cols, cfg.checksums)
            (br, bs), (gr, gs) = fb.result(), fg.result()
        return TableResult(name, br, gr, bs, gs, cols, green_only)

    if catch_up:
        catch_up()
    with ThreadPoolExecutor(max_workers=max(1, cfg.parallelism // 2)) as pool:
        results = dict(zip(common, pool.map(run, common), strict=True))
    # A mismatch seen while replication streams may be a change in flight: wait until
    # green has applied everything blue committed, then look again.
    for attempt in range(2, retries + 1):
        bad = [n for n, r in results.items() if not r.ok]
        if not bad or catch_up is None:
            break
        catch_up()
        for n in bad:
            results[n] = run(n)
            results[n].attempts = attempt
    report.tables = [results[n] for n in common]
    for r in report.tables:
        if r.blue_rows != r.green_rows:
            report.problems.append(f"{r.table}: {r.blue_rows} rows on blue, {r.green_rows} on "
                                   "green")
        elif r.blue_sum != r.green_sum:
            report.problems.append(f"{r.table}: same row count ({r.blue_rows}) but the content "
                                   f"differs in columns {', '.join(r.compared_columns)}")
        if r.green_only_columns:
            report.notes.append(f"{r.table}: columns only on green (not compared): "
                                f"{', '.join(r.green_only_columns)}")
    return report


def _schema_problems(blue: psycopg.Connection[Any], green: psycopg.Connection[Any],
                     exclude: tuple[str, ...]) -> list[str]:
    """Indexes and constraints of blue that green lacks or holds invalid."""
    query = """
        SELECT n.nspname || '.' || c.relname AS tbl, x.conname AS name, x.contype::text AS kind,
               x.convalidated AS valid
        FROM pg_constraint x JOIN pg_class c ON c.oid = x.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname <> ALL(%(skip)s) AND n.nspname NOT LIKE 'pg\\_%%'
          AND n.nspname <> 'information_schema'
        UNION ALL
        SELECT n.nspname || '.' || t.relname, i.relname, 'index', ix.indisvalid
        FROM pg_index ix JOIN pg_class i ON i.oid = ix.indexrelid
        JOIN pg_class t ON t.oid = ix.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace
        WHERE n.nspname <> ALL(%(skip)s) AND n.nspname NOT LIKE 'pg\\_%%'
          AND n.nspname <> 'information_schema'
    """
    params = {"skip": list(exclude)}
    b = {(r[0], r[1], r[2]): r[3] for r in blue.execute(query, params).fetchall()}
    g = {(r[0], r[1], r[2]): r[3] for r in green.execute(query, params).fetchall()}
    kinds = {"p": "primary key", "f": "foreign key", "c": "check constraint", "u": "unique",
             "x": "exclusion constraint", "n": "not-null constraint", "index": "index"}
    problems = []
    for key in sorted(set(b) - set(g)):
        problems.append(f"{kinds.get(key[2], key[2])} {key[1]} on {key[0]} is missing on green")
    for key in sorted(set(b) & set(g)):
        if b[key] and not g[key]:
            problems.append(f"{kinds.get(key[2], key[2])} {key[1]} on {key[0]} is not valid on "
                            "green")
    return problems
