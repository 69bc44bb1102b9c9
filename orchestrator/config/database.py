"""Where the databases are: blue, green, the release's state, migrations and backups."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from orchestrator.config._base import Duration, SecretRef, _Model


class DatabaseConfig(_Model):
    """How orchestrate reaches one database, and how the *other* cluster reaches it."""

    host: str = "127.0.0.1"
    port: int = Field(default=5432, ge=1, le=65535)
    dbname: str
    user: str
    password: SecretRef | None = None
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = (
        "prefer"
    )
    connect_timeout: Duration = 10.0
    # A server that stops answering without closing its connections (a paused VM, a
    # blackholed path) is invisible without deadlines. Keepalives and
    # tcp_user_timeout let the kernel drop a dead network path (also for the
    # subscription's and pg_dump/psql's connections, which get them through the
    # conninfo); a paused server's kernel still answers TCP, so every statement the
    # orchestrator waits on has a client-side deadline too (``statement_deadline``),
    # after which the connection is dropped and the step fails or retries.
    keepalives_idle: Duration = 10.0
    keepalives_interval: Duration = 5.0
    keepalives_count: int = Field(default=3, ge=1, le=100)
    tcp_user_timeout: Duration = 30.0
    statement_deadline: Duration = 60.0
    # The address the peer cluster uses for replication (a Service name in Kubernetes,
    # for instance); defaults to host/port.
    peer_host: str | None = None
    peer_port: int | None = Field(default=None, ge=1, le=65535)
    # The application's login role, fenced at switchover; defaults to none (no fencing
    # by role, only the replication catch-up).
    app_role: str | None = None

    def conninfo(
        self, *, dbname: str | None = None, for_peer: bool = False, with_password: bool = True
    ) -> str:
        """A libpq conninfo string. With the password in it: never log it."""
        parts = {
            "host": (self.peer_host or self.host) if for_peer else self.host,
            "port": str((self.peer_port or self.port) if for_peer else self.port),
            "dbname": dbname or self.dbname,
            "user": self.user,
            "sslmode": self.sslmode,
            "connect_timeout": str(max(1, int(self.connect_timeout))),
            "keepalives": "1",
            "keepalives_idle": str(max(1, int(self.keepalives_idle))),
            "keepalives_interval": str(max(1, int(self.keepalives_interval))),
            "keepalives_count": str(self.keepalives_count),
            "tcp_user_timeout": str(max(1000, int(self.tcp_user_timeout * 1000))),
        }
        if with_password and self.password is not None:
            parts["password"] = self.password.resolve()
        return " ".join(f"{k}={_quote_conninfo(v)}" for k, v in parts.items())

    def describe(self) -> str:
        """Safe for logs: no password."""
        return f"{self.user}@{self.host}:{self.port}/{self.dbname}"

    def subprocess_env(self) -> dict[str, str]:
        """Environment for pg_dump/psql: the password travels here, never on argv
        (where any local user could read it in ps)."""
        env = {"PGAPPNAME": "orchestrate", "PGCONNECT_TIMEOUT": str(int(self.connect_timeout))}
        if self.password is not None:
            env["PGPASSWORD"] = self.password.resolve()
        return env


def _quote_conninfo(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class GreenConfig(DatabaseConfig):
    # Create the database on the green server if it does not exist yet.
    create_database: bool = True


class StateConfig(_Model):
    """Where the release's own state lives. Defaults to a schema in blue's database."""

    database: DatabaseConfig | None = None
    schema_name: Annotated[str, Field(alias="schema", pattern=r"^[a-z_][a-z0-9_]*$")] = (
        "orchestrate"
    )
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class MigrationsConfig(_Model):
    dir: Path = Path("migrations")
    # What the lint does with changes that break logical replication or lock hot tables.
    lint: Literal["error", "warn", "off"] = "error"


class BackupConfig(_Model):
    dir: Path = Path("backups")
    format: Literal["custom", "directory"] = "custom"
    jobs: int = Field(default=1, ge=1, le=64)
    timeout: Duration = 6 * 3600.0
    # Skip the backup (only for throw-away environments; the release log says so).
    enabled: bool = True
    # How many backups to keep in ``dir`` (this release's included): after a new one
    # is verified, the oldest beyond this count are removed. Unset: all are kept.
    keep: int | None = Field(default=None, ge=1)
