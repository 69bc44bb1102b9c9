"""``telemetry``: the orchestrator's own Prometheus metrics (orchestrator/telemetry/).

``orchestrate serve`` always shows them at ``/metrics``. A running ``orchestrate
release`` serves them on ``listen`` (or ``--metrics-port``) for a Prometheus that can
reach the process, and/or pushes them to a Pushgateway, the usual way for a
short-lived CronJob whose pod Prometheus may never scrape before it ends.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator

from orchestrator.config._base import Duration, _Model


class PushgatewayConfig(_Model):
    """Pushes of the whole registry (PUT: the group holds this run's metrics only),
    grouped by ``job`` and the release name, at every milestone and at the end. A
    Pushgateway that is down is a warning: the release never waits for it."""

    # e.g. http://prometheus-pushgateway.monitoring:9091
    url: str = Field(pattern=r"^https?://")
    job: str = "orchestrate"
    # Per HTTP call; ``attempts`` calls at most per push (1 s apart, then 2 s, ...).
    timeout: Duration = Field(default=5.0, gt=0, le=60)
    attempts: int = Field(default=3, ge=1, le=10)

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, url: str) -> str:
        # The URL is logged when the gateway is down: a password in it would be too.
        if "@" in urlsplit(url).netloc:
            raise ValueError("put no user or password in the Pushgateway URL (it appears "
                             "in logs); protect the gateway with a network policy instead")
        return url


class TelemetryConfig(_Model):
    """Where a running ``orchestrate release`` makes its metrics available."""

    # host:port for GET /metrics while the release runs; null: not served (the
    # --metrics-port option serves on 127.0.0.1:PORT). Off loopback anyone who reaches
    # the port reads release names and states; nothing secret is exported.
    listen: str | None = None
    pushgateway: PushgatewayConfig | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:9464)")
        return value
