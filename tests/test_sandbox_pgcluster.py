"""PgCluster against real servers: Debian's PostgreSQL 15 and the npm builds of 16-18."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from orchestrator.errors import OrchestrateError
from orchestrator.sandbox.pgcluster import PgCluster, SandboxError, server_bindir


def _query(conninfo: str, sql: str) -> object:
    with psycopg.connect(conninfo, connect_timeout=5) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return row[0]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    # libpq would otherwise find a password in the environment or a ~/.pgpass and
    # make the "no password" checks pass for the wrong reason.
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent/pgpass")


@pytest.fixture(scope="module")
def pg15(module_sandbox_dir: Path) -> Iterator[PgCluster]:
    with PgCluster("pg15", 15, module_sandbox_dir) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def pg17(module_sandbox_dir: Path) -> Iterator[PgCluster]:
    with PgCluster("pg17", 17, module_sandbox_dir) as cluster:
        yield cluster


@pytest.mark.parametrize("fixture", ["pg15", "pg17"])
def test_cluster_runs_requested_major_with_logical_wal(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    cluster: PgCluster = request.getfixturevalue(fixture)
    assert cluster.server_version_num() // 10000 == cluster.major
    info = cluster.conninfo()
    assert _query(info, "SHOW wal_level") == "logical"
    assert _query(info, "SHOW max_replication_slots") == "20"
    assert _query(info, "SHOW max_wal_senders") == "20"
    assert _query(info, "SHOW max_logical_replication_workers") == "16"
    assert _query(info, "SHOW max_worker_processes") == "32"
    assert _query(info, "SHOW max_sync_workers_per_subscription") == "4"
    assert _query(info, "SHOW listen_addresses") == "127.0.0.1"
    assert _query(info, "SHOW fsync") == "on"
    assert _query(info, "SELECT current_user") == "postgres"
    # The unix socket lives inside the cluster's own directory.
    assert (cluster.dir / "run" / f".s.PGSQL.{cluster.port}").exists()


@pytest.mark.parametrize("fixture", ["pg15", "pg17"])
def test_password_is_required(fixture: str, request: pytest.FixtureRequest) -> None:
    cluster: PgCluster = request.getfixturevalue(fixture)
    without = f"host=127.0.0.1 port={cluster.port} user=postgres dbname=postgres"
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(without, connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(cluster.conninfo(password="wrong"), connect_timeout=5)
    # The password is the one in the pwfile, which only the owner may read.
    pwfile = cluster.dir / "pwfile"
    assert pwfile.read_text().strip() == cluster.password
    assert pwfile.stat().st_mode & 0o777 == 0o600
    assert _query(cluster.conninfo(), "SELECT 1") == 1


def test_roles_and_databases_are_idempotent(pg17: PgCluster) -> None:
    pg17.create_role("shopper", "first", replication=True)
    pg17.create_role("shopper", "second", replication=True)  # same role, new password
    pg17.create_database("orders", owner="shopper")
    pg17.create_database("orders", owner="shopper")

    as_shopper = pg17.conninfo("orders", user="shopper", password="second")
    assert _query(as_shopper, "SELECT current_database()") == "orders"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg17.conninfo("orders", user="shopper", password="first"))
    assert (
        _query(
            pg17.conninfo(),
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'orders'",
        )
        == "shopper"
    )
    attrs = _query(
        pg17.conninfo(),
        "SELECT (rolsuper, rolreplication, rolcanlogin)::text FROM pg_roles "
        "WHERE rolname = 'shopper'",
    )
    assert attrs == "(f,t,t)"
    pg17.execute("CREATE TABLE IF NOT EXISTS t (id int)", dbname="orders")
    assert _query(pg17.conninfo("orders"), "SELECT count(*) FROM t") == 0


def test_pg16_and_pg18_start_too(sandbox_dir: Path) -> None:
    for major in (16, 18):
        with PgCluster(f"pg{major}", major, sandbox_dir) as cluster:
            assert cluster.server_version_num() // 10000 == major
            assert _query(cluster.conninfo(), "SHOW wal_level") == "logical"


def test_settings_restart_and_idempotent_stop(sandbox_dir: Path) -> None:
    cluster = PgCluster("pg", 17, sandbox_dir, settings={"fsync": "off", "work_mem": "8MB"})
    cluster.start()
    try:
        assert _query(cluster.conninfo(), "SHOW fsync") == "off"
        assert _query(cluster.conninfo(), "SHOW work_mem") == "8MB"
        cluster.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('x')")
        pid = cluster._proc.pid if cluster._proc else None
        assert pid is not None
    finally:
        cluster.stop()
    cluster.stop()
    assert not _pid_alive(pid)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", cluster.port)) != 0

    # A second PgCluster over the same directory reuses the data and the password.
    again = PgCluster("pg", 17, sandbox_dir, port=cluster.port)
    assert again.password == cluster.password
    with again:
        assert _query(again.conninfo(), "SELECT v FROM kept") == "x"


def test_failed_start_reports_the_log_and_leaves_nothing_running(sandbox_dir: Path) -> None:
    cluster = PgCluster("bad", 15, sandbox_dir, settings={"wal_level": "bogus"})
    with pytest.raises(SandboxError, match="wal_level") as info:
        cluster.start()
    assert isinstance(info.value, OrchestrateError)
    assert not cluster.running
    cluster.stop()


def test_server_bindir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert server_bindir(15) == Path("/usr/lib/postgresql/15/bin")
    assert (server_bindir(17) / "postgres").is_file()
    with pytest.raises(SandboxError, match="PostgreSQL 99") as info:
        server_bindir(99)
    assert info.value.hint is not None
    assert "setup.sh" in info.value.hint
    monkeypatch.setenv("ORCHESTRATE_CACHE", str(tmp_path))
    with pytest.raises(SandboxError, match=str(tmp_path)):
        server_bindir(17)


def test_the_sandbox_without_the_demo_extra_says_which_extra_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from orchestrator.sandbox import stack
    from orchestrator.sandbox.process import SandboxError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "prometheus_client" else real(name, *a))
    with pytest.raises(SandboxError, match="prometheus_client") as caught:
        stack.require_demo_extra()
    assert "orchestrate[demo]" in (caught.value.hint or "")
