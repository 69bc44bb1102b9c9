"""The load generator against the real demo app on a throwaway PostgreSQL 15."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orchestrator.sandbox import demodata
from orchestrator.sandbox.loadgen import LoadGenerator, LoadReport
from orchestrator.sandbox.pgcluster import PgCluster
from orchestrator.sandbox.ports import free_port

REPO = Path(__file__).resolve().parents[1]


# -- a PostgreSQL 15 and the demo app on it --------------------------------------------


@pytest.fixture(scope="module")
def dsn(module_sandbox_dir: Path) -> Iterator[str]:
    """A loaded demo database on a cluster of its own."""
    settings = {"fsync": "off", "full_page_writes": "off"}
    with PgCluster("loadgen", 15, module_sandbox_dir, settings=settings) as cluster:
        cluster.create_database("shop")
        shop = cluster.conninfo("shop")
        demodata.load(shop)
        yield shop


class App:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def fault(self, fail_rate: float = 0.0, extra_latency: float = 0.0) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            body = json.dumps({"fail_rate": fail_rate, "extra_latency": extra_latency})
            conn.request("POST", "/admin/fault", body=body)
            assert conn.getresponse().status == 200
        finally:
            conn.close()


@pytest.fixture(scope="module")
def app(dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    log_path = tmp_path_factory.mktemp("app") / "blue.log"
    command = [sys.executable, "-m", "orchestrator.sandbox.demoapp", "--colour", "blue"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*command, "--port", "0"],
            env={**os.environ, "DEMO_DSN": dsn},
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=REPO,
        )
    try:
        port = None
        deadline = time.monotonic() + 15
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            for line in log_path.read_text().splitlines():
                if json.loads(line).get("event") == "listening":
                    port = int(json.loads(line)["port"])
            time.sleep(0.05)
        assert port is not None, log_path.read_text()
        yield App(proc, port)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def healthy(app: App) -> Iterator[App]:
    app.fault()
    yield app
    app.fault()


def _existing_order_ids(dsn: str, ids: list[int]) -> set[int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT id FROM orders WHERE id = ANY(%s)", (ids,)).fetchall()
    return {r[0] for r in rows}


# -- tests --------------------------------------------------------------------------------


def test_offers_the_target_rate_and_every_acked_write_exists(healthy: App, dsn: str) -> None:
    generator = LoadGenerator(healthy.url, rate=50, write_ratio=0.3, seed=1)
    generator.start()
    time.sleep(1.5)
    midway = generator.report()
    time.sleep(1.5)
    report = generator.stop()

    assert 0 < midway.requests < report.requests
    assert 1.4 < midway.duration_s < 1.7
    assert 2.9 < report.duration_s < 3.5
    expected = 50 * report.duration_s
    assert 0.9 * expected <= report.requests <= 1.05 * expected + 1
    assert report.errors == {}
    assert report.ok == report.requests
    assert report.max_schedule_lag_s < 0.5  # the rate was really offered

    acked = report.acked_order_ids
    assert 0.15 * report.requests < len(acked) < 0.45 * report.requests
    assert len(set(acked)) == len(acked)
    assert _existing_order_ids(dsn, acked) == set(acked)
    assert report.acked_by_colour == {"blue": len(acked)}
    # About 15 writes/s: an average gap near 70 ms, a longest one well under a second.
    assert 0.02 < report.max_write_gap_s < 1.0
    assert 0 < report.p99_latency_s < 0.5


def test_a_write_outage_shows_as_errors_and_as_the_write_gap(healthy: App) -> None:
    generator = LoadGenerator(healthy.url, rate=50, write_ratio=0.5, seed=2)
    generator.start()
    time.sleep(0.8)
    healthy.fault(fail_rate=1.0)
    outage_started = time.monotonic()
    time.sleep(1.0)
    healthy.fault(fail_rate=0.0)
    outage = time.monotonic() - outage_started
    time.sleep(0.8)
    report = generator.stop()

    assert set(report.errors) == {"500"}
    assert 0.6 * 50 * outage < report.errors["500"] < 1.3 * 50 * outage
    assert report.ok + report.errors["500"] == report.requests
    assert outage - 0.1 < report.max_write_gap_s < outage + 0.5


def test_a_slow_server_is_reported_not_hidden(healthy: App) -> None:
    healthy.fault(extra_latency=0.3)
    # 4 workers at 0.3 s each manage ~13 requests/s; 40/s were asked for.
    slow = LoadGenerator(healthy.url, rate=40, workers=4, seed=3)
    slow.start()
    time.sleep(1.5)
    report = slow.stop()
    assert report.errors == {}
    assert report.max_schedule_lag_s > 0.5
    assert report.p99_latency_s >= 0.3

    impatient = LoadGenerator(healthy.url, rate=20, timeout=0.1, seed=4)
    impatient.start()
    time.sleep(0.8)
    report = impatient.stop()
    assert report.ok == 0
    assert report.requests > 0
    assert set(report.errors) == {"TimeoutError"}


def test_an_unreachable_server_gives_errors_not_exceptions() -> None:
    generator = LoadGenerator(f"http://127.0.0.1:{free_port()}", rate=40, seed=5)
    generator.start()
    time.sleep(0.5)
    started = time.monotonic()
    report = generator.stop()
    assert time.monotonic() - started < 1.0
    assert report.requests > 0
    assert report.ok == 0
    assert set(report.errors) == {"ConnectionRefusedError"}
    assert report.acked_order_ids == []
    # Nothing shows that a write went through: the gap is the whole run.
    assert report.max_write_gap_s == report.duration_s


def test_keep_alive_connections_survive_a_server_that_closes_them() -> None:
    # A tiny server that answers once per connection and closes it without saying so
    # first: the generator must retry on a fresh connection, not report an error.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                conn.recv(65536)
                body = b'{"id": 1}'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        generator = LoadGenerator(f"http://127.0.0.1:{port}", rate=20, workers=2, write_ratio=0)
        generator.start()
        time.sleep(1.0)
        report = generator.stop()
    finally:
        stop.set()
        server.join(timeout=5)
        listener.close()
    assert report.errors == {}
    assert report.ok == report.requests > 0
    assert report.retries > 0


def test_command_line_prints_the_report_and_writes_acked_ids(
    healthy: App, dsn: str, tmp_path: Path
) -> None:
    acked_file = tmp_path / "acked.txt"
    command = [sys.executable, "-m", "orchestrator.sandbox.loadgen", "--url", healthy.url]
    options = ["--rate", "30", "--duration", "1.5", "--write-ratio", "0.5"]
    result = subprocess.run(
        [*command, *options, "--acked-file", str(acked_file)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=REPO,
    )
    report = LoadReport(**json.loads(result.stdout))
    assert report.requests > 30
    assert report.errors == {}
    ids = [int(line) for line in acked_file.read_text().splitlines()]
    assert ids == report.acked_order_ids
    assert ids
    assert _existing_order_ids(dsn, ids) == set(ids)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_url": "ftp://x"}, "http"),
        ({"base_url": "http://x", "rate": 0}, "rate"),
        ({"base_url": "http://x", "write_ratio": 1.5}, "write_ratio"),
        ({"base_url": "http://x", "workers": 0}, "workers"),
    ],
)
def test_rejects_nonsense(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoadGenerator(**kwargs)
