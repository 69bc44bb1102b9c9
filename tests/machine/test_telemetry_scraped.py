"""A real Prometheus scrapes the orchestrator's metrics while the machine runs a
release in process, and a real Pushgateway takes its pushes."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from orchestrator.events import Events
from orchestrator.record import State, Status
from orchestrator.routers.base import Weights
from orchestrator.sandbox.ports import free_port
from orchestrator.sandbox.process import wait_until
from orchestrator.sandbox.prometheus import PrometheusServer
from orchestrator.telemetry import ProcessTelemetry, ReleaseMetrics, sink_for
from tests.conftest import short_tmpdir
from tests.machine.conftest import SWITCHED_OVER, FakeSleep, Pair

PUSHGATEWAY = Path("/usr/bin/prometheus-pushgateway")


@pytest.fixture
def scraped() -> Iterator[tuple[ProcessTelemetry, PrometheusServer]]:
    telemetry = ProcessTelemetry(ReleaseMetrics(CollectorRegistry()))
    port = free_port()
    with short_tmpdir("orch-tm-") as base:
        prom = PrometheusServer(base / "prometheus", scrape_interval="1s")
        prom.add_target("orchestrate", f"127.0.0.1:{port}")
        http = telemetry.serve(f"127.0.0.1:{port}")
        assert http is not None and http.port == port
        try:
            with prom:
                yield telemetry, prom
        finally:
            telemetry.stop()


def test_prometheus_scrapes_the_state_during_a_release(
        pair: Pair, scraped: tuple[ProcessTelemetry, PrometheusServer]) -> None:
    telemetry, prom = scraped
    cfg = pair.config(canary={"on_inconclusive": "pause"})
    pair.seed(cfg, State.CANARY, **{**SWITCHED_OVER, "stage": 1})
    pair.router.weights = Weights.green_at(100)
    release = cfg.release.name
    seen: list[float] = []
    sleep = FakeSleep(limit=100_000)
    other = pair.store(cfg)

    def scraped_mid_canary() -> None:
        # The first wait of the canary: Prometheus must see it running before it goes on.
        if not seen:
            started = time.monotonic()
            prom.wait_for_series(
                f'orchestrate_release_state{{release="{release}",state="canary"}} == 1',
                timeout=30)
            seen.append(time.monotonic() - started)
        row = other.get(release)
        assert row is not None
        if row.facts.awaiting_approval is not None and row.approved_stage is None:
            other.approve_stage(release, row.facts.awaiting_approval)

    sleep.each = scraped_mid_canary
    events = Events([pair.events, sink_for(cfg, telemetry)])
    from orchestrator.machine import Release

    outcome = Release(cfg, store=pair.store(cfg), router=pair.router, metrics=pair.metrics,
                      sleep=sleep, events=events).run()
    assert (outcome.state, outcome.status) == (State.WINDOW, Status.PROMOTED)
    assert seen, "the canary never waited, so nothing was scraped during it"

    prom.wait_for_series(
        f'orchestrate_release_state{{release="{release}",state="window"}} == 1', timeout=30)
    prom.wait_for_series(
        f'orchestrate_release_status{{release="{release}",status="promoted"}} == 1', timeout=30)
    [canary] = prom.query('orchestrate_state_duration_seconds_count{state="canary"}')
    assert float(canary["value"][1]) == 1
    [buckets] = prom.query(
        'sum(orchestrate_state_duration_seconds_bucket{le="+Inf"})')
    assert float(buckets["value"][1]) == 2  # canary and promote
    [stage] = prom.query(f'orchestrate_release_stage{{release="{release}"}}')
    assert float(stage["value"][1]) == 2
    [closes] = prom.query(
        f'orchestrate_rollback_window_close_timestamp_seconds{{release="{release}"}}'
        " - time()")
    assert 3000 < float(closes["value"][1]) <= 3600


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


def test_a_release_pushes_to_a_real_pushgateway(pair: Pair) -> None:
    port = free_port()
    with short_tmpdir("orch-pg-") as base:
        log = (base / "pushgateway.log").open("w")
        gateway = subprocess.Popen(
            [str(PUSHGATEWAY), f"--web.listen-address=127.0.0.1:{port}",
             f"--persistence.file={base / 'persist'}"], stdout=log, stderr=log)
        try:
            wait_until(lambda: _ready(port), what="the Pushgateway", timeout=30,
                       interval=0.1)
            cfg = pair.config(canary={"checks": [], "allow_unanalysed": True,
                                      "stages": [{"weight": 100, "duration": 0}]},
                              telemetry={"pushgateway": {
                                  "url": f"http://127.0.0.1:{port}", "job": "orch-test",
                                  "timeout": "2s"}})
            pair.seed(cfg, State.CANARY, **{**SWITCHED_OVER, "stage": 0})
            pair.router.weights = Weights.green_at(100)
            telemetry = ProcessTelemetry(ReleaseMetrics(CollectorRegistry()))
            from orchestrator.machine import Release

            outcome = Release(cfg, store=pair.store(cfg), router=pair.router,
                              metrics=pair.metrics, sleep=FakeSleep(),
                              events=Events([sink_for(cfg, telemetry)])).run()
            assert outcome.status == Status.PROMOTED
            # run() closed the sink: the final push is in the gateway.
            text = _get(f"http://127.0.0.1:{port}/metrics")
            name = cfg.release.name
            line = (f'orchestrate_release_status{{instance="",job="orch-test",'
                    f'release="{name}",status="promoted"}} 1')
            assert line in text
            groups = json.loads(_get(f"http://127.0.0.1:{port}/api/v1/metrics"))["data"]
            assert [g["labels"] for g in groups] == [{"job": "orch-test", "release": name}]
        finally:
            gateway.terminate()
            gateway.wait(10)
            log.close()
    assert gateway.returncode is not None  # ours, stopped by its PID


def _ready(port: int) -> bool:
    try:
        return "OK" in _get(f"http://127.0.0.1:{port}/-/ready")
    except OSError:
        return False


def test_leftover_slots_are_counted_at_scrape_time(pair: Pair) -> None:
    import psycopg

    from orchestrator.pg.replication import SLOT_PREFIX

    cfg = pair.config()
    telemetry = ProcessTelemetry(ReleaseMetrics(CollectorRegistry()))
    telemetry.watch_slots(cfg)
    registry = telemetry.metrics.registry
    slot = f"{SLOT_PREFIX}leftover_{pair.name.replace('-', '_')}"
    with psycopg.connect(pair.cluster.conninfo(pair.blue), autocommit=True) as blue:
        blue.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        try:
            # One cluster holds both databases: each side sees the cluster's slots.
            assert registry.get_sample_value("orchestrate_leftover_replication_slots",
                                             {"side": "blue"}) == 1
            assert registry.get_sample_value(
                "orchestrate_leftover_replication_slot_retained_bytes", {"side": "blue"}) >= 0
        finally:
            blue.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    assert registry.get_sample_value("orchestrate_leftover_replication_slots",
                                     {"side": "blue"}) == 0
