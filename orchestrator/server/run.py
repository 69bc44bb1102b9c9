"""Starting and stopping ``orchestrate serve``: the rules for tokens and transport,
the listening socket, uvicorn in this thread (serve) or another (tests)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any

import uvicorn

from orchestrator import pairing
from orchestrator.config import AlertsConfig, ReleaseConfig
from orchestrator.errors import ConfigError
from orchestrator.logging import get_logger
from orchestrator.server.app import ALERT_PATH, WORKERS, create_app, protocol_with
from orchestrator.server.receiver import AlertReceiver
from orchestrator.server.state import ReceiverStateStore, lock_probe, rollback_runner
from orchestrator.telemetry import process_telemetry

log = get_logger("orchestrate.serve")

# Off loopback, a token anyone can guess in a reasonable time is not a token.
MIN_TOKEN_CHARS = 32
HOW_TO_GENERATE = ("generate one with `openssl rand -hex 32` (or `python3 -c 'import secrets; "
              "print(secrets.token_hex(32))'`), store it where alerts.token points and give "
              "Alertmanager the same value (webhook_configs http_config.authorization)")
# Idle keep-alive connections are closed after this (uvicorn's own timer).
KEEP_ALIVE_S = 5


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
        if len(token) < MIN_TOKEN_CHARS:
            if not is_loopback(host):
                raise ConfigError(
                    f"the webhook token from {alerts.token.describe()} has {len(token)} "
                    f"characters; listening on {host} (not a loopback address) it must "
                    f"have at least {MIN_TOKEN_CHARS}", hint=HOW_TO_GENERATE)
            log.warning(f"the webhook token is shorter than {MIN_TOKEN_CHARS} characters; "
                        "allowed on a loopback address only", hint=HOW_TO_GENERATE)
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


def check_transport(alerts: AlertsConfig, *, host: str) -> None:
    """TLS files readable and matching; plain HTTP off loopback said loudly."""
    if alerts.tls is None:
        if not is_loopback(host):
            log.warning(
                f"PLAIN HTTP on {host}: the bearer token crosses the network in clear text. "
                "Configure alerts.tls (cert_file, key_file), or keep the receiver behind a "
                "TLS-terminating proxy or a mesh that encrypts pod traffic")
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            alerts.tls.cert_file, alerts.tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot use alerts.tls (cert_file {alerts.tls.cert_file}, key_file "
            f"{alerts.tls.key_file}): {getattr(exc, 'strerror', None) or exc}",
            hint="give PEM files: the certificate (chain) and its private key, readable "
            "by this user") from exc


class _UvicornToStructlog(logging.Handler):
    """uvicorn logs with the standard library ("Exceeded concurrency limit.", "Invalid
    HTTP request received."): through structlog, so they are JSON lines like the rest
    and pass the scrubber."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname.lower()
        method = getattr(log, level if level in {"debug", "info", "warning", "error"}
                         else "warning")
        method(record.getMessage(), source=record.name)


def _route_uvicorn_logs() -> None:
    uvicorn_log = logging.getLogger("uvicorn")
    if not any(isinstance(h, _UvicornToStructlog) for h in uvicorn_log.handlers):
        uvicorn_log.addHandler(_UvicornToStructlog())
    uvicorn_log.propagate = False


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}",
                          hint="pick a free port with --listen HOST:PORT") from exc
    sock.setblocking(False)
    return sock


class ReceiverHTTP:
    """The receiver's server: bound at construction, served by ``run`` (blocking) or
    ``start`` (a background thread, for tests)."""

    def __init__(self, receiver: AlertReceiver, alerts: AlertsConfig, *, host: str,
                 port: int) -> None:
        self.receiver = receiver
        self.alerts = alerts
        self.executor = ThreadPoolExecutor(WORKERS, thread_name_prefix="orchestrate-alert")
        self.sock = _bind(host, port, alerts.backlog)
        address = self.sock.getsockname()
        self.host, self.port = str(address[0]), int(address[1])
        tls = alerts.tls
        self.scheme = "https" if tls else "http"
        self.config = uvicorn.Config(
            create_app(receiver, self.executor),
            http=protocol_with(alerts.request_timeout, alerts.state_timeout + 5),
            backlog=alerts.backlog, limit_concurrency=alerts.max_connections,
            timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=10,
            ssl_certfile=tls.cert_file if tls else None,
            ssl_keyfile=tls.key_file if tls else None,
            lifespan="off", access_log=False, log_config=None, server_header=False,
            log_level="warning")
        self.server = uvicorn.Server(self.config)
        _route_uvicorn_logs()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def run(self) -> None:
        loop = asyncio.new_event_loop()
        handshake = self.alerts.request_timeout
        create_server = loop.create_server

        # uvicorn leaves asyncio's 60 s TLS handshake timeout; a stalled handshake is a
        # slow client like any other and gets the request deadline.
        async def with_handshake_deadline(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("ssl") is not None:
                kwargs.setdefault("ssl_handshake_timeout", handshake)
            return await create_server(*args, **kwargs)

        loop.create_server = with_handshake_deadline  # type: ignore[method-assign]
        try:
            loop.run_until_complete(self.server.serve(sockets=[self.sock]))
        finally:
            loop.close()
            self.executor.shutdown(wait=False, cancel_futures=True)

    def start(self) -> ReceiverHTTP:
        self._thread = threading.Thread(target=self.run, name="orchestrate-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)


def build_receiver(cfg: ReleaseConfig, token: str | None, *,
                   run_rollback: Callable[[str], None] | None = None,
                   loaded: ReleaseConfig | None = None) -> AlertReceiver:
    """The receiver on the real state database, its connections short-timed.

    ``loaded``: the config as written, when it names no release; the receiver then
    follows the release of the day, and its lock probe and rollback use the release
    it follows at that moment."""
    follow = None
    if loaded is not None and not loaded.release.name:
        def follow(store: Any) -> ReleaseConfig:
            return pairing.resolve(loaded, store, starting=False)

    receiver: AlertReceiver

    def lock_is_free() -> bool:
        return lock_probe(receiver.cfg)()

    def rollback(reason: str) -> None:
        (run_rollback or rollback_runner(receiver.cfg))(reason)

    receiver = AlertReceiver(cfg, store=ReceiverStateStore.for_receiver(cfg), token=token,
                             lock_is_free=lock_is_free, run_rollback=rollback,
                             store_factory=lambda: ReceiverStateStore.for_receiver(cfg),
                             follow=follow)
    return receiver


def serve(cfg: ReleaseConfig, *, host: str, port: int, insecure: bool = False,
          ready: Callable[[str, int], None] | None = None,
          loaded: ReleaseConfig | None = None) -> None:
    """Serve until SIGTERM/SIGINT. Blocking."""
    token = resolve_token(cfg.alerts, host=host, insecure=insecure)
    check_transport(cfg.alerts, host=host)
    receiver = build_receiver(cfg, token, loaded=loaded)
    # This app answers /metrics: a rollback it runs must not open a second port.
    process_telemetry().served_elsewhere = True
    process_telemetry().watch_slots(cfg)
    http = ReceiverHTTP(receiver, cfg.alerts, host=host, port=port)
    log.info("listening for Alertmanager", url=f"{http.url}{ALERT_PATH}",
             release=receiver.name, alerts=receiver.selector.describe(),
             authenticated=token is not None, tls=cfg.alerts.tls is not None)
    if ready is not None:
        ready(http.host, http.port)
    started = time.monotonic()

    def stopped(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)

    # uvicorn handles SIGTERM/SIGINT (stop accepting, finish the answers in flight) and
    # then re-raises the signal to the handler it found: this one, so that the process
    # lives on to wait for a rollback in progress instead of dying there.
    previous = {s: signal.signal(s, stopped) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        http.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if receiver.rollback_running():
            log.warning("waiting for the rollback in progress to finish")
        receiver.wait()
        receiver.close()
        log.info("stopped", served_s=round(time.monotonic() - started, 1),
                 **{f"alerts_{k}": v for k, v in receiver.snapshot().items()})
