"""A connection cut under a live session (a router or firewall drop: RST, not
silence) ends the statement at once with an error the retry policy knows, and the
next connection works; a refused connection is a clear ConnectError."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

from orchestrator.config import DatabaseConfig
from orchestrator.errors import ConnectError
from orchestrator.pg.conn import connect
from orchestrator.retry import refused_by_server
from orchestrator.sandbox.pgcluster import PgCluster
from orchestrator.sandbox.ports import free_port
from tests.faults.proxy import Proxy
from tests.pg_helpers import module_cluster, superuser_config

cluster = module_cluster("cut", 16, "orch-cut-")


@pytest.fixture
def proxy(cluster: PgCluster) -> Iterator[Proxy]:
    with Proxy((cluster.host, cluster.port), free_port()) as p:
        yield p


def _db(proxy: Proxy, pg: PgCluster, monkeypatch: pytest.MonkeyPatch) -> DatabaseConfig:
    return superuser_config(pg, monkeypatch, "ORCH_CUT_PW", address=(proxy.host, proxy.port),
                            connect_timeout=2)


def test_a_cut_connection_fails_the_statement_at_once_and_the_next_one_works(
        cluster: PgCluster, proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    db = _db(proxy, cluster, monkeypatch)
    with connect(db, role="green", attempts=1) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert proxy.cut() == 1
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute("SELECT pg_sleep(0)")
        assert time.monotonic() - started < 2.0
        assert refused_by_server(caught.value) is None  # so the retry policy retries it
    with connect(db, role="green", attempts=1) as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_a_refused_connection_is_a_clear_error_and_the_proxy_comes_back(
        cluster: PgCluster, proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    db = _db(proxy, cluster, monkeypatch)
    with proxy.down(), pytest.raises(ConnectError, match="cannot connect"):
        connect(db, role="green", attempts=1)
    with connect(db, role="green", attempts=1) as conn:
        assert conn.execute("SELECT 3").fetchone() == (3,)
