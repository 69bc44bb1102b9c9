"""The receiver against real servers: a real PostgreSQL whose backend stalls (a lock
held by another session; a backend stopped with SIGSTOP), and the real Alertmanager's
own webhook sender delivering over HTTPS. The receiver runs in this process (uvicorn
in a thread), wired exactly as `orchestrate serve` wires it."""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orchestrator.config import ReleaseConfig, parse_config
from orchestrator.sandbox.pgcluster import PgCluster
from orchestrator.sandbox.ports import free_port
from orchestrator.server import ReceiverHTTP, build_receiver, connection_params
from orchestrator.store import StateStore
from tests.integration.helpers import ALERTMANAGER, alertmanager, alertmanager_ready, wait_for
from tests.unit.test_alert_server import TOKEN, Harness, cfg, payload, running
from tests.unit.test_alert_server_abuse import certificate  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def pg(module_sandbox_dir: Path) -> Iterator[PgCluster]:
    with PgCluster("state", 15, module_sandbox_dir) as cluster:
        yield cluster


@pytest.fixture
def release_cfg(pg: PgCluster, tmp_path: Path) -> Iterator[ReleaseConfig]:
    pw = tmp_path / "pw"
    pw.write_text(pg.password)
    config = parse_config({
        "release": {"name": "shop-r1", "service": "shop"},
        "blue": {"host": pg.host, "port": pg.port, "dbname": "postgres", "user": "postgres",
                 "password": {"file": str(pw)}, "sslmode": "disable"},
        "green": {"host": pg.host, "port": pg.port, "dbname": "green", "user": "postgres"},
        "router": {"kind": "fake"},
        "canary": {"checks": [], "allow_unanalysed": True},
        "alerts": {"state_timeout": "4s"},
    }, base_dir=tmp_path)
    store = StateStore.for_config(config)
    store.ensure_schema()
    with store.conn.transaction():
        store.conn.execute("DELETE FROM orchestrate.release_log")
        store.conn.execute("DELETE FROM orchestrate.releases")
    store.create("shop-r1", "canary", "x", {})
    # An orchestrator runs the release: the receiver records requests, it does not act.
    store.acquire_lock()
    try:
        yield config
    finally:
        store.close()


def alert_now(**labels: str) -> dict[str, Any]:
    return {"status": "firing",
            "labels": {"alertname": "GreenErrors", "release": "shop-r1", **labels},
            "annotations": {"summary": "green answers 5xx"},
            "startsAt": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "fingerprint": "f00d"}


@contextmanager
def receiver_on(config: ReleaseConfig) -> Iterator[ReceiverHTTP]:
    rollbacks: list[str] = []
    receiver = build_receiver(config, TOKEN, run_rollback=rollbacks.append)
    server = ReceiverHTTP(receiver, config.alerts, host="127.0.0.1", port=0).start()
    try:
        yield server
    finally:
        server.stop()
        receiver.close()
    assert rollbacks == []


def post(server: ReceiverHTTP) -> tuple[int, dict[str, Any], float]:
    began = time.monotonic()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=20)
    try:
        conn.request("POST", "/alertmanager", body=payload(alert_now()),
                     headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), time.monotonic() - began
    finally:
        conn.close()


def serve_backends(pg: PgCluster) -> list[int]:
    with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'orchestrate-serve'")]


def test_state_connection_has_timeouts_and_keepalives(release_cfg: ReleaseConfig) -> None:
    receiver = build_receiver(release_cfg, TOKEN)
    store = receiver._pool._idle.get_nowait()
    try:
        conn = store.conn  # type: ignore[attr-defined]
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "4s"
        assert conn.execute("SHOW lock_timeout").fetchone()[0] == "2s"
        params = conn.info.get_parameters()
        expected = connection_params(4.0)
        for key in ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
                    "tcp_user_timeout", "connect_timeout"):
            assert params.get(key) == str(expected[key]), (key, params)
    finally:
        store.close()


def test_a_table_lock_held_elsewhere_gives_503_within_5s(pg: PgCluster,
                                                        release_cfg: ReleaseConfig) -> None:
    # On main the receiver's query waited as long as the lock was held (no statement
    # or lock timeout): Alertmanager got no answer at all.
    with receiver_on(release_cfg) as server, \
            psycopg.connect(pg.conninfo()) as locker:
        locker.execute("LOCK TABLE orchestrate.releases IN ACCESS EXCLUSIVE MODE")
        results = [post(server) for _ in range(2)]
        locker.rollback()
        code, body, took = post(server)
    for code_, body_, took_ in results:
        print(f"table locked: {code_} in {took_:.2f}s")
        assert code_ == 503 and "unreachable" in body_["error"], body_
        assert took_ < 5.0
    # The lock gone, the next alert goes through on the same receiver.
    assert code == 202 and body["action"] == "rollback_requested", body
    assert took < 2.0


def test_a_stopped_backend_gives_503_within_5s_and_frees_its_worker(
        pg: PgCluster, release_cfg: ReleaseConfig) -> None:
    # SIGSTOP: the kernel still acknowledges packets and keepalives, so no TCP timeout
    # fires and no statement timeout runs. Only an abandoned, aborted call helps.
    with receiver_on(release_cfg) as server:
        assert post(server)[0] == 202  # opens the pooled connection
        stopped = serve_backends(pg)
        assert stopped
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            code, body, took = post(server)
            print(f"backend stopped: {code} in {took:.2f}s")
            assert code == 503 and "did not answer within 4s" in body["error"], body
            assert took < 5.0
            # Still stopped, and the next alert is answered on a new connection.
            code, body, again = post(server)
            assert code == 200 and "already requested" in body["reason"], body
            assert again < 2.0
            # The abandoned call is counted once, by the side that answered.
            assert server.receiver.snapshot()["store_unavailable"] == 1
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)


# -- the real Alertmanager ---------------------------------------------------------------------


@pytest.mark.skipif(ALERTMANAGER is None, reason="Debian's prometheus-alertmanager is needed")
def test_alertmanager_delivers_over_https(tmp_path: Path,
                                          certificate: tuple[Path, Path]) -> None:  # noqa: F811
    cert, key = certificate
    h = Harness(running(), config=cfg(tls={"cert_file": str(cert), "key_file": str(key)},
                                      matchers={}))
    server = ReceiverHTTP(h.receiver, h.receiver_cfg.alerts, host="127.0.0.1", port=0).start()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    port = free_port()
    am = alertmanager(tmp_path, port, f"{server.url}/alertmanager", token_file, ca_file=cert)
    am.start()
    try:
        wait_for(lambda: alertmanager_ready(port), timeout=30)
        body = json.dumps([
            {"labels": {"alertname": "OtherRelease", "release": "shop-r0"}},
            {"labels": {"alertname": "GreenErrors", "release": "shop-r1", "service": "shop"},
             "annotations": {"summary": "green answers 5xx"}}]).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v2/alerts", data=body,
                                     method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
        deadline = time.monotonic() + 20
        while not h.store.requests and time.monotonic() < deadline:
            time.sleep(0.1)
        log = (tmp_path / "am.log").read_text()
        assert h.store.requests == ["alert GreenErrors firing: green answers 5xx"], log[-3000:]
        # Alertmanager's own body (nanosecond startsAt and all) parsed; the other
        # release's alert was ignored.
        assert h.receiver.snapshot().get("bad_payload", 0) == 0
        assert "ignored" in h.receiver.snapshot(), h.receiver.snapshot()
        # Alertmanager verified the certificate (tls_config.ca_file) without complaint.
        assert "x509" not in log and "certificate" not in log.lower()
    finally:
        am.stop()
        server.stop()
