"""The whole embedded default on one machine: what a release needs, on free ports.

    blue PostgreSQL (16)   <- blue demo app  \\
                                              HAProxy (backend app) <- clients
    green PostgreSQL (17)  <- green demo app /
    Prometheus scraping both apps and HAProxy's exporter

Blue holds the ``shop`` database with the demo schema and seed data; green holds only
the ``app`` role, because creating green's database is part of the release.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import structlog
import yaml

from orchestrator.sandbox.haproxy import HAProxyServer
from orchestrator.sandbox.pgcluster import REPO_ROOT, PgCluster
from orchestrator.sandbox.ports import free_port
from orchestrator.sandbox.process import (
    ManagedProcess,
    SandboxError,
    Service,
    tcp_open,
    wait_until,
)
from orchestrator.sandbox.prometheus import PrometheusServer

log = structlog.get_logger()

APP_ROLE = "app"
APP_DATABASE = "shop"
DEMO_MIGRATIONS = REPO_ROOT / "examples" / "demo" / "migrations"
# What the `demo` extra installs for the sandbox (the demo app's metrics).
DEMO_MODULES = ("prometheus_client",)

# PromQL templates for the canary checks (string.Template: $colour and $window are
# filled in by the canary analysis). Metric names are those of HAProxy 2.6's built-in
# exporter and of the demo app.
ERROR_RATE_QUERY = (
    'sum(rate(haproxy_server_http_responses_total{proxy="app",server="$colour",code="5xx"}'
    "[$window])) / "
    'sum(rate(haproxy_server_http_responses_total{proxy="app",server="$colour"}[$window]))'
)
P99_LATENCY_QUERY = (
    "histogram_quantile(0.99, sum by (le) "
    '(rate(demo_http_request_duration_seconds_bucket{colour="$colour"}[$window])))'
)


def require_demo_extra() -> None:
    """The sandbox is an optional part of the package (the `demo` extra): say so
    before starting anything, instead of a demo app dying on an ImportError in its
    log file."""
    missing = [m for m in DEMO_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise SandboxError(
            f"the demo sandbox needs {', '.join(missing)}, which the orchestrator itself "
            "does not", hint="install the demo extra: pip install 'orchestrate[demo]' (or "
            "run ./scripts/setup.sh)")


class _Stoppable(Protocol):
    def stop(self) -> None: ...


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in: mappings recursively, anything else replaced."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class Sandbox(Service):
    def __init__(
        self,
        base_dir: Path,
        *,
        blue_major: int = 16,
        green_major: int = 17,
        scale: int = 1,
        green_fail_rate: float = 0.0,
        green_extra_latency: float = 0.0,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.scale = scale
        self.green_fail_rate = green_fail_rate
        self.green_extra_latency = green_extra_latency
        self.blue = PgCluster("blue", blue_major, self.base_dir)
        self.green = PgCluster("green", green_major, self.base_dir)
        self.app_password = secrets.token_urlsafe(18)
        self.app_ports = {"blue": free_port(), "green": free_port()}
        self.app_urls = {c: f"http://127.0.0.1:{p}" for c, p in self.app_ports.items()}
        self.haproxy = HAProxyServer(
            self.base_dir,
            blue=f"127.0.0.1:{self.app_ports['blue']}",
            green=f"127.0.0.1:{self.app_ports['green']}",
        )
        self.prometheus = PrometheusServer(self.base_dir / "prometheus")
        self.prometheus.add_target(
            "demo", f"127.0.0.1:{self.app_ports['blue']}", {"colour": "blue"}
        )
        self.prometheus.add_target(
            "demo", f"127.0.0.1:{self.app_ports['green']}", {"colour": "green"}
        )
        self.prometheus.add_target("haproxy", self.haproxy.metrics_address)
        self.apps: dict[str, ManagedProcess] = {}
        self._started: list[_Stoppable] = []

    @property
    def secrets_env(self) -> dict[str, str]:
        """Variables the release config's password references read."""
        return {
            "ORCHESTRATE_BLUE_PASSWORD": self.blue.password,
            "ORCHESTRATE_GREEN_PASSWORD": self.green.password,
        }

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start everything; on any failure, stop what was started and re-raise."""
        require_demo_extra()
        started = time.monotonic()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        log.info(
            "sandbox.ready",
            base_dir=str(self.base_dir),
            url=self.haproxy.url,
            prometheus=self.prometheus.url,
            seconds=round(time.monotonic() - started, 1),
        )

    def _start(self) -> None:
        # Prometheus first: 2.42 starts scraping only at its first target reload, up to
        # 5 s after start, and that wait overlaps with everything below this way.
        # Its targets are down meanwhile, which it only records.
        self._started.append(self.prometheus)
        self.prometheus.start()
        for cluster in (self.blue, self.green):
            self._started.append(cluster)
            cluster.start()
            cluster.create_role(APP_ROLE, self.app_password)
        self.blue.create_database(APP_DATABASE, owner=APP_ROLE)

        # Imported here: the demo data and app are only needed by a running sandbox,
        # and importing them must not be a cost (or a failure) for the rest.
        from orchestrator.sandbox import demodata

        # As the app role, so that the app owns its tables, as in production.
        demodata.load(self._app_dsn(self.blue), self.scale)

        for colour, cluster in (("blue", self.blue), ("green", self.green)):
            self._start_app(colour, cluster)

        self._started.append(self.haproxy)
        self.haproxy.start()
        # The canary reads these from the first second on; without them its first
        # evaluations would be "no data".
        self.prometheus.wait_for_series('up{job="haproxy"} == 1', timeout=30)
        self.prometheus.wait_for_series('up{job="demo",colour="blue"} == 1', timeout=30)

    def _app_dsn(self, cluster: PgCluster) -> str:
        return cluster.conninfo(APP_DATABASE, user=APP_ROLE, password=self.app_password)

    def _start_app(self, colour: str, cluster: PgCluster) -> None:
        port = self.app_ports[colour]
        argv = [
            sys.executable,
            "-m",
            "orchestrator.sandbox.demoapp",
            "--colour",
            colour,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ]
        if colour == "green" and self.green_fail_rate:
            argv += ["--fail-rate", str(self.green_fail_rate)]
        if colour == "green" and self.green_extra_latency:
            argv += ["--extra-latency", str(self.green_extra_latency)]
        proc = ManagedProcess(
            f"demo app {colour}",
            argv,
            self.base_dir / f"app-{colour}.log",
            env={**os.environ, "DEMO_DSN": self._app_dsn(cluster)},
            cwd=REPO_ROOT,
            stop_signal=signal.SIGTERM,
            stop_timeout=10.0,
        )
        self.apps[colour] = proc
        self._started.append(proc)
        proc.start()
        wait_until(
            lambda: tcp_open("127.0.0.1", port),
            what=f"the {colour} demo app to listen on port {port}",
            timeout=30.0,
            proc=proc,
        )

    def stop(self) -> None:
        """Stop what was started, newest first. Idempotent; one failure does not
        keep the rest running."""
        while self._started:
            component = self._started.pop()
            try:
                component.stop()
            except Exception as exc:
                log.warning("sandbox.stop_failed", component=repr(component), error=str(exc))

    # -- release configuration ---------------------------------------------------

    def release_config(self, name: str = "demo-release", **overrides: Any) -> dict[str, Any]:
        """A configuration for ``orchestrator.config.parse_config`` that releases the
        demo from blue to green; ``overrides`` are deep-merged into it."""

        raw: dict[str, Any] = {
            "release": {"name": name, "service": APP_DATABASE, "version": "v2"},
            "blue": self.blue.database_section(APP_DATABASE, "ORCHESTRATE_BLUE_PASSWORD",
                                               app_role=APP_ROLE),
            "green": self.green.database_section(APP_DATABASE, "ORCHESTRATE_GREEN_PASSWORD",
                                                 app_role=APP_ROLE),
            "migrations": {"dir": str(DEMO_MIGRATIONS)},
            "backup": {"dir": str(self.base_dir / "backups")},
            "sync": {"max_lag_bytes": 1024 * 1024},
            "canary": {
                "interval": "2s",
                "window": "10s",
                "stages": [
                    {"weight": 0, "duration": "4s"},
                    {"weight": 5, "duration": "6s"},
                    {"weight": 20, "duration": "6s"},
                    {"weight": 100, "duration": "6s"},
                ],
                "checks": [
                    # While green gets little or no traffic these queries have no
                    # value (0/0); a few inconclusive evaluations are expected.
                    {
                        "name": "error-rate",
                        "query": ERROR_RATE_QUERY,
                        "max": 0.05,
                        "inconclusive_limit": 5,
                    },
                    {
                        "name": "p99-latency",
                        "query": P99_LATENCY_QUERY,
                        "max": 0.5,
                        "inconclusive_limit": 5,
                    },
                ],
            },
            "prometheus": {"url": self.prometheus.url},
            "router": {
                "kind": "haproxy",
                "socket": str(self.haproxy.admin_socket),
                "backend": HAProxyServer.backend,
            },
        }
        return deep_merge(raw, overrides)

    def write_config(self, path: Path, **overrides: Any) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.release_config(**overrides), sort_keys=False))
        return path
