"""The receiver's HTTP side: a FastAPI app under uvicorn (h11), with hard edges.

What uvicorn gives: HTTP/1.1 framing by h11 (a body left unread is consumed as a
body, never parsed as a second request), a listen backlog, a cap on open
connections (``limit_concurrency``: beyond it, 503), TLS from certificate files.
What is added here: a per-request deadline at the connection (headers and body must
arrive within ``alerts.request_timeout`` however slowly they trickle; uvicorn only
times out idle keep-alive connections), the same deadline on the TLS handshake, and
the blocking state-store work on a bounded thread pool, abandoned with a 503 after
``alerts.state_timeout``.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from orchestrator.logging import get_logger
from orchestrator.server.payload import MAX_BODY_BYTES, PayloadError, parse_payload
from orchestrator.server.pool import Ticket
from orchestrator.server.receiver import REFUSED, AlertReceiver, Decision
from orchestrator.telemetry import process_telemetry

log = get_logger("orchestrate.serve")

ALERT_PATH = "/alertmanager"
# Threads for the blocking state-store work. More than the store pool, so a call
# waiting for a connection does not keep a free connection from being used.
WORKERS = 8
_CLOSE = {"Connection": "close"}


class DeadlineProtocol(H11Protocol):
    """h11 with a per-request deadline: from the connection (or the previous answer)
    to the complete request. A client trickling a byte a second is cut off when it
    runs out, not kept for as long as it keeps trickling."""

    request_timeout: ClassVar[float] = 10.0
    # Past the deadline with the request complete, the app is deciding (bounded by
    # state_timeout): give it this much more before closing.
    grace: ClassVar[float] = 10.0

    def __init__(self, config: Config, server_state: ServerState,
                 app_state: dict[str, Any], _loop: asyncio.AbstractEventLoop | None = None,
                 ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._deadline: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.request_timeout)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm(self.request_timeout)  # the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            self._arm(self.grace)  # the whole request is in: the answer is coming
            return
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's body read ends with a disconnect
            cycle.message_event.set()
        self.transport.close()


def protocol_with(request_timeout: float, grace: float) -> type[DeadlineProtocol]:
    return type("OrchestrateH11Protocol", (DeadlineProtocol,),
                {"request_timeout": request_timeout, "grace": grace})


def metrics_text(receiver: AlertReceiver) -> str:
    """The receiver's counters, then the process's release metrics (a rollback this
    receiver runs itself is counted there: docs/metrics.md)."""
    counters = receiver.snapshot()
    lines = ["# HELP orchestrate_alert_requests_total Alertmanager webhook calls by outcome.",
             "# TYPE orchestrate_alert_requests_total counter"]
    lines += [f'orchestrate_alert_requests_total{{release="{receiver.name}",outcome="{k}"}} {v}'
              for k, v in sorted(counters.items())]
    releases = generate_latest(process_telemetry().metrics.registry).decode()
    return "\n".join(lines) + "\n" + releases


async def decide(receiver: AlertReceiver, executor: ThreadPoolExecutor,
                 alerts: Any) -> Decision:
    """``receiver.handle`` off the event loop, answered within ``state_timeout``."""
    ticket = Ticket()
    future = asyncio.get_running_loop().run_in_executor(executor, receiver.handle, alerts,
                                                        ticket)
    try:
        return await asyncio.wait_for(asyncio.shield(future), receiver.state_timeout)
    except TimeoutError:
        future.cancel()  # still queued: it never runs
        ticket.abort()
        return receiver.unavailable(
            f"the release state database did not answer within "
            f"{receiver.state_timeout:g}s (alerts.state_timeout)")


async def _read_body(request: Request) -> bytes | None:
    """The body, or None when it is larger than MAX_BODY_BYTES."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _json(code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=code, headers=headers)


def create_app(receiver: AlertReceiver, executor: ThreadPoolExecutor) -> FastAPI:
    # No generated documents yet: the receiver has one caller, Alertmanager.
    app = FastAPI(title="orchestrate", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        path = request.url.path
        message = (f"no such path {path}; POST alerts to {ALERT_PATH}" if exc.status_code == 404
                   else f"{request.method} is not allowed on {path}")
        # Connection: close. A body left unread is then never looked at.
        return _json(exc.status_code, {"error": message}, _CLOSE)

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json(200, {"status": "ok", "release": receiver.name})

    @app.get("/metrics")
    # Not async: the leftover-slot count connects to both databases, and that must
    # not hold the event loop (and every alert) while a server does not answer.
    def metrics() -> Response:
        return PlainTextResponse(metrics_text(receiver),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post(ALERT_PATH)
    @app.post(ALERT_PATH + "/", include_in_schema=False)
    async def alertmanager(request: Request) -> Response:
        if not receiver.authorized(request.headers.get("authorization")):
            receiver.count("unauthorized")
            client = request.client.host if request.client else None
            log.warning(REFUSED, client=client)
            return _json(401, {"error": "missing or wrong bearer token"},
                         {"WWW-Authenticate": 'Bearer realm="orchestrate"', **_CLOSE})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            receiver.count("too_large")
            return _json(413, {"error": f"body larger than {MAX_BODY_BYTES} bytes"}, _CLOSE)
        try:
            raw = await _read_body(request)
        except ClientDisconnect:
            return _json(408, {"error": "the request did not arrive in time"}, _CLOSE)
        if raw is None:
            receiver.count("too_large")
            return _json(413, {"error": f"body larger than {MAX_BODY_BYTES} bytes"}, _CLOSE)
        try:
            alerts = parse_payload(raw)
        except PayloadError as exc:
            receiver.count("bad_payload")
            return _json(400, {"error": str(exc)})
        decision = await decide(receiver, executor, alerts)
        return Response(json.dumps(decision.body), status_code=decision.code,
                        media_type="application/json")

    return app
