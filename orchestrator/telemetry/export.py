"""Getting the metrics out of a running ``orchestrate release``: served on a port
for Prometheus to scrape, or pushed to a Pushgateway.

Neither is on the release's path. The HTTP server is prometheus_client's own, in its
daemon thread. The pusher is a thread of its own that wakes on a milestone and
pushes the whole registry; a push that fails is retried a bounded number of times,
then logged as a warning, and the release never waits for any of it (``request``
only sets a flag). ``close`` makes the final push, bounded by the configured
timeout and attempts.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, push_to_gateway, start_http_server

from orchestrator.config import PushgatewayConfig
from orchestrator.errors import ConfigError
from orchestrator.logging import get_logger, scrub

log = get_logger("orchestrate.telemetry")

# Between the attempts of one push: 1 s, 2 s, 4 s, ... (capped).
_BACKOFF_S = 1.0
# At most one push per this long (the final one excepted): a canary whose stages
# pass quickly must not turn into a stream of HTTP calls.
MIN_INTERVAL_S = 1.0
_BACKOFF_MAX_S = 8.0


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsHTTP:
    """GET /metrics of one registry on host:port, from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        host, port = parse_listen(listen)
        try:
            self.server, self.thread = start_http_server(port, host, registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {listen}: {exc.strerror or exc}",
                              hint="pick a free port (telemetry.listen or --metrics-port), "
                              "or leave it unset") from exc
        self.host, self.port = str(self.server.server_address[0]), self.server.server_port
        log.info("serving metrics", url=f"http://{listen.rpartition(':')[0]}:{self.port}"
                 "/metrics")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class Pusher:
    """Pushes ``registry`` to a Pushgateway from a thread of its own."""

    def __init__(self, registry: CollectorRegistry, cfg: PushgatewayConfig, *,
                 grouping_key: dict[str, str]) -> None:
        self.registry = registry
        self.cfg = cfg
        self.grouping_key = grouping_key
        self.pushes = 0  # successful ones, for tests and the final log line
        self.failures = 0
        self._wanted = threading.Event()
        self._closing = False
        self._stop = threading.Event()
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="orchestrate-push", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """A milestone: push soon. Never blocks; pushes requested meanwhile merge."""
        self._wanted.set()

    def close(self) -> None:
        """The final push, then the thread ends; waits at most for one full push."""
        self._closing = True
        self._stop.set()
        self._wanted.set()
        budget = self.cfg.attempts * (self.cfg.timeout + _BACKOFF_MAX_S)
        self._thread.join(budget)
        if self._thread.is_alive():
            log.warning("the final push to the Pushgateway did not finish; metrics of this "
                        "run may be missing there", url=self.cfg.url)

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            closing = self._closing
            self._push_with_retries(closing)
            if closing:
                return
            self._stop.wait(MIN_INTERVAL_S)

    def _push_with_retries(self, closing: bool) -> None:
        # The last push of a run to a gateway already found down gets one try: the
        # process is ending and must not wait out the retries too.
        attempts = 1 if closing and self._warned else self.cfg.attempts
        delay = _BACKOFF_S
        for attempt in range(1, attempts + 1):
            try:
                self._push()
            except Exception as exc:  # urllib's URLError, HTTPError, OSError, timeouts
                if attempt == attempts:
                    self._failed(exc)
                    return
                time.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)
            else:
                self.pushes += 1
                if self._warned:
                    log.info("the Pushgateway takes pushes again", url=self.cfg.url)
                self._warned = False
                return

    def _push(self) -> None:
        push_to_gateway(self.cfg.url, job=self.cfg.job, registry=self.registry,
                        grouping_key=self.grouping_key, timeout=self.cfg.timeout)

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        if not self._warned:  # once per outage, not once per milestone
            log.warning("cannot push metrics to the Pushgateway; the release goes on",
                        url=self.cfg.url, attempts=self.cfg.attempts,
                        error=scrub(str(exc)).strip())
        self._warned = True

