"""Opening connections: timeouts, bounded retries, readable errors, no secret leaks."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import psycopg
from psycopg import sql
from psycopg.abc import PQGen
from psycopg.rows import TupleRow

from orchestrator.config import DatabaseConfig
from orchestrator.errors import AuthenticationError, ConnectError
from orchestrator.logging import scrub
from orchestrator.retry import call_with_retry, pg_retrying, refused_by_server

APPLICATION_NAME = "orchestrate"
RV = TypeVar("RV")


class StatementDeadline(psycopg.OperationalError):
    """No answer within the connection's deadline: the server is paused or the network
    path is gone. The connection is closed (its state is unknown); an OperationalError,
    so the retry policy and the state machine treat it as a broken connection."""


class DeadlineConnection(psycopg.Connection[TupleRow]):
    """A connection whose every wait on the server ends by ``deadline`` seconds.

    A server whose processes are stopped (SIGSTOP, a paused VM) keeps its sockets: the
    kernel completes TCP handshakes and acknowledges data, so neither keepalives nor
    ``tcp_user_timeout`` fire, and ``statement_timeout`` is enforced by the very
    process that is stopped. Only the client can give up: psycopg's own wait takes a
    timeout, applied here to every statement, commit and COPY on the connection.
    """

    deadline: float | None = None
    peer: str = "the server"

    def wait(self, gen: PQGen[RV], interval: float = 0.1,
             timeout: float | None = None) -> RV:
        limit = timeout if timeout is not None else self.deadline
        try:
            return super().wait(gen, interval=interval, timeout=limit)
        except psycopg.errors._WaitTimeout:  # psycopg's only timeout signal
            if timeout is not None:
                raise
            # Mid-protocol: the connection can never be used again.
            self.pgconn.finish()
            raise StatementDeadline(
                f"no answer from {self.peer} within {limit:g}s (the server is paused, "
                "overloaded or unreachable)") from None


CT = TypeVar("CT", bound=psycopg.Connection[Any])


def open_connection(cls: type[CT], conninfo: str, **kwargs: Any) -> CT:
    """``cls.connect(conninfo, **kwargs)``, and a timed-out attempt's socket closed.

    psycopg (3.3) keeps the libpq connection of an attempt that hit ``connect_timeout``
    open until the garbage collector breaks a reference cycle through the exception.
    Against a paused server that matters: once it resumes, each such socket holds a
    backend in authentication for ``authentication_timeout`` (60 s) and its
    connection slot, and keeps a DROP DATABASE or a ProcSignal barrier waiting. So
    the exception is replaced by a fresh one (no traceback) and the cycle collected.
    """
    failed: psycopg.errors.ConnectionTimeout | None = None
    try:
        return cls.connect(conninfo, **kwargs)
    except psycopg.errors.ConnectionTimeout as exc:
        failed = psycopg.errors.ConnectionTimeout(str(exc))
    gc.collect()
    raise failed


def connect(
    db: DatabaseConfig,
    *,
    dbname: str | None = None,
    autocommit: bool = True,
    role: str = "",
    lock_timeout_ms: int = 10_000,
    statement_timeout_ms: int = 0,
    attempts: int = 5,
    deadline: float | Literal["default"] | None = "default",
    connect_timeout: float | None = None,
    application_name: str | None = None,
    replication: Literal["database"] | None = None,
    settings: Mapping[str, str] | None = None,
) -> psycopg.Connection[Any]:
    """Connect with retries on transient failures.

    lock_timeout keeps a DDL statement from queueing behind a long transaction and
    blocking every query behind it (the classic migration outage). ``deadline``
    (seconds; the database's ``statement_deadline`` by default, None for work that
    may legitimately take long, such as a migration) bounds every wait on the server.
    ``application_name`` replaces the one made from ``role`` (sessions found again by
    name); ``replication="database"`` opens a logical replication connection.
    ``settings`` are further session settings, sent at startup like the timeouts.
    """
    options = f"-c lock_timeout={lock_timeout_ms} -c statement_timeout={statement_timeout_ms}"
    options += "".join(f" -c {k}={v}" for k, v in (settings or {}).items())
    if connect_timeout is not None:
        # libpq counts whole seconds and takes 2 as its minimum.
        db = db.model_copy(update={"connect_timeout": max(2.0, connect_timeout)})
    conninfo = db.conninfo(dbname=dbname)
    name = application_name or f"{APPLICATION_NAME}{'-' + role if role else ''}"
    extra: dict[str, Any] = {} if replication is None else {"replication": replication}

    def _open() -> psycopg.Connection[Any]:
        conn = open_connection(DeadlineConnection, conninfo, autocommit=autocommit,
                               application_name=name, options=options, **extra)
        conn.deadline = db.statement_deadline if deadline == "default" else deadline
        conn.peer = f"{role or 'the'} database {db.describe()}".strip()
        return conn

    where = db.describe() if dbname is None else f"{db.user}@{db.host}:{db.port}/{dbname}"
    try:
        return call_with_retry(_open, policy=pg_retrying(attempts=attempts,
                                                         what=f"connect to {where}"))
    except psycopg.Error as exc:
        what = f"{role} database" if role in {"blue", "green"} else "database"
        refused = refused_by_server(exc)
        if refused == "credentials":
            raise AuthenticationError(
                f"{where} refused the login: {scrub(str(exc)).strip()}",
                hint=f"check the user and the password source of the {what} in the config "
                "(an empty or unset password is refused too); not retried, to keep the "
                "role from being locked out") from exc
        raise ConnectError(
            f"cannot connect to {where}: {scrub(str(exc)).strip()}",
            hint="check host, port, database, user and the password source in the config",
        ) from exc


@contextmanager
def connection(db: DatabaseConfig, **kwargs: Any) -> Iterator[psycopg.Connection[Any]]:
    conn = connect(db, **kwargs)
    try:
        yield conn
    finally:
        conn.close()


def server_major(conn: psycopg.Connection[Any]) -> int:
    return int(conn.info.server_version) // 10000


def scalar(conn: psycopg.Connection[Any], query: str | sql.Composable, *params: Any) -> Any:
    row = conn.execute(query, params or None).fetchone()  # type: ignore[arg-type]
    return None if row is None else row[0]
