"""Rebuilding green's recorded post-data objects after the copy, several sessions at once.

Every item can be run again after a crash; see ``orchestrator.pg.schema_sections``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
from orchestrator.pg.scheduler import Node, Scheduler, Sessions

Progress = Callable[[str, int, int], None]

_STEPS = ((STEP_BUILD, "indexes"), (STEP_ATTACH, "constraints"),
          (STEP_FOREIGN_KEYS, "foreign keys"))


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


@dataclass(frozen=True)
class Unit:
    """One node's work: ``items`` run in one session one after another, an ANALYZE of
    ``analyze``, or the end of the step called ``ends`` (run in no session)."""

    items: tuple[Deferred, ...] = ()
    analyze: tuple[str, str] | None = None
    ends: str | None = None

    @property
    def table(self) -> tuple[str, str]:
        return self.items[0].qualified_table if self.items else self.analyze or ("", "")

    @property
    def name(self) -> str:
        if self.items:
            return f"{self.items[0].kind} {self.items[0].schema}.{self.items[0].name}"
        return f"analyze {'.'.join(self.table)}" if self.analyze else f"end of {self.ends}"


def graph(items: list[Deferred], sizes: dict[tuple[str, str], int],
          analyze: list[tuple[str, str]]) -> list[Node[Unit]]:
    """The steps one after another (each waits for the end of the one before: a
    foreign key needs its tables' unique indexes), the units of a step side by side."""
    nodes: list[Node[Unit]] = []
    before: list[Node[Unit]] = []
    steps: list[tuple[str, list[Unit]]] = [
        (label, [Unit(items=tuple(u)) for u in _units(
            [i for i in items if i.step == step], step, sizes)])
        for step, label in _STEPS]
    if analyze:
        steps.append(("analyze", [Unit(analyze=t) for t in analyze]))
    for label, units in steps:
        step_nodes = []
        for rank, unit in enumerate(units):
            # Priority by rank keeps ``_units``' order (largest table first) exactly,
            # ties included.
            node = Node(unit.name, sizes.get(unit.table, 0), unit,
                        priority=len(units) - rank)
            node.after(before)
            step_nodes.append(node)
        end_unit = Unit(ends=label)
        end = Node(end_unit.name, 0, end_unit)
        end.after(step_nodes or before)
        nodes += [*step_nodes, end]
        before = [end]
    return nodes


def _restore_unit(unit: tuple[Deferred, ...], conn: psycopg.Connection[Any]) -> int:
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
    total = len(items) + len(analyze or [])
    done = 0
    step_started = time.monotonic()

    def work(node: Node[Unit], conn: psycopg.Connection[Any] | None) -> int:
        unit = node.job
        if unit.ends is not None:
            return 0
        assert conn is not None
        if unit.analyze is not None:
            conn.execute(sql.SQL("ANALYZE {}").format(relation(*unit.analyze)))
            return 1
        return _restore_unit(unit.items, conn)

    def finished(node: Node[Unit], worked: int) -> None:
        nonlocal done, step_started
        unit = node.job
        if unit.ends is not None:
            now = time.monotonic()
            stats.seconds_by_step[unit.ends] = round(now - step_started, 3)
            step_started = now
            return
        if unit.items:
            stats.skipped += len(unit.items) - worked
        done += len(unit.items) or 1
        if progress:
            progress("post-data", done, total)

    Scheduler[Unit](
        jobs=max(1, jobs), deadline=started + timeout,
        sessions=Sessions(lambda: session(
            db, maintenance_work_mem=maintenance_work_mem,
            parallel_workers=max_parallel_maintenance_workers, tag=tag)),
        work=work, in_session=lambda n: n.job.ends is None, finished=finished,
        # Nothing runs outside the sessions, whose statements the scheduler cancels:
        # the step is redone on the next run.
        cancel=lambda: None,
        late=lambda: ReleaseFailed("restoring green's indexes and constraints timed out",
                                   hint="raise sync.initial_copy_timeout"),
        thread_name_prefix="post-data",
    ).run(graph(items, sizes, analyze or []))
    with db.connect("green", application_name=tag[:63]) as conn:
        done_ids(conn, control_schema, [i.id for i in items])
    stats.seconds = round(time.monotonic() - started, 3)
    return stats
