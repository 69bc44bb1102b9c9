"""Blue and green compared row by row, by the test itself (not by orchestrate).

Each table, partitioned parent (its partitions' rows, each with the partition that
holds it) and materialized view is read whole on both sides as one md5 per row of the
row's text, over the columns both sides have (generated ones included); the two
multisets must be equal. Sessions fix the settings that shape a value's text.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.sandbox.pgcluster import PgCluster
from orchestrator.sandbox.stack import APP_DATABASE

# Same text for the same value on both sides, whatever the servers' defaults.
_SESSION = ("-c search_path= -c TimeZone=UTC -c DateStyle=ISO,YMD -c IntervalStyle=postgres "
            "-c extra_float_digits=1 -c bytea_output=hex -c statement_timeout=120000")
_SKIP_SCHEMAS = ("pg_catalog", "information_schema", "orchestrate")


@dataclass
class RelationDiff:
    relation: str
    kind: str
    blue_rows: int
    green_rows: int
    only_blue: int
    only_green: int
    samples: list[str]

    @property
    def differing(self) -> int:
        return self.only_blue + self.only_green


def connect(cluster: PgCluster) -> psycopg.Connection[Any]:
    return psycopg.connect(cluster.conninfo(APP_DATABASE), autocommit=True, options=_SESSION)


def relations(conn: psycopg.Connection[Any]) -> dict[str, tuple[str, list[str]]]:
    """quoted name -> (relkind, columns in order) for tables, partitioned parents and
    materialized views outside system and extension objects; partitions are read
    through their parent."""
    rows = conn.execute(
        """
        SELECT format('%%I.%%I', n.nspname, c.relname), c.relkind,
               array_agg(a.attname::text ORDER BY a.attnum)
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        WHERE c.relkind IN ('r', 'p', 'm') AND NOT c.relispartition
          AND n.nspname <> ALL(%s) AND n.nspname NOT LIKE 'pg\\_%%'
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                          AND d.objid = c.oid AND d.deptype = 'e')
        GROUP BY 1, 2
        """, (list(_SKIP_SCHEMAS),)).fetchall()
    return {r[0]: (r[1], list(r[2])) for r in rows}


def _row_hashes(conn: psycopg.Connection[Any], relation: str, columns: list[str]
                ) -> Counter[str]:
    # tableoid::regclass is the partition the row lives in (qualified: search_path is
    # empty), so a row routed to another partition on green is a difference too.
    row = sql.SQL("ROW(tableoid::regclass::text, {})").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in columns))
    query = sql.SQL("SELECT md5({}::text) FROM {}").format(row, sql.SQL(relation))
    return Counter(r[0] for r in conn.execute(query))


def _samples(conn: psycopg.Connection[Any], relation: str, columns: list[str],
             hashes: list[str]) -> list[str]:
    row = sql.SQL("ROW(tableoid::regclass::text, {})").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in columns))
    query = sql.SQL("SELECT left({r}::text, 300) FROM {t} WHERE md5({r}::text) = ANY(%s) "
                    "LIMIT 3").format(r=row, t=sql.SQL(relation))
    return [r[0] for r in conn.execute(query, (hashes,))]


def compare(blue: PgCluster, green: PgCluster) -> tuple[list[RelationDiff], list[str]]:
    """(a diff per relation on blue, relations or columns of blue missing on green)."""
    diffs: list[RelationDiff] = []
    missing: list[str] = []
    with connect(blue) as b, connect(green) as g:
        on_blue, on_green = relations(b), relations(g)
        for name, (kind, blue_cols) in sorted(on_blue.items()):
            if name not in on_green:
                missing.append(f"{name} (relkind {kind}) is not on green")
                continue
            green_cols = set(on_green[name][1])
            missing += [f"{name}.{c} is not on green" for c in blue_cols if c not in green_cols]
            cols = [c for c in blue_cols if c in green_cols]
            hb, hg = _row_hashes(b, name, cols), _row_hashes(g, name, cols)
            only_b, only_g = hb - hg, hg - hb
            samples: list[str] = []
            if only_b:
                samples += [f"blue: {s}" for s in _samples(b, name, cols, list(only_b)[:3])]
            if only_g:
                samples += [f"green: {s}" for s in _samples(g, name, cols, list(only_g)[:3])]
            diffs.append(RelationDiff(name, kind, hb.total(), hg.total(), only_b.total(),
                                      only_g.total(), samples))
    return diffs, missing


def wait_replicated(publisher: PgCluster, timeout: float = 60.0) -> None:
    """Until every logical slot on ``publisher`` confirmed its current WAL position:
    the subscriber has applied everything written so far."""
    with psycopg.connect(publisher.conninfo(APP_DATABASE), autocommit=True) as conn:
        target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
        deadline = time.monotonic() + timeout
        while True:
            behind = conn.execute(
                "SELECT slot_name, confirmed_flush_lsn FROM pg_replication_slots "
                "WHERE slot_type = 'logical' AND database = current_database() "
                "AND (confirmed_flush_lsn IS NULL OR confirmed_flush_lsn < %s)",
                (target,)).fetchall()
            if not behind:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"replication from {publisher.name} did not catch up "
                                     f"to {target} in {timeout}s: {behind}")
            time.sleep(0.2)
