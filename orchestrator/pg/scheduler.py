"""The parallel scheduler: a dependency graph run in ``jobs`` slots, highest priority first.

It runs both the initial copy (``orchestrator.pg.copy.graph``) and the post-data
restore (``orchestrator.pg.post_data_restore``). A node becomes ready once everything
it waits for is done; of the ready nodes the one with the highest priority starts
first (for the copy, the longest chain of work still behind it: ``bottom_levels``). A
node runs either on its own (a copy pipe: its psql children are the session) or in a
database session taken from a ``Sessions`` pool and given back after it. The whole
run ends by a deadline; on any failure the caller's ``cancel`` stops what still runs,
the sessions' statements are cancelled and every session is closed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import psycopg

from orchestrator.errors import ReleaseFailed

J = TypeVar("J")
Session = psycopg.Connection[Any]


@dataclass(eq=False)
class Node(Generic[J]):
    name: str
    cost: int
    job: J
    deps: set[Node[J]] = field(default_factory=set)
    dependents: list[Node[J]] = field(default_factory=list)
    priority: int = 0

    def after(self, before: Iterable[Node[J]]) -> None:
        """Make this node wait for every node of ``before``."""
        for dep in before:
            if dep is not self and dep not in self.deps:
                self.deps.add(dep)
                dep.dependents.append(self)


def bottom_levels(nodes: list[Node[J]]) -> None:
    """Set each node's priority: its cost plus the longest chain of work behind it."""
    # Dependents first (the graph is acyclic by construction).
    order: list[Node[J]] = []
    seen: set[int] = set()

    def visit(node: Node[J]) -> None:
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


class Sessions:
    """Sessions reused from node to node: opened on demand, kept for the next one."""

    def __init__(self, open_session: Callable[[], Session]) -> None:
        self._open = open_session
        self._idle: list[Session] = []

    def take(self) -> Session:
        return self._idle.pop() if self._idle else self._open()

    def give(self, session: Session) -> None:
        self._idle.append(session)

    def close(self) -> None:
        for session in self._idle:
            session.close()
        self._idle.clear()


class Scheduler(Generic[J]):
    """Runs ``work`` on every node of a graph, ``jobs`` at a time, by a deadline.

    ``finished(node, result)`` is called in the scheduling thread, in completion
    order; ``late()`` makes the error raised when the deadline passes.
    """

    def __init__(self, *, jobs: int, deadline: float, sessions: Sessions,
                 work: Callable[[Node[J], Session | None], int],
                 in_session: Callable[[Node[J]], bool],
                 finished: Callable[[Node[J], int], None],
                 cancel: Callable[[], None], late: Callable[[], ReleaseFailed],
                 thread_name_prefix: str = "copy") -> None:
        self.jobs = jobs
        self.deadline = deadline
        self.sessions = sessions
        self.work = work
        self.in_session = in_session
        self.finished = finished
        self.cancel = cancel
        self.late = late
        self.thread_name_prefix = thread_name_prefix

    def run(self, nodes: list[Node[J]]) -> None:
        ready = [n for n in nodes if not n.deps]
        running: dict[Future[int], tuple[Node[J], Session | None]] = {}
        try:
            with ThreadPoolExecutor(max_workers=self.jobs,
                                    thread_name_prefix=self.thread_name_prefix) as pool:
                try:
                    while ready or running:
                        self._start(pool, ready, running)
                        remaining = self.deadline - time.monotonic()
                        if remaining <= 0:
                            raise self.late()
                        done, _ = wait(list(running), timeout=remaining,
                                       return_when=FIRST_COMPLETED)
                        for fut in done:
                            self._finish(fut, ready, running)
                except BaseException:
                    self.cancel()
                    for _, held in running.values():
                        if held is not None:
                            with contextlib.suppress(psycopg.Error, OSError):
                                held.cancel_safe(timeout=5)
                    raise
                finally:
                    # Closed below, once the pool is done and no session is in use.
                    for _, held in running.values():
                        if held is not None:
                            self.sessions.give(held)
        finally:
            # A failed run's sessions too: left to the garbage collector, a backend
            # would idle on green until then.
            self.sessions.close()

    def _start(self, pool: ThreadPoolExecutor, ready: list[Node[J]],
               running: dict[Future[int], tuple[Node[J], Session | None]]) -> None:
        while ready and len(running) < self.jobs:
            ready.sort(key=lambda n: n.priority)
            node = ready.pop()
            held = self.sessions.take() if self.in_session(node) else None
            running[pool.submit(self.work, node, held)] = (node, held)

    def _finish(self, fut: Future[int], ready: list[Node[J]],
                running: dict[Future[int], tuple[Node[J], Session | None]]) -> None:
        node, held = running.pop(fut)
        if held is not None:
            self.sessions.give(held)
        result = fut.result()
        for dep in node.dependents:
            dep.deps.discard(node)
            if not dep.deps:
                ready.append(dep)
        self.finished(node, result)
