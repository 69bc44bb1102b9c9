"""Rebuilding green's recorded post-data objects after the copy, several sessions at once.

Every item can be run again after a crash; see ``orchestrator.pg.schema_sections``.
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

from orchestrator.errors import ReleaseFailed
from orchestrator.logging import scrub
from orchestrator.pg.endpoint import Endpoint, EndpointLike
from orchestrator.pg.names import unnest_params
from orchestrator.pg.post_data import (
    STEP_ATTACH,
    STEP_BUILD,
    STEP_FOREIGN_KEYS,
    Deferred,
    done_ids,
    pending,
    relation,
)

Progress = Callable[[str, int, int], None]
_U = TypeVar("_U")


@dataclass
class PostDataStats:
    items: int = 0
    skipped: int = 0  # already present (a rerun)
    seconds: float = 0.0
    seconds_by_step: dict[str, float] = field(default_factory=dict)


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


def session(db: EndpointLike, *, maintenance_work_mem: str,
            parallel_workers: int, tag: str) -> psycopg.Connection[Any]:
    # An index build may legitimately run for hours: no client deadline.
    return Endpoint.of(db, "green").connect(
        "green", application_name=tag[:63], lock_timeout_ms=300_000,
        statement_timeout_ms=0, deadline=None, settings={
            "maintenance_work_mem": maintenance_work_mem,
            "max_parallel_maintenance_workers": str(parallel_workers),
            # Nobody waits for these commits: a crash before the end reruns the step.
            "synchronous_commit": "off",
            # A backend whose orchestrator died notices it within a second and
            # stops, instead of building an index nobody will use.
            "client_connection_check_interval": "1000"})


def _table_sizes(conn: psycopg.Connection[Any], items: list[Deferred]) -> dict[tuple[str, str],
                                                                                  int]:
    pairs = sorted({(i.schema, i.table) for i in items})
    rows = conn.execute(
        "SELECT q.s, q.t, coalesce(pg_relation_size(c.oid), 0) "
        "FROM unnest(%s::text[], %s::text[]) AS q(s, t) "
        "LEFT JOIN pg_namespace n ON n.nspname = q.s "
        "LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = q.t",
        unnest_params(pairs)).fetchall()
    return {(r[0], r[1]): int(r[2]) for r in rows}


def _units(todo: list[Deferred], step: int, sizes: dict[tuple[str, str], int]
           ) -> list[list[Deferred]]:
    """The items of one step as units of work, each run in one session."""
    # Largest table first: the longest build starts at once and the small ones fill
    # the other sessions around it.
    todo = sorted(todo, key=lambda i: -sizes.get((i.schema, i.table), 0))
    if step != STEP_ATTACH:
        return [[i] for i in todo]
    # One table's ALTERs take its ACCESS EXCLUSIVE lock: run them in one session, one
    # table after another, different tables side by side.
    groups: dict[tuple[str, str], list[Deferred]] = {}
    for item in todo:
        groups.setdefault((item.schema, item.table), []).append(item)
    return list(groups.values())


def _restore_unit(unit: list[Deferred], conn: psycopg.Connection[Any]) -> int:
    worked = 0
    for item in unit:
        try:
            worked += int(run_item(conn, item))
        except psycopg.Error as exc:
            raise ReleaseFailed(
                f"restoring {item.kind} {item.schema}.{item.name} on green failed: "
                f"{scrub(str(exc)).strip()}",
                hint="a migration may have made an index or constraint that blue's data "
                "violates; fix the migration") from exc
    return worked


def restore_post_data(
    db: EndpointLike,
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
    db = Endpoint.of(db, "green")
    started = time.monotonic()
    stats = PostDataStats()
    with db.connect("green", application_name=tag[:63]) as conn:
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
            worked = _parallel(_units(todo, step, sizes), sessions, _restore_unit, deadline,
                               on_done=_reporter(progress, done, total))
            done += len(todo)
            stats.skipped += len(todo) - worked
            stats.seconds_by_step[label] = round(time.monotonic() - step_started, 3)
        if analyze:
            step_started = time.monotonic()
            tables = [[t] for t in analyze]

            def _analyze(unit: list[tuple[str, str]], conn: psycopg.Connection[Any]) -> int:
                conn.execute(sql.SQL("ANALYZE {}").format(relation(*unit[0])))
                return 1

            _parallel(tables, sessions, _analyze, deadline,
                      on_done=_reporter(progress, done, total))
            stats.seconds_by_step["analyze"] = round(time.monotonic() - step_started, 3)
        with db.connect("green", application_name=tag[:63]) as conn:
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
