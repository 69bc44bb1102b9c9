"""``orchestrate serve``: an Alertmanager webhook receiver that rolls a release back.

    POST /alertmanager   Alertmanager's webhook payload (version 4), bearer token
    GET  /healthz        200 while the process serves
    GET  /metrics        the receiver's own counters, Prometheus text format

A firing alert whose labels satisfy ``alerts.matchers`` asks the running release to
roll back (``StateStore.request_rollback``), which the orchestrator running it
notices within a second (it polls the request while it waits between evaluations).
When no orchestrator holds the release's lock (it crashed, or was never restarted)
the receiver performs the rollback itself, in a background thread, one at a time.

Answers, so that Alertmanager (which retries 5xx, not 4xx) does the right thing:

    202  a rollback was requested, or started by this receiver: {"action": ...}
    200  nothing to do, and why: resolved or non-matching alerts, a release that is not
         running, a rollback already requested (a repeated alert queues nothing new)
    400  not an Alertmanager payload        401  missing or wrong token
    413  body too large                     503  the state database is unreachable

The token is compared in constant time and never logged. Without a token the
receiver refuses to start, unless it listens on a loopback address and was started
with ``--insecure``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from string import Template
from types import FrameType
from typing import Any, Protocol

import psycopg

from orchestrator.config import AlertsConfig, ReleaseConfig
from orchestrator.errors import ConfigError, LockedError, OrchestrateError
from orchestrator.logging import get_logger, scrub
from orchestrator.store import ReleaseRow, StateStore

__all__ = ["AlertReceiver", "AlertsConfig", "Matchers", "parse_payload", "serve"]

log = get_logger("orchestrate.serve")

# Alertmanager batches alerts of one group; even hundreds of alerts stay far below this.
MAX_BODY_BYTES = 1024 * 1024
# Seconds a client may take to send its request (slow or stuck clients must not pin
# a thread forever).
REQUEST_TIMEOUT_S = 10.0
PAYLOAD_VERSION = "4"
ALERT_PATH = "/alertmanager"


class PayloadError(ValueError):
    """The body is not an Alertmanager webhook payload."""


@dataclass(frozen=True)
class Alert:
    status: str  # firing / resolved
    labels: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)
    starts_at: str | None = None
    fingerprint: str | None = None

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "unnamed alert")

    def describe(self) -> str:
        summary = self.annotations.get("summary") or self.annotations.get("description")
        return f"alert {self.name} firing" + (f": {summary}" if summary else "")


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PayloadError(f"{what} must be an object")
    return {str(k): str(v) for k, v in value.items()}


def parse_payload(raw: bytes) -> list[Alert]:
    """The alerts of an Alertmanager webhook body (payload version 4)."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PayloadError("the body must be a JSON object")
    version = doc.get("version")
    if version is not None and str(version) != PAYLOAD_VERSION:
        raise PayloadError(f"payload version {version!r} is not supported; Alertmanager's "
                           f"webhook sends version {PAYLOAD_VERSION!r}")
    alerts = doc.get("alerts")
    if not isinstance(alerts, list):
        raise PayloadError("'alerts' must be a list (is this an Alertmanager webhook?)")
    out = []
    for i, item in enumerate(alerts):
        if not isinstance(item, dict):
            raise PayloadError(f"alerts[{i}] must be an object")
        status = item.get("status", doc.get("status"))
        if status not in {"firing", "resolved"}:
            raise PayloadError(f"alerts[{i}].status must be 'firing' or 'resolved', "
                               f"got {status!r}")
        out.append(Alert(
            status=status,
            labels=_str_map(item.get("labels"), f"alerts[{i}].labels"),
            annotations=_str_map(item.get("annotations"), f"alerts[{i}].annotations"),
            starts_at=item.get("startsAt"),
            fingerprint=item.get("fingerprint"),
        ))
    return out


class Matchers:
    """``alerts.matchers``: every one must hold. "v" equals, "~re" fully matches a
    regex, "!v" and "!~re" negate; values are templates ($service, $release...)."""

    def __init__(self, spec: Mapping[str, str], variables: Mapping[str, str]) -> None:
        # (label, negated, compiled regex or None, exact value, rendered spec)
        self._tests: list[tuple[str, bool, re.Pattern[str] | None, str, str]] = []
        for label, raw in spec.items():
            value = Template(raw).safe_substitute(variables)
            negate = value.startswith("!")
            body = value[1:] if negate else value
            pattern = re.compile(body[1:]) if body.startswith("~") else None
            self._tests.append((label, negate, pattern, body.removeprefix("="), value))

    def match(self, labels: Mapping[str, str]) -> bool:
        for label, negate, pattern, wanted, _ in self._tests:
            # A missing label reads as "", as in Alertmanager's own matchers.
            given = labels.get(label, "")
            hit = pattern.fullmatch(given) is not None if pattern else given == wanted
            if hit == negate:
                return False
        return True

    def describe(self) -> str:
        return ", ".join(f"{label}: {value!r}" for label, *_, value in self._tests) or "any"


@dataclass
class Decision:
    code: int
    body: dict[str, Any]


class ReceiverStore(Protocol):
    """What the receiver needs of ``StateStore``."""

    def get(self, name: str) -> ReleaseRow | None: ...

    def request_rollback(self, name: str, reason: str) -> bool: ...

    def log(self, name: str, level: str, message: str, *, state: str | None = None,
            details: dict[str, Any] | None = None, duration_s: float | None = None) -> None: ...

    def close(self) -> None: ...


class StoreUnavailable(Exception):
    """The control schema could not be read or written."""


class AlertReceiver:
    """The receiver's decisions, without HTTP (tested with a fake store)."""

    def __init__(
        self,
        cfg: ReleaseConfig,
        *,
        store: ReceiverStore,
        token: str | None,
        lock_is_free: Callable[[], bool],
        run_rollback: Callable[[str], None],
    ) -> None:
        self.name = cfg.release.name
        variables = {"service": cfg.release.service, "namespace": cfg.release.namespace,
                     "version": cfg.release.version, "release": cfg.release.name,
                     **cfg.prometheus.labels}
        self.matchers = Matchers(cfg.alerts.matchers, variables)
        self._token = token.encode() if token is not None else None
        self._store = store
        self._store_lock = threading.Lock()
        self._lock_is_free = lock_is_free
        self._run_rollback = run_rollback
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self.counters: dict[str, int] = {}
        self._counter_lock = threading.Lock()

    # -- authentication ----------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        if self._token is None:
            return True  # --insecure on loopback: the operator chose this
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Constant time: a timing difference must not reveal the token's prefix.
        return hmac.compare_digest(given.strip().encode(), self._token)

    def count(self, outcome: str) -> None:
        with self._counter_lock:
            self.counters[outcome] = self.counters.get(outcome, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._counter_lock:
            return dict(self.counters)

    # -- decisions ----------------------------------------------------------------

    def handle(self, alerts: list[Alert]) -> Decision:
        firing = [a for a in alerts if a.status == "firing"]
        matching = [a for a in firing if self.matchers.match(a.labels)]
        if not matching:
            reason = ("no alert is firing" if not firing else
                      f"no firing alert matches the matchers ({self.matchers.describe()})")
            return self._ignored(reason)
        alert = matching[0]
        reason = alert.describe()
        try:
            with self._store_lock:
                row = self._with_store(lambda: self._store.get(self.name))
                if row is None:
                    return self._ignored(f"release {self.name} has not started")
                if row.status != "running":
                    return self._ignored(f"release {self.name} is {row.status} (state "
                                         f"{row.state}); only a running release is rolled back")
                new = False
                if row.state != "rollback" and not row.rollback_requested:
                    new = self._with_store(lambda: self._store.request_rollback(self.name,
                                                                                reason))
                    if new:
                        self._with_store(lambda: self._store.log(
                            self.name, "warning", f"rollback requested by Alertmanager: "
                            f"{reason}", state=row.state, details={
                                "alertname": alert.name, "labels": alert.labels,
                                "fingerprint": alert.fingerprint,
                                "starts_at": alert.starts_at, "matching_alerts": len(matching)}))
                pending = row.rollback_requested or row.error or reason
        except StoreUnavailable as exc:
            self.count("store_unavailable")
            # 503: Alertmanager retries, and the next attempt may find the database back.
            return Decision(503, {"action": "none", "error": str(exc)})
        started = self._ensure_executor(reason if new else pending)
        executor = "receiver" if self.rollback_running() else "orchestrator"
        body = {"release": self.name, "reason": reason, "executor": executor,
                "state": row.state, "matching_alerts": len(matching)}
        if new:
            self.count("rollback_requested")
            log.warning("rollback requested", release=self.name, reason=reason,
                        alertname=alert.name, executor=executor)
            return Decision(202, {"action": "rollback_requested", **body})
        if started:
            self.count("rollback_started")
            return Decision(202, {"action": "rollback_started", **body,
                                  "reason": pending})
        self.count("already_requested")
        return Decision(200, {"action": "none", **body, "reason": (
            "a rollback is already under way" if row.state == "rollback" else
            f"a rollback was already requested: {pending}")})

    def _ignored(self, reason: str) -> Decision:
        self.count("ignored")
        log.info("alert ignored", release=self.name, reason=reason)
        return Decision(200, {"action": "ignored", "release": self.name, "reason": reason})

    def _with_store(self, call: Callable[[], Any]) -> Any:
        """One call to the store; one reconnect when the connection broke (a database
        restart must not turn every later alert into a 503)."""
        for attempt in range(2):
            try:
                return call()
            except (psycopg.OperationalError, OrchestrateError) as exc:
                self._store.close()
                if attempt == 1:
                    message = exc.message if isinstance(exc, OrchestrateError) else str(exc)
                    raise StoreUnavailable(
                        f"the release state database is unreachable: "
                        f"{scrub(message).strip()}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- rollback by the receiver -------------------------------------------------

    def rollback_running(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _ensure_executor(self, reason: str) -> bool:
        """Start a rollback here when nobody runs the release. True if started."""
        with self._worker_lock:
            if self.rollback_running():
                return False
            try:
                free = self._lock_is_free()
            except OrchestrateError as exc:
                log.warning("cannot tell whether an orchestrator runs the release",
                            error=exc.message)
                return False
            if not free:
                return False  # the running orchestrator acts on the request
            log.warning("no orchestrator holds the release: rolling back from here",
                        release=self.name, reason=reason)
            # Not a daemon: a process asked to stop waits for the rollback to finish.
            self._worker = threading.Thread(target=self._rollback, args=(reason,),
                                            name="orchestrate-rollback", daemon=False)
            self._worker.start()
            return True

    def _rollback(self, reason: str) -> None:
        try:
            self._run_rollback(reason)
        except LockedError:
            log.info("an orchestrator took the release over; it performs the rollback",
                     release=self.name)
        except OrchestrateError as exc:
            self.count("rollback_failed")
            # An error meant for a person: its message says it all, no traceback.
            log.error("rollback from the receiver failed", release=self.name,  # noqa: TRY400
                      error=exc.message, hint=exc.hint)
        except Exception as exc:
            # A thread that dies silently would leave the release half rolled back
            # with nobody saying so.
            self.count("rollback_failed")
            log.exception("rollback from the receiver failed", release=self.name,
                          error=scrub(str(exc)))

    def wait(self, timeout: float | None = None) -> None:
        worker = self._worker
        if worker is not None:
            worker.join(timeout)


# -- HTTP -------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], receiver: AlertReceiver) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.receiver = receiver
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_S
    server_version = "orchestrate"

    def _send(self, code: int, body: dict[str, Any] | str,
              headers: Mapping[str, str] | None = None) -> None:
        if isinstance(body, str):
            data, ctype = body.encode(), "text/plain; version=0.0.4; charset=utf-8"
        else:
            data, ctype = json.dumps(body).encode(), "application/json"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, {"status": "ok", "release": self.server.receiver.name})
        elif path == "/metrics":
            self._send(200, _metrics_text(self.server.receiver))
        else:
            self._send(404, {"error": f"no such path {path}; POST alerts to {ALERT_PATH}"})

    def do_POST(self) -> None:
        receiver = self.server.receiver
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != ALERT_PATH:
            self._send(404, {"error": f"no such path {path}; POST alerts to {ALERT_PATH}"})
            return
        if not receiver.authorized(self.headers.get("Authorization")):
            receiver.count("unauthorized")
            log.warning("alert refused: missing or wrong bearer token",
                        client=self.client_address[0])
            # The body is left unread: close the connection rather than parse it.
            self.close_connection = True
            self._send(401, {"error": "missing or wrong bearer token"},
                       {"WWW-Authenticate": 'Bearer realm="orchestrate"', "Connection": "close"})
            return
        length_header = self.headers.get("Content-Length")
        if length_header is None or not length_header.isdigit():
            self.close_connection = True
            self._send(411, {"error": "Content-Length is required"}, {"Connection": "close"})
            return
        length = int(length_header)
        if length > MAX_BODY_BYTES:
            receiver.count("too_large")
            self.close_connection = True
            self._send(413, {"error": f"body larger than {MAX_BODY_BYTES} bytes"},
                       {"Connection": "close"})
            return
        try:
            alerts = parse_payload(self.rfile.read(length))
        except PayloadError as exc:
            receiver.count("bad_payload")
            self._send(400, {"error": str(exc)})
            return
        decision = receiver.handle(alerts)
        self._send(decision.code, decision.body)

    def log_message(self, format: str, *args: Any) -> None:
        # The request line only: headers (the token) never reach the log.
        log.debug("http", client=self.client_address[0], line=format % args)


def _metrics_text(receiver: AlertReceiver) -> str:
    counters = receiver.snapshot()
    lines = ["# HELP orchestrate_alert_requests_total Alertmanager webhook calls by outcome.",
             "# TYPE orchestrate_alert_requests_total counter"]
    lines += [f'orchestrate_alert_requests_total{{release="{receiver.name}",outcome="{k}"}} {v}'
              for k, v in sorted(counters.items())]
    return "\n".join(lines) + "\n"


# -- serve -----------------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """"host:port" (IPv6 as "[::1]:8080") -> (host, port)."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{listen!r} is not host:port", hint="e.g. --listen 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(alerts: AlertsConfig, *, host: str, insecure: bool) -> str | None:
    """The bearer token, or None when running without one is allowed."""
    problem = ""
    try:
        token: str | None = alerts.token.resolve().strip() or None
        if token is None:
            problem = f"the token from {alerts.token.describe()} is empty"
    except ConfigError as exc:
        token, problem = None, exc.message
    if token is not None:
        if len(token) < 16:
            log.warning("the webhook token is short; use 32 random characters or more "
                        "(e.g. `openssl rand -hex 32`)")
        return token
    if not insecure:
        raise ConfigError(
            f"orchestrate serve needs a bearer token: {problem}",
            hint=f"set the secret named by alerts.token ({alerts.token.describe()}) and give "
            "Alertmanager the same value (webhook_configs http_config.authorization."
            "credentials); only for a local test, --insecure runs without one on a "
            "loopback address")
    if not is_loopback(host):
        raise ConfigError(
            f"--insecure listens without a token, which is allowed on a loopback address "
            f"only, not on {host}",
            hint="listen on 127.0.0.1 (--listen 127.0.0.1:8080), or configure a token")
    log.warning("listening WITHOUT a token (--insecure): any local process can roll the "
                "release back")
    return None


def _lock_probe(cfg: ReleaseConfig) -> Callable[[], bool]:
    def lock_is_free() -> bool:
        probe = StateStore.for_config(cfg)
        try:
            probe.acquire_lock()
        except LockedError:
            return False
        finally:
            probe.close()  # releases the lock if it was taken
        return True
    return lock_is_free


def _rollback_runner(cfg: ReleaseConfig) -> Callable[[str], None]:
    def run(reason: str) -> None:
        # Imported here: the machine pulls in every backend, which the HTTP side of the
        # receiver does not need.
        from orchestrator.machine import release_for

        store = StateStore.for_config(cfg)
        try:
            outcome = release_for(cfg, store=store).run(rollback=reason)
            log.warning("rollback performed by the receiver", release=outcome.name,
                        state=outcome.state, status=outcome.status)
        finally:
            store.close()
    return run


def serve(cfg: ReleaseConfig, *, host: str, port: int, insecure: bool = False,
          ready: Callable[[str, int], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT. Blocking."""
    token = resolve_token(cfg.alerts, host=host, insecure=insecure)
    store = StateStore.for_config(cfg)
    receiver = AlertReceiver(cfg, store=store, token=token, lock_is_free=_lock_probe(cfg),
                             run_rollback=_rollback_runner(cfg))
    try:
        httpd = _Server((host, port), receiver)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}",
                          hint="pick a free port with --listen HOST:PORT") from exc
    address = httpd.server_address
    bound_host = address[0].decode() if isinstance(address[0], bytes) else str(address[0])
    bound_port = int(address[1])

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        # shutdown() waits for serve_forever to return: not from its own thread.
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    log.info("listening for Alertmanager", url=f"http://{bound_host}:{bound_port}{ALERT_PATH}",
             release=receiver.name, matchers=receiver.matchers.describe(),
             authenticated=token is not None)
    if ready is not None:
        ready(bound_host, bound_port)
    started = time.monotonic()
    try:
        httpd.serve_forever(poll_interval=0.5)
    finally:
        httpd.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if receiver.rollback_running():
            log.warning("waiting for the rollback in progress to finish")
        receiver.wait()
        store.close()
        log.info("stopped", served_s=round(time.monotonic() - started, 1),
                 **{f"alerts_{k}": v for k, v in receiver.snapshot().items()})
