"""The orchestrator's own Prometheus metrics: kept from the release's events
(``metrics``), served or pushed (``export``), wired into a release (``sink``).
The metrics, their labels and the alerts over them: docs/metrics.md."""

from orchestrator.telemetry.export import MetricsHTTP, Pusher
from orchestrator.telemetry.metrics import REASON_KINDS, ReleaseMetrics, reason_kind
from orchestrator.telemetry.sink import (
    MetricsSink,
    ProcessTelemetry,
    process_telemetry,
    sink_for,
    with_metrics,
)

__all__ = ["REASON_KINDS", "MetricsHTTP", "MetricsSink", "ProcessTelemetry", "Pusher",
           "ReleaseMetrics", "process_telemetry", "reason_kind", "sink_for", "with_metrics"]
