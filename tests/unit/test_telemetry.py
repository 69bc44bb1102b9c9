"""The event -> metric mapping of orchestrator.telemetry, and its bounded labels."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from orchestrator.config import parse_config
from orchestrator.errors import ConfigError
from orchestrator.events import Event, Events, Kind
from orchestrator.telemetry import (
    REASON_KINDS,
    MetricsSink,
    ProcessTelemetry,
    ReleaseMetrics,
    reason_kind,
    sink_for,
)

R = "shop-r1"


def metrics() -> ReleaseMetrics:
    made = ReleaseMetrics(CollectorRegistry())
    made.configure(R, stages=3, max_lag_bytes=1024, window_s=600)
    return made


def value(m: ReleaseMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_the_state_gauge_has_one_current_state() -> None:
    m = metrics()
    m.observe(Event(Kind.STARTED, R, state="backup", at=100.0))
    m.observe(Event(Kind.STATE, R, state="backup"))
    m.observe(Event(Kind.STATE, R, state="sync"))
    assert value(m, "orchestrate_release_state", release=R, state="sync") == 1
    assert value(m, "orchestrate_release_state", release=R, state="backup") == 0
    states = [s for s in m.state.collect()[0].samples if s.value == 1]
    assert [s.labels["state"] for s in states] == ["sync"]
    assert value(m, "orchestrate_release_status", release=R, status="running") == 1
    assert value(m, "orchestrate_release_started_timestamp_seconds", release=R) == 100.0
    # Config facts, known before any event.
    assert value(m, "orchestrate_release_stages", release=R) == 3
    assert value(m, "orchestrate_replication_lag_limit_bytes", release=R) == 1024


def test_state_done_fills_the_duration_histogram() -> None:
    m = metrics()
    m.observe(Event(Kind.STATE_DONE, R, state="sync", details={"duration_s": 42.0,
                                                                "next": "validate"}))
    m.observe(Event(Kind.STATE_DONE, R, state="sync", details={"duration_s": 0.05}))
    assert value(m, "orchestrate_state_duration_seconds_count", state="sync") == 2
    assert value(m, "orchestrate_state_duration_seconds_sum", state="sync") == pytest.approx(42.05)
    assert value(m, "orchestrate_state_duration_seconds_bucket", state="sync", le="0.1") == 1
    assert value(m, "orchestrate_state_duration_seconds_bucket", state="sync", le="60.0") == 2


def test_stage_weight_lag_rows_and_differences() -> None:
    m = metrics()
    m.observe(Event(Kind.MEASUREMENT, R, stage=2, weight=25, details={
        "check": "replication-lag:forward", "value": 4096.0, "baseline": 1024.0,
        "verdict": "fail"}))
    m.observe(Event(Kind.MEASUREMENT, R, stage=2, weight=25, details={
        "check": "replication-lag:reverse", "value": 0.0}))
    m.observe(Event(Kind.MEASUREMENT, R, stage=2, weight=25, details={
        "check": "error-rate", "value": None, "verdict": "inconclusive"}))
    assert value(m, "orchestrate_release_stage", release=R) == 2
    assert value(m, "orchestrate_release_green_weight_percent", release=R) == 25
    assert value(m, "orchestrate_replication_lag_bytes", release=R, direction="forward") == 4096
    assert value(m, "orchestrate_replication_lag_bytes", release=R, direction="reverse") == 0
    # A measurement is not a state: the state gauge is untouched by it.
    assert m.state.collect()[0].samples == []
    m.observe(Event(Kind.STAGE_PASSED, R, state="canary", stage=3, stages=3, weight=50))
    assert value(m, "orchestrate_release_stage", release=R) == 3
    assert value(m, "orchestrate_release_green_weight_percent", release=R) == 50

    m.observe(Event(Kind.MEASUREMENT, R, state="sync", details={
        "check": "initial-copy:rows", "value": 1200}))
    m.observe(Event(Kind.MEASUREMENT, R, state="sync", details={
        "check": "initial-copy:rows", "value": 34}))
    assert value(m, "orchestrate_rows_copied_total") == 1234
    m.observe(Event(Kind.MEASUREMENT, R, state="validate", details={
        "check": "validation:differences", "value": 2}))
    assert value(m, "orchestrate_validation_differences", release=R) == 2


def test_outcomes_failures_rollbacks_and_windows() -> None:
    m = metrics()
    for kind in REASON_KINDS:  # present at 0 before the first rollback
        assert value(m, "orchestrate_rollbacks_total", reason_kind=kind) == 0
    m.observe(Event(Kind.PROMOTED, R, state="window", at=1000.0))
    assert value(m, "orchestrate_release_status", release=R, status="promoted") == 1
    assert value(m, "orchestrate_release_green_weight_percent", release=R) == 100
    assert value(m, "orchestrate_last_success_timestamp_seconds") == 1000.0
    assert value(m, "orchestrate_rollback_window_close_timestamp_seconds", release=R) == 1600.0
    m.observe(Event(Kind.STATE, R, state="window"))  # the window state begins: still promoted
    assert value(m, "orchestrate_release_status", release=R, status="promoted") == 1
    assert value(m, "orchestrate_release_status", release=R, status="running") == 0

    m.observe(Event(Kind.ROLLING_BACK, R, state="window",
                    reason="alert HighErrorRate firing: green answers 500s"))
    assert value(m, "orchestrate_rollbacks_total", reason_kind="alert") == 1
    m.observe(Event(Kind.ROLLED_BACK, R, state="rolled_back", at=1100.0,
                    reason="alert HighErrorRate firing"))
    assert value(m, "orchestrate_release_status", release=R, status="rolled_back") == 1
    assert value(m, "orchestrate_release_status", release=R, status="promoted") == 0
    assert value(m, "orchestrate_release_green_weight_percent", release=R) == 0
    assert value(m, "orchestrate_release_ended_timestamp_seconds", release=R) == 1100.0
    assert value(m, "orchestrate_rollback_window_close_timestamp_seconds", release=R) is None
    assert value(m, "orchestrate_release_state", release=R, state="rolled_back") == 1

    m.observe(Event(Kind.FAILED, R, state="rollback", reason="blue unreachable"))
    assert value(m, "orchestrate_failures_total", state="rollback") == 1
    assert value(m, "orchestrate_release_status", release=R, status="failed") == 1
    # A deadline, where an event carries one.
    m.observe(Event(Kind.STATE, R, state="canary", details={"deadline_at": 5000.0}))
    assert value(m, "orchestrate_release_deadline_timestamp_seconds", release=R) == 5000.0


@pytest.mark.parametrize(("reason", "kind"), [
    ("alert HighErrorRate firing: p99 over 1s", "alert"),
    ("requested by an operator", "request"),
    ("regret", "request"),
    ("canary failed: stage 25%: error-rate 0.31 > max 0.05", "check"),
    ("canary failed: stage 25% aborted: green does not answer: 3 probes in a row failed "
     "(last: timeout)", "probe"),
    ("canary failed: stage 25% aborted: forward replication stopped: worker error", "probe"),
    ("canary failed: stage 25% aborted: alert Slow firing", "alert"),
    ("canary failed: aborted while waiting for approval: requested by an operator", "request"),
    ("sync failed: green caught up too slowly", "failure"),
    ("validate failed: green differs from blue: public.t: 3 rows on blue, 2 on green",
     "failure"),
    ("release.deadline reached before promotion", "deadline"),
    ("SIGTERM received mid-canary", "deadline"),
    ("", "request"),
    (None, "request"),
])
def test_reason_kind_is_bounded(reason: str | None, kind: str) -> None:
    assert reason_kind(reason) == kind
    assert kind in REASON_KINDS


def test_the_free_text_reason_never_becomes_a_label() -> None:
    m = metrics()
    for n in range(20):
        m.observe(Event(Kind.ROLLING_BACK, R, reason=f"operator {n} said so"))
    samples = [s for s in m.rollbacks.collect()[0].samples if s.name.endswith("_total")]
    assert {s.labels["reason_kind"] for s in samples} == set(REASON_KINDS)
    assert value(m, "orchestrate_rollbacks_total", reason_kind="request") == 20


def test_the_registry_is_private_not_the_global_one(tmp_path: object) -> None:
    telemetry = ProcessTelemetry()
    assert telemetry.metrics.registry is not REGISTRY
    assert REGISTRY.get_sample_value("orchestrate_last_success_timestamp_seconds") is None


def _cfg(**telemetry: object) -> object:
    return parse_config({
        "release": {"name": R},
        "blue": {"host": "h", "dbname": "b", "user": "u"},
        "green": {"host": "h", "dbname": "g", "user": "u"},
        "router": {"kind": "fake"},
        "canary": {"checks": [], "allow_unanalysed": True,
                   "stages": [{"weight": 100, "duration": 1}]},
        "telemetry": telemetry,
    }, base_dir=Path("."))


def test_telemetry_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"telemetry\.listen"):
        _cfg(listen="nohost")
    with pytest.raises(ConfigError, match=r"telemetry\.pushgateway"):
        _cfg(pushgateway={"url": "pushgateway:9091"})  # no scheme
    with pytest.raises(ConfigError, match=r"no user or password in the Pushgateway URL"):
        _cfg(pushgateway={"url": "https://ops:s3cret@push.example:9091"})
    cfg = _cfg(pushgateway={"url": "http://127.0.0.1:9091", "timeout": "2s"})
    assert cfg.telemetry.pushgateway.timeout == 2.0  # type: ignore[attr-defined]
    assert cfg.telemetry.listen is None  # type: ignore[attr-defined]


def test_a_busy_metrics_port_is_a_warning_not_a_failure() -> None:
    first = ProcessTelemetry()
    http = first.serve("127.0.0.1:0")
    assert http is not None
    try:
        second = ProcessTelemetry()
        assert second.serve(f"127.0.0.1:{http.port}") is None
    finally:
        first.stop()


def test_a_pushgateway_that_is_down_never_slows_the_release() -> None:
    from orchestrator.sandbox.ports import free_port

    cfg = _cfg(pushgateway={"url": f"http://127.0.0.1:{free_port()}", "timeout": "1s",
                            "attempts": 2})
    telemetry = ProcessTelemetry(ReleaseMetrics(CollectorRegistry()))
    sink = sink_for(cfg, telemetry)  # type: ignore[arg-type]
    assert isinstance(sink, MetricsSink) and sink.pusher is not None
    events = Events([sink])
    started = time.monotonic()
    for _ in range(200):
        events.emit(Event(Kind.STATE, R, state="canary"))
    assert time.monotonic() - started < 0.5, "emit waited for the network"
    deadline = time.monotonic() + 10
    while sink.pusher.failures == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sink.pusher.failures >= 1 and sink.pusher.pushes == 0
    started = time.monotonic()
    events.close()  # the final push: one try, the gateway is known to be down
    assert time.monotonic() - started < 3


def test_serve_metrics_keep_the_receiver_counters_and_add_the_release_metrics() -> None:
    from typing import cast

    from prometheus_client.parser import text_string_to_metric_families

    from orchestrator.server.app import metrics_text
    from orchestrator.server.receiver import AlertReceiver
    from orchestrator.telemetry import process_telemetry

    class Counted:
        name = "serve-r9"

        def snapshot(self) -> dict[str, int]:
            return {"ignored": 2}

    process_telemetry().metrics.observe(Event(Kind.STATE, "serve-r9", state="rollback"))
    text = metrics_text(cast(AlertReceiver, Counted()))
    assert 'orchestrate_alert_requests_total{release="serve-r9",outcome="ignored"} 2' in text
    assert 'orchestrate_release_state{release="serve-r9",state="rollback"} 1.0' in text
    # One exposition Prometheus can parse, each family once.
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names)) and "orchestrate_release_state" in names
