"""What to copy: the columns, binary or text, whole tables or page ranges, how many jobs."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import psycopg

from orchestrator.config import InitialCopyConfig
from orchestrator.errors import ReleaseFailed
from orchestrator.pg.catalog import Table
from orchestrator.pg.conn import scalar, server_major

# OIDs below this are assigned by initdb to built-in objects and are the same on
# every server of every major (FirstNormalObjectId).
FIRST_NORMAL_OID = 16384


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def effective_jobs(cfg: InitialCopyConfig) -> int:
    return cfg.jobs or cores()


def parallel_maintenance_workers(cfg: InitialCopyConfig) -> int:
    if cfg.max_parallel_maintenance_workers is not None:
        return cfg.max_parallel_maintenance_workers
    return max(1, cores() // effective_jobs(cfg) - 1)


@dataclass(frozen=True)
class CopyTask:
    """One pipe: rows of ``source`` (optionally a page range) into ``target``."""

    target: tuple[str, str]  # green table (schema, name)
    source: tuple[str, str]  # blue relation: the table itself or a leaf partition
    columns: list[str]
    binary: bool
    cost: int  # bytes on blue, for scheduling and progress
    pages: tuple[int, int | None] | None = None  # [first, end) heap pages; None = all
    freeze: bool = False  # whole table into a plain table: TRUNCATE + COPY FREEZE
    only: bool = True  # source read with ONLY (inheritance children are own tasks)

    @property
    def label(self) -> str:
        rng = "" if self.pages is None else f" pages {self.pages[0]}..{self.pages[1] or 'end'}"
        src = ".".join(self.source)
        return f"{src}{rng}"


@dataclass
class CopyPlan:
    tasks: list[CopyTask]
    targets: list[tuple[str, str, str]]  # (schema, name, relkind) on green
    binary_tables: int = 0
    text_tables: int = 0
    split_tables: int = 0
    chunk_bytes: int = 0

    @property
    def total_cost(self) -> int:
        return sum(t.cost for t in self.tasks)


@dataclass(frozen=True)
class _Col:
    name: str
    typid: int
    generated: bool
    binary_io: bool


def _relation(conn: psycopg.Connection[Any], schema: str, name: str) -> tuple[int, str] | None:
    row = conn.execute(
        "SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s", (schema, name)).fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


def _columns(conn: psycopg.Connection[Any], oid: int) -> list[_Col]:
    rows = conn.execute(
        """
        SELECT a.attname, a.atttypid::int, a.attgenerated <> '',
               t.typsend::oid <> 0 AND t.typreceive::oid <> 0
        FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """, (oid,)).fetchall()
    return [_Col(r[0], int(r[1]), bool(r[2]), bool(r[3])) for r in rows]


@dataclass(frozen=True)
class _Source:
    schema: str
    name: str
    relkind: str
    heap: int  # main fork bytes: what page ranges divide
    data: int  # heap + TOAST: what the copy moves


def _sources(conn: psycopg.Connection[Any], oid: int, relkind: str) -> list[_Source]:
    """The relations that hold the table's rows: itself, or its leaf partitions."""
    select = ("SELECT n.nspname, c.relname, c.relkind, pg_relation_size(c.oid), "
              "pg_total_relation_size(c.oid) - pg_indexes_size(c.oid) ")
    if relkind == "p":
        query = (select + "FROM pg_partition_tree(%s) p JOIN pg_class c ON c.oid = p.relid "
                 "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.isleaf ORDER BY 1, 2")
    else:
        query = (select + "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                 "WHERE c.oid = %s")
    return [_Source(r[0], r[1], r[2], int(r[3]), int(r[4]))
            for r in conn.execute(query, (oid,)).fetchall()]


def default_chunk_bytes(total: int, jobs: int) -> int:
    return min(1024 ** 3, max(64 * 1024 ** 2, total // max(1, 4 * jobs)))


def split_pages(pages: int, size: int, chunk: int) -> list[tuple[int, int | None]]:
    """Page ranges of about ``chunk`` bytes covering a relation of ``pages`` pages.

    The last range is open-ended: pages added after the sizes were read hold only
    rows the snapshot cannot see, but an open end makes that irrelevant.
    """
    if pages <= 0 or size <= chunk * 3 // 2:
        return [(0, None)]
    count = -(-size // chunk)
    step = -(-pages // count)
    bounds = list(range(0, pages, step))
    return [(lo, bounds[i + 1] if i + 1 < len(bounds) else None)
            for i, lo in enumerate(bounds)]


def lpt_makespan(costs: list[int], machines: int) -> int:
    """Finish time of ``costs`` on ``machines`` workers, largest first."""
    loads = [0] * max(1, machines)
    for cost in sorted(costs, reverse=True):
        loads[loads.index(min(loads))] += cost
    return max(loads)


# Splitting must at least halve the copy's makespan. A split table is filled by
# several sessions, so it cannot be loaded with COPY FREEZE; on PostgreSQL 17 the
# index builds, foreign-key checks and ANALYZE that follow then pay for setting hint
# bits and visibility on every page (about a quarter more CPU for the whole load at
# pgbench scale 50), and the table is left for a later anti-wraparound VACUUM to
# freeze, which rewrites it. On a small server a single COPY pipe already keeps most
# cores busy (COPY FROM ~1, COPY TO and the two psql ~0.5), so the gain must be large.
SPLIT_GAIN = 2.0


@dataclass(frozen=True)
class _Found:
    """A table to copy: the columns both sides share, the format, where its rows are."""

    table: Table
    green_kind: str
    columns: list[str]
    binary: bool
    sources: list[_Source]


def _find(blue: psycopg.Connection[Any], green: psycopg.Connection[Any], t: Table,
          binary: bool) -> _Found:
    b = _relation(blue, t.schema, t.name)
    g = _relation(green, t.schema, t.name)
    if b is None:
        raise ReleaseFailed(f"table {t.qname} disappeared from blue during the release")
    if g is None:
        raise ReleaseFailed(f"table {t.qname} is missing on green",
                            hint="a migration dropped or renamed a table that blue still "
                            "has; exclude it (sync.exclude_tables) or keep it")
    bcols = _columns(blue, b[0])
    gcols = {c.name: c for c in _columns(green, g[0])}
    # Generated columns are computed on green; columns green dropped are left out,
    # columns only green has take their defaults (as logical replication does).
    pairs = [(c, gcols[c.name]) for c in bcols
             if not c.generated and c.name in gcols and not gcols[c.name].generated]
    if not pairs:
        raise ReleaseFailed(f"table {t.qname} has no column in common between blue "
                            "and green")
    is_binary = binary and all(
        bc.typid == gc.typid and bc.typid < FIRST_NORMAL_OID and bc.binary_io
        and gc.binary_io for bc, gc in pairs)
    return _Found(t, g[1], [c.name for c, _ in pairs], is_binary, _sources(blue, b[0], b[1]))


Ranges = Callable[[_Source], list[tuple[int, int | None]]]


def _costs(found: list[_Found], ranges_of: Ranges, split_now: set[tuple[str, str]]
           ) -> list[int]:
    out: list[int] = []
    for f in found:
        for src in f.sources:
            n = len(ranges_of(src)) if (src.schema, src.name) in split_now else 1
            out += [max(1, src.data // n)] * n
    return out


def _splits(found: list[_Found], ranges_of: Ranges, *, jobs: int, can_split: bool,
            split: Literal["auto", "always", "never"]) -> set[tuple[str, str]]:
    """Start whole, then split the largest relations while that pays (see SPLIT_GAIN)."""
    splits: set[tuple[str, str]] = set()
    candidates = sorted((src for f in found for src in f.sources
                         if can_split and src.relkind == "r" and len(ranges_of(src)) > 1),
                        key=lambda src: -src.data)
    for src in candidates:
        trial = {*splits, (src.schema, src.name)}
        if split == "always" or (
                lpt_makespan(_costs(found, ranges_of, trial), jobs) * SPLIT_GAIN
                <= lpt_makespan(_costs(found, ranges_of, splits), jobs)):
            splits = trial
        else:
            break
    return splits


def _tasks(f: _Found, ranges_of: Ranges, splits: set[tuple[str, str]], *, block: int,
           freeze: bool) -> list[CopyTask]:
    tasks: list[CopyTask] = []
    t = f.table
    for src in f.sources:
        npages = src.heap // block
        ranges = ranges_of(src) if (src.schema, src.name) in splits else [(0, None)]
        whole = len(ranges) == 1 and len(f.sources) == 1 and (
            src.schema, src.name) == (t.schema, t.name)
        for lo, hi in ranges:
            pages = None if len(ranges) == 1 else (lo, hi)
            cost = src.data if pages is None else src.data * (
                (hi if hi is not None else npages) - lo) // max(1, npages)
            tasks.append(CopyTask(
                target=(t.schema, t.name), source=(src.schema, src.name), columns=f.columns,
                binary=f.binary, cost=max(1, cost), pages=pages,
                freeze=freeze and whole and f.green_kind == "r",
                only=src.relkind != "p"))
    return tasks


def plan_copy(blue: psycopg.Connection[Any], green: psycopg.Connection[Any],
              tables: list[Table], *, jobs: int, chunk_bytes: int | None = None,
              binary: bool = True, freeze: bool = True,
              split: Literal["auto", "always", "never"] = "auto") -> CopyPlan:
    """Decide the copy tasks: which columns, binary or text, whole or page ranges."""
    can_split = server_major(blue) >= 14 and split != "never"  # TID range scans
    found = [_find(blue, green, t, binary) for t in tables]
    plan = CopyPlan([], [(f.table.schema, f.table.name, f.green_kind) for f in found])
    plan.binary_tables = sum(1 for f in found if f.binary)
    plan.text_tables = len(found) - plan.binary_tables
    total = sum(src.data for f in found for src in f.sources)
    chunk = chunk_bytes or default_chunk_bytes(total, jobs)
    plan.chunk_bytes = chunk
    block = int(scalar(blue, "SELECT current_setting('block_size')::int") or 8192)

    def ranges_of(src: _Source) -> list[tuple[int, int | None]]:
        return split_pages(src.heap // block, src.data, chunk)

    splits = _splits(found, ranges_of, jobs=jobs, can_split=can_split, split=split)
    tasks: list[CopyTask] = []
    for f in found:
        mine = _tasks(f, ranges_of, splits, block=block, freeze=freeze)
        plan.split_tables += int(len(mine) > len(f.sources))
        tasks += mine
    tasks.sort(key=lambda task: -task.cost)
    plan.tasks = tasks
    return plan
