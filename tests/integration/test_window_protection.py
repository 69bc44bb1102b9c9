"""Protection after promotion and lag that fails a stage, on real servers.

* In the rollback window, a regression on green fires a real Prometheus alerting
  rule; Debian's Alertmanager delivers it (bearer token from its ``http_config``) to
  ``orchestrate serve``; the orchestrator waiting in the window rolls back with every
  acknowledged write on blue.
* A long transaction on green holds a lock the subscription's apply worker needs:
  the forward path lags in bytes and seconds, and the stage fails on it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from orchestrator.routers.base import Weights
from orchestrator.sandbox.loadgen import LoadGenerator
from orchestrator.sandbox.ports import free_port
from orchestrator.sandbox.prometheus import PrometheusServer
from orchestrator.sandbox.stack import Sandbox
from tests.integration import helpers as h
from tests.integration.test_canary_analysis import Receiver, log_messages

pytestmark = pytest.mark.slow

TOKEN = "it-token-5b0f8d3c2a6e41f7"


class RulingPrometheus(PrometheusServer):
    """A second Prometheus with an alerting rule and an Alertmanager to send it to."""

    def __init__(self, base: Path, rules: dict[str, Any], alertmanager: str) -> None:
        super().__init__(base)
        self.rules, self.alertmanager = rules, alertmanager

    def render_config(self) -> dict[str, Any]:
        rules = self.base_dir / "rules.yml"
        self.base_dir.mkdir(parents=True, exist_ok=True)
        rules.write_text(yaml.safe_dump(self.rules))
        return {**super().render_config(), "rule_files": [str(rules)], "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [self.alertmanager]}]}]}}


@pytest.mark.skipif(h.ALERTMANAGER is None, reason="Debian's prometheus-alertmanager is needed")
def test_an_alert_from_a_real_alertmanager_rolls_back_inside_the_window(
        sandbox_16_17: Sandbox, tmp_path: Path) -> None:
    sb = sandbox_16_17
    h.reset(sb)
    name = "window-alert"
    token_file = sb.base_dir / "webhook-token"
    token_file.write_text(TOKEN + "\n")
    cfg = h.write_config(sb, name, rollback={"window": "5m"}, canary={
        "interval": "1s", "window": "10s", "checks": [], "allow_unanalysed": True,
        "stages": [{"weight": 0, "duration": "1s"}, {"weight": 100, "duration": "2s"}]},
        alerts={"token": {"file": str(token_file)}})
    receiver = Receiver(sb, cfg, tmp_path / "serve.log")
    am_port = free_port()
    am = h.alertmanager(tmp_path, am_port, f"{receiver.url}/alertmanager", token_file)
    prom = RulingPrometheus(tmp_path / "prom", {"groups": [{"name": "canary", "rules": [{
        "alert": "GreenErrorRate",
        "expr": 'sum(rate(demo_http_requests_total{colour="green",code=~"5.."}[5s])) / '
                'sum(rate(demo_http_requests_total{colour="green"}[5s])) > 0.2',
        "labels": {"severity": "critical", "release": name},
        "annotations": {"summary": "green answers 5xx"}}]}]}, f"127.0.0.1:{am_port}")
    prom.add_target("demo", f"127.0.0.1:{sb.app_ports['green']}", {"colour": "green"})
    load = LoadGenerator(sb.haproxy.url, rate=60.0, write_ratio=0.5)
    log = tmp_path / "release.log"
    proc = None
    try:
        am.start()
        assert h.wait_for(lambda: h.alertmanager_ready(am_port), timeout=30)
        prom.start()
        load.start()
        proc = h.spawn_cli(sb, "release", "--config", str(cfg), "--wait-window", log=log)

        def in_window() -> bool:
            row = h.release_row(sb, name)
            return bool(row and row["state"] == "window")

        assert h.wait_for(in_window, timeout=180), log.read_text()[-3000:]
        assert h.wait_for(lambda: load.report().acked_by_colour.get("green", 0) > 20, timeout=30)
        # The regression shows after promotion, as they do.
        h.set_fault(sb, "green", fail_rate=1.0)
        assert h.wait_for(lambda: any("rollback requested by Alertmanager" in m
                                      for m in log_messages(sb, name)), timeout=60), (
            (tmp_path / "am.log").read_text()[-2000:] + receiver.log.read_text()[-2000:])
        requested = time.monotonic()
        assert h.wait_for(lambda: h.router(sb).current() == Weights.green_at(0), timeout=30,
                          interval=0.05)
        reacted = time.monotonic() - requested
        # The process waiting in the window did the rollback, and says so.
        assert proc.wait(timeout=90) == 1, log.read_text()[-3000:]
    finally:
        h.set_fault(sb, "green")
        if proc is not None and proc.poll() is None:
            proc.kill()
        report = load.stop()
        receiver.stop()
        prom.stop()
        am.stop()
    print(f"alert recorded -> 100 % on blue: {reacted:.2f}s")
    row = h.rolled_back_row(sb, name)
    assert row["facts"]["rollback_from"] == "window"
    assert "alert GreenErrorRate firing: green answers 5xx" in (row["error"] or "")
    h.assert_left_clean(sb, report)


def test_sustained_replication_lag_fails_the_stage(sandbox_16_17: Sandbox,
                                                   tmp_path: Path) -> None:
    sb = sandbox_16_17
    h.reset(sb)
    name = "lagging"
    # Bytes generous, seconds tight: replay_lag goes stale while the worker is stuck,
    # so only the slot's position standing still can say how long it has been.
    cfg = h.write_config(sb, name, sync={"max_lag_bytes": 100_000_000, "max_lag_seconds": "5s",
                                         "lag_failure_limit": 2},
                         canary={"interval": "1s", "window": "10s", "checks": [],
                                 "allow_unanalysed": True, "stages": [
                                   {"weight": 0, "duration": "60s"},
                                   {"weight": 100, "duration": "1s"}]})
    load = LoadGenerator(sb.haproxy.url, rate=60.0, write_ratio=0.5)
    log = tmp_path / "release.log"
    held = threading.Event()
    locker: psycopg.Connection[Any] | None = None
    proc = None
    try:
        load.start()
        proc = h.spawn_cli(sb, "release", "--config", str(cfg), log=log)
        assert h.wait_for(lambda: any(m.startswith("stage 1/2")
                                      for m in _messages(sb, name)), timeout=180), (
            log.read_text()[-3000:])
        # A DBA's long transaction on green: the apply worker waits on its lock while
        # blue goes on taking orders.
        locker = h.green_conn(sb)
        locker.autocommit = False
        locker.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        held.set()
        assert h.wait_for(lambda: any(m.startswith("rolling back") for m in _messages(sb, name)),
                          timeout=60), log.read_text()[-3000:]
        locker.rollback()
        assert proc.wait(timeout=120) == 1, log.read_text()[-3000:]
    finally:
        if locker is not None:
            locker.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
        report = load.stop()
    assert held.is_set()
    row = h.rolled_back_row(sb, name)
    error = row["error"] or ""
    assert "forward replication lag" in error and "in 2 checks in a row" in error, error
    assert "s > 5s" in error and "bytes" not in error, error
    h.assert_left_clean(sb, report)


def _messages(sb: Sandbox, name: str) -> list[str]:
    try:
        with h.blue_conn(sb) as conn:
            return [r[0] for r in conn.execute(
                "SELECT message FROM orchestrate.release_log WHERE release = %s ORDER BY id",
                (name,)).fetchall()]
    except psycopg.Error:
        return []
