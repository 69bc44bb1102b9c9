"""The metrics sink a release is built with, and the process's one registry.

``with_metrics`` is what ``wiring.release_for`` calls: the release's events feed the
process's ``ReleaseMetrics``; ``telemetry.listen`` serves them, ``telemetry.pushgateway``
pushes them. ``orchestrate serve`` shows the same registry on its own ``/metrics``
(``orchestrator.server.app``), so a rollback the receiver runs is counted there.
"""

from __future__ import annotations

import threading

from prometheus_client.registry import Collector

from orchestrator.config import ReleaseConfig
from orchestrator.errors import ConfigError
from orchestrator.events import Event, Events, Kind
from orchestrator.logging import get_logger
from orchestrator.telemetry.export import MetricsHTTP, Pusher
from orchestrator.telemetry.metrics import ReleaseMetrics

log = get_logger("orchestrate.telemetry")

# Measurements come every canary interval: they update the registry, and ride along
# with the next push rather than causing one each.
_NO_PUSH = frozenset({Kind.MEASUREMENT})


class ProcessTelemetry:
    """One registry per process, and at most one HTTP server for it."""

    def __init__(self, metrics: ReleaseMetrics | None = None) -> None:
        self.metrics = metrics or ReleaseMetrics()
        self.http: MetricsHTTP | None = None
        # Set by `orchestrate serve`: its own app answers /metrics.
        self.served_elsewhere = False
        self._lock = threading.Lock()
        self._slots: Collector | None = None

    def serve(self, listen: str) -> MetricsHTTP | None:
        """Serve /metrics on ``listen`` (once per process). A port that cannot be had is a
        warning: metrics are not worth a release that does not start."""
        with self._lock:
            if self.http is None and not self.served_elsewhere:
                try:
                    self.http = MetricsHTTP(self.metrics.registry, listen)
                except ConfigError as exc:
                    log.warning(exc.message, hint=exc.hint)
            return self.http

    def watch_slots(self, cfg: ReleaseConfig) -> None:
        """Count leftover replication slots of ``cfg``'s databases at every scrape."""
        from orchestrator.telemetry.slots import SlotCollector

        with self._lock:
            if self._slots is None:
                self._slots = SlotCollector(cfg)
                self.metrics.registry.register(self._slots)

    def stop(self) -> None:
        with self._lock:
            if self.http is not None:
                self.http.stop()
                self.http = None


# Made at import (cheap: empty metrics), so no two threads can race to make two.
_PROCESS = ProcessTelemetry()


def process_telemetry() -> ProcessTelemetry:
    return _PROCESS


class MetricsSink:
    """An ``EventSink``: every event updates the registry; milestones ask for a push."""

    def __init__(self, metrics: ReleaseMetrics, pusher: Pusher | None = None) -> None:
        self.metrics = metrics
        self.pusher = pusher

    def emit(self, event: Event) -> None:
        self.metrics.observe(event)
        if self.pusher is not None and event.kind not in _NO_PUSH:
            self.pusher.request()

    def close(self) -> None:
        if self.pusher is not None:
            self.pusher.close()


def sink_for(cfg: ReleaseConfig, telemetry: ProcessTelemetry | None = None) -> MetricsSink:
    telemetry = telemetry or process_telemetry()
    telemetry.metrics.configure(cfg.release.name, stages=len(cfg.canary.stages),
                                max_lag_bytes=cfg.sync.max_lag_bytes,
                                window_s=cfg.rollback.window)
    if cfg.telemetry.listen is not None:
        telemetry.serve(cfg.telemetry.listen)
    push = cfg.telemetry.pushgateway
    pusher = None
    if push is not None:
        # One group per release: a run replaces its own metrics, never another's.
        pusher = Pusher(telemetry.metrics.registry, push,
                        grouping_key={"release": cfg.release.name})
    return MetricsSink(telemetry.metrics, pusher)


def with_metrics(cfg: ReleaseConfig, events: Events | None = None) -> Events:
    """``events`` (or new ones) with the metrics sink of ``cfg`` added."""
    events = events if events is not None else Events()
    events.sinks.append(sink_for(cfg))
    return events
