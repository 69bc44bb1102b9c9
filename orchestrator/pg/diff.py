"""Comparing a table's rows on blue and green: chunk checksums, bisection, row diffs.

1. The key space of each table is cut into ranges of about ``chunk_rows`` rows, with
   boundaries taken from a block sample of blue's keys (``TABLESAMPLE SYSTEM``: a few
   hundred random pages, never a scan and never OFFSET). Ranges are row-value
   comparisons, ``(a, b) >= (x, y) AND (a, b) < (z, w)``, so composite keys work and
   every range is an index range scan on either side.
2. Each range gets a checksum on both sides at the same time (one thread pool and
   one connection per worker per side): ``count(*)`` and the exact (numeric) sum of a
   64-bit hash of each row. A sum does not depend on the order rows are read in, so
   neither side sorts anything. The row hash is built from the type's own hash
   function where that is safe and stable across majors (integers, text, uuid,
   timestamps, jsonb, ...; the same functions hash partitioning relies on, which
   pg_upgrade keeps stable), and from the text form otherwise; see ``row_hash``.
3. A range whose checksums differ is cut into enough parts (at most
   ``split_factor``) for each to hold about ``leaf_rows`` rows; the cut points are
   computed for an integer key and read otherwise (``row_number()`` over the range
   on the side holding more rows: an index-only scan), and both sides checksum all
   parts in one query each (``bucket_query``). A part holding at most ``leaf_rows``
   rows on both sides has its rows fetched and compared by key: missing on green,
   extra on green, or which columns changed; a bigger one is cut again.
4. Every differing key found is looked up again by key on both sides before it is
   reported (``confirm``). While replication streams, that lookup follows a catch-up
   and locks the rows on the publisher, so that only real, persistent differences
   are reported (see docs/validation.md).

Collisions: two different rows get the same 64-bit hash with probability 2^-64, and
a chunk whose rows differ keeps the same (count, sum) with probability about 2^-64
too; ``strong_checksums`` adds a second, independently seeded hash (2^-128).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeVar

import psycopg
from psycopg import sql

from orchestrator.config import DatabaseConfig, ValidateConfig
from orchestrator.pg.conn import connect
from orchestrator.pg.names import QualifiedName, with_params
from orchestrator.pg.schema_check import ColumnPair, Side

T = TypeVar("T")
Key = tuple[str, ...]  # a row's key, each column in its text form
Conn = psycopg.Connection[Any]
Progress = Callable[[str, int, int], None]

# Pinned on every comparing session, so that text forms are identical on both sides
# whatever the server or role defaults are, and on every major from 12 on:
# extra_float_digits > 0 gives the shortest exact float text (12+), TimeZone fixes
# timestamptz text, and so on. search_path keeps every name we do not qualify in
# pg_catalog (no user function can shadow ours). JIT compiling a short range query
# costs more than it saves; parallel query would compete with our own workers.
SESSION_SETTINGS: tuple[tuple[str, str], ...] = (
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
    ("xmlbinary", "base64"),
    ("lc_monetary", "C"),
    ("search_path", "pg_catalog, pg_temp"),
    ("jit", "off"),
    ("max_parallel_workers_per_gather", "0"),
)

# Built-in base types hashed by their own hash function rather than by text, with how
# the argument is passed. Only types whose hash depends on the value alone: enums
# (label OIDs differ between the two databases), numeric and interval (1.0 and 1.00,
# '1 day' and '24 hours' hash the same but read differently) and everything else go
# through the text form. Text types are hashed with COLLATE "C" (the bytes), whatever
# the column's collation is.
HASH_FUNCTIONS: dict[str, tuple[str, str]] = {
    "int2": ("hashint2extended", ""),
    "int4": ("hashint4extended", ""),
    "int8": ("hashint8extended", ""),
    "float4": ("hashfloat4extended", ""),
    "float8": ("hashfloat8extended", ""),
    "bool": ("hashint4extended", "int4"),
    "text": ("hashtextextended", "collate"),
    "varchar": ("hashtextextended", "collate"),
    "bpchar": ("hashbpcharextended", "collate"),
    "uuid": ("uuid_hash_extended", ""),
    "date": ("hashtextextended", "text"),
    "time": ("time_hash_extended", ""),
    "timestamp": ("timestamp_hash_extended", ""),
    "timestamptz": ("timestamp_hash_extended", "utc"),
    "jsonb": ("jsonb_hash_extended", ""),
    "inet": ("hashinetextended", ""),
    "cidr": ("hashinetextended", ""),
    "macaddr": ("hashmacaddrextended", ""),
    "macaddr8": ("hashmacaddr8extended", ""),
    "pg_lsn": ("pg_lsn_hash_extended", ""),
}

_MASK64 = (1 << 64) - 1
# A bisection deeper than this means the data moves faster than it can be narrowed.
_MAX_DEPTH = 40
_LOOKUP_BATCH = 500


def constant(*parts: int) -> int:
    """A fixed pseudo-random signed 64-bit constant (splitmix64 of ``parts``): seeds."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x + (p + 1) * 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x - (1 << 64) if x >= (1 << 63) else x


def open_session(db: DatabaseConfig, cfg: ValidateConfig, role: str) -> Conn:
    # The server enforces statement_timeout while it runs; the client deadline a bit
    # later catches a server that stopped running at all.
    conn = connect(db, role=role, statement_timeout_ms=int(cfg.statement_timeout * 1000),
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


# ---------------------------------------------------------------- plans and SQL


@dataclass(frozen=True)
class KeyRange:
    """Keys >= lo and < hi (None: unbounded), compared as row values."""

    lo: Key | None = None
    hi: Key | None = None

    def describe(self, names: Sequence[str]) -> str:
        def show(k: Key) -> str:
            return ", ".join(f"{n}={v}" for n, v in zip(names, k, strict=False))
        lo = f"[{show(self.lo)}" if self.lo is not None else "(start"
        hi = f"{show(self.hi)})" if self.hi is not None else "end)"
        return f"{lo} .. {hi}"


@dataclass
class TablePlan:
    table: QualifiedName  # the same on both sides
    columns: list[ColumnPair]  # compared, in blue's order
    key: list[ColumnPair]  # empty: no usable key, the table is compared whole
    green_only: list[str] = field(default_factory=list)
    est_rows: int = 0
    pages: int = 0

    @property
    def chunked(self) -> bool:
        return bool(self.key)

    @property
    def key_names(self) -> list[str]:
        return [k.blue for k in self.key]


def _ids(pairs: Iterable[ColumnPair], side: Side) -> list[sql.Composable]:
    return [sql.Identifier(p.name(side)) for p in pairs]


def _row(items: Sequence[sql.Composable]) -> sql.Composable:
    joined = sql.SQL(", ").join(items)
    return joined if len(items) == 1 else sql.SQL("({})").format(joined)


def _aliased(items: Sequence[sql.Composable]) -> sql.Composable:
    """A select list with positional aliases.

    ``SELECT CAST(id AS text) ... ORDER BY id`` would sort by the *output* column
    (named id too), i.e. as text: the aliases keep ORDER BY on the real columns.
    """
    return sql.SQL(", ").join(sql.SQL("{} AS {}").format(item, sql.Identifier(f"orch_c{i}"))
                              for i, item in enumerate(items))


def range_predicate(plan: TablePlan, side: Side, rng: KeyRange
                    ) -> tuple[sql.Composable, list[str]]:
    """WHERE text and parameters for ``rng`` (TRUE when unbounded).

    Bounds travel as text parameters of unknown type, so that each server reads them
    as its own key column type (int4 on one side and int8 on the other is fine), and
    the comparison stays an index condition.
    """
    target = _row(_ids(plan.key, side))
    parts: list[sql.Composable] = []
    params: list[str] = []
    for bound, op in ((rng.lo, ">="), (rng.hi, "<")):
        if bound is not None:
            parts.append(sql.SQL("{} {} {}").format(
                target, sql.SQL(op), _row([sql.Placeholder()] * len(bound))))
            params += bound
    return (sql.SQL(" AND ").join(parts) if parts else sql.SQL("TRUE")), params


def keys_predicate(plan: TablePlan, side: Side, keys: Sequence[Key]
                   ) -> tuple[sql.Composable, list[str]]:
    target = _row(_ids(plan.key, side))
    one = _row([sql.Placeholder()] * len(plan.key))
    values = sql.SQL(", ").join([one] * len(keys))
    return (sql.SQL("{} IN ({})").format(target, values),
            [v for k in keys for v in k])


# Stand-ins for NULL where the row hash chains columns (see ``row_hash``): any value
# of the type does, the NULL flag goes into the seed.
_NULL_STANDIN: dict[str, str] = {
    "int2": "0", "int4": "0", "int8": "0", "float4": "0", "float8": "0", "bool": "0",
    "text": "", "varchar": "", "bpchar": "", "uuid": "00000000-0000-0000-0000-000000000000",
    "time": "00:00", "timestamp": "epoch", "timestamptz": "epoch", "jsonb": "null",
    "inet": "0.0.0.0", "cidr": "0.0.0.0",  # noqa: S104 (values, not addresses to bind)
    "macaddr": "00:00:00:00:00:00",
    "macaddr8": "00:00:00:00:00:00:00:00", "pg_lsn": "0/0",
}
# Columns chained in one nested expression; wider tables are hashed in groups (the
# server's expression depth is limited).
_CHAIN = 32


def _hash_call(pair: ColumnPair, side: Side, seed: sql.Composable, *, standin: bool
               ) -> sql.Composable:
    """``fn(column, seed)``: the column's own hash function, or its text form's.

    With ``standin`` NULL is replaced by a value of the type (the caller records the
    NULL elsewhere), so the call never returns NULL.
    """
    col: sql.Composable = sql.Identifier(pair.name(side))
    fn, how = HASH_FUNCTIONS.get(pair.base, ("hashtextextended", "text"))
    if how == "text":
        arg: sql.Composable = sql.SQL("CAST({} AS pg_catalog.text)").format(col)
    elif how == "int4":
        arg = sql.SQL("CAST({} AS pg_catalog.int4)").format(col)
    elif how == "utc":
        # The instant, not its rendering in some time zone.
        arg = sql.SQL("({} AT TIME ZONE 'UTC')").format(col)
    else:
        arg = col
    if standin:
        arg = sql.SQL("COALESCE({}, {})").format(
            arg, sql.Literal(_NULL_STANDIN.get(pair.base if how != "text" else "text", "")))
    if how in ("text", "collate"):
        arg = sql.SQL('{} COLLATE "C"').format(arg)
    return sql.SQL("pg_catalog.{}({}, {})").format(sql.Identifier(fn), arg, seed)


def column_term(pair: ColumnPair, side: Side, position: int, variant: int = 0
                ) -> sql.Composable:
    """The 64-bit hash of one column of a row on its own, never NULL.

    Used to tell which columns of a differing row differ. NULL maps to a
    per-position constant, so NULL and '' hash apart.
    """
    term = _hash_call(pair, side, sql.Literal(constant(variant, position, 1)), standin=False)
    if pair.nullable:
        term = sql.SQL("COALESCE({}, {})").format(term, sql.Literal(constant(variant, position, 2)))
    return term


def row_hash(plan: TablePlan, side: Side, variant: int = 0) -> sql.Composable:
    """A 64-bit hash of the compared columns of a row.

    Columns are chained: each column's hash function takes the previous column's
    hash as its seed, so the result depends on every value and on its position, with
    one function call per column (cheaper than hashing each column apart and mixing
    the results, and much cheaper than hashing the row's text). A nullable column
    hashes a stand-in value and flips the seed with a per-position constant when
    NULL, so NULL, '' and 0 all hash apart. Groups of columns (wide tables) are
    XORed and mixed once more: a bare XOR of independent hashes, summed over rows,
    would let values swapped between two rows cancel out.
    """
    groups: list[sql.Composable] = []
    for g in range(0, max(len(plan.columns), 1), _CHAIN):
        h: sql.Composable = sql.Literal(constant(variant, g, 3))
        for i, pair in enumerate(plan.columns[g:g + _CHAIN], start=g):
            if pair.nullable:
                h = sql.SQL("({} # CASE WHEN {} IS NULL THEN {} ELSE 0 END)").format(
                    h, sql.Identifier(pair.name(side)), sql.Literal(constant(variant, i, 4)))
            h = _hash_call(pair, side, h, standin=pair.nullable)
        groups.append(h)
    if len(groups) == 1:
        return groups[0]
    return sql.SQL("pg_catalog.hashint8extended({}, {})").format(
        sql.SQL(" # ").join(groups), sql.Literal(constant(variant, 1 << 20)))


def checksum_query(plan: TablePlan, side: Side, rng: KeyRange, *, strong: bool,
                   counts_only: bool = False) -> tuple[sql.Composed, list[str]]:
    where, params = range_predicate(plan, side, rng) if plan.chunked else (sql.SQL("TRUE"), [])
    if counts_only:
        sums: list[sql.Composable] = []
    else:
        sums = [sql.SQL("pg_catalog.sum({})::pg_catalog.text").format(row_hash(plan, side, v))
                for v in range(2 if strong else 1)]
    return sql.SQL("SELECT {} FROM {} WHERE {}").format(
        sql.SQL(", ").join([sql.SQL("count(*)"), *sums]), plan.table.ident, where), params


def _part_of(target: sql.Composable, points: Sequence[Key], first: int,
             params: list[str]) -> sql.Composable:
    """A CASE tree giving the part number of ``target``: log2(len(points)) comparisons."""
    if not points:
        return sql.Literal(first)
    mid = len(points) // 2
    params += points[mid]
    below = _part_of(target, points[:mid], first, params)
    above = _part_of(target, points[mid + 1:], first + mid + 1, params)
    return sql.SQL("CASE WHEN {} < {} THEN {} ELSE {} END").format(
        target, _row([sql.Placeholder()] * len(points[mid])), below, above)


def bucket_query(plan: TablePlan, side: Side, rng: KeyRange, points: Sequence[Key], *,
                 strong: bool) -> tuple[sql.Composed, list[str]]:
    """Checksums of the parts of ``rng`` cut at ``points``, in one pass over the range.

    Part i holds the keys in [points[i-1], points[i]). A balanced tree of row
    comparisons assigns each row its part: it works for composite keys (unlike
    width_bucket) and costs about 8 comparisons per row for 256 parts.
    """
    bucket_params: list[str] = []
    bucket = _part_of(_row(_ids(plan.key, side)), points, 0, bucket_params)
    where, params = range_predicate(plan, side, rng)
    sums = [sql.SQL("pg_catalog.sum({})::pg_catalog.text").format(row_hash(plan, side, v))
            for v in range(2 if strong else 1)]
    query = sql.SQL("SELECT {} AS orch_part, count(*), {} FROM {} WHERE {} GROUP BY 1").format(
        bucket, sql.SQL(", ").join(sums), plan.table.ident, where)
    return query, bucket_params + params


def integer_points(lo: int, hi: int, parts: int) -> list[Key]:
    """Points cutting the integers [lo, hi) into ``parts`` ranges of equal width."""
    width = hi - lo
    if width <= 1:
        return []
    parts = min(parts, width)
    points = sorted({lo + (width * i) // parts for i in range(1, parts)})
    return [(str(p),) for p in points if lo < p < hi]


def fetch_query(plan: TablePlan, side: Side, where: sql.Composable, *, limit: int | None,
                lock: bool) -> sql.Composed:
    """Rows with their key text, the per-column hash terms and the values as text."""
    key_text = [sql.SQL("CAST({} AS pg_catalog.text)").format(c) for c in _ids(plan.key, side)]
    terms = [column_term(p, side, i) for i, p in enumerate(plan.columns)]
    texts = [sql.SQL("CAST({} AS pg_catalog.text)").format(c) for c in _ids(plan.columns, side)]
    query = sql.SQL("SELECT {} FROM {} WHERE {}").format(
        _aliased([*key_text, *terms, *texts]), plan.table.ident, where)
    if plan.key:
        query = sql.SQL("{} ORDER BY {}").format(query, sql.SQL(", ").join(_ids(plan.key, side)))
    if limit is not None:
        query = sql.SQL("{} LIMIT {}").format(query, sql.Literal(limit))
    if lock:
        query = sql.SQL("{} FOR SHARE").format(query)
    return query


# ---------------------------------------------------------------- rows and differences


@dataclass(frozen=True)
class ChunkSum:
    rows: int
    sums: tuple[str | None, ...]


@dataclass(frozen=True)
class FetchedRow:
    key: Key
    terms: tuple[int, ...]
    values: tuple[str | None, ...]


@dataclass
class RowDiff:
    """One differing row: by key, or (table without a key) by content."""

    key: dict[str, str]
    kind: Literal["missing_on_green", "extra_on_green", "changed"]
    # column label -> (blue value, green value), text forms; None is SQL NULL
    changes: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    row: dict[str, str | None] | None = None  # the whole row, for missing/extra
    count: int = 1  # how many copies (tables without a key)

    def key_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.key.items()) or "(no key)"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "kind": self.kind}
        if self.changes:
            out["changes"] = {c: {"blue": b, "green": g} for c, (b, g) in self.changes.items()}
        if self.row is not None:
            out["row"] = self.row
        if self.count != 1:
            out["count"] = self.count
        return out


def parse_rows(plan: TablePlan, rows: Iterable[Sequence[Any]]) -> dict[Key, FetchedRow]:
    nk, nc = len(plan.key), len(plan.columns)
    out: dict[Key, FetchedRow] = {}
    for r in rows:
        key = tuple(str(v) for v in r[:nk])
        out[key] = FetchedRow(key, tuple(int(v) for v in r[nk:nk + nc]), tuple(r[nk + nc:]))
    return out


def key_sort(key: Key) -> tuple[tuple[int, float, str], ...]:
    """Numbers in numeric order, anything else by text: good enough for a report."""
    out = []
    for v in key:
        try:
            out.append((0, float(v), v))
        except ValueError:
            out.append((1, 0.0, v))
    return tuple(out)


def diff_rows(plan: TablePlan, blue: dict[Key, FetchedRow], green: dict[Key, FetchedRow],
              keys: Iterable[Key] | None = None) -> list[RowDiff]:
    """Differences between the rows of both sides, matched by key.

    A column differs when its hash term differs: the same notion of "equal" as the
    checksums (the text forms are what the report shows).
    """
    labels = [p.label for p in plan.columns]
    names = plan.key_names
    out: list[RowDiff] = []
    for key in sorted(set(keys) if keys is not None else set(blue) | set(green), key=key_sort):
        b, g = blue.get(key), green.get(key)
        named = dict(zip(names, key, strict=True))
        if b is not None and g is None:
            out.append(RowDiff(named, "missing_on_green", row=dict(zip(labels, b.values,
                                                                        strict=True))))
        elif g is not None and b is None:
            out.append(RowDiff(named, "extra_on_green", row=dict(zip(labels, g.values,
                                                                      strict=True))))
        elif b is not None and g is not None and b.terms != g.terms:
            changes = {labels[i]: (b.values[i], g.values[i])
                       for i in range(len(labels)) if b.terms[i] != g.terms[i]}
            out.append(RowDiff(named, "changed", changes))
    return out


def _integer_key(plan: TablePlan) -> bool:
    return len(plan.key) == 1 and plan.key[0].base in ("int2", "int4", "int8")


def pick_bounds(sorted_keys: Sequence[Key], chunks: int) -> list[Key]:
    """chunks - 1 boundaries at even quantiles of a sorted key sample, no duplicates."""
    if chunks <= 1 or not sorted_keys:
        return []
    bounds: list[Key] = []
    for i in range(1, chunks):
        k = sorted_keys[min(len(sorted_keys) - 1, i * len(sorted_keys) // chunks)]
        if not bounds or bounds[-1] != k:
            bounds.append(k)
    if bounds and bounds[0] == sorted_keys[0]:
        bounds = bounds[1:]  # an empty first range helps nobody
    return bounds


def ranges_between(lo: Key | None, hi: Key | None, points: Sequence[Key]) -> list[KeyRange]:
    edges: list[Key | None] = [lo, *points, hi]
    return [KeyRange(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


# ---------------------------------------------------------------- results


@dataclass
class TableResult:
    table: str  # as PostgreSQL quotes it (QualifiedName.display): reports are for people
    blue_rows: int = 0
    green_rows: int = 0
    method: Literal["chunked", "whole-table", "counts"] = "chunked"
    chunks: int = 0
    mismatched_chunks: int = 0  # still mismatching after the re-checks
    ranges_compared: int = 0  # checksum comparisons, bisection included
    compared_columns: list[str] = field(default_factory=list)
    green_only_columns: list[str] = field(default_factory=list)
    diffs: list[RowDiff] = field(default_factory=list)
    complete: bool = True  # False: the search stopped at validate.max_diff_keys
    unconfirmed: int = 0  # differing rows that kept changing under writes
    transient: int = 0  # rows that differed at first look and matched when looked up again
    unexplained: str | None = None  # checksums differ, no row could be named
    error: str | None = None
    seconds: float = 0.0

    @property
    def differing_keys(self) -> int:
        return sum(d.count for d in self.diffs)

    @property
    def ok(self) -> bool:
        if self.error or self.unexplained or self.diffs:
            return False
        return self.method != "counts" or self.blue_rows == self.green_rows

    def as_dict(self, max_keys: int) -> dict[str, Any]:
        return {
            "table": self.table, "blue_rows": self.blue_rows, "green_rows": self.green_rows,
            "ok": self.ok, "method": self.method, "chunks": self.chunks,
            "mismatched_chunks": self.mismatched_chunks,
            "ranges_compared": self.ranges_compared,
            "checksum_match": self.ok, "differing_keys": self.differing_keys,
            "complete": self.complete, "unconfirmed": self.unconfirmed,
            "transient": self.transient,
            "unexplained": self.unexplained, "error": self.error,
            "compared_columns": self.compared_columns,
            "green_only_columns": self.green_only_columns,
            "seconds": round(self.seconds, 3),
            "diffs": [d.as_dict() for d in self.diffs[:max_keys]],
        }


# ---------------------------------------------------------------- the engine


class _SidePool:
    """Worker threads of one side, each with its own connection (opened on first use)."""

    def __init__(self, side: Side, db: DatabaseConfig, cfg: ValidateConfig) -> None:
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


@dataclass
class _Chunk:
    rng: KeyRange
    blue: ChunkSum | None = None
    green: ChunkSum | None = None

    @property
    def matches(self) -> bool:
        return self.blue == self.green


@dataclass
class _State:
    plan: TablePlan
    result: TableResult
    chunks: list[_Chunk] = field(default_factory=list)
    candidates: set[Key] = field(default_factory=set)
    unresolved: int = 0  # leaves whose checksums differed but whose rows did not
    int_bounds: tuple[int, int] | None = None  # smallest and largest key, integer keys
    started: float = field(default_factory=time.monotonic)

    @property
    def failed(self) -> bool:
        return self.result.error is not None


@dataclass
class _Work:
    state: _State
    rng: KeyRange
    blue_rows: int
    green_rows: int
    depth: int = 0


class Comparer:
    """Compares the rows of many tables; one instance per validation."""

    def __init__(self, blue_db: DatabaseConfig, green_db: DatabaseConfig, cfg: ValidateConfig,
                 *, catch_up: Callable[[], None] | None = None,
                 publisher: Side = "blue", progress: Progress | None = None) -> None:
        self.cfg = cfg
        self.dbs: dict[Side, DatabaseConfig] = {"blue": blue_db, "green": green_db}
        self.catch_up = catch_up
        self.publisher: Side = publisher
        self.progress = progress
        self.pools: dict[Side, _SidePool] = {"blue": _SidePool("blue", blue_db, cfg),
                                             "green": _SidePool("green", green_db, cfg)}
        self._source: Conn | None = None
        self.counts_only = not cfg.checksums
        self.leaf_limit = cfg.leaf_rows * 4 + 64

    # -- plumbing ----------------------------------------------------------

    def close(self, *, abort: bool = False) -> None:
        for pool in self.pools.values():
            pool.close(abort=abort)
        if self._source is not None:
            self._source.close()

    def _both(self, fn: Callable[[Conn, Side], T]) -> tuple[Future[T], Future[T]]:
        return (self.pools["blue"].submit(lambda c: fn(c, "blue")),
                self.pools["green"].submit(lambda c: fn(c, "green")))

    def _fail(self, state: _State, exc: BaseException) -> None:
        if state.result.error is None:
            state.result.error = f"{type(exc).__name__}: {str(exc).strip()}"

    def _checksum(self, plan: TablePlan, rng: KeyRange, conn: Conn, side: Side) -> ChunkSum:
        query, params = checksum_query(plan, side, rng, strong=self.cfg.strong_checksums,
                                       counts_only=self.counts_only)
        row = conn.execute(with_params(query, conn), params).fetchone()
        assert row is not None
        return ChunkSum(int(row[0]), tuple(row[1:]))

    def _fetch_range(self, plan: TablePlan, rng: KeyRange, conn: Conn, side: Side
                     ) -> dict[Key, FetchedRow]:
        where, params = range_predicate(plan, side, rng)
        rows = conn.execute(with_params(fetch_query(plan, side, where,
                                                    limit=self.leaf_limit + 1, lock=False),
                                        conn), params).fetchall()
        return parse_rows(plan, rows)

    def _lookup(self, plan: TablePlan, keys: Sequence[Key], conn: Conn, side: Side, *,
                lock: bool = False) -> dict[Key, FetchedRow]:
        out: dict[Key, FetchedRow] = {}
        for i in range(0, len(keys), _LOOKUP_BATCH):
            where, params = keys_predicate(plan, side, keys[i:i + _LOOKUP_BATCH])
            rows = conn.execute(with_params(fetch_query(plan, side, where, limit=None,
                                                        lock=lock), conn), params).fetchall()
            out.update(parse_rows(plan, rows))
        return out

    def _report(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)

    # -- the phases --------------------------------------------------------

    def run(self, plans: list[TablePlan]) -> list[TableResult]:
        states = [_State(p, TableResult(
            p.table.display, method="counts" if self.counts_only else
            ("chunked" if p.chunked else "whole-table"),
            compared_columns=[c.label for c in p.columns], green_only_columns=p.green_only))
            for p in plans]
        self._plan_chunks(states)
        if self.catch_up is not None:
            # Green holds at least everything blue committed before we start.
            self.catch_up()
        self._checksum_chunks(states)
        if self.catch_up is not None:
            self._recheck_chunks(states)
        if not self.counts_only:
            self._bisect(states)
            for state in states:
                if state.failed:
                    continue
                try:
                    if state.plan.chunked:
                        self._confirm(state)
                    elif any(not c.matches for c in state.chunks):
                        self._diff_whole_table(state)
                except psycopg.Error as exc:
                    self._fail(state, exc)
        for state in states:
            self._finish(state)
        return [s.result for s in states]

    def _plan_chunks(self, states: list[_State]) -> None:
        """First-level ranges of every table, from a sample of blue's keys."""
        futures: list[tuple[_State, int, Future[list[Key]]]] = []
        for state in states:
            plan = state.plan
            chunks = max(1, math.ceil(plan.est_rows / self.cfg.chunk_rows))
            if not plan.chunked or chunks == 1 or self.counts_only:
                state.chunks = [_Chunk(KeyRange())]
                continue
            futures.append((state, chunks, self.pools["blue"].submit(
                partial(self._sample_keys, plan, chunks))))
        ends = [(s, *self._both(partial(self._key_ends, s.plan))) for s in states
                if _integer_key(s.plan) and not self.counts_only]
        for state, chunks, fut in futures:
            try:
                bounds = pick_bounds(fut.result(), chunks)
            except psycopg.Error:
                # Sampling is an optimisation: one range is slower, never wrong.
                bounds = []
            state.chunks = [_Chunk(r) for r in ranges_between(None, None, bounds)]
        for state, fb, fg in ends:
            try:
                found = [x for x in (fb.result(), fg.result()) if x is not None]
            except psycopg.Error:
                continue
            if found:
                state.int_bounds = (min(x[0] for x in found), max(x[1] for x in found))

    def _key_ends(self, plan: TablePlan, conn: Conn, side: Side) -> tuple[int, int] | None:
        """min and max of an integer key: two index endpoint lookups."""
        col = _ids(plan.key, side)[0]
        row = conn.execute(sql.SQL("SELECT min({c})::pg_catalog.text, max({c})::pg_catalog.text "
                                   "FROM {t}").format(c=col, t=plan.table.ident)).fetchone()
        if row is None or row[0] is None:
            return None
        return int(row[0]), int(row[1])

    def _sample_keys(self, plan: TablePlan, chunks: int, conn: Conn) -> list[Key]:
        """Quantiles of a block sample of blue's keys, about ``chunks`` of them, sorted.

        SYSTEM sampling reads whole random pages, so the number of pages is what makes
        the quantiles even: about 8 per chunk. The quantiles are picked on the server,
        so only they travel, not the sample.
        """
        pages = max(chunks * 8, 64)
        percent = min(100.0, max(0.0001, 100.0 * pages / max(plan.pages, 1)))
        cols = _ids(plan.key, "blue")
        aliases = [sql.Identifier(f"k{i}") for i in range(len(cols))]
        inner = sql.SQL(
            "SELECT {}, row_number() OVER (ORDER BY {}) AS orch_rn, count(*) OVER () AS orch_n "
            "FROM {} TABLESAMPLE SYSTEM ({}) REPEATABLE (7)").format(
            sql.SQL(", ").join(sql.SQL("{} AS {}").format(c, a)
                               for c, a in zip(cols, aliases, strict=True)),
            sql.SQL(", ").join(cols), plan.table.ident, sql.Placeholder())
        query = sql.SQL("SELECT {} FROM ({}) s WHERE mod(s.orch_rn - 1, greatest(1, s.orch_n / {}))"
                        " = 0 ORDER BY s.orch_rn").format(
            sql.SQL(", ").join(sql.SQL("CAST(s.{} AS pg_catalog.text)").format(a)
                               for a in aliases), inner, sql.Literal(chunks))
        rows = conn.execute(with_params(query, conn), [f"{percent:.6f}"]).fetchall()
        return [tuple(str(v) for v in r) for r in rows]

    def _compare_chunks(self, items: list[tuple[_State, _Chunk]], phase: str) -> None:
        futures = []
        for state, chunk in items:
            fb, fg = self._both(partial(self._checksum, state.plan, chunk.rng))
            futures.append((state, chunk, fb, fg))
        for done, (state, chunk, fb, fg) in enumerate(futures, 1):
            try:
                chunk.blue, chunk.green = fb.result(), fg.result()
            except psycopg.Error as exc:
                self._fail(state, exc)
            state.result.ranges_compared += 1
            self._report(phase, done, len(futures))

    def _checksum_chunks(self, states: list[_State]) -> None:
        self._compare_chunks([(s, c) for s in states for c in s.chunks], "checksums")

    def _recheck_chunks(self, states: list[_State]) -> None:
        """Under writes: compare mismatching chunks again after green caught up.

        A chunk touched by a transaction that blue had committed and green had not
        yet applied differs for a moment; a real difference stays.
        """
        assert self.catch_up is not None
        for _ in range(self.cfg.recheck_rounds):
            bad = [(s, c) for s in states if not s.failed for c in s.chunks if not c.matches]
            if not bad:
                return
            self.catch_up()
            self._compare_chunks(bad, "re-checks")

    def _bisect(self, states: list[_State]) -> None:
        """Narrow every mismatching chunk of a keyed table down to differing keys.

        Level by level over all tables at once, so both sides' workers stay busy.
        """
        pending: list[_Work] = []
        for s in states:
            if s.failed or not s.plan.chunked:
                continue
            for c in s.chunks:
                if not c.matches and c.blue is not None and c.green is not None:
                    pending.append(_Work(s, c.rng, c.blue.rows, c.green.rows))
        cap = self.cfg.max_diff_keys
        while pending:
            leaves: list[_Work] = []
            splits: list[tuple[_Work, Future[list[Key]]]] = []
            for w in pending:
                if w.state.failed:
                    continue
                if len(w.state.candidates) >= cap:
                    w.state.result.complete = False
                    continue
                if max(w.blue_rows, w.green_rows) <= self.cfg.leaf_rows or w.depth >= _MAX_DEPTH:
                    leaves.append(w)
                else:
                    rows = max(w.blue_rows, w.green_rows)
                    # Enough parts that each should hold at most leaf_rows rows: one
                    # step usually goes straight from a chunk to rows.
                    fanout = max(2, min(self.cfg.split_factor,
                                        math.ceil(rows / self.cfg.leaf_rows)))
                    points = self._integer_split(w.state, w.rng, fanout)
                    if points is not None:
                        done: Future[list[Key]] = Future()
                        done.set_result(points)
                        splits.append((w, done))
                        continue
                    side: Side = "blue" if w.blue_rows >= w.green_rows else "green"
                    splits.append((w, self.pools[side].submit(partial(
                        self._split_points, w.state.plan, w.rng, math.ceil(rows / fanout),
                        side=side))))
            leaf_futures = [(w, *self._both(partial(self._fetch_range, w.state.plan, w.rng)))
                            for w in leaves]
            parts: list[tuple[_Work, list[KeyRange], Future[list[ChunkSum]],
                              Future[list[ChunkSum]]]] = []
            nxt: list[_Work] = []
            for w, fut in splits:
                try:
                    points = fut.result()
                except psycopg.Error as exc:
                    self._fail(w.state, exc)
                    continue
                if not points:
                    # The range shrank under writes: fetch what is there.
                    nxt.append(_Work(w.state, w.rng, 0, 0, w.depth + 1))
                    continue
                ranges = ranges_between(w.rng.lo, w.rng.hi, points)
                parts.append((w, ranges, *self._both(partial(
                    self._bucket_sums, w.state.plan, w.rng, points))))
            for w, ranges, fb, fg in parts:
                try:
                    bs, gs = fb.result(), fg.result()
                except psycopg.Error as exc:
                    self._fail(w.state, exc)
                    continue
                w.state.result.ranges_compared += len(ranges)
                for rng, b, g in zip(ranges, bs, gs, strict=True):
                    if b != g:
                        nxt.append(_Work(w.state, rng, b.rows, g.rows, w.depth + 1))
            for w, fb_rows, fg_rows in leaf_futures:
                try:
                    b_rows, g_rows = fb_rows.result(), fg_rows.result()
                except psycopg.Error as exc:
                    self._fail(w.state, exc)
                    continue
                if max(len(b_rows), len(g_rows)) > self.leaf_limit:
                    if w.depth >= _MAX_DEPTH:
                        w.state.result.complete = False
                    else:
                        nxt.append(_Work(w.state, w.rng, len(b_rows), len(g_rows), w.depth + 1))
                    continue
                found = diff_rows(w.state.plan, b_rows, g_rows)
                if not found:
                    w.state.unresolved += 1
                for d in found:
                    w.state.candidates.add(tuple(d.key.values()))
            pending = nxt

    def _integer_split(self, state: _State, rng: KeyRange, parts: int) -> list[Key] | None:
        """Points for a single integer key, computed instead of read (saves a round trip).

        Open ends use the smallest and largest keys seen on either side; the outer
        parts stay open, so a row beyond them is still counted. Sparse keys give
        unequal parts, which the next step splits again.
        """
        bounds = state.int_bounds
        if bounds is None:
            return None
        lo = int(rng.lo[0]) if rng.lo is not None else bounds[0]
        hi = int(rng.hi[0]) if rng.hi is not None else bounds[1] + 1
        points = integer_points(lo, hi, parts)
        return points or None

    def _bucket_sums(self, plan: TablePlan, rng: KeyRange, points: list[Key], conn: Conn,
                     side: Side) -> list[ChunkSum]:
        query, params = bucket_query(plan, side, rng, points, strong=self.cfg.strong_checksums)
        found = {int(r[0]): ChunkSum(int(r[1]), tuple(r[2:]))
                 for r in conn.execute(with_params(query, conn), params).fetchall()}
        empty = ChunkSum(0, (None,) * (2 if self.cfg.strong_checksums else 1))
        return [found.get(i, empty) for i in range(len(points) + 1)]

    def _split_points(self, plan: TablePlan, rng: KeyRange, step: int, conn: Conn, *,
                      side: Side) -> list[Key]:
        """Keys cutting ``rng`` into parts of ``step`` rows (an index-only scan)."""
        where, params = range_predicate(plan, side, rng)
        cols = _ids(plan.key, side)
        aliases = [sql.Identifier(f"k{i}") for i in range(len(cols))]
        inner = sql.SQL("SELECT {}, row_number() OVER (ORDER BY {}) AS orch_rn FROM {} WHERE {}"
                        ).format(
            sql.SQL(", ").join(sql.SQL("{} AS {}").format(c, a)
                               for c, a in zip(cols, aliases, strict=True)),
            sql.SQL(", ").join(cols), plan.table.ident, where)
        query = sql.SQL("SELECT {} FROM ({}) s WHERE s.orch_rn > 1 AND "
                        "mod(s.orch_rn - 1, {}) = 0 ORDER BY s.orch_rn").format(
            sql.SQL(", ").join(sql.SQL("CAST(s.{} AS pg_catalog.text)").format(a)
                               for a in aliases), inner, sql.Literal(step))
        rows = conn.execute(with_params(query, conn), params).fetchall()
        return [tuple(str(v) for v in r) for r in rows]

    # -- confirming differences -------------------------------------------

    def _confirm(self, state: _State) -> None:
        """Look every candidate key up again on both sides; keep what really differs."""
        if not state.candidates:
            return
        plan = state.plan
        keys = sorted(state.candidates, key=key_sort)[: self.cfg.max_diff_keys]
        if self.catch_up is None:
            fb, fg = self._both(partial(self._lookup_side, plan, keys))
            state.result.diffs = diff_rows(plan, fb.result(), fg.result(), keys)
            state.result.transient = len(keys) - len(state.result.diffs)
            return
        first_keys = len(keys)
        unstable: set[Key] = set()
        diffs: list[RowDiff] = []
        for round_no in range(self.cfg.recheck_rounds):
            self.catch_up()  # short lag before taking any lock
            persisted, unstable, blue_rows, green_rows, exact = self._confirm_round(plan, keys)
            diffs = diff_rows(plan, blue_rows, green_rows, persisted)
            keys = sorted(persisted | unstable, key=key_sort)
            # Rows locked on the publisher were compared exactly; rows it does not hold
            # (extra on green) cannot be locked, so they must differ in two rounds.
            if not keys or (not unstable and (exact or round_no >= 1)):
                break
        state.result.diffs = diffs
        state.result.unconfirmed = len(unstable)
        state.result.transient = first_keys - len(diffs) - len(unstable)

    def _lookup_side(self, plan: TablePlan, keys: Sequence[Key], conn: Conn, side: Side
                     ) -> dict[Key, FetchedRow]:
        return self._lookup(plan, keys, conn, side)

    def _source_conn(self) -> Conn:
        if self._source is None or self._source.closed:
            self._source = open_session(self.dbs[self.publisher], self.cfg, "validate-confirm")
            self._source.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        return self._source

    def _confirm_round(self, plan: TablePlan, keys: list[Key]
                       ) -> tuple[set[Key], set[Key], dict[Key, FetchedRow],
                                  dict[Key, FetchedRow], bool]:
        """One exact look at ``keys`` while replication streams.

        On the publisher, in one transaction: lock the rows (FOR SHARE: writers to
        them wait, nobody else does) and read them; catch up, so the subscriber has
        applied every commit before the lock, including the last one touching these
        rows; read the subscriber; read the publisher again. A locked row cannot have
        changed, so publisher and subscriber are compared at the same point. A key
        the publisher does not hold cannot be locked: it counts as stable only if
        both publisher reads agree.
        """
        assert self.catch_up is not None
        src_side: Side = self.publisher
        dst_side: Side = "green" if src_side == "blue" else "blue"
        src = self._source_conn()
        locked = False
        with src.transaction():
            first: dict[Key, FetchedRow] = {}
            if self.cfg.lock_rows:
                try:
                    with src.transaction():
                        first = self._lookup(plan, keys, src, src_side, lock=True)
                    locked = True
                except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected,
                        psycopg.errors.ReadOnlySqlTransaction,
                        psycopg.errors.InsufficientPrivilege):
                    locked = False
            if not locked:
                first = self._lookup(plan, keys, src, src_side)
            self.catch_up()
            other = self.pools[dst_side].submit(
                partial(self._lookup_side, plan, keys, side=dst_side))
            dst = other.result()
            second = self._lookup(plan, keys, src, src_side)
        persisted: set[Key] = set()
        unstable: set[Key] = set()
        for key in keys:
            a, b, c = first.get(key), second.get(key), dst.get(key)
            same_src = (a.terms if a else None) == (b.terms if b else None)
            equal = (b.terms if b else None) == (c.terms if c else None)
            if equal:
                continue
            (persisted if same_src else unstable).add(key)
        blue_rows, green_rows = (second, dst) if src_side == "blue" else (dst, second)
        exact = locked and all(k in first for k in persisted)
        return persisted, unstable, blue_rows, green_rows, exact

    # -- tables without a key ------------------------------------------------

    def _diff_whole_table(self, state: _State) -> None:
        """A table without a key, compared as a multiset of row hashes."""
        plan = state.plan
        rows = max((max(c.blue.rows if c.blue else 0, c.green.rows if c.green else 0)
                    for c in state.chunks), default=0)
        if rows > self.cfg.nokey_diff_max_rows:
            state.result.unexplained = (
                f"content differs; the table has no primary key and {rows} rows (more than "
                "validate.nokey_diff_max_rows), so the differing rows are not listed")
            return
        if self.catch_up is not None:
            self.catch_up()
        fb, fg = self._both(partial(self._hash_counts, plan))
        b, g = fb.result(), fg.result()
        extra_blue = b - g
        extra_green = g - b
        wanted = list(extra_blue) + list(extra_green)
        wanted = wanted[: self.cfg.max_diff_keys]
        if not wanted:
            return
        fb2, fg2 = self._both(partial(self._rows_by_hash, plan, wanted))
        b_rows, g_rows = fb2.result(), fg2.result()
        labels = [p.label for p in plan.columns]
        diffs: list[RowDiff] = []
        for h in wanted:
            if h in extra_blue and h in b_rows:
                diffs.append(RowDiff({}, "missing_on_green", row=dict(zip(labels, b_rows[h],
                                                                          strict=True)),
                                     count=extra_blue[h]))
            elif h in extra_green and h in g_rows:
                diffs.append(RowDiff({}, "extra_on_green", row=dict(zip(labels, g_rows[h],
                                                                        strict=True)),
                                     count=extra_green[h]))
        state.result.diffs = diffs
        state.result.complete = len(wanted) == len(extra_blue) + len(extra_green)

    def _hash_counts(self, plan: TablePlan, conn: Conn, side: Side) -> Counter[int]:
        query = sql.SQL("SELECT h, count(*) FROM (SELECT {} AS h FROM {}) s GROUP BY h").format(
            row_hash(plan, side), plan.table.ident)
        return Counter({int(r[0]): int(r[1]) for r in conn.execute(query).fetchall()})

    def _rows_by_hash(self, plan: TablePlan, hashes: list[int], conn: Conn, side: Side
                      ) -> dict[int, tuple[str | None, ...]]:
        texts = [sql.SQL("CAST({} AS pg_catalog.text)").format(c)
                 for c in _ids(plan.columns, side)]
        h = row_hash(plan, side)
        query = sql.SQL("SELECT {}, {} FROM {} WHERE {} = ANY({}::pg_catalog.int8[])").format(
            h, sql.SQL(", ").join(texts), plan.table.ident, h, sql.Placeholder())
        out: dict[int, tuple[str | None, ...]] = {}
        for r in conn.execute(with_params(query, conn), [hashes]).fetchall():
            out.setdefault(int(r[0]), tuple(r[1:]))
        return out

    # -- results ---------------------------------------------------------------

    def _finish(self, state: _State) -> None:
        res = state.result
        done = [c for c in state.chunks if c.blue is not None and c.green is not None]
        res.chunks = len(state.chunks)
        res.blue_rows = sum(c.blue.rows for c in done if c.blue is not None)
        res.green_rows = sum(c.green.rows for c in done if c.green is not None)
        res.mismatched_chunks = sum(1 for c in done if not c.matches)
        if state.unresolved and self.catch_up is None and not res.error:
            # Without writes, a range whose checksums differ holds a differing row; rows
            # that read the same on both sides mean the data moved while we looked.
            res.unexplained = (f"{state.unresolved} range(s) had different checksums but "
                               "identical rows (were there writes? pass a catch-up)")
        if not res.complete and not res.diffs and not res.error and res.unexplained is None:
            res.unexplained = ("too many transient differences to isolate the real ones; "
                               "run the validation again")
        res.seconds = time.monotonic() - state.started


def compare_tables(blue_db: DatabaseConfig, green_db: DatabaseConfig, cfg: ValidateConfig,
                   plans: list[TablePlan], *, catch_up: Callable[[], None] | None = None,
                   publisher: Side = "blue", progress: Progress | None = None
                   ) -> list[TableResult]:
    comparer = Comparer(blue_db, green_db, cfg, catch_up=catch_up, publisher=publisher,
                        progress=progress)
    try:
        results = comparer.run(plans)
    except BaseException:
        comparer.close(abort=True)
        raise
    comparer.close()
    return results
