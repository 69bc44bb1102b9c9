"""PrometheusServer, the canary check queries against HAProxy's real exporter, and the
whole Sandbox stack."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING

import pytest

from orchestrator.config import parse_config
from orchestrator.sandbox.haproxy import HAProxyServer
from orchestrator.sandbox.process import SandboxError, http_get
from orchestrator.sandbox.prometheus import PrometheusServer, QueryRejected
from orchestrator.sandbox.stack import ERROR_RATE_QUERY, P99_LATENCY_QUERY, Sandbox

if TYPE_CHECKING:
    from tests.conftest import ColourServer


def _value(prom: PrometheusServer, promql: str, timeout: float = 20) -> float:
    """The query's single value, once it is a number (rates need two scrapes)."""
    deadline = time.monotonic() + timeout
    while True:
        result = prom.query(promql)
        if result:
            value = float(result[0]["value"][1])
            if not math.isnan(value):
                return value
        assert time.monotonic() < deadline, f"no value for {promql}"
        time.sleep(0.25)


@dataclass
class Scraped:
    prom: PrometheusServer
    proxy: HAProxyServer


@pytest.fixture(scope="module")
def scraped(
    module_sandbox_dir: Path, colour_server: Callable[..., ColourServer]
) -> Iterator[Scraped]:
    """One Prometheus for the module (each start costs ~5 s before the first scrape)
    scraping a tiny target and the exporter of an HAProxy whose green server fails."""
    tiny = colour_server("tiny", metrics_text='tiny_things_total{kind="x"} 3\n')
    blue, green = colour_server("blue"), colour_server("green", status=500)
    with HAProxyServer(
        module_sandbox_dir, blue.address, green.address, green_weight=50
    ) as proxy:
        prom = PrometheusServer(module_sandbox_dir / "prometheus", scrape_interval="1s")
        prom.add_target("tiny", tiny.address, {"colour": "blue"})
        prom.add_target("haproxy", proxy.metrics_address)
        with prom:
            yield Scraped(prom, proxy)
    assert not prom.running


def test_scrapes_a_target_and_waits_for_series(scraped: Scraped) -> None:
    prom = scraped.prom
    assert prom.url == f"http://127.0.0.1:{prom.port}"
    assert http_get("127.0.0.1", prom.port, "/-/ready")[0] == 200
    # Targets are fixed at start: adding one later would silently not be scraped.
    with pytest.raises(SandboxError, match="before starting"):
        prom.add_target("late", "127.0.0.1:1")
    started = time.monotonic()
    prom.wait_for_series('tiny_things_total{job="tiny",colour="blue",kind="x"}', timeout=20)
    assert time.monotonic() - started < 10
    [series] = prom.query("tiny_things_total")
    assert series["value"][1] == "3"

    with pytest.raises(SandboxError, match="no series"):
        prom.wait_for_series("tiny_things_total{kind='absent'}", timeout=1)
    started = time.monotonic()
    with pytest.raises(QueryRejected):
        prom.wait_for_series("sum(", timeout=10)
    assert time.monotonic() - started < 2  # bad PromQL fails at once


def test_error_rate_check_reads_haproxy_exporter(scraped: Scraped) -> None:
    prom, proxy = scraped.prom, scraped.proxy
    responses = 'haproxy_server_http_responses_total{proxy="app",server="green",code="5xx"}'
    prom.wait_for_series(responses, timeout=20)
    # Traffic after the first scrape, so that rate() sees the counters move.
    for _ in range(40):
        status, _ = http_get("127.0.0.1", proxy.port, "/x")
        assert status in {200, 500}
    green_rate = Template(ERROR_RATE_QUERY).substitute(colour="green", window="30s")
    blue_rate = Template(ERROR_RATE_QUERY).substitute(colour="blue", window="30s")
    assert _value(prom, green_rate) == pytest.approx(1.0)
    assert _value(prom, blue_rate) == pytest.approx(0.0)


def test_release_config_is_valid_and_merges_overrides(sandbox_dir: Path) -> None:
    sandbox = Sandbox(sandbox_dir)  # not started: ports and passwords exist already
    raw = sandbox.release_config(canary={"interval": "5s"}, rollback={"window": "1m"})
    cfg = parse_config(raw, base_dir=sandbox_dir)
    assert cfg.release.name == "demo-release"
    assert cfg.blue.port == sandbox.blue.port and cfg.green.port == sandbox.green.port
    assert cfg.blue.dbname == cfg.green.dbname == "shop"
    assert cfg.canary.interval == 5.0 and cfg.canary.window == 10.0  # merged, not replaced
    assert [s.weight for s in cfg.canary.stages] == [0, 5, 20, 100]
    assert {c.name for c in cfg.canary.checks} == {"error-rate", "p99-latency"}
    assert cfg.router.kind == "haproxy"
    assert cfg.router.socket == str(sandbox.haproxy.admin_socket)
    assert cfg.rollback.window == 60.0
    assert cfg.migrations.dir.name == "migrations"
    for name, value in sandbox.secrets_env.items():
        os.environ[name] = value
    try:
        assert f"password={sandbox.blue.password}" in cfg.blue.conninfo()
    finally:
        for name in sandbox.secrets_env:
            del os.environ[name]

    path = sandbox.write_config(sandbox_dir / "release.yaml", name="other")
    assert "name: other" in path.read_text()
    assert sandbox.blue.password not in path.read_text()


def test_sandbox_stack_serves_traffic_and_is_scraped(sandbox_dir: Path) -> None:
    pytest.importorskip("orchestrator.sandbox.demoapp")
    pytest.importorskip("orchestrator.sandbox.demodata")
    sandbox = Sandbox(sandbox_dir, blue_major=15, green_major=17)
    started = time.monotonic()
    with sandbox:
        startup = time.monotonic() - started
        assert set(sandbox.app_urls) == {"blue", "green"}
        assert sandbox.blue.server_version_num() // 10000 == 15
        assert sandbox.green.server_version_num() // 10000 == 17
        for item in range(1, 21):
            status, body = http_get("127.0.0.1", sandbox.haproxy.port, f"/items/{item}")
            assert status == 200, body
        # All traffic is on blue; Prometheus sees blue's app and HAProxy.
        p99 = Template(P99_LATENCY_QUERY).substitute(colour="blue", window="10s")
        sandbox.prometheus.wait_for_series('demo_http_requests_total{colour="blue"}', timeout=20)
        assert _value(sandbox.prometheus, p99) < 0.5
        sandbox.prometheus.wait_for_series('up{job="demo",colour="green"} == 1', timeout=10)
        pids = [p.pid for p in sandbox.apps.values()]
    sandbox.stop()  # idempotent
    assert startup < 60
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_sandbox_start_failure_stops_what_was_started(sandbox_dir: Path) -> None:
    sandbox = Sandbox(sandbox_dir, blue_major=15, green_major=99)
    with pytest.raises(SandboxError, match="PostgreSQL 99"):
        sandbox.start()
    # Prometheus and blue were up before green failed; both are stopped again.
    assert not sandbox.prometheus.running
    assert not sandbox.blue.running
    sandbox.stop()
