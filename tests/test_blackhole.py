"""A network path that blackholes (packets vanish, nothing answers, nothing resets):
every wait on it ends at a deadline, and the same connection works again once the
path is back. The server itself keeps running: only the path is gone."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from orchestrator.config import DatabaseConfig
from orchestrator.errors import ConnectError
from orchestrator.pg.conn import StatementDeadline, connect
from orchestrator.sandbox.pgcluster import PgCluster
from tests.faults.netns import IsolatedAddress
from tests.pg_helpers import module_cluster, superuser_config

cluster = module_cluster("bh", 17, "orch-bh-")


@pytest.fixture
def isolated(cluster: PgCluster) -> Iterator[IsolatedAddress]:
    with IsolatedAddress((cluster.host, cluster.port)) as address:
        yield address


def _db(address: IsolatedAddress, pg: PgCluster, monkeypatch: pytest.MonkeyPatch,
        **kw: object) -> DatabaseConfig:
    return superuser_config(pg, monkeypatch, "ORCH_BH_PW",
                            address=(address.host, address.port), **kw)


def test_a_statement_on_a_blackholed_path_ends_at_its_deadline_and_the_path_comes_back(
        cluster: PgCluster, isolated: IsolatedAddress, monkeypatch: pytest.MonkeyPatch) -> None:
    db = _db(isolated, cluster, monkeypatch, statement_deadline=3)
    with connect(db, role="green", attempts=1) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with isolated.blackholed():
            started = time.monotonic()
            with pytest.raises(StatementDeadline, match="within 3s"):
                conn.execute("SELECT 1")
            took = time.monotonic() - started
    assert 2.5 < took < 6.0, took
    # The path is back: a new connection answers (the first attempt right after the
    # link comes up may be reset, as on a real network: the usual retries apply).
    with connect(db, role="green") as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_connecting_through_a_blackholed_path_ends_at_connect_timeout(
        cluster: PgCluster, isolated: IsolatedAddress, monkeypatch: pytest.MonkeyPatch) -> None:
    db = _db(isolated, cluster, monkeypatch, connect_timeout=2)
    with isolated.blackholed():
        started = time.monotonic()
        with pytest.raises(ConnectError, match="cannot connect"):
            connect(db, role="green", attempts=1)
        assert time.monotonic() - started < 6.0
