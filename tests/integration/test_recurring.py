"""Recurring releases with no edits: the CronJob's exact command, run twice against
the demo sandbox with a database pair and no release name, releases A -> B and then
B -> A, both promoted, every acknowledged write kept; HAProxy follows the live side."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from orchestrator.routers.base import Weights
from orchestrator.sandbox.loadgen import LoadGenerator, LoadReport
from orchestrator.sandbox.stack import APP_DATABASE, Sandbox
from tests.conftest import short_tmpdir
from tests.integration import helpers as h

pytestmark = pytest.mark.slow

STATE_DB = "orchestrate_state"


@pytest.fixture(scope="module")
def sandbox_17_17() -> Iterator[Sandbox]:
    # The same major on both sides: the second run releases back onto the first one.
    with short_tmpdir("orch-rec-") as base, Sandbox(base, blue_major=17, green_major=17) as sb:
        yield sb


def cronjob_args(config: Path) -> list[str]:
    """The CronJob's command (k8s/cronjob.yaml), with the config at ``config``."""
    doc = yaml.safe_load((h.REPO / "k8s" / "cronjob.yaml").read_text())
    (container,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["orchestrate"]
    args = list(container["args"])
    args[args.index("--config") + 1] = str(config)
    return args


def pair_config(sb: Sandbox) -> Path:
    raw: dict[str, Any] = sb.release_config(canary=h.FAST_CANARY, rollback={"window": "2s"})
    raw["release"].pop("name")
    state = {**raw["blue"], "dbname": STATE_DB}
    state.pop("app_role")
    raw["pair"] = {"a": raw.pop("blue"), "b": raw.pop("green")}
    raw["state"] = {"database": state}
    path = sb.base_dir / "recurring.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def state_rows(sb: Sandbox) -> tuple[list[tuple[Any, ...]], tuple[Any, ...] | None]:
    with psycopg.connect(sb.blue.conninfo(STATE_DB), autocommit=True) as conn:
        releases = conn.execute("SELECT name, state, status FROM orchestrate.releases "
                                "ORDER BY started_at").fetchall()
        live = conn.execute("SELECT live, previous, release FROM orchestrate.live_side"
                            ).fetchone()
    return releases, live


def acked_on(dsn: str, load: LoadReport) -> set[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return set(load.acked_order_ids) - h.order_ids(conn)


def test_cronjob_command_twice_releases_a_to_b_then_b_to_a(sandbox_17_17: Sandbox) -> None:
    sb = sandbox_17_17
    sb.blue.create_database(STATE_DB)
    config = pair_config(sb)
    args = cronjob_args(config)
    assert "--wait-window" in args
    load = LoadGenerator(sb.haproxy.url, rate=40.0, write_ratio=0.5)
    load.start()
    try:
        first = h.run_cli(sb, *args, timeout=400)
        assert first.code == 0, first.err[-4000:]
        after_first = load.report()
        releases, live = state_rows(sb)
        assert releases == [("shop-v2", "done", "promoted")]
        assert live == ("b", "a", "shop-v2")
        # HAProxy's server "green" fronts b's application: all traffic is there.
        assert h.router(sb).current() == Weights.green_at(100)
        assert acked_on(sb.green.conninfo(APP_DATABASE), after_first) == set()

        second = h.run_cli(sb, *args, timeout=400)
        assert second.code == 0, second.err[-4000:]
        after_second = load.report()
        releases, live = state_rows(sb)
        assert [r[1:] for r in releases] == [("done", "promoted"), ("done", "promoted")]
        name = releases[1][0]
        assert name.startswith("shop-v2-") and name.endswith("z")
        assert live == ("a", "b", name)
        # Back on server "blue", in front of a, whose database was recreated.
        assert h.router(sb).current() == Weights.green_at(0)
        assert "pair green recreated" in second.err
    finally:
        report = load.stop()
    assert acked_on(sb.blue.conninfo(APP_DATABASE), report) == set()
    assert report.acked_order_ids and len(after_second.acked_order_ids) > len(
        after_first.acked_order_ids)
    assert h.replication_leftovers(sb) == []
    assert report.max_write_gap_s < 5.0
    print(f"recurring: {len(report.acked_order_ids)} acknowledged writes, 0 lost; "
          f"errors {report.errors}; max write gap {report.max_write_gap_s:.2f}s")


def test_green_taking_traffic_is_refused_and_nothing_changes(sandbox_17_17: Sandbox) -> None:
    """Someone moved traffic by hand: b (green for the next run) takes 10 %."""
    sb = sandbox_17_17
    config = pair_config(sb)
    before, live = state_rows(sb)
    assert live is not None and live[0] == "a"
    h.router(sb).set_weights(Weights.green_at(10))
    try:
        result = h.run_cli(sb, *cronjob_args(config), timeout=120)
        assert result.code == 2, result.err[-3000:]
        assert "takes 10% of the traffic" in result.err
        assert "nothing was changed" in result.err
        assert state_rows(sb) == (before, live)
        with psycopg.connect(sb.green.conninfo(APP_DATABASE), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] > 0
    finally:
        h.router(sb).set_weights(Weights.green_at(0))
