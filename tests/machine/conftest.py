"""In-process fixtures for the state machine: one real PostgreSQL cluster per module,
a fresh blue and green database (two databases of that cluster) per test, the fake
router and fake metrics, and a sleep that never sleeps.

The machine is built through its public constructor only; a test puts the release
row where it starts from with the store's own methods (``seed``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from orchestrator import interrupts
from orchestrator.canary.metrics import FakeMetrics
from orchestrator.config import ReleaseConfig, parse_config
from orchestrator.events import Events, EventSink, RecordingSink
from orchestrator.machine import Release, config_digest
from orchestrator.record import Facts, State, Status
from orchestrator.routers.base import Weights
from orchestrator.routers.fake import FakeRouter
from orchestrator.sandbox.pgcluster import PgCluster
from orchestrator.sandbox.stack import deep_merge
from orchestrator.store import ReleaseRow, StateStore
from tests.conftest import short_tmpdir
from tests.pg_helpers import module_cluster

PASSWORD_ENV = "ORCH_MACHINE_PW"
_numbers = itertools.count()


cluster = module_cluster("machine", 15, "orch-m-")


def _admin(pg: PgCluster) -> psycopg.Connection[Any]:
    return psycopg.connect(pg.conninfo(), autocommit=True)


def drop_database(pg: PgCluster, name: str) -> None:
    with _admin(pg) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


class Stop(BaseException):
    """Raised by a fake sleep to end a run where a person would press Ctrl-C (not an
    ``Exception``: the machine must not take it for a failure of the state)."""


@dataclass
class FakeSleep:
    """Records every sleep and advances a fake clock instead of sleeping. ``on(n)``
    runs an action at the n-th call (1-based), e.g. a rollback request made by
    another process while the machine waits; ``each`` runs at every call. Past
    ``limit`` calls it raises ``Stop``: a test never hangs on a wait that lasts."""

    clock: float = 0.0
    calls: list[float] = field(default_factory=list)
    actions: dict[int, Callable[[], None]] = field(default_factory=dict)
    each: Callable[[], None] | None = None
    limit: int = 10_000

    def on(self, call: int, action: Callable[[], None]) -> None:
        self.actions[call] = action

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.clock += seconds
        if len(self.calls) > self.limit:
            raise Stop(f"slept {self.limit} times: the machine is waiting forever")
        if self.each is not None:
            self.each()
        action = self.actions.get(len(self.calls))
        if action is not None:
            action()


@dataclass
class Pair:
    """A blue and a green database of the module's cluster, and what talks to them."""

    cluster: PgCluster
    blue: str
    green: str
    base: Path
    name: str
    router: FakeRouter = field(default_factory=FakeRouter)
    metrics: FakeMetrics = field(default_factory=FakeMetrics)
    events: RecordingSink = field(default_factory=RecordingSink)
    stores: list[StateStore] = field(default_factory=list)

    def config(self, **overrides: Any) -> ReleaseConfig:
        def database(dbname: str) -> dict[str, Any]:
            return self.cluster.database_section(dbname, PASSWORD_ENV)

        raw: dict[str, Any] = {
            "release": {"name": self.name, "service": "app", "version": "v2"},
            "blue": database(self.blue),
            "green": database(self.green),
            "migrations": {"dir": str(self.base / "migrations")},
            "backup": {"dir": str(self.base / "backups")},
            "canary": {
                "interval": "10ms",
                "window": "1m",
                "stages": [
                    {"weight": 0, "duration": 0},
                    {"weight": 100, "duration": "5s"},
                ],
                "checks": [{"name": "error-rate", "query": "app_errors{colour='$colour'}",
                            "max": 0.05, "inconclusive_limit": 1}],
                "probe": {"interval": "100ms", "timeout": "2s"},
            },
            "prometheus": {"url": "http://127.0.0.1:9"},
            "router": {"kind": "fake"},
            "rollback": {"window": "1h"},
        }
        return parse_config(deep_merge(raw, overrides), base_dir=self.base)

    def store(self, cfg: ReleaseConfig) -> StateStore:
        store = StateStore.for_config(cfg)
        self.stores.append(store)
        return store

    def release(self, cfg: ReleaseConfig, *, sleep: FakeSleep,
                wait_window: bool = False, stop: interrupts.Stop | None = None,
                sinks: Sequence[EventSink] = ()) -> Release:
        """``sinks``: listeners besides ``events`` (a notification sink, say)."""
        return Release(cfg, store=self.store(cfg), router=self.router, metrics=self.metrics,
                       sleep=sleep, wait_window=wait_window,
                       events=Events([self.events, *sinks]), stop=stop)

    def seed(self, cfg: ReleaseConfig, state: State, *, status: Status = Status.RUNNING,
             **facts: Any) -> StateStore:
        """The release row as a run that got to ``state`` (with ``facts``) left it."""
        store = self.store(cfg)
        store.ensure_schema()
        sha, data = config_digest(cfg)
        store.create(cfg.release.name, state, sha, data)
        store.set_state(cfg.release.name, state, status=status)
        store.merge_facts(cfg.release.name, Facts.model_validate(facts))
        return store

    def row(self, cfg: ReleaseConfig) -> ReleaseRow:
        row = self.store(cfg).get(cfg.release.name)
        assert row is not None
        return row

    def log(self, cfg: ReleaseConfig) -> list[str]:
        return [e["message"] for e in self.store(cfg).log_entries(cfg.release.name, 200)]


# What a run that switched over (PostgreSQL 15: switchover mode) has recorded.
SWITCHED_OVER: dict[str, Any] = {
    "mode": "switchover", "majors": {"blue": 15, "green": 15}, "green_writable": True,
    "switched_over": True, "forward_dropped": True, "weights": Weights.green_at(100),
    "weights_target": Weights.green_at(100),
}


@pytest.fixture
def pair(cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pair]:
    monkeypatch.setenv(PASSWORD_ENV, cluster.password)
    n = next(_numbers)
    blue, green = f"blue_{n}", f"green_{n}"
    cluster.create_database(blue)
    cluster.create_database(green)
    with short_tmpdir("orch-mc-") as base:
        (base / "migrations").mkdir()
        made = Pair(cluster, blue, green, base, name=f"rel-{n}")
        try:
            yield made
        finally:
            for store in made.stores:
                store.close()
            drop_database(cluster, blue)
            drop_database(cluster, green)
