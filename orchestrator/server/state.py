"""The receiver's connections to the release state database: short timeouts throughout.

The orchestrator itself may wait long for the database; the receiver may not. An
answer later than a few seconds is no answer to Alertmanager, so every state
connection of the receiver has a connect timeout, a statement and a lock timeout,
TCP keepalives and a TCP user timeout (a peer that vanished is noticed in seconds,
not after the kernel's two hours), and can be aborted from another thread.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Callable
from typing import Any

import psycopg

from orchestrator.config import ReleaseConfig
from orchestrator.errors import ExternalError, LockedError
from orchestrator.logging import get_logger, scrub
from orchestrator.pg.conn import APPLICATION_NAME, open_connection
from orchestrator.pg.endpoint import Endpoint
from orchestrator.store import StateStore

log = get_logger("orchestrate.serve")


def connection_params(timeout_s: float) -> dict[str, Any]:
    """libpq parameters bounding every wait to about ``timeout_s`` seconds."""
    ms = max(500, int(timeout_s * 1000))
    return {
        "connect_timeout": max(1, math.ceil(timeout_s / 2)),
        "keepalives": 1,
        "keepalives_idle": max(1, int(timeout_s)),
        "keepalives_interval": 1,
        "keepalives_count": 3,
        # Unacknowledged data (a dead peer, a blackholed route) fails the connection.
        "tcp_user_timeout": ms,
        "options": f"-c statement_timeout={ms} -c lock_timeout={ms // 2} "
                   f"-c idle_in_transaction_session_timeout={ms * 2}",
    }


class ReceiverStateStore(StateStore):
    """A ``StateStore`` whose connections never wait long (see the module docstring)."""

    def __init__(self, db: Endpoint, schema: str, *, timeout_s: float) -> None:
        # The lock probe opens its own connection from the endpoint: cap its connect
        # timeout too.
        super().__init__(db.with_connect_timeout(max(1.0, math.ceil(timeout_s / 2))), schema)
        self.timeout_s = timeout_s

    @classmethod
    def for_receiver(cls, cfg: ReleaseConfig) -> ReceiverStateStore:
        return cls(Endpoint(cfg.state_db, "state"), cfg.state.schema_name,
                   timeout_s=cfg.alerts.state_timeout)

    @property
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            # One attempt: the receiver's caller retries once, and Alertmanager retries
            # a 503; a backoff here would outlast the answer.
            try:
                self._conn = open_connection(
                    psycopg.Connection, self.db.session_conninfo(), autocommit=True,
                    application_name=f"{APPLICATION_NAME}-serve",
                    **connection_params(self.timeout_s))
            except psycopg.Error as exc:
                raise ExternalError(
                    f"cannot connect to {self.db.describe()}: {scrub(str(exc)).strip()}",
                    hint="check the state database (blue, or state.database) is up") from exc
        return self._conn

    def abort(self) -> None:
        """From another thread: end the connection now, whatever it waits for."""
        conn = self._conn
        if conn is None or conn.closed:
            return
        with contextlib.suppress(OSError, psycopg.Error):
            fd = os.dup(conn.fileno())
            # shutdown() acts on the socket, not on this descriptor: the thread blocked
            # reading it sees end-of-file and psycopg raises OperationalError.
            with socket.socket(fileno=fd) as sock:
                sock.shutdown(socket.SHUT_RDWR)


def lock_probe(cfg: ReleaseConfig) -> Callable[[], bool]:
    def lock_is_free() -> bool:
        probe = ReceiverStateStore.for_receiver(cfg)
        try:
            probe.acquire_lock()
        except LockedError:
            return False
        finally:
            probe.close()  # releases the lock if it was taken
        return True
    return lock_is_free


def rollback_runner(cfg: ReleaseConfig) -> Callable[[str], None]:
    def run(reason: str) -> None:
        # Imported here: the machine pulls in every backend, which the HTTP side of the
        # receiver does not need.
        from orchestrator.wiring import release_for

        # The rollback is the orchestrator's own work, with its own (longer) waits.
        store = StateStore.for_config(cfg)
        try:
            outcome = release_for(cfg, store=store).run(rollback=reason)
            log.warning("rollback performed by the receiver", release=outcome.name,
                        state=outcome.state, status=outcome.status)
        finally:
            store.close()
    return run
