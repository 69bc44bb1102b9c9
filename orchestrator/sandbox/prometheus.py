"""A Prometheus server scraping the sandbox's targets every second."""

from __future__ import annotations

import http.client
import json
import signal
import time
import urllib.parse
from pathlib import Path
from typing import Any

import structlog
import yaml

from orchestrator.sandbox.ports import free_port
from orchestrator.sandbox.process import (
    ManagedProcess,
    SandboxError,
    Service,
    find_binary,
    http_get,
)

log = structlog.get_logger()

_HTTP_TIMEOUT = 3.0


def prometheus_binary() -> Path:
    return find_binary("prometheus", Path("/usr/bin/prometheus"))


class QueryRejected(SandboxError):
    """Prometheus refused the query itself (bad PromQL): waiting will not help."""


class PrometheusServer(Service):
    def __init__(
        self, base_dir: Path, port: int | None = None, scrape_interval: str = "1s"
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.port = port or free_port()
        self.scrape_interval = scrape_interval
        self.config_path = self.base_dir / "prometheus.yml"
        self.data_dir = self.base_dir / "prometheus-data"
        self.log_path = self.base_dir / "prometheus.log"
        # job -> [(address, labels)]
        self._targets: dict[str, list[tuple[str, dict[str, str]]]] = {}
        self._proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_target(self, job: str, address: str, labels: dict[str, str] | None = None) -> None:
        """Scrape ``http://address/metrics`` as ``job``; call before start()."""
        if self._proc is not None:
            raise SandboxError("add targets before starting Prometheus", hint=None)
        self._targets.setdefault(job, []).append((address, dict(labels or {})))

    def render_config(self) -> dict[str, Any]:
        return {
            "global": {
                "scrape_interval": self.scrape_interval,
                # Prometheus rejects a timeout longer than the interval.
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [
                        {"targets": [address], "labels": labels} for address, labels in targets
                    ],
                }
                for job, targets in self._targets.items()
            ],
        }

    def start(self) -> None:
        if self._proc is not None and self._proc.running:
            return
        binary = prometheus_binary()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.render_config(), sort_keys=False))
        self._proc = ManagedProcess(
            "prometheus",
            [
                binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.data_dir}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            self.log_path,
            cwd=self.base_dir,
            stop_signal=signal.SIGTERM,
            stop_timeout=15.0,
        )
        seconds = self._proc.start_and_wait(
            self._ready, what=f"Prometheus to be ready on port {self.port}", timeout=60.0,
            interval=0.2,
        )
        log.info("sandbox.prometheus_started", port=self.port, seconds=seconds)

    def _ready(self) -> bool:
        try:
            status, _ = http_get("127.0.0.1", self.port, "/-/ready", timeout=_HTTP_TIMEOUT)
        except (OSError, http.client.HTTPException):
            return False
        return status == 200

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.stop()
        self._proc = None
        log.info("sandbox.prometheus_stopped")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query; the result vector (possibly empty)."""
        params = urllib.parse.urlencode({"query": promql})
        try:
            status, raw = http_get(
                "127.0.0.1", self.port, f"/api/v1/query?{params}", timeout=_HTTP_TIMEOUT
            )
            body = json.loads(raw)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise SandboxError(f"cannot query Prometheus at {self.url}: {exc}") from exc
        if status in {400, 422}:
            raise QueryRejected(f"Prometheus rejected {promql!r}: {body.get('error')}", hint=None)
        if body.get("status") != "success":
            raise SandboxError(f"Prometheus query {promql!r} failed: {body}", hint=None)
        result = body["data"]["result"]
        if body["data"].get("resultType") == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def wait_for_series(self, promql: str, timeout: float = 30) -> None:
        """Block until ``promql`` returns at least one series."""
        deadline = time.monotonic() + timeout
        last_error: str | None = None
        while True:
            try:
                if self.query(promql):
                    return
                last_error = None
            except QueryRejected:
                raise
            except SandboxError as exc:
                last_error = exc.message
            if time.monotonic() >= deadline:
                why = f" (last error: {last_error})" if last_error else ""
                raise SandboxError(
                    f"no series for {promql!r} after {timeout:.0f}s{why}",
                    hint=f"check the targets at {self.url}/targets",
                )
            time.sleep(0.25)

