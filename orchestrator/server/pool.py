"""The receiver's connections to the state database: a small pool, each call bounded
and retried once.

A pool, not one connection behind one lock: an alert stuck on a stalled connection
must not hold every later alert behind it. A ``Ticket`` is one call of the receiver;
the HTTP side aborts it when it overruns, which shuts the stuck connection's socket.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

import psycopg

from orchestrator.errors import OrchestrateError, StateUnavailable
from orchestrator.logging import scrub
from orchestrator.store import ReleaseRow


class ReceiverStore(Protocol):
    """What the receiver needs of ``StateStore``."""

    def get(self, name: str) -> ReleaseRow | None: ...

    def request_rollback(self, name: str, reason: str) -> bool: ...

    def log(self, name: str, level: str, message: str, *, state: str | None = None,
            details: dict[str, Any] | None = None, duration_s: float | None = None) -> None: ...

    def close(self) -> None: ...


class StoreUnavailable(Exception):
    """The control schema could not be read or written in time."""


class Ticket:
    """One call of ``handle``: lets the HTTP side abort it when it overruns."""

    def __init__(self) -> None:
        self.store: ReceiverStore | None = None
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        # A store stuck in a read (a stopped backend answers nothing, and the kernel
        # still acknowledges keepalives) is freed by shutting its socket down.
        abort = getattr(self.store, "abort", None)
        if callable(abort):
            abort()


class StorePool:
    def __init__(self, store: ReceiverStore, factory: Callable[[], ReceiverStore] | None,
                 max_stores: int, *, timeout: float) -> None:
        self._idle: queue.LifoQueue[ReceiverStore] = queue.LifoQueue()
        self._idle.put(store)
        self._stores = [store]
        self._factory = factory
        self._max_stores = max_stores
        self._pool_lock = threading.Lock()
        self.timeout = timeout

    def checkout(self, ticket: Ticket) -> ReceiverStore:
        try:
            store = self._idle.get_nowait()
        except queue.Empty:
            store = self._new_store() or self._wait_for_store()
        ticket.store = store
        return store

    def _new_store(self) -> ReceiverStore | None:
        with self._pool_lock:
            if self._factory is None or len(self._stores) >= self._max_stores:
                return None
            store = self._factory()
            self._stores.append(store)
            return store

    def _wait_for_store(self) -> ReceiverStore:
        try:
            return self._idle.get(timeout=self.timeout)
        except queue.Empty:
            raise StoreUnavailable(
                f"every state database connection has been busy for {self.timeout:g}s "
                "with earlier alerts (is the database stalled?)") from None

    def checkin(self, store: ReceiverStore, ticket: Ticket) -> None:
        if ticket.aborted:
            store.close()  # its socket was shut down: reconnect on next use
        self._idle.put(store)

    def call(self, store: ReceiverStore, ticket: Ticket, call: Callable[[], Any]) -> Any:
        """One call to the store; one reconnect when the connection broke (a database
        restart must not turn every later alert into a 503)."""
        for attempt in range(2):
            try:
                return call()
            except (psycopg.OperationalError, OrchestrateError) as exc:
                store.close()
                # A statement timeout is the database answering "stalled": retrying
                # would only double the wait Alertmanager sees.
                # The store wraps a lost server in StateUnavailable: look at its cause.
                answer = exc.__cause__ if isinstance(exc, StateUnavailable) else exc
                final = (attempt == 1 or ticket.aborted
                         or isinstance(answer, psycopg.errors.QueryCanceled
                                       | psycopg.errors.LockNotAvailable))
                if final:
                    message = exc.message if isinstance(exc, OrchestrateError) else str(exc)
                    # The first line: PostgreSQL's LINE/caret context is noise here.
                    first = (scrub(message).strip().splitlines() or [""])[0]
                    raise StoreUnavailable(
                        f"the release state database is unreachable: {first}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        with self._pool_lock:
            for store in self._stores:
                store.close()
