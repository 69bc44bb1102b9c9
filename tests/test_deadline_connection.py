"""Every wait on a server has a deadline: a frozen PostgreSQL (SIGSTOP, sockets open)
ends a statement with StatementDeadline instead of hanging, on every major."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import psycopg
import pytest

from orchestrator.config import DatabaseConfig
from orchestrator.errors import ConnectError
from orchestrator.pg.conn import StatementDeadline, connect
from orchestrator.sandbox.pgcluster import PgCluster
from tests.faults.freeze import frozen
from tests.pg_helpers import superuser_config, tmp_cluster


@pytest.fixture(scope="module", params=[15, 18])
def cluster(request: pytest.FixtureRequest) -> Iterator[PgCluster]:
    with tmp_cluster("dl", request.param, "orch-dl-") as pg:
        yield pg


def _db(pg: PgCluster, monkeypatch: pytest.MonkeyPatch, **kw: object) -> DatabaseConfig:
    return superuser_config(pg, monkeypatch, "ORCH_DL_PW", **kw)


def test_a_statement_on_a_frozen_server_ends_at_its_deadline(
        cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    db = _db(cluster, monkeypatch, statement_deadline=1.5)
    conn = connect(db, role="blue")
    assert conn.execute("SELECT 1").fetchone() == (1,)
    with frozen(cluster):
        started = time.monotonic()
        with pytest.raises(StatementDeadline, match=r"no answer from blue database .* 1\.5s"):
            conn.execute("SELECT 1")
        waited = time.monotonic() - started
        assert conn.closed
    assert 1.4 <= waited < 10.0
    # The error is an OperationalError: retried as a broken connection, caught by
    # the state machine like any lost connection.
    assert issubclass(StatementDeadline, psycopg.OperationalError)
    with connect(db, role="blue") as again:
        assert again.execute("SELECT 2").fetchone() == (2,)


def test_connecting_to_a_frozen_server_ends_at_connect_timeout(
        cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    db = _db(cluster, monkeypatch, connect_timeout=2)
    with frozen(cluster):
        started = time.monotonic()
        with pytest.raises(ConnectError, match="cannot connect"):
            connect(db, role="green", attempts=1)
        assert time.monotonic() - started < 10.0


def _sockets_to(port: int) -> int:
    """This process's TCP connections to 127.0.0.1:port still open (from /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") \
            else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            remote, inode = fields[2], fields[9]
            if inode in inodes and int(remote.split(":")[1], 16) == port:
                count += 1
    return count


def test_a_timed_out_attempt_leaves_no_socket_for_the_server_to_find_later(
        cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    # psycopg alone keeps each timed-out attempt's socket until a GC pass; a frozen
    # server resumed then finds one backend per attempt waiting in authentication.
    db = _db(cluster, monkeypatch, connect_timeout=2)
    with frozen(cluster):
        for _ in range(3):
            with pytest.raises(ConnectError):
                connect(db, role="green", attempts=1)
        assert _sockets_to(cluster.port) == 0


def test_no_deadline_for_work_that_may_take_long(
        cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    db = _db(cluster, monkeypatch, statement_deadline=0.5)
    with connect(db, role="green", deadline=None) as conn:
        assert conn.execute("SELECT pg_sleep(1.0), 1").fetchone() == ("", 1)


def test_keepalives_and_user_timeout_are_set_on_the_socket(
        cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    db = _db(cluster, monkeypatch, keepalives_idle=7, keepalives_interval=3,
             keepalives_count=4, tcp_user_timeout=12)
    with connect(db, role="blue") as conn:
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
        try:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12000
        finally:
            sock.close()
