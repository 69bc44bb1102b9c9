"""The demo application that a release moves traffic between, in two versions.

    DEMO_DSN='host=... dbname=... password=...' \\
        python -m orchestrator.sandbox.demoapp --colour blue --port 8081

Both colours serve the same small shop API from the same code; ``--colour`` picks the
version. Green is the release: it writes and reads ``orders.status``, so it needs
migration 0001 on its database, while blue knows nothing of that column.

The process starts and answers /healthz whether or not its database exists yet (the
orchestrator creates green's database after green's app is deployed); connections
are opened lazily, with short timeouts, and data requests answer 503 until the
database works. Prometheus metrics at /metrics are what the canary analysis reads,
and /admin/fault injects errors and latency so a canary can be made to fail on
purpose.

Only the standard library's HTTP server and psycopg are used: the demo must run
anywhere the orchestrator runs, without a web framework.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import psycopg
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

# The same connect as the orchestrator: a timed-out attempt must not leave its socket.
from orchestrator.pg.conn import open_connection

Colour = Literal["blue", "green"]

# Database timeouts are short on purpose: a request that cannot get an answer within
# a few seconds is better answered 503 (the canary analysis sees it) than left hanging.
DB_CONNECT_TIMEOUT_S = 2
DB_STATEMENT_TIMEOUT_MS = 5_000
DB_TCP_USER_TIMEOUT_MS = 10_000
# After a failed connection attempt, requests fail fast for this long instead of
# each one paying a connect timeout against a database that is known to be down.
DB_RETRY_AFTER_S = 0.5
POOL_ACQUIRE_TIMEOUT_S = 2.0
# A pooled connection idle for longer than this is pinged before use, so a database
# restart costs one cheap round trip instead of a 503.
POOL_PING_AFTER_IDLE_S = 2.0
HTTP_IDLE_TIMEOUT_S = 30.0
MAX_BODY_BYTES = 64 * 1024
MAX_EXTRA_LATENCY_S = 60.0
SHUTDOWN_DRAIN_S = 5.0
PG_BIGINT_MAX = 2**63 - 1
PG_INT_MAX = 2**31 - 1

# 1 ms .. 5 s, roughly 1-2.5-5 per decade.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

log: Any = structlog.get_logger("demoapp")


class DatabaseUnavailable(Exception):
    """No connection to the database could be had; the request gets a 503."""


class BadRequest(Exception):
    """The client sent something this API does not accept; the request gets a 400."""


# -- connection pool --------------------------------------------------------------


class ConnectionPool:
    """A small, lazy, bounded pool of autocommit connections.

    psycopg_pool is not a dependency of this project; the demo needs only this much:
    connections are opened on demand (never at start, the database may not exist
    yet), broken ones are discarded, and a failed connect makes the following
    requests fail fast for a moment rather than queue up behind connect timeouts.
    """

    def __init__(self, conninfo: str, *, max_size: int = 10, application_name: str) -> None:
        self._conninfo = _session_conninfo(conninfo, application_name)
        self._max_size = max_size
        self._cond = threading.Condition()
        self._idle: list[tuple[psycopg.Connection[Any], float]] = []
        self._size = 0  # open connections, idle or lent out, plus ones being opened
        self._closed = False
        self._retry_at = 0.0
        self._available: bool | None = None

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self._acquire()
        try:
            yield conn
        finally:
            self._release(conn)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._size -= len(idle)
            self._cond.notify_all()
        for conn, _ in idle:
            conn.close()

    def _acquire(self) -> psycopg.Connection[Any]:
        deadline = time.monotonic() + POOL_ACQUIRE_TIMEOUT_S
        while True:
            conn, idle_for = self._take_idle_or_slot(deadline)
            if conn is None:
                return self._open()
            if idle_for <= POOL_PING_AFTER_IDLE_S or self._ping(conn):
                return conn

    def _take_idle_or_slot(self, deadline: float) -> tuple[psycopg.Connection[Any] | None, float]:
        """An idle connection and how long it idled, or (None, 0) after reserving a slot
        for a new connection."""
        with self._cond:
            while True:
                if self._closed:
                    raise DatabaseUnavailable("the application is shutting down")
                if self._idle:
                    conn, idle_since = self._idle.pop()
                    return conn, time.monotonic() - idle_since
                if self._size < self._max_size:
                    if time.monotonic() < self._retry_at:
                        raise DatabaseUnavailable("the database was unreachable moments ago")
                    self._size += 1
                    return None, 0.0
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DatabaseUnavailable("all database connections are busy")
                self._cond.wait(remaining)

    def _ping(self, conn: psycopg.Connection[Any]) -> bool:
        try:
            conn.execute("SELECT 1")
        except psycopg.Error:
            self._discard(conn)
            return False
        return True

    def _open(self) -> psycopg.Connection[Any]:
        try:
            conn = open_connection(psycopg.Connection, self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            with self._cond:
                self._size -= 1
                self._retry_at = time.monotonic() + DB_RETRY_AFTER_S
                self._cond.notify()
            self._note_state(available=False, exc=exc)
            raise DatabaseUnavailable("cannot connect to the database") from exc
        self._note_state(available=True)
        return conn

    def _release(self, conn: psycopg.Connection[Any]) -> None:
        healthy = (
            not conn.closed
            and not conn.broken
            and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        )
        if not healthy:
            self._discard(conn)
            return
        with self._cond:
            if not self._closed:
                self._idle.append((conn, time.monotonic()))
                self._cond.notify()
                return
            self._size -= 1
        conn.close()

    def _discard(self, conn: psycopg.Connection[Any]) -> None:
        conn.close()
        with self._cond:
            self._size -= 1
            self._cond.notify()

    def _note_state(self, *, available: bool, exc: psycopg.Error | None = None) -> None:
        # Log transitions only: a database that stays down would otherwise produce a
        # line per request.
        with self._cond:
            changed = self._available is not available
            self._available = available
        if not changed:
            return
        if available:
            log.info("database available")
        else:
            log.warning("database unavailable", **_describe_error(exc))


def _session_conninfo(conninfo: str, application_name: str) -> str:
    """The user's conninfo plus our timeouts; values the user set explicitly win,
    except a connect timeout longer than ours (requests must fail fast)."""
    params = conninfo_to_dict(conninfo)
    user_timeout = params.get("connect_timeout")
    if user_timeout is None or not str(user_timeout).isdigit() or int(str(user_timeout)) <= 0:
        params["connect_timeout"] = str(DB_CONNECT_TIMEOUT_S)
    else:
        params["connect_timeout"] = str(min(int(str(user_timeout)), DB_CONNECT_TIMEOUT_S))
    params.setdefault("application_name", application_name)
    params.setdefault("tcp_user_timeout", str(DB_TCP_USER_TIMEOUT_MS))
    options = str(params.get("options") or "")
    params["options"] = f"{options} -c statement_timeout={DB_STATEMENT_TIMEOUT_MS}".strip()
    return make_conninfo("", **params)


def _describe_error(exc: BaseException | None) -> dict[str, Any]:
    """Loggable facts about a database error, without anything from the conninfo.

    Errors the server reported (they have a SQLSTATE) and connection failures carry
    a message with no password in it. Other errors, notably a conninfo that fails
    to parse, may quote the conninfo, so only their class is logged.
    """
    if exc is None:
        return {}
    out: dict[str, Any] = {"error": type(exc).__name__}
    if isinstance(exc, psycopg.Error):
        if exc.sqlstate:
            out["sqlstate"] = exc.sqlstate
        if exc.sqlstate or isinstance(exc, psycopg.OperationalError):
            message = exc.diag.message_primary or str(exc)
            out["detail"] = " ".join(message.split())[:300]
    return out


# -- fault injection ----------------------------------------------------------------


@dataclass
class Faults:
    fail_rate: float = 0.0
    extra_latency: float = 0.0
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def snapshot(self) -> tuple[float, float]:
        with self._lock:
            return self.fail_rate, self.extra_latency

    def update(self, fail_rate: float | None, extra_latency: float | None) -> None:
        with self._lock:
            if fail_rate is not None:
                self.fail_rate = fail_rate
            if extra_latency is not None:
                self.extra_latency = extra_latency


def _check_fail_rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError("fail_rate must be a number between 0 and 1")
    return float(value)


def _check_latency(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= MAX_EXTRA_LATENCY_S
    ):
        raise ValueError(f"extra_latency must be a number of seconds, 0 to {MAX_EXTRA_LATENCY_S}")
    return float(value)


# -- the application ------------------------------------------------------------------


@dataclass
class Response:
    code: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def json_response(code: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, default=_json_default, separators=(",", ":")).encode()
    return Response(code, body, headers=headers or {})


def error_response(code: int, message: str, **extra: Any) -> Response:
    return json_response(code, {"error": message, **extra})


Handler = Callable[["DemoApp", re.Match[str], bytes], Response]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    label: str  # the route label of the metrics: the pattern, never the raw path
    handler: Handler
    data: bool  # data routes get fault injection and metrics; the others do not


class DemoApp:
    """The HTTP-independent part: routing, fault injection, SQL, metrics."""

    def __init__(
        self,
        colour: Colour,
        pool: ConnectionPool,
        faults: Faults | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.colour: Colour = colour
        self.pool = pool
        self.faults = faults or Faults()
        # Fault injection wants a fair coin, not a secret.
        self._rng = rng or random.Random()  # noqa: S311
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests_total = Counter(
            "demo_http_requests",
            "HTTP requests served, by route pattern and status code.",
            ["colour", "method", "route", "code"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "demo_http_request_duration_seconds",
            "Time to serve an HTTP request, including injected latency.",
            ["colour", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._inflight = 0
        self._inflight_cond = threading.Condition()
        self.shutting_down = False
        self._prime_metrics()

    def _prime_metrics(self) -> None:
        # Series that exist from the start: an error-rate query over a colour that
        # has had no error yet then yields 0 rather than "no data", which a canary
        # check would count as inconclusive.
        for route in ROUTES:
            if not route.data:
                continue
            self.request_duration.labels(self.colour, route.label)
            ok = "201" if route.method == "POST" else "200"
            for code in (ok, "500", "503"):
                self.requests_total.labels(self.colour, route.method, route.label, code)

    # request bookkeeping, for a graceful shutdown

    def begin_request(self) -> None:
        with self._inflight_cond:
            self._inflight += 1

    def end_request(self) -> None:
        with self._inflight_cond:
            self._inflight -= 1
            self._inflight_cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if some still were at the deadline."""
        deadline = time.monotonic() + timeout
        with self._inflight_cond:
            while self._inflight > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._inflight_cond.wait(remaining)
        return True

    # dispatch

    def handle(self, method: str, raw_path: str, body: bytes) -> tuple[Response, Route | None]:
        path = urlsplit(raw_path).path
        allowed: list[str] = []
        for route in ROUTES:
            match = route.pattern.fullmatch(path)
            if match is None:
                continue
            if route.method != method:
                allowed.append(route.method)
                continue
            return self._run(route, match, body), route
        if allowed:
            response = error_response(405, "method not allowed")
            response.headers["Allow"] = ", ".join(allowed)
            return response, None
        return error_response(404, "no such endpoint"), None

    def _run(self, route: Route, match: re.Match[str], body: bytes) -> Response:
        if route.data:
            fail_rate, extra_latency = self.faults.snapshot()
            if extra_latency > 0:
                time.sleep(extra_latency)
            if fail_rate > 0 and self._rng.random() < fail_rate:
                return error_response(500, "injected fault")
        try:
            return route.handler(self, match, body)
        except DatabaseUnavailable as exc:
            return error_response(503, "database unavailable", reason=str(exc))
        except psycopg.Error as exc:
            log.warning("database error", route=route.label, **_describe_error(exc))
            return error_response(503, "database error", sqlstate=exc.sqlstate)

    def record(self, method: str, route: Route | None, code: int, seconds: float) -> None:
        if route is None or not route.data:
            return
        self.requests_total.labels(self.colour, method, route.label, str(code)).inc()
        self.request_duration.labels(self.colour, route.label).observe(seconds)

    # endpoints

    def healthz(self, _match: re.Match[str], _body: bytes) -> Response:
        db = "ok"
        try:
            with self.pool.connection() as conn:
                conn.execute("SELECT 1")
        except (DatabaseUnavailable, psycopg.Error):
            db = "unavailable"
        # 200 either way: the process is alive; whether it can serve data is in "db".
        return json_response(200, {"colour": self.colour, "db": db})

    def metrics(self, _match: re.Match[str], _body: bytes) -> Response:
        return Response(200, generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST)

    def get_fault(self, _match: re.Match[str], _body: bytes) -> Response:
        fail_rate, extra_latency = self.faults.snapshot()
        return json_response(
            200, {"colour": self.colour, "fail_rate": fail_rate, "extra_latency": extra_latency}
        )

    def set_fault(self, match: re.Match[str], body: bytes) -> Response:
        try:
            fail_rate, extra_latency = _parse_fault(body)
        except BadRequest as exc:
            return error_response(400, str(exc))
        self.faults.update(fail_rate, extra_latency)
        new_fail_rate, new_latency = self.faults.snapshot()
        log.info("fault injection changed", fail_rate=new_fail_rate, extra_latency=new_latency)
        return self.get_fault(match, body)

    def get_item(self, match: re.Match[str], _body: bytes) -> Response:
        item_id = _id_from(match)
        if item_id is None:
            return error_response(404, "no such item")
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT id, sku, name, price_cents, created_at FROM public.items WHERE id = %s",
                (item_id,),
            )
            row = cur.fetchone()
        if row is None:
            return error_response(404, "no such item")
        return json_response(200, row)

    def get_order(self, match: re.Match[str], _body: bytes) -> Response:
        order_id = _id_from(match)
        if order_id is None:
            return error_response(404, "no such order")
        columns = "id, customer_id, item_id, quantity, amount_cents, created_at"
        if self.colour == "green":
            columns += ", status"
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(f"SELECT {columns} FROM public.orders WHERE id = %s", (order_id,))
            row = cur.fetchone()
        if row is None:
            return error_response(404, "no such order")
        return json_response(200, row)

    def create_order(self, _match: re.Match[str], body: bytes) -> Response:
        try:
            payload = _parse_object(body)
            customer_id = _positive_int(payload, "customer_id", PG_BIGINT_MAX)
            item_id = _positive_int(payload, "item_id", PG_BIGINT_MAX)
            quantity = _positive_int(payload, "quantity", PG_INT_MAX)
        except BadRequest as exc:
            return error_response(400, str(exc))
        # Green writes status explicitly: this is the version that needs migration 0001.
        if self.colour == "green":
            query = (
                "INSERT INTO public.orders"
                " (customer_id, item_id, quantity, amount_cents, status)"
                " SELECT %(customer)s, i.id, %(quantity)s,"
                " i.price_cents::bigint * %(quantity)s, 'new'"
                " FROM public.items AS i WHERE i.id = %(item)s"
                " RETURNING id"
            )
        else:
            query = (
                "INSERT INTO public.orders (customer_id, item_id, quantity, amount_cents)"
                " SELECT %(customer)s, i.id, %(quantity)s, i.price_cents::bigint * %(quantity)s"
                " FROM public.items AS i WHERE i.id = %(item)s"
                " RETURNING id"
            )
        params = {"customer": customer_id, "item": item_id, "quantity": quantity}
        try:
            # Autocommit: the INSERT is its own transaction, and execute() returns only
            # after the server reported the commit, so a 201 is an acknowledged write.
            with self.pool.connection() as conn:
                row = conn.execute(query, params).fetchone()
        except pg_errors.ForeignKeyViolation:
            return error_response(422, "no such customer", customer_id=customer_id)
        except (pg_errors.CheckViolation, pg_errors.NumericValueOutOfRange):
            return error_response(422, "the order is out of range")
        if row is None:
            return error_response(422, "no such item", item_id=item_id)
        return json_response(201, {"id": row[0], "colour": self.colour})


def _id_from(match: re.Match[str]) -> int | None:
    value = int(match.group(1))
    return value if 0 < value <= PG_BIGINT_MAX else None


def _parse_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("the body is not valid JSON") from exc
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object")
    return payload


def _parse_fault(body: bytes) -> tuple[float | None, float | None]:
    """New fault settings; a field left out keeps its current value."""
    payload = _parse_object(body)
    unknown = set(payload) - {"fail_rate", "extra_latency"}
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    fail_rate, extra_latency = payload.get("fail_rate"), payload.get("extra_latency")
    try:
        return (
            None if fail_rate is None else _check_fail_rate(fail_rate),
            None if extra_latency is None else _check_latency(extra_latency),
        )
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc


def _positive_int(payload: dict[str, Any], key: str, maximum: int) -> int:
    value = payload.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= maximum:
        raise BadRequest(f"{key} must be a positive integer")
    return value


ROUTES: tuple[Route, ...] = (
    Route("GET", re.compile(r"/healthz"), "/healthz", DemoApp.healthz, data=False),
    Route("GET", re.compile(r"/metrics"), "/metrics", DemoApp.metrics, data=False),
    Route("GET", re.compile(r"/admin/fault"), "/admin/fault", DemoApp.get_fault, data=False),
    Route("POST", re.compile(r"/admin/fault"), "/admin/fault", DemoApp.set_fault, data=False),
    Route("GET", re.compile(r"/items/(\d{1,19})"), "/items/:id", DemoApp.get_item, data=True),
    Route("POST", re.compile(r"/orders"), "/orders", DemoApp.create_order, data=True),
    Route("GET", re.compile(r"/orders/(\d{1,19})"), "/orders/:id", DemoApp.get_order, data=True),
)


# -- HTTP -----------------------------------------------------------------------------


class DemoServer(ThreadingHTTPServer):
    daemon_threads = True
    # server_close() would otherwise join every handler thread, including ones parked
    # on idle keep-alive connections; the drain in main() waits for requests instead.
    block_on_close = False

    def __init__(self, address: tuple[str, int], app: DemoApp) -> None:
        self.app = app
        super().__init__(address, RequestHandler)

    def handle_error(self, request: object, client_address: Any) -> None:
        # The base class prints a bare traceback to stderr, which would break the
        # JSON-lines log. A client hanging up mid-request (health checkers do it all
        # the time) is no error at all.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return
        log.error("connection failed", client=client_address[0], exc_info=True)


class RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, which the load generator relies on
    server_version = "demoapp"
    sys_version = ""
    timeout = HTTP_IDLE_TIMEOUT_S

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    # Answered by the router (405 with Allow, or 404) instead of the base class's
    # HTML 501 page: every answer of this API is JSON.
    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        app = cast(DemoServer, self.server).app
        started = time.perf_counter()
        app.begin_request()
        route: Route | None = None
        try:
            body, problem = self._read_body()
            if problem is not None:
                response = problem
            else:
                try:
                    response, route = app.handle(method, self.path, body)
                except Exception:
                    log.exception("request failed", method=method)
                    response = error_response(500, "internal error")
            if app.shutting_down:
                self.close_connection = True
            self._write(response, app.colour)
            app.record(method, route, response.code, time.perf_counter() - started)
        finally:
            app.end_request()

    def _read_body(self) -> tuple[bytes, Response | None]:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            return b"", error_response(411, "send a Content-Length, not chunked encoding")
        raw = self.headers.get("Content-Length", "0")
        if not raw.isdigit():
            self.close_connection = True
            return b"", error_response(400, "invalid Content-Length")
        length = int(raw)
        if length > MAX_BODY_BYTES:
            # The body stays unread, so this connection cannot carry another request.
            self.close_connection = True
            return b"", error_response(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length) if length else b"", None

    def _write(self, response: Response, colour: str) -> None:
        try:
            self.send_response(response.code)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            # Which version answered, for clients behind a router.
            self.send_header("X-Served-By", colour)
            for name, value in response.headers.items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(response.body)
        except OSError:
            # The client went away; nothing left to tell it.
            self.close_connection = True

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # One line per request would drown the useful lines; /metrics counts them.
        pass

    def log_message(self, format: str, *args: Any) -> None:
        log.info("http", message=format % args, client=self.client_address[0])


# -- process --------------------------------------------------------------------------


def configure_logging(colour: str) -> None:
    """JSON lines on stderr, each naming the colour (both apps usually log side by side)."""

    def add_colour(_logger: object, _name: str, event: MutableMapping[str, Any]) -> Any:
        event.setdefault("colour", colour)
        return event

    structlog.configure(
        processors=[
            add_colour,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.sandbox.demoapp",
        description="The demo shop API (conninfo from the DEMO_DSN environment variable).",
    )
    parser.add_argument("--colour", choices=["blue", "green"], required=True)
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--extra-latency", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--pool-size", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        _check_fail_rate(args.fail_rate)
        _check_latency(args.extra_latency)
    except ValueError as exc:
        parser.error(str(exc))
    if args.pool_size < 1:
        parser.error("--pool-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    configure_logging(args.colour)
    dsn = os.environ.get("DEMO_DSN")
    if not dsn:
        log.error("DEMO_DSN is not set; it must hold a libpq conninfo string")
        return 2
    try:
        pool = ConnectionPool(
            dsn, max_size=args.pool_size, application_name=f"demoapp-{args.colour}"
        )
    except psycopg.Error:
        # No traceback: the parse error quotes the conninfo, password included.
        log.error("DEMO_DSN is not a valid libpq conninfo string")  # noqa: TRY400
        return 2
    app = DemoApp(args.colour, pool, Faults(args.fail_rate, args.extra_latency))
    try:
        server = DemoServer((args.host, args.port), app)
    except OSError as exc:
        # The reason (address in use, ...) says it all; a traceback would add nothing.
        log.error("cannot listen", host=args.host, port=args.port, error=str(exc))  # noqa: TRY400
        pool.close()
        return 1

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    serving = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True
    )
    serving.start()
    port = server.server_port
    log.info("listening", host=args.host, port=port, url=f"http://{args.host}:{port}")
    # A timed wait, so the signal handler gets to run promptly on every platform.
    while not stop.wait(0.5):
        pass

    app.shutting_down = True
    server.shutdown()  # stop accepting; requests already read are still answered
    server.server_close()
    drained = app.drain(SHUTDOWN_DRAIN_S)
    pool.close()
    log.info("stopped", drained=drained)
    return 0


if __name__ == "__main__":
    sys.exit(main())
