"""The two sides of a comparison: pinned sessions, a worker pool per side, their reads.

Every function taking ``conn, side`` last runs on one side's worker: the engine
hands it to ``SidePool.submit`` (or both sides at once) with ``functools.partial``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from orchestrator.config import ValidateConfig
from orchestrator.pg.columns import Side
from orchestrator.pg.diff.queries import (
    SESSION_SETTINGS,
    Key,
    KeyRange,
    TablePlan,
    bucket_query,
    checksum_query,
    key_ends_query,
    sample_keys_query,
    split_points_query,
)
from orchestrator.pg.diff.rows import ChunkSum
from orchestrator.pg.endpoint import Endpoint
from orchestrator.pg.names import QualifiedName, with_params

T = TypeVar("T")
Conn = psycopg.Connection[Any]


def open_session(db: Endpoint, cfg: ValidateConfig, role: str) -> Conn:
    # The server enforces statement_timeout while it runs; the client deadline a bit
    # later catches a server that stopped running at all.
    conn = db.connect(role, statement_timeout_ms=int(cfg.statement_timeout * 1000),
                      lock_timeout_ms=int(cfg.lock_timeout * 1000),
                      deadline=cfg.statement_timeout + 30.0)
    # Custom plans for every range: a generic plan cannot see how wide a range is.
    conn.prepare_threshold = None
    conn.execute(sql.SQL("SELECT {}").format(sql.SQL(", ").join(
        [sql.SQL("pg_catalog.set_config(%s, %s, false)")] * len(SESSION_SETTINGS))),
        [v for pair in SESSION_SETTINGS for v in pair])
    return conn


def estimate(conn: Conn, table: QualifiedName) -> tuple[int, int]:
    """(rows, pages) of a table, partitions summed; rows from the planner's statistics.

    Never-analysed tables (reltuples -1) are guessed from their size: the estimate
    only sizes the chunks, it never decides what is compared.
    """
    row = conn.execute(
        """
        WITH t AS (SELECT c.oid, c.relkind FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE n.nspname = %s AND c.relname = %s)
        SELECT coalesce(sum(c.reltuples) FILTER (WHERE c.reltuples >= 0), 0)::bigint,
               coalesce(bool_or(c.reltuples < 0), false),
               (coalesce(sum(pg_relation_size(c.oid)), 0)
                / current_setting('block_size')::int)::bigint
        FROM pg_class c
        -- pg_partition_tree() is empty for a table that is not partitioned.
        WHERE c.oid IN (SELECT p.relid FROM pg_partition_tree((SELECT oid FROM t)) p
                        WHERE p.isleaf
                        UNION ALL SELECT oid FROM t WHERE relkind <> 'p')
        """,
        (table.schema, table.name),
    ).fetchone()
    if row is None:
        return 0, 0
    rows, unknown, pages = int(row[0]), bool(row[1]), int(row[2])
    if unknown:
        rows = max(rows, pages * 50)
    return rows, pages


class SidePool:
    """Worker threads of one side, each with its own connection (opened on first use)."""

    def __init__(self, side: Side, db: Endpoint, cfg: ValidateConfig) -> None:
        self.side = side
        self._db = db
        self._cfg = cfg
        self._executor = ThreadPoolExecutor(max_workers=cfg.parallelism,
                                            thread_name_prefix=f"validate-{side}")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[Conn] = []

    def _conn(self) -> Conn:
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = open_session(self._db, self._cfg, f"validate-{self.side}")
            with self._lock:
                self._conns.append(conn)
            self._local.conn = conn
        return conn

    def submit(self, fn: Callable[[Conn], T]) -> Future[T]:
        return self._executor.submit(lambda: fn(self._conn()))

    def close(self, *, abort: bool) -> None:
        if abort:
            # Stop running queries rather than waiting for them to finish.
            with self._lock:
                for conn in self._conns:
                    with contextlib.suppress(Exception):
                        conn.cancel_safe(timeout=5.0)
        self._executor.shutdown(wait=True, cancel_futures=True)
        for conn in self._conns:
            conn.close()



# ---------------------------------------------------------------- reads of one side


def checksum(plan: TablePlan, rng: KeyRange, conn: Conn, side: Side, *, strong: bool,
             counts_only: bool) -> ChunkSum:
    query, params = checksum_query(plan, side, rng, strong=strong, counts_only=counts_only)
    row = conn.execute(with_params(query, conn), params).fetchone()
    assert row is not None
    return ChunkSum(int(row[0]), tuple(row[1:]))


def bucket_sums(plan: TablePlan, rng: KeyRange, points: list[Key], conn: Conn, side: Side, *,
                strong: bool) -> list[ChunkSum]:
    query, params = bucket_query(plan, side, rng, points, strong=strong)
    found = {int(r[0]): ChunkSum(int(r[1]), tuple(r[2:]))
             for r in conn.execute(with_params(query, conn), params).fetchall()}
    empty = ChunkSum(0, (None,) * (2 if strong else 1))
    return [found.get(i, empty) for i in range(len(points) + 1)]


def split_points(plan: TablePlan, rng: KeyRange, step: int, conn: Conn, *, side: Side
                 ) -> list[Key]:
    query, params = split_points_query(plan, side, rng, step)
    rows = conn.execute(with_params(query, conn), params).fetchall()
    return [tuple(str(v) for v in r) for r in rows]


def key_ends(plan: TablePlan, conn: Conn, side: Side) -> tuple[int, int] | None:
    """min and max of an integer key: two index endpoint lookups."""
    row = conn.execute(key_ends_query(plan, side)).fetchone()
    if row is None or row[0] is None:
        return None
    return int(row[0]), int(row[1])


def sample_keys(plan: TablePlan, chunks: int, conn: Conn) -> list[Key]:
    """Quantiles of a block sample of blue's keys, about ``chunks`` of them, sorted.

    SYSTEM sampling reads whole random pages, so the number of pages is what makes
    the quantiles even: about 8 per chunk.
    """
    pages = max(chunks * 8, 64)
    percent = min(100.0, max(0.0001, 100.0 * pages / max(plan.pages, 1)))
    query = sample_keys_query(plan, chunks)
    rows = conn.execute(with_params(query, conn), [f"{percent:.6f}"]).fetchall()
    return [tuple(str(v) for v in r) for r in rows]
