"""One real PostgreSQL cluster in a short temporary directory, and a superuser
DatabaseConfig for it, for the test modules that each start their own cluster."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from orchestrator.config import DatabaseConfig, SecretRef
from orchestrator.sandbox.pgcluster import PgCluster
from tests.conftest import short_tmpdir


@contextmanager
def tmp_cluster(name: str, major: int, prefix: str) -> Iterator[PgCluster]:
    """A started cluster under a fresh /tmp directory (short: socket paths), stopped
    and removed on exit."""
    with short_tmpdir(prefix) as base, PgCluster(name, major, base) as pg:
        yield pg


def module_cluster(name: str, major: int, prefix: str) -> Callable[[], Iterator[PgCluster]]:
    """A module-scoped fixture of one ``tmp_cluster``: ``cluster = module_cluster(...)``."""
    @pytest.fixture(scope="module")
    def cluster() -> Iterator[PgCluster]:
        with tmp_cluster(name, major, prefix) as pg:
            yield pg
    return cluster


def superuser_config(pg: PgCluster, monkeypatch: pytest.MonkeyPatch, env: str, *,
                     address: tuple[str, int] | None = None, **kw: Any) -> DatabaseConfig:
    """The ``postgres`` database of ``pg`` as its superuser, the password passed in
    the environment variable ``env``; ``address`` is another way to the server (a
    proxy, an isolated path), the cluster's own address by default."""
    monkeypatch.setenv(env, pg.password)
    host, port = address if address is not None else (pg.host, pg.port)
    return DatabaseConfig(host=host, port=port, dbname="postgres", user=pg.superuser,
                          password=SecretRef(env=env), sslmode="disable", **kw)
