"""A database pair on a real PostgreSQL: the live side recorded with done, the name a
run takes, and green recreated only when nothing says it is in use."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from orchestrator import naming, pairing
from orchestrator.config import ReleaseConfig, parse_config
from orchestrator.errors import StateUnavailable
from orchestrator.pg import replication
from orchestrator.record import State, Status, config_digest
from orchestrator.routers.base import Weights
from orchestrator.routers.fake import FakeRouter
from orchestrator.sandbox.pgcluster import PgCluster
from orchestrator.store import StateStore
from tests.conftest import short_tmpdir
from tests.machine.conftest import PASSWORD_ENV, drop_database

_numbers = itertools.count()


@dataclass
class Dbs:
    cluster: PgCluster
    a: str
    b: str
    state: str
    base: Path

    def config(self, **release: Any) -> ReleaseConfig:
        def database(dbname: str) -> dict[str, Any]:
            return self.cluster.database_section(dbname, PASSWORD_ENV)

        raw = {"release": {"service": "shop", "version": "v7", **release},
               "pair": {"a": database(self.a), "b": database(self.b)},
               "state": {"database": database(self.state)},
               "router": {"kind": "fake"},
               "canary": {"checks": [], "allow_unanalysed": True}}
        return parse_config(raw, base_dir=self.base)

    def conn(self, dbname: str) -> psycopg.Connection[Any]:
        return psycopg.connect(self.cluster.conninfo(dbname), autocommit=True)


@pytest.fixture
def dbs(cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Dbs]:
    monkeypatch.setenv(PASSWORD_ENV, cluster.password)
    n = next(_numbers)
    made = Dbs(cluster, f"pa_{n}", f"pb_{n}", f"pstate_{n}", Path())
    for name in (made.a, made.b, made.state):
        cluster.create_database(name)
    with short_tmpdir("orch-pair-") as base:
        made.base = base
        try:
            yield made
        finally:
            for name in (made.a, made.b):
                with made.conn("postgres") as c:
                    exists = c.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                       (name,)).fetchone()
                if exists:
                    with made.conn(name) as c:
                        for (sub,) in c.execute("SELECT subname FROM pg_subscription").fetchall():
                            c.execute(sql.SQL("DROP SUBSCRIPTION {}").format(
                                sql.Identifier(sub)))
            for name in (made.a, made.b, made.state):
                drop_database(cluster, name)


def store_for(cfg: ReleaseConfig) -> StateStore:
    store = StateStore.for_config(cfg)
    store.ensure_schema()
    return store


def finish(store: StateStore, cfg: ReleaseConfig, state: State = State.DONE) -> None:
    """A release of ``cfg`` recorded as it ends: done (promoted) or rolled back."""
    sha, data = config_digest(cfg)
    store.create(cfg.release.name, State.BACKUP, sha, data)
    status = Status.PROMOTED if state == State.DONE else Status.ROLLED_BACK
    store.set_state(cfg.release.name, state, status=status)


def test_done_records_green_as_live_and_the_next_run_swaps(dbs: Dbs) -> None:
    loaded = dbs.config()
    store = store_for(loaded)
    first = pairing.resolve(loaded, store, starting=True)
    assert (first.blue.dbname, first.green.dbname) == (dbs.a, dbs.b)
    assert first.release.name == "shop-v7"
    assert store.live_on_done == "b"
    finish(store, first)
    assert store.live_side() == ("b", "a", "shop-v7")

    store2 = StateStore.for_config(loaded)
    second = pairing.resolve(loaded, store2, starting=True, )
    assert (second.blue.dbname, second.green.dbname) == (dbs.b, dbs.a)
    assert second.release.name.startswith("shop-v7-") and second.release.name != "shop-v7"
    assert store2.live_on_done == "a"
    finish(store2, second)
    assert store2.live_side() == ("a", "b", second.release.name)
    store.close()
    store2.close()


def test_a_rolled_back_release_leaves_the_live_side(dbs: Dbs) -> None:
    loaded = dbs.config()
    store = store_for(loaded)
    first = pairing.resolve(loaded, store, starting=True)
    finish(store, first, State.ROLLED_BACK)
    assert store.live_side() is None
    again = pairing.resolve(loaded, StateStore.for_config(loaded), starting=True)
    assert again.blue.dbname == dbs.a
    store.close()


def test_done_and_live_side_commit_together(dbs: Dbs) -> None:
    """A record that cannot take the live side keeps the release out of done, so a
    rerun repeats cleanup -> done instead of releasing onto the live database."""
    loaded = dbs.config()
    store = store_for(loaded)
    cfg = pairing.resolve(loaded, store, starting=True)
    sha, data = config_digest(cfg)
    store.create(cfg.release.name, State.CLEANUP, sha, data)
    with dbs.conn(dbs.state) as c:
        c.execute("DROP TABLE orchestrate.live_side")
    with pytest.raises((psycopg.Error, StateUnavailable)):
        store.set_state(cfg.release.name, State.DONE, status=Status.PROMOTED)
    store.close()
    row = StateStore.for_config(cfg).get(cfg.release.name)
    assert row is not None and row.state == State.CLEANUP


def test_a_rerun_continues_the_unfinished_release_by_name(dbs: Dbs) -> None:
    loaded = dbs.config()
    store = store_for(loaded)
    finish(store, pairing.resolve(loaded, store, starting=True))
    later = datetime(2026, 3, 1, 3, 0, tzinfo=UTC)
    cfg = pairing.resolve(loaded, store, starting=True)
    sha, data = config_digest(cfg)
    store.create(cfg.release.name, State.CANARY, sha, data)
    # Any later run (another second, another pod) finds it, with the same digest.
    for _ in range(2):
        again = pairing.resolve(loaded, StateStore.for_config(loaded), starting=True)
        assert again.release.name == cfg.release.name
        assert config_digest(again)[0] == sha
    assert naming.release_name(loaded, store, starting=True, now=later) == cfg.release.name
    # A name in the config always wins.
    named = dbs.config(name="by-hand")
    assert naming.release_name(named, store, starting=True) == "by-hand"
    store.close()


def _leave_previous_release(dbs: Dbs) -> tuple[ReleaseConfig, StateStore]:
    """Release shop-v7 (a -> b) is done: a still holds the old data; the next run's
    config has blue = b, green = a."""
    loaded = dbs.config()
    store = store_for(loaded)
    finish(store, pairing.resolve(loaded, store, starting=True))
    with dbs.conn(dbs.a) as c:
        c.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    cfg = pairing.resolve(loaded, store, starting=True)
    assert cfg.green.dbname == dbs.a
    return cfg, store


def _exists(dbs: Dbs, dbname: str) -> bool:
    with dbs.conn("postgres") as c:
        return c.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                         (dbname,)).fetchone() is not None


def test_green_left_by_a_done_release_is_dropped(dbs: Dbs) -> None:
    cfg, store = _leave_previous_release(dbs)
    # The previous release's own publication is ours: dropped with it.
    with dbs.conn(dbs.a) as c:
        c.execute(sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES").format(
            sql.Identifier(replication.reverse("shop-v7").publication)))
    assert pairing.prepare_green(cfg, store, FakeRouter(Weights.green_at(0))) is True
    assert not _exists(dbs, dbs.a)
    assert _exists(dbs, dbs.b)
    store.close()


def test_green_taking_traffic_is_refused(dbs: Dbs) -> None:
    cfg, store = _leave_previous_release(dbs)
    with pytest.raises(pairing.GreenInUse, match=r"takes 30% of the traffic"):
        pairing.prepare_green(cfg, store, FakeRouter(Weights.green_at(30)))
    assert _exists(dbs, dbs.a)
    store.close()


def test_green_holding_a_foreign_subscription_is_refused(dbs: Dbs) -> None:
    cfg, store = _leave_previous_release(dbs)
    with dbs.conn(dbs.a) as c:
        c.execute("CREATE SUBSCRIPTION reporting_feed CONNECTION 'host=127.0.0.1 port=9' "
                  "PUBLICATION feed WITH (connect = false, slot_name = NONE, enabled = false)")
    with pytest.raises(pairing.GreenInUse, match="subscription reporting_feed"):
        pairing.prepare_green(cfg, store, FakeRouter(Weights.green_at(0)))
    with dbs.conn(dbs.a) as c:
        assert c.execute("SELECT count(*) FROM orders").fetchone() == (0,)
    store.close()


def test_green_holding_a_foreign_publication_is_refused(dbs: Dbs) -> None:
    cfg, store = _leave_previous_release(dbs)
    with dbs.conn(dbs.a) as c:
        c.execute("CREATE PUBLICATION analytics FOR ALL TABLES")
    with pytest.raises(pairing.GreenInUse, match="publication analytics"):
        pairing.prepare_green(cfg, store, FakeRouter(Weights.green_at(0)))
    assert _exists(dbs, dbs.a)
    store.close()


def test_tables_no_release_of_ours_left_are_refused(dbs: Dbs) -> None:
    """No record: the first run finds b holding data. It is not ours to drop."""
    loaded = dbs.config()
    store = store_for(loaded)
    with dbs.conn(dbs.b) as c:
        c.execute("CREATE TABLE invoices (id int)")
    cfg = pairing.resolve(loaded, store, starting=True)
    with pytest.raises(pairing.GreenInUse, match=r"already holds tables \(public.invoices\)"):
        pairing.prepare_green(cfg, store, FakeRouter())
    assert _exists(dbs, dbs.b)
    store.close()


def test_an_unfinished_release_owns_green(dbs: Dbs) -> None:
    cfg, store = _leave_previous_release(dbs)
    sha, data = config_digest(cfg)
    store.create(cfg.release.name, State.PROVISION, sha, data)
    assert pairing.prepare_green(cfg, store, FakeRouter(Weights.green_at(0))) is False
    assert _exists(dbs, dbs.a)
    store.close()


def test_serve_follows_the_release_of_the_day_and_its_sides(dbs: Dbs) -> None:
    """`orchestrate serve` left running across two CronJob runs: an alert about the
    second run rolls back that one, with that run's blue and green."""
    import json

    from orchestrator.server import parse_payload
    from orchestrator.server.run import build_receiver

    loaded = dbs.config()
    store = store_for(loaded)
    first = pairing.resolve(loaded, store, starting=True)
    finish(store, first)  # done: b is live now
    rolled: list[str] = []
    receiver = build_receiver(pairing.resolve(loaded, StateStore.for_config(loaded),
                                              starting=False),
                              "t" * 40, loaded=loaded, run_rollback=rolled.append)
    assert receiver.name == "shop-v7"
    second = pairing.resolve(loaded, StateStore.for_config(loaded), starting=True)
    sha, data = config_digest(second)
    store.create(second.release.name, State.CANARY, sha, data)
    body = json.dumps({"version": "4", "status": "firing", "alerts": [{
        "status": "firing", "labels": {"alertname": "GreenErrors",
                                       "release": second.release.name},
        "annotations": {"summary": "green answers 5xx"},
        "startsAt": datetime.now(UTC).isoformat(), "endsAt": "0001-01-01T00:00:00Z"}]})
    try:
        decision = receiver.handle(parse_payload(body.encode()))
        receiver.wait(10)
    finally:
        receiver.close()
    assert decision.code == 202, decision.body
    assert receiver.name == second.release.name
    assert (receiver.cfg.blue.dbname, receiver.cfg.green.dbname) == (dbs.b, dbs.a)
    assert rolled == ["alert GreenErrors firing: green answers 5xx"]
    row = store.get(second.release.name)
    assert row is not None and row.rollback_requested == rolled[0]


def test_a_green_that_may_not_be_created_is_not_dropped(dbs: Dbs) -> None:
    cfg, store = _leave_previous_release(dbs)
    fixed = cfg.model_copy(update={"green": cfg.green.model_copy(
        update={"create_database": False})})
    with pytest.raises(pairing.GreenInUse, match="create_database: false"):
        pairing.prepare_green(fixed, store, FakeRouter(Weights.green_at(0)))
    assert _exists(dbs, dbs.a)
    store.close()
