"""Green's initial load: a snapshot-consistent parallel copy, then streaming from the slot.

Logical replication's own initial sync (``copy_data = true``) copies each table in
one worker into tables that already carry every index, and cannot split a table.
orchestrate does the copy itself instead, the way pg_dump and pgcopydb take a
consistent picture of a live database, and lets logical replication stream from
exactly the point that picture shows:

1. On blue, a replication connection creates the forward slot with an exported
   snapshot (``CREATE_REPLICATION_SLOT .. LOGICAL pgoutput (SNAPSHOT 'export')``, the
   older ``EXPORT_SNAPSHOT`` spelling before 15). The snapshot shows exactly the
   transactions committed before the slot's consistent point; the slot streams
   exactly the ones committed after it. The connection stays open and idle until
   the last copy is done: an exported snapshot can only be imported while its
   exporting session is unchanged.
2. Green's indexes, key constraints and foreign keys are recorded and dropped
   (``schema_sections``), read from green's own catalog because the release's
   migrations ran on green after provisioning.
3. ``jobs`` slots run a dependency graph: copy pipes and green sessions that rebuild
   what step 2 dropped. A table's indexes are built as soon as its rows are in, while
   other tables are still copying; a foreign key is checked once both of its tables
   are indexed; ANALYZE comes last per table. The longest chain of remaining work
   goes first, so the largest table's copy starts at once and its index right after.
4. The subscription is created on the existing slot (``copy_data = false,
   create_slot = false``) and the heartbeat catch-up (``replication.wait_applied``)
   proves green current: "caught up and indexed".

A copy pipe is ``psql`` on blue (``BEGIN ISOLATION LEVEL REPEATABLE READ; SET
TRANSACTION SNAPSHOT ..; COPY .. TO STDOUT``) into ``psql`` on green (``\\copy ..
FROM pstdin``). The rows never pass through Python: a psycopg copy loop costs a
Python call per row under the GIL (measured 1.9-4.6 s per million pgbench rows
against 1.3-2.0 s for the psql pipe). Green's transaction commits only after blue's
side exited successfully: COPY takes end-of-input at a row boundary as a normal
end, so a blue failure mid-stream must not commit a prefix. Green's copy sessions
run with ``session_replication_role = replica`` (triggers do not fire, as in
logical replication's apply) and ``synchronous_commit = off``.

Binary COPY is used for a table when every copied column has a built-in type (OID
below 16384, the same on every major) with binary send/receive functions, and the
same type on both sides; other tables (enums, domains, extension types, arrays of
those, a type a migration changed) use text, the portable format.

A table copied whole by one pipe is truncated and filled in one transaction with
``COPY .. FREEZE``: rows are written frozen and all-visible, so the index builds,
foreign-key checks and ANALYZE that follow do not set hint bits page by page, and
no anti-wraparound VACUUM rewrites the table later. A large table can instead be
split into ranges of heap pages (``ctid >= '(a,0)' AND ctid < '(b,0)'``, a TID range
scan, blue 14+) copied in parallel: the pages a snapshot sees are fixed, the split
needs no index, every range reads sequentially and ranges of equal size take equal
time (key ranges from a skewed or uncorrelated key do not). Splitting gives up
FREEZE, so ``plan_copy`` splits only where that at least halves the copy's makespan
(``SPLIT_GAIN``). Leaf partitions of a partitioned table are separate tasks.

WAL: green runs with ``wal_level = logical`` (it publishes the reverse direction
later), so the ``wal_level = minimal`` shortcut that skips WAL for a COPY into a
table created or truncated in the same transaction does not apply; every copied
page is WAL-logged. Unlogged tables switched to LOGGED afterwards would write the
whole table to WAL anyway (and lose everything on a crash in between), so the copy
simply writes WAL, in multi-insert records; checkpoint spacing (``max_wal_size``)
decides whether that WAL is cheap.

Resuming: an exported snapshot dies with its session, so a copy interrupted half way
cannot be continued consistently. Green keeps one row per slot in
``<control_schema>.initial_copy``: ``copying`` is written before the slot is created,
``copied`` when the last row is in, ``streaming`` with the subscription. A run that
finds ``copying`` (or ``copied`` without the slot on blue) ends the copy sessions a
dead run may have left, drops the slot, truncates green's copied tables and starts
over; ``copied`` keeps the copy and the slot and only finishes the rebuilds
(``restore_post_data``); ``streaming`` has nothing left to do.

The plain path (``method: subscription``) remains: logical replication copies the
tables itself, with more sync workers for the run (``tune_sync_workers``),
``binary`` when both majors are 16+ and ``streaming = parallel`` on 16+.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import psycopg
from psycopg import pq, sql

from orchestrator.config import DatabaseConfig, InitialCopyConfig
from orchestrator.errors import ExternalError, ReleaseFailed
from orchestrator.logging import get_logger, scrub
from orchestrator.pg import children, replication, schema_sections
from orchestrator.pg.catalog import Table
from orchestrator.pg.conn import scalar, server_major
from orchestrator.pg.tools import PgTools

log = get_logger("orchestrate")

STATE_TABLE = "initial_copy"
SETTINGS_TABLE = "initial_copy_settings"
# OIDs below this are assigned by initdb to built-in objects and are the same on
# every server of every major (FirstNormalObjectId).
FIRST_NORMAL_OID = 16384
COPY_APP_PREFIX = "orch-copy:"

Progress = Callable[[str, int, int], None]


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


# ------------------------------------------------------------------ planning


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


def plan_copy(blue: psycopg.Connection[Any], green: psycopg.Connection[Any],
              tables: list[Table], *, jobs: int, chunk_bytes: int | None = None,
              binary: bool = True, freeze: bool = True,
              split: Literal["auto", "always", "never"] = "auto") -> CopyPlan:
    """Decide the copy tasks: which columns, binary or text, whole or page ranges."""
    can_split = server_major(blue) >= 14 and split != "never"  # TID range scans
    found: list[tuple[Table, str, list[str], bool, list[_Source]]] = []
    targets: list[tuple[str, str, str]] = []
    plan = CopyPlan([], targets)
    for t in tables:
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
        plan.binary_tables += int(is_binary)
        plan.text_tables += int(not is_binary)
        found.append((t, g[1], [c.name for c, _ in pairs], is_binary,
                      _sources(blue, b[0], b[1])))
        targets.append((t.schema, t.name, g[1]))
    total = sum(src.data for f in found for src in f[4])
    chunk = chunk_bytes or default_chunk_bytes(total, jobs)
    plan.chunk_bytes = chunk
    block = int(scalar(blue, "SELECT current_setting('block_size')::int") or 8192)

    def ranges_of(src: _Source) -> list[tuple[int, int | None]]:
        return split_pages(src.heap // block, src.data, chunk)

    # Start whole, then split the largest relations while that pays (see SPLIT_GAIN).
    splits: set[tuple[str, str]] = set()
    candidates = sorted((src for f in found for src in f[4]
                         if can_split and src.relkind == "r" and len(ranges_of(src)) > 1),
                        key=lambda src: -src.data)

    def costs(split_now: set[tuple[str, str]]) -> list[int]:
        out: list[int] = []
        for f in found:
            for src in f[4]:
                n = len(ranges_of(src)) if (src.schema, src.name) in split_now else 1
                out += [max(1, src.data // n)] * n
        return out

    for src in candidates:
        trial = {*splits, (src.schema, src.name)}
        if split == "always" or (
                lpt_makespan(costs(trial), jobs) * SPLIT_GAIN
                <= lpt_makespan(costs(splits), jobs)):
            splits = trial
        else:
            break

    tasks: list[CopyTask] = []
    for t, green_kind, cols, is_binary, sources in found:
        split_any = False
        for src in sources:
            npages = src.heap // block
            ranges = ranges_of(src) if (src.schema, src.name) in splits else [(0, None)]
            split_any = split_any or len(ranges) > 1
            whole = len(ranges) == 1 and len(sources) == 1 and (
                src.schema, src.name) == (t.schema, t.name)
            for lo, hi in ranges:
                pages = None if len(ranges) == 1 else (lo, hi)
                cost = src.data if pages is None else src.data * (
                    (hi if hi is not None else npages) - lo) // max(1, npages)
                tasks.append(CopyTask(
                    target=(t.schema, t.name), source=(src.schema, src.name), columns=cols,
                    binary=is_binary, cost=max(1, cost), pages=pages,
                    freeze=freeze and whole and green_kind == "r",
                    only=src.relkind != "p"))
        plan.split_tables += int(split_any)
    tasks.sort(key=lambda task: -task.cost)
    plan.tasks = tasks
    return plan


# ------------------------------------------------------------------ state


@dataclass(frozen=True)
class CopyState:
    slot: str
    phase: str  # copying | copied | streaming
    consistent_point: str | None


def _ident(*parts: str) -> sql.Composed:
    return sql.SQL(".").join([sql.Identifier(p) for p in parts])


def ensure_state_tables(conn: psycopg.Connection[Any], control_schema: str) -> None:
    conn.execute(sql.SQL(
        "CREATE SCHEMA IF NOT EXISTS {s}; "
        "CREATE TABLE IF NOT EXISTS {s}.{t} (slot text PRIMARY KEY, phase text NOT NULL, "
        " consistent_point text, jobs int, started_at timestamptz NOT NULL DEFAULT now(), "
        " updated_at timestamptz NOT NULL DEFAULT now())"
    ).format(s=sql.Identifier(control_schema), t=sql.Identifier(STATE_TABLE)))
    schema_sections.ensure_table(conn, control_schema)


def copy_state(conn: psycopg.Connection[Any], control_schema: str, slot: str
               ) -> CopyState | None:
    exists = scalar(conn, "SELECT to_regclass(%s) IS NOT NULL",
                    _ident(control_schema, STATE_TABLE).as_string(conn))
    if not exists:
        return None
    row = conn.execute(sql.SQL("SELECT slot, phase, consistent_point FROM {} WHERE slot = %s"
                               ).format(_ident(control_schema, STATE_TABLE)), (slot,)).fetchone()
    return None if row is None else CopyState(row[0], row[1], row[2])


def _set_phase(conn: psycopg.Connection[Any], control_schema: str, slot: str, phase: str,
               **values: Any) -> None:
    conn.execute(sql.SQL(
        "INSERT INTO {} AS s (slot, phase, consistent_point, jobs) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (slot) DO UPDATE SET phase = excluded.phase, "
        "consistent_point = coalesce(excluded.consistent_point, s.consistent_point), "
        "jobs = coalesce(excluded.jobs, s.jobs), updated_at = now()"
    ).format(_ident(control_schema, STATE_TABLE)),
        (slot, phase, values.get("consistent_point"), values.get("jobs")))


def _slot_exists(conn: psycopg.Connection[Any], slot: str) -> bool:
    return bool(scalar(conn, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", slot))


def _subscription_on_slot(conn: psycopg.Connection[Any], slot: str) -> bool:
    return bool(scalar(conn, "SELECT 1 FROM pg_subscription WHERE subslotname = %s "
                       "AND subdbid = (SELECT oid FROM pg_database "
                       "WHERE datname = current_database())", slot))


def _end_copy_sessions(conn: psycopg.Connection[Any], slot: str) -> int:
    """End sessions of an earlier run's copy pipes (their psql may outlive it)."""
    rows = conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = %s AND pid <> pg_backend_pid()",
        ((COPY_APP_PREFIX + slot)[:63],)).fetchall()
    return len(rows)


# ------------------------------------------------------------------ the slot


@dataclass(frozen=True)
class ExportedSlot:
    name: str
    consistent_point: str
    snapshot: str


@contextlib.contextmanager
def exported_slot(db: DatabaseConfig, slot: str, *, timeout: float) -> Iterator[ExportedSlot]:
    """Create the logical slot over a replication connection, exporting its snapshot.

    The snapshot is importable while this context is open (the connection is idle).
    The slot itself is permanent: it outlives the context, for the subscription.
    """
    conn = psycopg.connect(db.conninfo(), replication="database", autocommit=True,
                           application_name=(COPY_APP_PREFIX + slot)[:63])
    try:
        major = server_major(conn)
        ident = sql.Identifier(slot).as_string(conn)
        # The option list is PostgreSQL 15+ syntax; the bare keyword is older (and
        # still accepted by 15-18, but may not be forever).
        command = (f"CREATE_REPLICATION_SLOT {ident} LOGICAL pgoutput (SNAPSHOT 'export')"
                   if major >= 15 else
                   f"CREATE_REPLICATION_SLOT {ident} LOGICAL pgoutput EXPORT_SNAPSHOT")
        # The command waits for transactions open on blue to finish; a statement
        # timeout does not apply to replication commands, so a timer cancels it.
        timer = threading.Timer(timeout, conn.cancel_safe)
        timer.start()
        try:
            result = conn.pgconn.exec_(command.encode())
        finally:
            timer.cancel()
        if result.status != pq.ExecStatus.TUPLES_OK:
            message = (result.error_message or b"").decode(errors="replace").strip()
            hint = None
            if "canceling" in message:
                hint = (f"a transaction on blue stayed open for more than {timeout:.0f}s; "
                        "end it or raise sync.initial_copy.slot_timeout")
            raise ExternalError(f"creating replication slot {slot} on blue failed: "
                                f"{scrub(message)}", hint=hint)
        values = [result.get_value(0, i) for i in range(3)]
        yield ExportedSlot(slot, (values[1] or b"").decode(), (values[2] or b"").decode())
    finally:
        conn.close()


# ------------------------------------------------------------------ copying


@dataclass
class CopyStats:
    skipped: str | None = None  # why nothing was copied (a rerun), else None
    streaming: bool = False  # green already streams from the slot: nothing left to do
    tables: int = 0
    tasks: int = 0
    rows: int = 0
    bytes: int = 0
    binary_tables: int = 0
    text_tables: int = 0
    split_tables: int = 0
    jobs: int = 0
    seconds: float = 0.0
    consistent_point: str | None = None
    restarted: bool = False  # an interrupted copy was thrown away and redone
    copy_seconds: float = 0.0  # until the last row was in (the rebuilds overlap it)
    deferred: schema_sections.DeferReport | None = None
    post_data: schema_sections.PostDataStats | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in {"deferred", "post_data"}}
        if self.post_data is not None:
            out["post_data"] = dict(self.post_data.__dict__)
        return out


_PSQL_ENV_DROP = ("PGOPTIONS", "PGSERVICE", "PGSERVICEFILE", "PGDATABASE")


def _env(db: DatabaseConfig, app: str, options: list[str], encoding: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PSQL_ENV_DROP}
    env.update(db.subprocess_env())
    env.update({"PGAPPNAME": app, "PGOPTIONS": " ".join(f"-c {o}" for o in options),
                "PGCLIENTENCODING": encoding})
    return env


# Session settings that make a text COPY read back exactly what it wrote, whatever
# the servers' defaults are.
_PORTABLE = ["datestyle=ISO", "intervalstyle=postgres", "extra_float_digits=3",
             "statement_timeout=0", "idle_in_transaction_session_timeout=0",
             # A DDL statement queued on blue must not stall a copy forever.
             "lock_timeout=300000"]


@dataclass(eq=False)
class _Pipe:
    blue: subprocess.Popen[bytes]
    green: subprocess.Popen[bytes]
    control: int  # write end of green's command stream

    def kill(self) -> None:
        for proc in (self.blue, self.green):
            if proc.poll() is None:
                proc.kill()
        for proc in (self.blue, self.green):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            os.close(self.control)


class _Copier:
    def __init__(self, blue: DatabaseConfig, green: DatabaseConfig, tools: PgTools, *,
                 snapshot: str, slot: str, encoding: str, replica_role: bool,
                 deadline: float, stall_timeout: float = 120.0) -> None:
        app = (COPY_APP_PREFIX + slot)[:63]
        self.psql = tools.path("psql")
        self.blue_conninfo = blue.conninfo(with_password=False)
        self.green_conninfo = green.conninfo(with_password=False)
        self.blue_env = _env(blue, app, _PORTABLE, encoding)
        green_opts = [*_PORTABLE, "synchronous_commit=off"]
        if replica_role:
            green_opts.append("session_replication_role=replica")
        self.green_env = _env(green, app, green_opts, encoding)
        self.snapshot = snapshot
        self.deadline = deadline
        self.stall_timeout = stall_timeout
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._pipes: set[_Pipe] = set()

    def blue_cmd(self, task: CopyTask) -> list[str]:
        cols = sql.SQL(", ").join(map(sql.Identifier, task.columns))
        src = _ident(*task.source)
        fmt = sql.SQL("binary" if task.binary else "text")
        if task.pages is None and task.only:
            copy = sql.SQL("COPY {} ({}) TO STDOUT (FORMAT {})").format(src, cols, fmt)
        else:
            where: sql.Composable = sql.SQL("")
            if task.pages is not None:
                lo, hi = task.pages
                where = sql.SQL(" WHERE ctid >= {}::tid").format(sql.Literal(f"({lo},0)"))
                if hi is not None:
                    where = sql.SQL("{} AND ctid < {}::tid").format(
                        where, sql.Literal(f"({hi},0)"))
            copy = sql.SQL("COPY (SELECT {} FROM {}{}{}) TO STDOUT (FORMAT {})").format(
                cols, sql.SQL("ONLY ") if task.only else sql.SQL(""), src, where, fmt)
        snap = sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(self.snapshot))
        return [self.psql, "-X", "-q", "-w", "-v", "ON_ERROR_STOP=1",
                "-d", self.blue_conninfo,
                "-c", "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
                "-c", snap.as_string(None), "-c", copy.as_string(None), "-c", "COMMIT"]

    def green_script(self, task: CopyTask) -> str:
        cols = sql.SQL(", ").join(map(sql.Identifier, task.columns)).as_string(None)
        target = _ident(*task.target).as_string(None)
        opts = ["format binary" if task.binary else "format text"]
        lines = ["BEGIN;"]
        if task.freeze:
            lines.append(f"TRUNCATE ONLY {target};")
            opts.append("freeze")
        # \copy reads the rows from psql's own stdin (the pipe from blue) while the
        # commands come from the control stream; a plain COPY .. FROM STDIN would
        # read the rows from the command stream.
        lines.append(f"\\copy {target} ({cols}) from pstdin with ({', '.join(opts)})")
        return "\n".join(lines) + "\n"

    def run(self, task: CopyTask) -> int:
        """Copy one task; returns the rows green received."""
        if self.cancelled.is_set():
            raise ReleaseFailed("copy cancelled")
        with contextlib.ExitStack() as files:
            errors_b, errors_g, out_g = (files.enter_context(tempfile.TemporaryFile())
                                         for _ in range(3))
            return self._run(task, errors_b, errors_g, out_g)

    def _run(self, task: CopyTask, errors_b: IO[bytes], errors_g: IO[bytes], out_g: IO[bytes]
             ) -> int:
        read_fd, write_fd = os.pipe()
        try:
            green = children.popen(
                [self.psql, "-X", "-w", "-v", "ON_ERROR_STOP=1", "-d", self.green_conninfo,
                 "-f", f"/dev/fd/{read_fd}"],
                stdin=subprocess.PIPE, stdout=out_g, stderr=errors_g, env=self.green_env,
                pass_fds=(read_fd,))
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        try:
            blue = children.popen(self.blue_cmd(task), stdin=subprocess.DEVNULL,
                                  stdout=green.stdin, stderr=errors_b, env=self.blue_env)
        except BaseException:
            green.kill()
            green.wait()
            os.close(write_fd)
            raise
        assert green.stdin is not None
        green.stdin.close()  # blue holds the write end now
        pipe = _Pipe(blue, green, write_fd)
        with self._lock:
            self._pipes.add(pipe)
        try:
            with contextlib.suppress(BrokenPipeError):
                os.write(write_fd, self.green_script(task).encode())
            blue_rc = self._wait(blue, watch=blue, task=task)
            if blue_rc == 0:
                # Only now may green commit: see the module docstring.
                with contextlib.suppress(BrokenPipeError):
                    os.write(write_fd, b"COMMIT;\n")
            os.close(write_fd)
            pipe.control = -1
            green_rc = self._wait(green, watch=green, task=task)
            if blue_rc != 0 or green_rc != 0:
                if self.cancelled.is_set():
                    raise ReleaseFailed("copy cancelled")
                # A failing green makes blue fail too (broken pipe): green's error is
                # the cause then.
                side = "green" if green_rc != 0 else "blue"
                err = _tail(errors_g) if green_rc != 0 else _tail(errors_b)
                raise ExternalError(f"copying {task.label} failed on {side}: {err}")
            match = re.search(rb"^COPY (\d+)$", _read(out_g), re.M)
            return int(match.group(1)) if match else 0
        finally:
            if pipe.control != -1:
                with contextlib.suppress(OSError):
                    os.close(pipe.control)
                pipe.control = -1
            pipe.kill()
            with self._lock:
                self._pipes.discard(pipe)

    def _wait(self, proc: subprocess.Popen[bytes], *, watch: subprocess.Popen[bytes],
              task: CopyTask) -> int:
        """Wait for ``proc``, watching that ``watch`` moves bytes: the data goes from
        one psql to the other without passing through this process, so progress is
        read from the kernel's I/O counters of the child."""
        moved, moved_at = _io_bytes(watch.pid), time.monotonic()
        while True:
            now = time.monotonic()
            remaining = self.deadline - now
            if remaining <= 0:
                raise ReleaseFailed("the initial copy did not finish in time",
                                    hint="raise sync.initial_copy_timeout")
            try:
                return proc.wait(timeout=min(remaining, 0.5))
            except subprocess.TimeoutExpired:
                if self.cancelled.is_set():
                    proc.kill()
            now_moved = _io_bytes(watch.pid)
            if now_moved != moved:
                moved, moved_at = now_moved, time.monotonic()
            elif moved is not None and time.monotonic() - moved_at > self.stall_timeout:
                raise ReleaseFailed(
                    f"copying {task.label}: no byte moved for {self.stall_timeout:g}s (blue "
                    "or green stopped answering)",
                    hint="check both servers; the rerun resumes the copy (raise "
                    "sync.initial_copy.stall_timeout if the servers are only slow)")

    def cancel(self) -> None:
        self.cancelled.set()
        with self._lock:
            pipes = list(self._pipes)
        for pipe in pipes:
            for proc in (pipe.blue, pipe.green):
                if proc.poll() is None:
                    proc.kill()


def _io_bytes(pid: int) -> int | None:
    """Bytes the process read and wrote so far (Linux /proc), None where unknown."""
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return None
    fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    return int(fields.get("rchar", 0)) + int(fields.get("wchar", 0))


def _read(f: IO[bytes]) -> bytes:
    f.seek(0)
    return f.read()


def _tail(f: IO[bytes]) -> str:
    return scrub(_read(f).decode(errors="replace").strip())[-800:] or "no message"


def _check_replica_role(green: psycopg.Connection[Any], targets: list[tuple[str, str, str]]
                        ) -> bool:
    """Whether copy sessions can run as replica; if not, that no trigger would fire."""
    try:
        with green.transaction():
            green.execute("SET LOCAL session_replication_role = replica")
        return True
    except psycopg.errors.InsufficientPrivilege:
        pass
    rows = green.execute(
        "SELECT n.nspname || '.' || c.relname || ': ' || t.tgname FROM pg_trigger t "
        "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN unnest(%s::text[], %s::text[]) q(s, r) ON q.s = n.nspname AND q.r = c.relname "
        "WHERE NOT t.tgisinternal AND t.tgenabled IN ('O', 'A')",
        ([t[0] for t in targets], [t[1] for t in targets])).fetchall()
    if rows:
        raise ReleaseFailed(
            f"green's user may not set session_replication_role, and triggers would fire "
            f"during the copy ({', '.join(r[0] for r in rows[:3])})",
            hint="grant it (GRANT SET ON PARAMETER session_replication_role TO ..., "
            "PostgreSQL 15+) or use sync.initial_copy.method: subscription")
    return False


def copy_initial(
    blue: DatabaseConfig,
    green: DatabaseConfig,
    tables: list[Table],
    *,
    slot_name: str,
    publication: str,
    tools: PgTools,
    control_schema: str,
    config: InitialCopyConfig | None = None,
    progress: Progress | None = None,
    timeout: float = 6 * 3600.0,
) -> CopyStats:
    """Copy ``tables`` (and orchestrate's heartbeat table) from blue to green,
    consistent with a new logical slot ``slot_name`` from which the subscription
    will stream, and rebuild green's indexes and constraints.

    Copies and rebuilds share ``jobs`` slots: a table's indexes are built as soon as
    its copy is complete, while other tables are still being copied, and a foreign
    key is checked once both of its tables are indexed (see ``_graph``).

    ``publication`` must already exist on blue and publish the tables: pgoutput
    reads it as of each change's commit, so it has to predate the slot.
    Safe to call again after any failure or crash (see the module docstring); when it
    finds the copy done it returns at once, and ``restore_post_data`` finishes what a
    crash may have left of the rebuilds.
    """
    cfg = config or InitialCopyConfig()
    jobs = effective_jobs(cfg)
    started = time.monotonic()
    stats = CopyStats(jobs=jobs)
    heartbeat = Table(control_schema, replication.HEARTBEAT_TABLE, ["direction"])
    every = [*tables, heartbeat]
    with _control(blue, "blue") as bconn, _control(green, "green") as gconn:
        ensure_state_tables(gconn, control_schema)
        for conn in (bconn, gconn):
            replication.ensure_heartbeat(conn, control_schema)
        if not scalar(bconn, "SELECT 1 FROM pg_publication WHERE pubname = %s", publication):
            raise ReleaseFailed(f"publication {publication} does not exist on blue",
                                hint="create the publication before the copy's slot")
        if _subscription_on_slot(gconn, slot_name):
            stats.skipped = "green already streams from the slot"
            stats.streaming = True
            return stats
        state = copy_state(gconn, control_schema, slot_name)
        if state is not None and state.phase in {"copied", "streaming"} and _slot_exists(
                bconn, slot_name):
            stats.skipped = "the copy finished in an earlier run"
            stats.consistent_point = state.consistent_point
            return stats
        plan = plan_copy(bconn, gconn, every, jobs=jobs, chunk_bytes=cfg.chunk_bytes,
                         binary=cfg.binary == "auto", freeze=cfg.freeze, split=cfg.split)
        user_targets = [t for t in plan.targets if t[0] != control_schema]
        if state is not None:
            # A run died half way: its snapshot is gone, start over.
            stats.restarted = True
            ended = _end_copy_sessions(bconn, slot_name) + _end_copy_sessions(gconn, slot_name)
            log.warning("initial copy restarts: an earlier run did not finish",
                        slot=slot_name, phase=state.phase, sessions_ended=ended)
        else:
            _require_empty(gconn, user_targets)
        replication.drop_slot(bconn, slot_name)
        replica_role = _check_replica_role(gconn, plan.targets)
        stats.deferred = schema_sections.defer_post_data(
            gconn, [(s, n) for s, n, kind in user_targets if kind == "r"],
            control_schema=control_schema)
        items = schema_sections.pending(gconn, control_schema)
        with gconn.transaction():
            # Recorded before the slot exists, so that a crash from here on is seen as
            # an unfinished copy by the next run.
            _set_phase(gconn, control_schema, slot_name, "copying", jobs=jobs)
            parts = [sql.SQL("{}{}").format(sql.SQL("ONLY ") if kind == "r" else sql.SQL(""),
                                             _ident(s, n)) for s, n, kind in plan.targets]
            gconn.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(parts)))
        encoding = str(scalar(bconn, "SHOW server_encoding"))
    stats.tables = len(plan.targets)
    stats.tasks = len(plan.tasks)
    stats.bytes = plan.total_cost
    stats.binary_tables = plan.binary_tables
    stats.text_tables = plan.text_tables
    stats.split_tables = plan.split_tables
    log.info("initial copy planned", tables=stats.tables, tasks=stats.tasks, jobs=jobs,
             bytes=stats.bytes, chunk_bytes=plan.chunk_bytes, binary_tables=plan.binary_tables,
             text_tables=plan.text_tables, split_tables=plan.split_tables,
             post_data_items=len(items), replica_role=replica_role)
    analyze = [(s, n) for s, n, _ in user_targets] if cfg.analyze else []
    nodes = _graph(plan, items, analyze)
    copied = False
    with contextlib.ExitStack() as slot_stack:
        try:
            slot = slot_stack.enter_context(
                exported_slot(blue, slot_name, timeout=cfg.slot_timeout))
            stats.consistent_point = slot.consistent_point
            copier = _Copier(blue, green, tools, snapshot=slot.snapshot, slot=slot_name,
                             encoding=encoding, replica_role=replica_role,
                             deadline=started + timeout, stall_timeout=cfg.stall_timeout)

            def copies_done() -> None:
                nonlocal copied
                # Every copy session imported the snapshot long ago: let it go, so
                # blue's vacuum is not held back by it during the rebuilds.
                slot_stack.close()
                with _control(green, "green") as conn:
                    _set_phase(conn, control_schema, slot_name, "copied",
                               consistent_point=stats.consistent_point)
                copied = True
                stats.copy_seconds = round(time.monotonic() - started, 3)
                log.info("initial copy: rows copied", seconds=stats.copy_seconds)

            runner = _Runner(copier, green, jobs=jobs, control_schema=control_schema,
                             maintenance_work_mem=cfg.maintenance_work_mem,
                             parallel_workers=parallel_maintenance_workers(cfg),
                             deadline=started + timeout, progress=progress)
            stats.rows = runner.run(nodes, on_copies_done=copies_done)
            stats.post_data = runner.post
        except BaseException:
            if not copied:
                # The slot of an unfinished copy is useless; the next run makes anew.
                with contextlib.suppress(Exception), _control(blue, "blue") as bconn:
                    replication.drop_slot(bconn, slot_name)
            raise
    with _control(green, "green") as gconn:
        schema_sections.done_ids(gconn, control_schema, [i.id for i in items])
    stats.seconds = round(time.monotonic() - started, 3)
    log.info("initial copy done", rows=stats.rows, seconds=stats.seconds,
             consistent_point=stats.consistent_point)
    return stats


# Relative cost of the work after a table's rows are in, per byte of the table, for
# scheduling only: an index build sorts the key columns, a foreign-key check joins.
_INDEX_COST = 0.3
_FK_COST = 0.15
_SMALL_COST = 1 << 20


@dataclass(eq=False)
class _Node:
    name: str
    table: tuple[str, str]
    cost: int
    task: CopyTask | None = None
    item: schema_sections.Deferred | None = None
    analyze: bool = False
    deps: set[_Node] = field(default_factory=set)
    dependents: list[_Node] = field(default_factory=list)
    priority: int = 0


def _graph(plan: CopyPlan, items: list[schema_sections.Deferred],
           analyze: list[tuple[str, str]]) -> list[_Node]:
    """Copy tasks, rebuilds and ANALYZEs with what each has to wait for.

    A table's index builds wait for all of its copy tasks; ADD CONSTRAINT .. USING
    INDEX and the small ALTERs wait for its index builds (they take ACCESS EXCLUSIVE
    and would stall them); a foreign key waits for both of its tables to be indexed
    (ADD .. NOT VALID takes SHARE ROW EXCLUSIVE on both, which CREATE INDEX blocks);
    ANALYZE comes after everything done on its own table (its lock conflicts with it).
    Priority is the longest chain of work a node still has behind it, so the
    biggest table's copy starts first and its index build right after it.
    """
    nodes: list[_Node] = []
    copies: dict[tuple[str, str], list[_Node]] = {}
    size: dict[tuple[str, str], int] = {}
    for task in plan.tasks:
        node = _Node(f"copy {task.label}", task.target, task.cost, task=task)
        copies.setdefault(task.target, []).append(node)
        size[task.target] = size.get(task.target, 0) + task.cost
        nodes.append(node)
    by_table: dict[tuple[str, str], list[_Node]] = {}
    steps: dict[tuple[str, str], dict[int, list[_Node]]] = {}
    for item in items:
        table = item.qualified_table
        if item.kind == "fk":
            cost = int((size.get(table, 0) + size.get(
                (item.ref_schema or "", item.ref_table or ""), 0)) * _FK_COST)
        elif item.step == schema_sections.STEP_BUILD:
            cost = int(size.get(table, 0) * _INDEX_COST)
        else:
            cost = _SMALL_COST
        node = _Node(f"{item.kind} {item.schema}.{item.name}", table, max(cost, 1), item=item)
        by_table.setdefault(table, []).append(node)
        steps.setdefault(table, {}).setdefault(item.step, []).append(node)
        nodes.append(node)

    def link(node: _Node, before: list[_Node]) -> None:
        for dep in before:
            if dep is not node and dep not in node.deps:
                node.deps.add(dep)
                dep.dependents.append(node)

    for table, nodes_of in by_table.items():
        for node in nodes_of:
            assert node.item is not None
            link(node, copies.get(table, []))
            if node.item.kind == "attach":
                link(node, steps[table].get(schema_sections.STEP_BUILD, []))
            elif node.item.kind == "extra":
                link(node, steps[table].get(schema_sections.STEP_BUILD, []))
                link(node, [n for n in steps[table].get(schema_sections.STEP_ATTACH, [])
                            if n.item is not None and n.item.kind == "attach"])
            elif node.item.kind == "fk":
                ref = (node.item.ref_schema or "", node.item.ref_table or "")
                link(node, copies.get(ref, []))
                for t in {table, ref}:
                    link(node, steps.get(t, {}).get(schema_sections.STEP_BUILD, []))
                    link(node, steps.get(t, {}).get(schema_sections.STEP_ATTACH, []))
    for table in analyze:
        node = _Node(f"analyze {table[0]}.{table[1]}", table, _SMALL_COST, analyze=True)
        link(node, copies.get(table, []))
        # Not after the foreign keys that reference it: VALIDATE takes only ROW SHARE
        # on the referenced table, which ANALYZE does not conflict with.
        link(node, by_table.get(table, []))
        nodes.append(node)
    # Bottom levels, dependents first (the graph is acyclic by construction).
    order: list[_Node] = []
    seen: set[int] = set()

    def visit(node: _Node) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        for dep in node.dependents:
            visit(dep)
        order.append(node)

    for node in nodes:
        visit(node)
    for node in order:
        node.priority = node.cost + max((d.priority for d in node.dependents), default=0)
    return nodes


class _Runner:
    """Runs the graph with ``jobs`` slots: a slot is a COPY pipe or a green session."""

    def __init__(self, copier: _Copier, green: DatabaseConfig, *, jobs: int,
                 control_schema: str, maintenance_work_mem: str, parallel_workers: int,
                 deadline: float, progress: Progress | None) -> None:
        self.copier = copier
        self.green = green
        self.jobs = jobs
        self.control_schema = control_schema
        self.maintenance_work_mem = maintenance_work_mem
        self.parallel_workers = parallel_workers
        self.deadline = deadline
        self.progress = progress
        self.post = schema_sections.PostDataStats()
        self._sessions: list[psycopg.Connection[Any]] = []
        self._busy: dict[int, psycopg.Connection[Any]] = {}

    def _session(self) -> psycopg.Connection[Any]:
        if self._sessions:
            return self._sessions.pop()
        return schema_sections.session(
            self.green, maintenance_work_mem=self.maintenance_work_mem,
            parallel_workers=self.parallel_workers, tag="orch-post-data")

    def _sql(self, node: _Node, conn: psycopg.Connection[Any]) -> int:
        began = time.monotonic()
        try:
            if node.analyze:
                conn.execute(sql.SQL("ANALYZE {}").format(_ident(*node.table)))
                worked = 1
            else:
                assert node.item is not None
                worked = int(schema_sections.run_item(conn, node.item))
        except psycopg.Error as exc:
            raise ReleaseFailed(
                f"{node.name} on green failed: {scrub(str(exc)).strip()}",
                hint="a migration may have made an index or constraint that blue's data "
                "violates; fix the migration") from exc
        kind = "analyze" if node.analyze else node.item.kind if node.item else "?"
        spent = self.post.seconds_by_step.get(kind, 0.0) + time.monotonic() - began
        self.post.seconds_by_step[kind] = round(spent, 3)
        return worked

    def run(self, nodes: list[_Node], *, on_copies_done: Callable[[], None]) -> int:
        copies = [n for n in nodes if n.task is not None]
        total_bytes = sum(n.cost for n in copies)
        total_items = len(nodes) - len(copies)
        self.post.items = sum(1 for n in nodes if n.item is not None)
        copied_bytes = 0
        copies_left = len(copies)
        items_done = 0
        rows = 0
        ready = [n for n in nodes if not n.deps]
        running: dict[Future[int], tuple[_Node, psycopg.Connection[Any] | None]] = {}
        if self.progress:
            self.progress("copy", 0, total_bytes)
        if not copies:
            on_copies_done()
        with ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="copy") as pool:
            try:
                while ready or running:
                    while ready and len(running) < self.jobs:
                        ready.sort(key=lambda n: n.priority)
                        node = ready.pop()
                        if node.task is not None:
                            running[pool.submit(self.copier.run, node.task)] = (node, None)
                        else:
                            session = self._session()
                            running[pool.submit(self._sql, node, session)] = (node, session)
                    remaining = self.deadline - time.monotonic()
                    if remaining <= 0:
                        raise ReleaseFailed("the initial copy did not finish in time",
                                            hint="raise sync.initial_copy_timeout")
                    finished, _ = wait(list(running), timeout=remaining,
                                       return_when=FIRST_COMPLETED)
                    for fut in finished:
                        node, held = running.pop(fut)
                        if held is not None:
                            self._sessions.append(held)
                        result = fut.result()
                        for dep in node.dependents:
                            dep.deps.discard(node)
                            if not dep.deps:
                                ready.append(dep)
                        if node.task is not None:
                            rows += result
                            copied_bytes += node.cost
                            copies_left -= 1
                            if copies_left == 0:
                                on_copies_done()
                            # 100 % is reported once the copy is recorded as complete.
                            if self.progress:
                                self.progress("copy", copied_bytes, total_bytes)
                        else:
                            items_done += 1
                            self.post.skipped += int(node.item is not None and not result)
                            if self.progress:
                                self.progress("post-data", items_done, total_items)
            except BaseException:
                self.copier.cancel()
                for _, held in running.values():
                    if held is not None:
                        with contextlib.suppress(psycopg.Error, OSError):
                            held.cancel_safe(timeout=5)
                raise
            finally:
                # Once the pool is done no session is in use any more.
                self._sessions += [h for _, h in running.values() if h is not None]
        for session in self._sessions:
            session.close()
        self._sessions.clear()
        return rows


def _require_empty(green: psycopg.Connection[Any], targets: list[tuple[str, str, str]]) -> None:
    for schema, name, kind in targets:
        only = sql.SQL("ONLY ") if kind == "r" else sql.SQL("")
        if scalar(green, sql.SQL("SELECT EXISTS (SELECT 1 FROM {}{})").format(
                only, _ident(schema, name))):
            raise ReleaseFailed(
                f"green's table {schema}.{name} already holds rows before the initial copy",
                hint="a migration must not insert rows into a table replicated from blue; "
                "green's replicated tables must match blue exactly")


@contextlib.contextmanager
def _control(db: DatabaseConfig, role: str) -> Iterator[psycopg.Connection[Any]]:
    conn = psycopg.connect(db.conninfo(), autocommit=True,
                           application_name=f"orchestrate-{role}-copy",
                           options="-c lock_timeout=60000 -c statement_timeout=600000")
    try:
        yield conn
    finally:
        conn.close()


# ------------------------------------------------------------------ post-data


def restore_post_data(green: DatabaseConfig, tables: list[Table], *, control_schema: str,
                      config: InitialCopyConfig | None = None,
                      progress: Progress | None = None, analyze: bool = True,
                      timeout: float = 6 * 3600.0) -> schema_sections.PostDataStats:
    """Rebuild green's indexes and constraints after ``copy_initial`` (idempotent), then
    ANALYZE ``tables`` unless ``analyze`` or the config says not to."""
    cfg = config or InitialCopyConfig()
    targets = [(t.schema, t.name) for t in tables] if cfg.analyze and analyze else None
    return schema_sections.restore_post_data(
        green, control_schema=control_schema, jobs=effective_jobs(cfg),
        maintenance_work_mem=cfg.maintenance_work_mem,
        max_parallel_maintenance_workers=parallel_maintenance_workers(cfg),
        analyze=targets, progress=progress, timeout=timeout)


# ------------------------------------------------------------------ subscription


def streaming_options(blue_major: int, green_major: int, *, origin_none: bool,
                      copy_data: bool) -> replication.SubscriptionOptions:
    """Subscription options for this pair of majors.

    binary needs 16+ on both sides to be safe for every type (and in 16+ applies to
    the initial sync too); streaming = parallel (16+) applies large transactions
    with parallel workers instead of spooling them to disk first.
    """
    both16 = min(blue_major, green_major) >= 16
    return replication.SubscriptionOptions(
        copy_data=copy_data, origin_none=origin_none, binary=both16,
        streaming="parallel" if both16 else "on")


def subscribe_from_slot(green: psycopg.Connection[Any], name: str, publisher_conninfo: str,
                        publication: str, opts: replication.SubscriptionOptions, *,
                        slot_name: str, control_schema: str | None) -> bool:
    """Create a subscription on an existing slot (no copy, no new slot). True if created.

    With ``control_schema``, the copy's phase becomes ``streaming`` in the same
    transaction. The statement embeds the peer's conninfo: it is never logged.
    """
    if replication.subscription_exists(green, name):
        return False
    options = [
        sql.SQL("copy_data = false"), sql.SQL("create_slot = false"),
        sql.SQL("slot_name = {}").format(sql.Literal(slot_name)),
        sql.SQL("binary = {}").format(sql.Literal(opts.binary)),
        sql.SQL("streaming = {}").format(sql.Literal(opts.streaming)),
        sql.SQL("disable_on_error = {}").format(sql.Literal(opts.disable_on_error)),
    ]
    if opts.origin_none:
        options.append(sql.SQL("origin = none"))
    with green.transaction():
        # Without create_slot the statement may run in a transaction: the phase and
        # the subscription commit together.
        green.execute(sql.SQL(
            "CREATE SUBSCRIPTION {n} CONNECTION {c} PUBLICATION {p} WITH ({o})").format(
                n=sql.Identifier(name), c=sql.Literal(publisher_conninfo),
                p=sql.Identifier(publication), o=sql.SQL(", ").join(options)))
        if control_schema is not None:
            _set_phase(green, control_schema, slot_name, "streaming")
    return True


# ------------------------------------------------------------------ the whole sync


@dataclass
class SyncReport:
    method: str
    copy: CopyStats | None = None
    post_data: schema_sections.PostDataStats | None = None
    copy_s: float = 0.0  # until every row was on green
    post_data_s: float = 0.0  # rebuilds after that (most of them overlap the copy)
    catchup_s: float = 0.0
    total_s: float = 0.0
    settings: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "copy_s": self.copy_s,
                               "post_data_s": self.post_data_s, "catchup_s": self.catchup_s,
                               "total_s": self.total_s}
        if self.copy:
            out["copy"] = self.copy.as_dict()
        elif self.post_data:
            out["post_data"] = dict(self.post_data.__dict__)
        if self.settings:
            out["settings"] = self.settings
        if self.warnings:
            out["warnings"] = self.warnings
        return out


def initial_sync(
    blue: DatabaseConfig,
    green: DatabaseConfig,
    tables: list[Table],
    *,
    names: replication.Names,
    tools: PgTools,
    control_schema: str,
    config: InitialCopyConfig | None = None,
    origin_none: bool = False,
    copy_timeout: float = 6 * 3600.0,
    catchup_timeout: float = 600.0,
    poll: float = 1.0,
    progress: Progress | None = None,
) -> SyncReport:
    """Everything from an empty green to "green caught up and indexed", either way.

    Idempotent: the sync state can call it again after any failure.
    """
    cfg = config or InitialCopyConfig()
    started = time.monotonic()
    report = SyncReport(cfg.method)
    heartbeat = Table(control_schema, replication.HEARTBEAT_TABLE, ["direction"])
    with _control(blue, "blue") as bconn, _control(green, "green") as gconn:
        for conn in (bconn, gconn):
            replication.ensure_heartbeat(conn, control_schema)
        replication.ensure_publication(bconn, names.publication, [*tables, heartbeat])
        majors = server_major(bconn), server_major(gconn)
    if cfg.method == "snapshot":
        offset = time.monotonic() - started
        report.copy = copy_initial(blue, green, tables, slot_name=names.slot,
                                   publication=names.publication, tools=tools,
                                   control_schema=control_schema, config=cfg,
                                   progress=progress, timeout=copy_timeout)
        # Rebuilds left over by a run that crashed after its copy (usually none).
        leftovers = restore_post_data(green, tables, control_schema=control_schema,
                                      config=cfg, progress=progress,
                                      analyze=not report.copy.streaming,
                                      timeout=copy_timeout)
        report.post_data = report.copy.post_data or leftovers
        if report.copy.copy_seconds:
            report.copy_s = round(offset + report.copy.copy_seconds, 3)
        report.post_data_s = round(time.monotonic() - started - report.copy_s, 3)
        opts = streaming_options(*majors, origin_none=origin_none, copy_data=False)
        with _control(green, "green") as gconn:
            subscribe_from_slot(gconn, names.subscription, blue.conninfo(for_peer=True),
                                names.publication, opts, slot_name=names.slot,
                                control_schema=control_schema)
    else:
        opts = streaming_options(*majors, origin_none=origin_none, copy_data=True)
        with _control(blue, "blue") as bconn, _control(green, "green") as gconn:
            tune = tune_sync_workers(bconn, gconn, effective_jobs(cfg),
                                     control_schema=control_schema)
            report.settings, report.warnings = tune.applied, tune.warnings
            try:
                replication.ensure_subscription(gconn, names.subscription,
                                                blue.conninfo(for_peer=True),
                                                names.publication, opts)
                replication.wait_initial_copy(
                    gconn, names.subscription, timeout=copy_timeout, poll=poll,
                    progress=(lambda d, t: progress("copy", d, t)) if progress else None)
            finally:
                restore_sync_settings(gconn, control_schema=control_schema)
        report.copy_s = round(time.monotonic() - started, 3)
    mark = time.monotonic()
    with _control(blue, "blue") as bconn, _control(green, "green") as gconn:
        replication.wait_applied(bconn, gconn, schema=control_schema, direction="fwd",
                                 subscription=names.subscription, timeout=catchup_timeout,
                                 poll=0.02)
    report.catchup_s = round(time.monotonic() - mark, 3)
    report.total_s = round(time.monotonic() - started, 3)
    return report


# ------------------------------------------------------------------ plain path tuning


@dataclass
class TuneResult:
    applied: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# Reloadable (sighup): set for the run with ALTER SYSTEM + pg_reload_conf().
_RELOADABLE = ("max_sync_workers_per_subscription",
               "max_parallel_apply_workers_per_subscription")


def tune_sync_workers(blue: psycopg.Connection[Any], green: psycopg.Connection[Any], jobs: int,
                      *, control_schema: str) -> TuneResult:
    """Let ``jobs`` tables sync at once, as far as the servers' fixed limits allow.

    max_sync_workers_per_subscription (and on 16+ the parallel apply workers) only
    need a reload and are changed for the run; the previous values are saved on
    green first, so ``restore_sync_settings`` can put them back even after a crash.
    max_logical_replication_workers and max_worker_processes on green, and
    max_wal_senders / max_replication_slots on blue (each sync worker holds a
    temporary slot), need a restart: orchestrate does not restart a server, it only
    reports when they cap the parallelism.
    """
    result = TuneResult()
    green.execute(sql.SQL(
        "CREATE SCHEMA IF NOT EXISTS {s}; CREATE TABLE IF NOT EXISTS {s}.{t} ("
        "name text PRIMARY KEY, previous text)").format(
            s=sql.Identifier(control_schema), t=sql.Identifier(SETTINGS_TABLE)))

    def num(conn: psycopg.Connection[Any], name: str) -> int:
        return int(scalar(conn, "SELECT setting FROM pg_settings WHERE name = %s", name) or 0)

    workers = num(green, "max_logical_replication_workers")
    procs = num(green, "max_worker_processes")
    senders = num(blue, "max_wal_senders") - int(scalar(
        blue, "SELECT count(*) FROM pg_stat_replication") or 0)
    slots = num(blue, "max_replication_slots") - int(scalar(
        blue, "SELECT count(*) FROM pg_replication_slots") or 0)
    # The apply worker itself takes one of each; it needs its own slot and sender.
    cap = min(workers - 1, procs - 2, senders - 1, slots - 1)
    wanted = max(1, min(jobs, cap))
    if wanted < jobs:
        result.warnings.append(
            f"only {wanted} table(s) can sync at once: raise max_logical_replication_workers "
            f"({workers}) / max_worker_processes ({procs}) on green or max_wal_senders / "
            "max_replication_slots on blue (restart needed)")
    values = {"max_sync_workers_per_subscription": str(wanted)}
    if server_major(green) >= 16:
        values["max_parallel_apply_workers_per_subscription"] = str(max(2, wanted // 2))
    for name, value in values.items():
        row = green.execute(
            "SELECT setting, coalesce(sourcefile, '') FROM pg_settings WHERE name = %s",
            (name,)).fetchone()
        if row is None:
            continue
        # A value ALTER SYSTEM set before is written back; anything else (the default,
        # postgresql.conf) comes back by RESET, which leaves no trace in .auto.conf.
        previous = row[0] if str(row[1]).endswith("postgresql.auto.conf") else None
        green.execute(sql.SQL("INSERT INTO {}.{} (name, previous) VALUES (%s, %s) "
                              "ON CONFLICT (name) DO NOTHING").format(
            sql.Identifier(control_schema), sql.Identifier(SETTINGS_TABLE)), (name, previous))
        green.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(
            sql.Identifier(name), sql.Literal(value)))
        result.applied[name] = value
    green.execute("SELECT pg_reload_conf()")
    return result


def restore_sync_settings(green: psycopg.Connection[Any], *, control_schema: str
                          ) -> list[str]:
    """Put back what ``tune_sync_workers`` changed. Idempotent; returns the names."""
    if not scalar(green, "SELECT to_regclass(%s) IS NOT NULL",
                  _ident(control_schema, SETTINGS_TABLE).as_string(green)):
        return []
    rows = green.execute(sql.SQL("SELECT name, previous FROM {}.{}").format(
        sql.Identifier(control_schema), sql.Identifier(SETTINGS_TABLE))).fetchall()
    for name, previous in rows:
        if name not in _RELOADABLE:
            continue
        if previous is None:
            green.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
        else:
            green.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(
                sql.Identifier(name), sql.Literal(previous)))
    green.execute("SELECT pg_reload_conf()")
    green.execute(sql.SQL("DELETE FROM {}.{}").format(
        sql.Identifier(control_schema), sql.Identifier(SETTINGS_TABLE)))
    return [r[0] for r in rows]
