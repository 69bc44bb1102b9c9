"""PostgreSQL 15 -> 17: without origin filtering on blue, green takes writes only at a
single switchover (blue fenced, green caught up to blue's last commit). Partial canary
stages are refused in preflight, plainly, unless the risk is accepted."""

from __future__ import annotations

import pytest

from orchestrator.routers.base import Weights
from orchestrator.sandbox.loadgen import LoadGenerator
from orchestrator.sandbox.stack import Sandbox
from tests.integration import helpers as h

pytestmark = pytest.mark.slow

ZERO_THEN_ALL = {
    "interval": "1s",
    "window": "10s",
    "stages": [{"weight": 0, "duration": "1s"}, {"weight": 100, "duration": "3s"}],
}


def test_partial_stages_refused_on_15_with_a_plain_reason(sandbox_15_17: Sandbox) -> None:
    sb = sandbox_15_17
    h.reset(sb)
    cfg = h.write_config(sb, "partial-on-15")
    result = h.run_cli(sb, "release", "--config", str(cfg))
    assert result.code == 2
    assert "would LOSE green's writes" in result.err
    assert "sync.accept_write_loss_risk" in result.err
    assert "nothing was changed" in result.err
    assert h.release_row(sb, "partial-on-15") is None
    with h.blue_conn(sb, "postgres") as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = 'shop'").fetchone()
    with h.green_conn(sb, "postgres") as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = 'shop'").fetchone() is None


def test_switchover_release_15_to_17_under_load(sandbox_15_17: Sandbox) -> None:
    sb = sandbox_15_17
    h.reset(sb)
    cfg = h.write_config(sb, "switch-15-17", canary=ZERO_THEN_ALL)
    load = LoadGenerator(sb.haproxy.url, rate=60.0, write_ratio=0.5)
    load.start()
    try:
        result = h.run_cli(sb, "release", "--config", str(cfg))
        assert result.code == 0, result.err[-3000:]
        promoted = load.report()
        row = h.release_row(sb, "switch-15-17")
        assert row is not None and row["status"] == "promoted"
        assert row["facts"]["mode"] == "switchover"
        assert row["facts"]["majors"] == {"blue": 15, "green": 17}
        assert row["facts"]["switchover_pause_s"] < 2.0
        assert h.router(sb).current() == Weights.green_at(100)
        with h.green_conn(sb) as g:
            assert g.execute("SHOW server_version_num").fetchone()[0].startswith("17")
            assert set(promoted.acked_order_ids) - h.order_ids(g) == set()
        back = h.run_cli(sb, "rollback", "--config", str(cfg))
        assert back.code == 0, back.err[-3000:]
    finally:
        report = load.stop()
    with h.blue_conn(sb) as b:
        assert set(report.acked_order_ids) - h.order_ids(b) == set()
    assert h.replication_leftovers(sb) == []
    assert report.max_write_gap_s < 3.0
