"""The copy's work as a graph: copy pipes, green's rebuilds and ANALYZE, and their order."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.errors import ReleaseFailed
from orchestrator.logging import scrub
from orchestrator.pg import schema_sections
from orchestrator.pg.copy.pipes import Copier
from orchestrator.pg.copy.plan import CopyPlan, CopyTask
from orchestrator.pg.copy.state import ident
from orchestrator.pg.endpoint import Endpoint
from orchestrator.pg.scheduler import Node, Scheduler, Sessions, bottom_levels

Progress = Callable[[str, int, int], None]

# Relative cost of the work after a table's rows are in, per byte of the table, for
# scheduling only: an index build sorts the key columns, a foreign-key check joins.
_INDEX_COST = 0.3
_FK_COST = 0.15
_SMALL_COST = 1 << 20


@dataclass(frozen=True)
class Step:
    """One node's work: a copy task, a recorded rebuild, or an ANALYZE of ``table``."""

    table: tuple[str, str]
    task: CopyTask | None = None
    item: schema_sections.Deferred | None = None
    analyze: bool = False


_Node = Node[Step]
_Steps = dict[tuple[str, str], dict[int, list[_Node]]]


def _item_cost(item: schema_sections.Deferred, size: dict[tuple[str, str], int]) -> int:
    table = item.qualified_table
    if item.kind == "fk":
        cost = int((size.get(table, 0) + size.get(
            (item.ref_schema or "", item.ref_table or ""), 0)) * _FK_COST)
    elif item.step == schema_sections.STEP_BUILD:
        cost = int(size.get(table, 0) * _INDEX_COST)
    else:
        cost = _SMALL_COST
    return max(cost, 1)


def _link_item(node: _Node, item: schema_sections.Deferred,
               copies: dict[tuple[str, str], list[_Node]], steps: _Steps) -> None:
    table = item.qualified_table
    node.after(copies.get(table, []))
    if item.kind == "attach":
        node.after(steps[table].get(schema_sections.STEP_BUILD, []))
    elif item.kind == "extra":
        node.after(steps[table].get(schema_sections.STEP_BUILD, []))
        node.after([n for n in steps[table].get(schema_sections.STEP_ATTACH, [])
                    if n.job.item is not None and n.job.item.kind == "attach"])
    elif item.kind == "fk":
        ref = (item.ref_schema or "", item.ref_table or "")
        node.after(copies.get(ref, []))
        for t in {table, ref}:
            node.after(steps.get(t, {}).get(schema_sections.STEP_BUILD, []))
            node.after(steps.get(t, {}).get(schema_sections.STEP_ATTACH, []))


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
        node = _Node(f"copy {task.label}", task.cost, Step(task.target, task=task))
        copies.setdefault(task.target, []).append(node)
        size[task.target] = size.get(task.target, 0) + task.cost
        nodes.append(node)
    by_table: dict[tuple[str, str], list[_Node]] = {}
    steps: _Steps = {}
    for item in items:
        table = item.qualified_table
        node = _Node(f"{item.kind} {item.schema}.{item.name}", _item_cost(item, size),
                     Step(table, item=item))
        by_table.setdefault(table, []).append(node)
        steps.setdefault(table, {}).setdefault(item.step, []).append(node)
        nodes.append(node)
    for nodes_of in by_table.values():
        for node in nodes_of:
            assert node.job.item is not None
            _link_item(node, node.job.item, copies, steps)
    for table in analyze:
        node = _Node(f"analyze {table[0]}.{table[1]}", _SMALL_COST, Step(table, analyze=True))
        node.after(copies.get(table, []))
        # Not after the foreign keys that reference it: VALIDATE takes only ROW SHARE
        # on the referenced table, which ANALYZE does not conflict with.
        node.after(by_table.get(table, []))
        nodes.append(node)
    bottom_levels(nodes)
    return nodes


class _Runner:
    """Runs the graph with ``jobs`` slots: a slot is a COPY pipe or a green session."""

    def __init__(self, copier: Copier, green: Endpoint, *, jobs: int,
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
        self._on_copies_done: Callable[[], None] = lambda: None
        self._total_bytes = self._total_items = 0
        self._copied_bytes = self._copies_left = self._items_done = self._rows = 0

    def _session(self) -> psycopg.Connection[Any]:
        return schema_sections.session(
            self.green, maintenance_work_mem=self.maintenance_work_mem,
            parallel_workers=self.parallel_workers, tag="orch-post-data")

    def _work(self, node: _Node, conn: psycopg.Connection[Any] | None) -> int:
        if node.job.task is not None:
            return self.copier.run(node.job.task)
        assert conn is not None
        return self._sql(node, conn)

    def _sql(self, node: _Node, conn: psycopg.Connection[Any]) -> int:
        began = time.monotonic()
        step = node.job
        try:
            if step.analyze:
                conn.execute(sql.SQL("ANALYZE {}").format(ident(*step.table)))
                worked = 1
            else:
                assert step.item is not None
                worked = int(schema_sections.run_item(conn, step.item))
        except psycopg.Error as exc:
            raise ReleaseFailed(
                f"{node.name} on green failed: {scrub(str(exc)).strip()}",
                hint="a migration may have made an index or constraint that blue's data "
                "violates; fix the migration") from exc
        kind = "analyze" if step.analyze else step.item.kind if step.item else "?"
        spent = self.post.seconds_by_step.get(kind, 0.0) + time.monotonic() - began
        self.post.seconds_by_step[kind] = round(spent, 3)
        return worked

    def _finished(self, node: _Node, result: int) -> None:
        if node.job.task is not None:
            self._rows += result
            self._copied_bytes += node.cost
            self._copies_left -= 1
            if self._copies_left == 0:
                self._on_copies_done()
            # 100 % is reported once the copy is recorded as complete.
            if self.progress:
                self.progress("copy", self._copied_bytes, self._total_bytes)
        else:
            self._items_done += 1
            self.post.skipped += int(node.job.item is not None and not result)
            if self.progress:
                self.progress("post-data", self._items_done, self._total_items)

    def run(self, nodes: list[_Node], *, on_copies_done: Callable[[], None]) -> int:
        copies = [n for n in nodes if n.job.task is not None]
        self._total_bytes = sum(n.cost for n in copies)
        self._total_items = len(nodes) - len(copies)
        self.post.items = sum(1 for n in nodes if n.job.item is not None)
        self._copies_left = len(copies)
        self._on_copies_done = on_copies_done
        if self.progress:
            self.progress("copy", 0, self._total_bytes)
        if not copies:
            on_copies_done()
        Scheduler[Step](
            jobs=self.jobs, deadline=self.deadline, sessions=Sessions(self._session),
            work=self._work, in_session=lambda n: n.job.task is None,
            finished=self._finished, cancel=self.copier.cancel,
            late=lambda: ReleaseFailed("the initial copy did not finish in time",
                                       hint="raise sync.initial_copy_timeout"),
        ).run(nodes)
        return self._rows
