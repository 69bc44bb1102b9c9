"""The sync driver: from an empty green to "green caught up and indexed", either way.

``initial_sync`` runs the snapshot copy (``copy_initial``: plan, slot, pipes and
rebuilds on one scheduler, progress recorded for a rerun) or the plain subscription
path, then waits for green to catch up (see the package docstring).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.config import InitialCopyConfig
from orchestrator.errors import ReleaseFailed
from orchestrator.logging import get_logger
from orchestrator.pg import replication, schema_sections
from orchestrator.pg.catalog import Table
from orchestrator.pg.conn import scalar, server_major
from orchestrator.pg.copy.graph import _graph, _Runner
from orchestrator.pg.copy.pipes import Copier
from orchestrator.pg.copy.plan import (
    CopyPlan,
    effective_jobs,
    parallel_maintenance_workers,
    plan_copy,
)
from orchestrator.pg.copy.slot import exported_slot
from orchestrator.pg.copy.state import (
    CopyState,
    copy_state,
    end_copy_sessions,
    ensure_state_tables,
    ident,
    set_phase,
    slot_exists,
    subscription_on_slot,
)
from orchestrator.pg.copy.subscribe import (
    restore_sync_settings,
    streaming_options,
    subscribe_from_slot,
    tune_sync_workers,
)
from orchestrator.pg.endpoint import Endpoint, EndpointLike
from orchestrator.pg.names import unnest_params
from orchestrator.pg.tools import PgTools

log = get_logger("orchestrate")

Progress = Callable[[str, int, int], None]


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
        unnest_params(targets)).fetchall()
    if rows:
        raise ReleaseFailed(
            f"green's user may not set session_replication_role, and triggers would fire "
            f"during the copy ({', '.join(r[0] for r in rows[:3])})",
            hint="grant it (GRANT SET ON PARAMETER session_replication_role TO ..., "
            "PostgreSQL 15+) or use sync.initial_copy.method: subscription")
    return False


@dataclass
class _Prepared:
    """What the copy needs once green is ready for it."""

    plan: CopyPlan
    user_targets: list[tuple[str, str, str]]  # the copied tables but orchestrate's own
    items: list[schema_sections.Deferred]
    replica_role: bool
    encoding: str


def _earlier_run(bconn: psycopg.Connection[Any], gconn: psycopg.Connection[Any],
                 stats: CopyStats, *, control_schema: str, slot_name: str
                 ) -> tuple[bool, CopyState | None]:
    """Whether an earlier run left nothing to copy (``stats`` then says why), and the
    state it recorded."""
    if subscription_on_slot(gconn, slot_name):
        stats.skipped = "green already streams from the slot"
        stats.streaming = True
        return True, None
    state = copy_state(gconn, control_schema, slot_name)
    if state is not None and state.phase in {"copied", "streaming"} and slot_exists(
            bconn, slot_name):
        stats.skipped = "the copy finished in an earlier run"
        stats.consistent_point = state.consistent_point
        return True, state
    return False, state


def _prepare(bconn: psycopg.Connection[Any], gconn: psycopg.Connection[Any],
             every: list[Table], *, cfg: InitialCopyConfig, jobs: int,
             state: CopyState | None, stats: CopyStats, control_schema: str,
             slot_name: str) -> _Prepared:
    """Plan the copy, clear what a dead run left, and record green's rebuilds."""
    plan = plan_copy(bconn, gconn, every, jobs=jobs, chunk_bytes=cfg.chunk_bytes,
                     binary=cfg.binary == "auto", freeze=cfg.freeze, split=cfg.split)
    user_targets = [t for t in plan.targets if t[0] != control_schema]
    if state is not None:
        # A run died half way: its snapshot is gone, start over.
        stats.restarted = True
        ended = end_copy_sessions(bconn, slot_name) + end_copy_sessions(gconn, slot_name)
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
        set_phase(gconn, control_schema, slot_name, "copying", jobs=jobs)
        parts = [sql.SQL("{}{}").format(sql.SQL("ONLY ") if kind == "r" else sql.SQL(""),
                                         ident(s, n)) for s, n, kind in plan.targets]
        gconn.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(parts)))
    encoding = str(scalar(bconn, "SHOW server_encoding"))
    return _Prepared(plan, user_targets, items, replica_role, encoding)


def _record_plan(stats: CopyStats, prep: _Prepared) -> None:
    plan = prep.plan
    stats.tables = len(plan.targets)
    stats.tasks = len(plan.tasks)
    stats.bytes = plan.total_cost
    stats.binary_tables = plan.binary_tables
    stats.text_tables = plan.text_tables
    stats.split_tables = plan.split_tables
    log.info("initial copy planned", tables=stats.tables, tasks=stats.tasks, jobs=stats.jobs,
             bytes=stats.bytes, chunk_bytes=plan.chunk_bytes, binary_tables=plan.binary_tables,
             text_tables=plan.text_tables, split_tables=plan.split_tables,
             post_data_items=len(prep.items), replica_role=prep.replica_role)


def copy_initial(
    blue: EndpointLike,
    green: EndpointLike,
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
    Safe to call again after any failure or crash (see the package docstring); when it
    finds the copy done it returns at once, and ``restore_post_data`` finishes what a
    crash may have left of the rebuilds.
    """
    blue, green = Endpoint.of(blue, "blue"), Endpoint.of(green, "green")
    cfg = config or InitialCopyConfig()
    jobs = effective_jobs(cfg)
    started = time.monotonic()
    stats = CopyStats(jobs=jobs)
    heartbeat = Table(control_schema, replication.HEARTBEAT_TABLE, ["direction"])
    every = [*tables, heartbeat]
    with _control(blue) as bconn, _control(green) as gconn:
        ensure_state_tables(gconn, control_schema)
        for conn in (bconn, gconn):
            replication.ensure_heartbeat(conn, control_schema)
        if not scalar(bconn, "SELECT 1 FROM pg_publication WHERE pubname = %s", publication):
            raise ReleaseFailed(f"publication {publication} does not exist on blue",
                                hint="create the publication before the copy's slot")
        done, state = _earlier_run(bconn, gconn, stats, control_schema=control_schema,
                                   slot_name=slot_name)
        if done:
            return stats
        prep = _prepare(bconn, gconn, every, cfg=cfg, jobs=jobs, state=state, stats=stats,
                        control_schema=control_schema, slot_name=slot_name)
    _record_plan(stats, prep)
    analyze = [(s, n) for s, n, _ in prep.user_targets] if cfg.analyze else []
    nodes = _graph(prep.plan, prep.items, analyze)
    copied = False
    with contextlib.ExitStack() as slot_stack:
        try:
            slot = slot_stack.enter_context(
                exported_slot(blue, slot_name, timeout=cfg.slot_timeout))
            stats.consistent_point = slot.consistent_point
            copier = Copier(blue, green, tools, snapshot=slot.snapshot, slot=slot_name,
                            encoding=prep.encoding, replica_role=prep.replica_role,
                            deadline=started + timeout, stall_timeout=cfg.stall_timeout)

            def copies_done() -> None:
                nonlocal copied
                # Every copy session imported the snapshot long ago: let it go, so
                # blue's vacuum is not held back by it during the rebuilds.
                slot_stack.close()
                with _control(green) as conn:
                    set_phase(conn, control_schema, slot_name, "copied",
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
                with contextlib.suppress(Exception), _control(blue) as bconn:
                    replication.drop_slot(bconn, slot_name)
            raise
    with _control(green) as gconn:
        schema_sections.done_ids(gconn, control_schema, [i.id for i in prep.items])
    stats.seconds = round(time.monotonic() - started, 3)
    log.info("initial copy done", rows=stats.rows, seconds=stats.seconds,
             consistent_point=stats.consistent_point)
    return stats


def _require_empty(green: psycopg.Connection[Any], targets: list[tuple[str, str, str]]) -> None:
    for schema, name, kind in targets:
        only = sql.SQL("ONLY ") if kind == "r" else sql.SQL("")
        if scalar(green, sql.SQL("SELECT EXISTS (SELECT 1 FROM {}{})").format(
                only, ident(schema, name))):
            raise ReleaseFailed(
                f"green's table {schema}.{name} already holds rows before the initial copy",
                hint="a migration must not insert rows into a table replicated from blue; "
                "green's replicated tables must match blue exactly")


_STATEMENT_TIMEOUT_MS = 600_000


@contextlib.contextmanager
def _control(db: Endpoint) -> Iterator[psycopg.Connection[Any]]:
    # The server's statement_timeout ends a statement first; the client's deadline
    # only fires on a server that stopped answering altogether.
    conn = db.connect(f"{db.role}-copy", lock_timeout_ms=60_000,
                      statement_timeout_ms=_STATEMENT_TIMEOUT_MS,
                      deadline=_STATEMENT_TIMEOUT_MS / 1000 + 60)
    try:
        yield conn
    finally:
        conn.close()


def restore_post_data(green: EndpointLike, tables: list[Table], *, control_schema: str,
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
    blue: EndpointLike,
    green: EndpointLike,
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
    blue, green = Endpoint.of(blue, "blue"), Endpoint.of(green, "green")
    cfg = config or InitialCopyConfig()
    started = time.monotonic()
    report = SyncReport(cfg.method)
    heartbeat = Table(control_schema, replication.HEARTBEAT_TABLE, ["direction"])
    with _control(blue) as bconn, _control(green) as gconn:
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
        with _control(green) as gconn:
            subscribe_from_slot(gconn, names.subscription, blue.peer_conninfo(),
                                names.publication, opts, slot_name=names.slot,
                                control_schema=control_schema)
    else:
        opts = streaming_options(*majors, origin_none=origin_none, copy_data=True)
        with _control(blue) as bconn, _control(green) as gconn:
            tune = tune_sync_workers(bconn, gconn, effective_jobs(cfg),
                                     control_schema=control_schema)
            report.settings, report.warnings = tune.applied, tune.warnings
            try:
                replication.ensure_subscription(gconn, names.subscription,
                                                blue.peer_conninfo(),
                                                names.publication, opts)
                replication.wait_initial_copy(
                    gconn, names.subscription, timeout=copy_timeout, poll=poll,
                    progress=(lambda d, t: progress("copy", d, t)) if progress else None)
            finally:
                restore_sync_settings(gconn, control_schema=control_schema)
        report.copy_s = round(time.monotonic() - started, 3)
    mark = time.monotonic()
    with _control(blue) as bconn, _control(green) as gconn:
        replication.wait_applied(bconn, gconn, schema=control_schema, direction="fwd",
                                 subscription=names.subscription, timeout=catchup_timeout,
                                 poll=0.02)
    report.catchup_s = round(time.monotonic() - mark, 3)
    report.total_s = round(time.monotonic() - started, 3)
    return report

