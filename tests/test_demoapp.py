"""The demo app, its schema and seed, and its migrations, against a real PostgreSQL 15.

The app runs as a real subprocess (python -m orchestrator.sandbox.demoapp), exactly as
the sandbox runs it. The PostgreSQL cluster is a throwaway one started here.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.sandbox import demodata
from orchestrator.sandbox.pgcluster import PgCluster

REPO = Path(__file__).resolve().parents[1]
MIGRATIONS = REPO / "examples" / "demo" / "migrations"


# -- the module's PostgreSQL 15 -------------------------------------------------------


class Pg:
    """A sandbox cluster, with the few calls these tests make. Its superuser needs a
    password (scram), so the app's log can be checked for never containing it."""

    def __init__(self, cluster: PgCluster) -> None:
        self.cluster = cluster
        self.port = cluster.port
        self.password = cluster.password

    def dsn(self, dbname: str) -> str:
        return self.cluster.conninfo(dbname)

    def connect(self, dbname: str) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(dbname), autocommit=True)

    def create_database(self, name: str) -> None:
        self.cluster.create_database(name)


@pytest.fixture(scope="module")
def pg(module_sandbox_dir: Path) -> Iterator[Pg]:
    settings = {"fsync": "off", "full_page_writes": "off", "max_connections": "60"}
    with PgCluster("demoapp", 15, module_sandbox_dir, settings=settings) as cluster:
        yield Pg(cluster)


# -- the demo app as a subprocess -----------------------------------------------------


class App:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path

    def request(
        self, method: str, path: str, payload: Any = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        body = raw if raw is not None else None if payload is None else json.dumps(payload)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if response.getheader("Content-Type", "").startswith("application/json"):
            return response.status, json.loads(data)
        return response.status, data.decode()

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def post(self, path: str, payload: Any) -> tuple[int, Any]:
        return self.request("POST", path, payload)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise
        return self.proc.returncode

    def log_lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()


def start_app(colour: str, dsn: str, log_dir: Path, *extra: str) -> App:
    log_path = log_dir / f"{colour}-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "orchestrator.sandbox.demoapp", "--colour", colour]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*command, "--port", "0", *extra],
            env={**os.environ, "DEMO_DSN": dsn},
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=REPO,
        )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            event = json.loads(line)
            if event.get("event") == "listening":
                return App(proc, int(event["port"]), log_path)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=10)
    raise AssertionError(f"the demo app did not start:\n{log_path.read_text()}")


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def apply_sql_file(conn: psycopg.Connection[Any], path: Path) -> None:
    # As the orchestrator does it: one file, one transaction.
    with conn.transaction():
        conn.execute(path.read_text().encode())


@pytest.fixture(scope="module")
def shop(pg: Pg) -> str:
    pg.create_database("shop")
    dsn = pg.dsn("shop")
    demodata.load(dsn)
    return dsn


@pytest.fixture(scope="module")
def blue(shop: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    app = start_app("blue", shop, tmp_path_factory.mktemp("blue"))
    try:
        yield app
    finally:
        assert app.stop() == 0


# -- schema and seed ----------------------------------------------------------------------


def _fingerprint(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for table in ("items", "customers", "orders"):
        # Content, and the row versions: a no-op load must not even rewrite a row.
        out[table] = conn.execute(
            f"SELECT count(*), md5(string_agg(t::text, '|' ORDER BY id)),"
            f" sum(xmin::text::bigint) FROM public.{table} AS t"
        ).fetchone()
        out[f"{table}_seq"] = conn.execute(
            f"SELECT last_value, is_called FROM public.{table}_id_seq"
        ).fetchone()
    return out


def test_seed_has_expected_rows_and_a_second_load_changes_nothing(pg: Pg) -> None:
    pg.create_database("seed")
    started = time.monotonic()
    demodata.load(pg.dsn("seed"))
    assert time.monotonic() - started < 10
    with pg.connect("seed") as conn:
        first = _fingerprint(conn)
        assert first["items"][0] == 2_000
        assert first["customers"][0] == 5_000
        assert first["orders"][0] == 20_000
        demodata.load(pg.dsn("seed"))
        assert _fingerprint(conn) == first

        # Every table has a primary key: logical replication needs one.
        tables_with_pk = {
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
                " WHERE i.indisprimary AND c.relnamespace = 'public'::regnamespace"
            )
        }
        assert tables_with_pk == {"items", "customers", "orders"}

        # The awkward values that replication and checksums must get right.
        nulls, empties = conn.execute(
            "SELECT count(*) FILTER (WHERE note IS NULL), count(*) FILTER (WHERE note = '')"
            " FROM customers"
        ).fetchone() or (0, 0)
        assert nulls > 0
        assert empties > 0
        assert conn.execute("SELECT count(*) FROM customers WHERE full_name = ''").fetchone() != (
            0,
        )
        assert conn.execute(
            "SELECT count(*) FROM orders o JOIN items i ON i.id = o.item_id"
            " WHERE o.amount_cents <> i.price_cents * o.quantity"
        ).fetchone() == (0,)

        # The sequences are past the seeded ids: the app's inserts do not collide.
        new_ids = [
            conn.execute(sql).fetchone()
            for sql in (
                "INSERT INTO items (sku, name, price_cents) VALUES ('new', 'n', 1) RETURNING id",
                "INSERT INTO customers (email) VALUES ('new@example.test') RETURNING id",
                "INSERT INTO orders (customer_id, item_id, quantity, amount_cents)"
                " VALUES (1, 1, 1, 1) RETURNING id",
            )
        ]
        assert new_ids == [(2_001,), (5_001,), (20_001,)]


def test_seed_scales(pg: Pg) -> None:
    pg.create_database("seed2")
    demodata.load(pg.dsn("seed2"), scale=2)
    with pg.connect("seed2") as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM items), (SELECT count(*) FROM customers),"
            " (SELECT count(*) FROM orders), (SELECT max(item_id) FROM orders)"
        ).fetchone()
    assert counts == (4_000, 10_000, 40_000, 4_000)
    with pytest.raises(ValueError, match="scale"):
        demodata.load(pg.dsn("seed2"), scale=0)


# -- migrations -----------------------------------------------------------------------


def _schema(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    columns = conn.execute(
        "SELECT table_name, column_name, data_type, is_nullable, column_default"
        " FROM information_schema.columns WHERE table_schema = 'public'"
        " ORDER BY table_name, column_name"
    ).fetchall()
    constraints = conn.execute(
        "SELECT conname FROM pg_constraint WHERE connamespace = 'public'::regnamespace"
        " ORDER BY conname"
    ).fetchall()
    indexes = conn.execute(
        "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexname"
    ).fetchall()
    return columns + constraints + indexes


def test_migration_files_apply_in_order_rerun_harmlessly_and_revert(pg: Pg) -> None:
    ups = sorted(MIGRATIONS.glob("*.up.sql"))
    assert [p.name for p in ups] == [
        "0001_order_status.up.sql",
        "0002_orders_created_at_index.up.sql",
    ]
    for path in MIGRATIONS.iterdir():
        assert re.fullmatch(r"\d{4}_[a-z0-9_]+\.(up|down)\.sql", path.name), path.name
    downs = [p.with_name(p.name.replace(".up.sql", ".down.sql")) for p in ups]
    assert all(p.exists() for p in downs)

    pg.create_database("migrate")
    demodata.load(pg.dsn("migrate"))
    with pg.connect("migrate") as conn:
        pristine = _schema(conn)
        for _ in range(2):  # the second round proves a re-run is harmless
            for path in ups:
                apply_sql_file(conn, path)

        status = conn.execute(
            "SELECT data_type, is_nullable, column_default FROM information_schema.columns"
            " WHERE table_name = 'orders' AND column_name = 'status'"
        ).fetchone()
        assert status == ("text", "NO", "'new'::text")
        # Existing rows (and rows from a writer that knows nothing of status) get 'new'.
        assert conn.execute("SELECT DISTINCT status FROM orders").fetchall() == [("new",)]
        conn.execute(
            "INSERT INTO orders (customer_id, item_id, quantity, amount_cents, status)"
            " VALUES (1, 1, 1, 1, 'shipped')"
        )
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO orders (customer_id, item_id, quantity, amount_cents, status)"
                " VALUES (1, 1, 1, 1, 'lost')"
            )
        index = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'orders_created_at_idx'"
        ).fetchone()
        assert index is not None
        assert "(created_at)" in index[0]

        for _ in range(2):
            for path in reversed(downs):
                apply_sql_file(conn, path)
        assert _schema(conn) == pristine


# -- the app ----------------------------------------------------------------------------


def test_app_serves_healthz_before_its_database_exists_and_recovers_without_restart(
    pg: Pg, tmp_path: Path
) -> None:
    app = start_app("blue", pg.dsn("late"), tmp_path)
    try:
        assert app.get("/healthz") == (200, {"colour": "blue", "db": "unavailable"})
        code, body = app.get("/items/1")
        assert code == 503
        assert body["error"] == "database unavailable"

        # An injected fault answers without touching the database.
        assert app.post("/admin/fault", {"fail_rate": 1.0})[0] == 200
        assert app.get("/items/1") == (500, {"error": "injected fault"})
        assert app.post("/admin/fault", {"fail_rate": 0})[0] == 200

        pg.create_database("late")
        wait_for(lambda: app.get("/healthz")[1]["db"] == "ok", 5, "the database to be seen")
        # The database exists, the tables not yet: still a clean 503.
        code, body = app.get("/items/1")
        assert code == 503
        assert body == {"error": "database error", "sqlstate": "42P01"}

        demodata.load(pg.dsn("late"))
        wait_for(lambda: app.get("/items/1")[0] == 200, 5, "the app to serve data")
        code, item = app.get("/items/1")
        assert item["sku"] == "SKU-0000001"
    finally:
        assert app.stop() == 0

    lines = app.log_lines()
    events = [json.loads(line) for line in lines]  # every line is JSON
    assert {"database unavailable", "database available"} <= {e["event"] for e in events}
    assert all(e["colour"] == "blue" for e in events)
    assert not any(pg.password in line for line in lines)


def test_orders_are_written_durably_and_read_back(blue: App, pg: Pg) -> None:
    code, created = blue.post("/orders", {"customer_id": 7, "item_id": 3, "quantity": 4})
    assert code == 201
    assert created["colour"] == "blue"
    assert set(created) == {"id", "colour"}
    with pg.connect("shop") as conn:
        row = conn.execute(
            "SELECT o.customer_id, o.item_id, o.quantity, o.amount_cents = i.price_cents * 4"
            " FROM orders o JOIN items i ON i.id = o.item_id WHERE o.id = %s",
            (created["id"],),
        ).fetchone()
    assert row == (7, 3, 4, True)

    code, order = blue.get(f"/orders/{created['id']}")
    assert code == 200
    assert order["id"] == created["id"]
    assert order["quantity"] == 4
    assert "status" not in order  # blue knows nothing of it
    assert blue.get("/orders/999999999")[0] == 404
    assert blue.get("/items/999999999")[0] == 404
    assert blue.get("/items/99999999999999999999")[0] == 404  # beyond bigint: not a 503


@pytest.mark.parametrize(
    ("raw", "code", "error"),
    [
        (b"{not json", 400, "the body is not valid JSON"),
        (b"[1, 2]", 400, "the body must be a JSON object"),
        (b'{"customer_id": 1, "item_id": 1, "quantity": 0}', 400, "quantity must be"),
        (b'{"customer_id": true, "item_id": 1, "quantity": 1}', 400, "customer_id must be"),
        (b'{"customer_id": 999999, "item_id": 1, "quantity": 1}', 422, "no such customer"),
        (b'{"customer_id": 1, "item_id": 999999, "quantity": 1}', 422, "no such item"),
    ],
)
def test_bad_orders_get_client_errors(blue: App, raw: bytes, code: int, error: str) -> None:
    got_code, body = blue.request("POST", "/orders", raw=raw)
    assert got_code == code
    assert body["error"].startswith(error)


def test_unknown_paths_and_methods(blue: App) -> None:
    assert blue.get("/nope")[0] == 404
    assert blue.request("DELETE", "/orders/1")[0] == 405
    assert blue.request("PUT", "/items/1", raw=b"{}")[0] == 405


def test_clients_hanging_up_leave_only_json_lines_in_the_log(blue: App) -> None:
    for partial in (b"", b"GET /healthz HTTP/1.1\r\n", b"POST /orders HTTP/1.1\r\nContent-Le"):
        with socket.create_connection(("127.0.0.1", blue.port), timeout=5) as sock:
            sock.sendall(partial)
            # Linger 0: close with a reset, as an impatient health checker does.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert blue.get("/healthz")[0] == 200
    for line in blue.log_lines():
        json.loads(line)


def test_metrics_count_requests_by_route_pattern(blue: App) -> None:
    for item in (1, 2, 3):
        assert blue.get(f"/items/{item}")[0] == 200
    assert blue.post("/orders", {"customer_id": 1, "item_id": 2, "quantity": 1})[0] == 201
    assert blue.get("/items/999999")[0] == 404
    blue.get("/healthz")
    blue.get("/admin/fault")

    code, text = blue.get("/metrics")
    assert code == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {
        tuple(sorted(s.labels.items())): s.value
        for s in families["demo_http_requests"].samples
        if s.name == "demo_http_requests_total"
    }

    def count(method: str, route: str, code: str) -> float:
        key = (("code", code), ("colour", "blue"), ("method", method), ("route", route))
        return requests.get(tuple(sorted(key)), 0.0)

    assert count("GET", "/items/:id", "200") >= 3
    assert count("GET", "/items/:id", "404") >= 1
    assert count("POST", "/orders", "201") >= 1
    routes = {dict(k)["route"] for k in requests}
    assert routes <= {"/items/:id", "/orders", "/orders/:id"}  # no raw paths, no /healthz
    # Error series exist before the first error, so error-rate queries are never empty.
    assert count("POST", "/orders", "500") == 0.0
    assert (("code", "500"), ("colour", "blue"), ("method", "POST"), ("route", "/orders")) in (
        requests
    )

    buckets = {
        s.labels["le"]
        for s in families["demo_http_request_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["route"] == "/items/:id"
    }
    assert {"0.001", "5.0", "+Inf"} <= buckets


def test_fault_injection_changes_live(blue: App) -> None:
    try:
        assert blue.post("/admin/fault", {"fail_rate": 0.5, "extra_latency": 0}) == (
            200,
            {"colour": "blue", "fail_rate": 0.5, "extra_latency": 0.0},
        )
        codes = [blue.get(f"/items/{i % 50 + 1}")[0] for i in range(200)]
        assert set(codes) == {200, 500}
        share = codes.count(500) / len(codes)
        assert 0.3 < share < 0.7  # binomial(200, 0.5): more than 5 sigma either side

        assert blue.post("/admin/fault", {"fail_rate": 0, "extra_latency": 0.25})[0] == 200
        for _ in range(3):
            started = time.monotonic()
            assert blue.get("/items/1")[0] == 200
            assert time.monotonic() - started >= 0.25
        # Only data routes are slowed down and failed.
        started = time.monotonic()
        assert blue.get("/healthz")[0] == 200
        assert time.monotonic() - started < 0.25

        assert blue.post("/admin/fault", {"fail_rate": 2})[0] == 400
        assert blue.post("/admin/fault", {"fail": 0.1})[0] == 400
        assert blue.get("/admin/fault")[1]["extra_latency"] == 0.25  # unchanged by bad input
    finally:
        blue.post("/admin/fault", {"fail_rate": 0, "extra_latency": 0})


def test_green_writes_status_once_migration_0001_is_applied(pg: Pg, tmp_path: Path) -> None:
    pg.create_database("green")
    dsn = pg.dsn("green")
    demodata.load(dsn)
    green = start_app("green", dsn, tmp_path)
    try:
        order = {"customer_id": 2, "item_id": 5, "quantity": 1}
        code, body = green.post("/orders", order)
        assert code == 503  # no status column yet: green needs its migration
        assert body["sqlstate"] == "42703"

        with pg.connect("green") as conn:
            apply_sql_file(conn, MIGRATIONS / "0001_order_status.up.sql")
        code, created = green.post("/orders", order)
        assert code == 201
        assert created["colour"] == "green"
        with pg.connect("green") as conn:
            stored = conn.execute(
                "SELECT status FROM orders WHERE id = %s", (created["id"],)
            ).fetchone()
        assert stored == ("new",)
        code, read = green.get(f"/orders/{created['id']}")
        assert code == 200
        assert read["status"] == "new"
    finally:
        assert green.stop() == 0

    # Blue keeps working against the migrated schema: the default fills status in.
    blue = start_app("blue", dsn, tmp_path)
    try:
        code, created = blue.post("/orders", order)
        assert code == 201
        code, read = blue.get(f"/orders/{created['id']}")
        assert "status" not in read
    finally:
        assert blue.stop() == 0


def test_sigterm_answers_requests_in_flight_then_exits(shop: str, tmp_path: Path) -> None:
    app = start_app("blue", shop, tmp_path, "--extra-latency", "1.0")
    result: list[tuple[int, Any]] = []
    client = threading.Thread(target=lambda: result.append(app.get("/items/1")))
    client.start()
    time.sleep(0.3)  # the request is in the app's extra latency now
    started = time.monotonic()
    assert app.stop() == 0
    client.join(timeout=10)
    assert result
    assert result[0][0] == 200
    assert time.monotonic() - started < 5
    assert "stopped" in app.log_lines()[-1]
