"""One database as the product reaches it: built once from its config section.

An ``Endpoint`` owns everything that is derived from a ``DatabaseConfig``: opening a
session (through ``conn.connect``, so retries, deadlines and scrubbing stay in one
place), the environment for pg_dump/psql (the password from its secret reference,
never on a command line), the conninfo handed to the peer cluster for a
subscription, and a description safe for logs. Above this module nothing reads a
``DatabaseConfig`` to talk to a server; engines that open several sessions take an
``Endpoint``, and functions that run a few statements take a connection.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import psycopg

from orchestrator.config import DatabaseConfig, GreenConfig
from orchestrator.pg import conn as pgconn

Role = Literal["blue", "green", "state"]


@dataclass(frozen=True)
class Endpoint:
    """``db`` reached as ``role``: "blue", "green" or "state" (the release's records)."""

    db: DatabaseConfig
    role: Role

    @classmethod
    def of(cls, db: EndpointLike, role: Role) -> Endpoint:
        """The boundary for callers (tests, benchmarks) that still hold the config."""
        return db if isinstance(db, Endpoint) else cls(db, role)

    # ------------------------------------------------------------------ sessions

    def connect(
        self,
        purpose: str | None = None,
        *,
        dbname: str | None = None,
        autocommit: bool = True,
        deadline: float | Literal["default"] | None = "default",
        replication: Literal["database"] | None = None,
        attempts: int = 5,
        lock_timeout_ms: int = 10_000,
        statement_timeout_ms: int = 0,
        connect_timeout: float | None = None,
        application_name: str | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> psycopg.Connection[Any]:
        """A session for ``purpose`` (its application name and the word in its errors;
        the endpoint's role when None, no word when "")."""
        return pgconn.connect(
            self.db, role=self.role if purpose is None else purpose, dbname=dbname,
            autocommit=autocommit, deadline=deadline, replication=replication,
            attempts=attempts, lock_timeout_ms=lock_timeout_ms,
            statement_timeout_ms=statement_timeout_ms, connect_timeout=connect_timeout,
            application_name=application_name, settings=settings)

    @contextmanager
    def connection(self, purpose: str | None = None,
                   **kwargs: Any) -> Iterator[psycopg.Connection[Any]]:
        conn = self.connect(purpose, **kwargs)
        try:
            yield conn
        finally:
            conn.close()

    def session_conninfo(self) -> str:
        """For a connection opened with parameters of its own (the receiver's short
        waits). With the password in it: never log it."""
        return self.db.conninfo()

    def with_connect_timeout(self, seconds: float) -> Endpoint:
        """The same endpoint, its connect timeout at most ``seconds``."""
        capped = min(self.db.connect_timeout, seconds)
        return Endpoint(self.db.model_copy(update={"connect_timeout": capped}), self.role)

    # ------------------------------------------------------------- client tools

    def tool_conninfo(self) -> str:
        """``--dbname`` for pg_dump/pg_restore/psql: no password in it (argv is public)."""
        return self.db.conninfo(with_password=False)

    def tool_env(self) -> dict[str, str]:
        """The environment a client tool runs in; the password travels here."""
        return {**os.environ, **self.db.subprocess_env()}

    def tool_settings(self) -> dict[str, str]:
        """Only this endpoint's variables (PGAPPNAME, PGCONNECT_TIMEOUT, PGPASSWORD),
        for callers that build the environment themselves."""
        return self.db.subprocess_env()

    # ------------------------------------------------------------------ the peer

    def peer_conninfo(self) -> str:
        """How the *other* cluster reaches this one (a subscription's CONNECTION).
        With the password in it: never log it."""
        return self.db.conninfo(for_peer=True)

    def redacted_peer_conninfo(self) -> str:
        return self.db.conninfo(for_peer=True, with_password=False) + " password=***"

    # ---------------------------------------------------------------- describing

    def describe(self) -> str:
        """Safe for logs: no password."""
        return self.db.describe()

    @property
    def dbname(self) -> str:
        return self.db.dbname

    @property
    def user(self) -> str:
        return self.db.user

    @property
    def server(self) -> str:
        return f"{self.db.host}:{self.db.port}"

    @property
    def app_role(self) -> str | None:
        return self.db.app_role

    @property
    def create_database(self) -> bool:
        """Green's ``create_database`` (a database of another section is never made)."""
        return isinstance(self.db, GreenConfig) and self.db.create_database


# What the engines' public functions accept: tests and benchmarks still hand them the
# config section, converted at the boundary with ``Endpoint.of``.
EndpointLike: TypeAlias = Endpoint | DatabaseConfig
