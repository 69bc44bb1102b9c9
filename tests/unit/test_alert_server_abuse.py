"""The receiver's HTTP edges under abuse, over real sockets against the real server
(uvicorn in a thread of this process; the state store is a fake: these are about
HTTP). Each test pins a defect of the hand-written server it replaced."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import structlog

from orchestrator import cli
from orchestrator import logging as logs
from orchestrator.errors import ConfigError
from orchestrator.server import ReceiverHTTP, check_transport, resolve_token
from tests.unit.test_alert_server import TOKEN, Harness, alert, cfg, payload, running


@pytest.fixture
def json_logs() -> Iterator[None]:
    logs.configure(fmt="json")
    yield
    # The logger holds capsys's stream, which closes after the test.
    structlog.reset_defaults()


@contextmanager
def serving(**alerts: Any) -> Iterator[tuple[ReceiverHTTP, Harness]]:
    h = Harness(running(), config=cfg(**alerts))
    server = ReceiverHTTP(h.receiver, h.receiver_cfg.alerts, host="127.0.0.1", port=0).start()
    try:
        yield server, h
    finally:
        server.stop()


def post_alert(server: ReceiverHTTP, body: bytes | None = None,
               context: ssl.SSLContext | None = None) -> tuple[int, dict[str, Any]]:
    conn: http.client.HTTPConnection
    if context is not None:
        conn = http.client.HTTPSConnection(server.host, server.port, timeout=5,
                                           context=context)
    else:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("POST", "/alertmanager", body=body or payload(alert()),
                     headers={"Authorization": f"Bearer {TOKEN}",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, {"text": raw.decode(errors="replace")}
    finally:
        conn.close()


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and when it closed."""
    sock.settimeout(timeout)
    chunks = []
    with suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks), time.monotonic()


# -- malformed bodies -----------------------------------------------------------------------


def test_deeply_nested_json_gets_400_not_a_dropped_connection() -> None:
    # On main: RecursionError in the handler thread, no answer, a traceback on stderr.
    with serving() as (server, h):
        code, body = post_alert(server, b"[" * 100_000)
        assert code == 400, body
        assert "nests too deeply" in body["error"]
        code, body = post_alert(server, b'{"alerts": ' + b"[" * 100_000)
        assert code == 400
        # The server is still there.
        assert post_alert(server)[0] == 202
    assert h.receiver.snapshot()["bad_payload"] == 2


@pytest.mark.parametrize(("path", "auth"), [("/elsewhere", TOKEN), ("/alertmanager", "wrong"),
                                            ("/healthz/x", TOKEN)])
def test_an_unread_body_is_never_parsed_as_a_second_request(path: str, auth: str) -> None:
    # On main the 404 path left the body unread on a keep-alive connection: a body that
    # is itself a request got a second answer (a request-desync primitive).
    smuggled = (b"POST /alertmanager HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: " + str(len(payload(alert()))).encode() + b"\r\n\r\n"
                + payload(alert()))
    with serving() as (server, h), socket.create_connection((server.host, server.port), 5) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {auth}\r\n"
                  f"Content-Length: {len(smuggled)}\r\n\r\n".encode() + smuggled)
        answer, _ = read_until_closed(s)
        assert answer.count(b"HTTP/1.1 ") == 1, answer
        assert answer.startswith((b"HTTP/1.1 404", b"HTTP/1.1 401")), answer
        assert h.store.requests == []  # the smuggled alert never ran


# -- slow clients, caps ------------------------------------------------------------------------


def test_a_trickling_client_is_cut_off_at_the_request_deadline() -> None:
    # On main: a 10 s timeout per recv(), so a byte every second kept a thread forever.
    with serving(request_timeout="2s") as (server, _):
        for head, trickle in [(b"", b"POST /alertmanager HTTP/1.1\r\nHost: x\r\n"),
                              (b"POST /alertmanager HTTP/1.1\r\nHost: x\r\nAuthorization: "
                               b"Bearer " + TOKEN.encode() + b"\r\nContent-Length: 500\r\n\r\n",
                               b"{" * 500)]:
            with socket.create_connection((server.host, server.port), 5) as s:
                began = time.monotonic()
                s.sendall(head)
                closed_at = None
                for byte in trickle:
                    try:
                        s.sendall(bytes([byte]))
                        s.settimeout(0.5)
                        if s.recv(65536) == b"":
                            closed_at = time.monotonic()
                            break
                    except TimeoutError:
                        continue
                    except (BrokenPipeError, ConnectionResetError):
                        closed_at = time.monotonic()
                        break
                assert closed_at is not None, "the server never cut the trickling client off"
                assert 1.8 < closed_at - began < 3.5, closed_at - began


def test_500_slow_connections_do_not_delay_an_alert() -> None:
    with serving() as (server, h):
        slow: list[socket.socket] = []
        try:
            for i in range(500):
                s = socket.create_connection((server.host, server.port), 5)
                # Half idle, half stuck half-way through their headers.
                if i % 2:
                    s.sendall(b"POST /alertmanager HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                slow.append(s)
            time.sleep(0.2)
            began = time.monotonic()
            code, body = post_alert(server)
            took = time.monotonic() - began
        finally:
            for s in slow:
                s.close()
    print(f"alert answered in {took * 1000:.0f} ms with 500 slow connections open")
    assert code == 202 and body["action"] == "rollback_requested"
    assert took < 1.0
    assert len(h.store.requests) == 1


def test_connections_are_capped_and_the_cap_frees_itself() -> None:
    with serving(max_connections=16, request_timeout="1s") as (server, _):
        idle = [socket.create_connection((server.host, server.port), 5) for _ in range(20)]
        try:
            time.sleep(0.1)
            code, body = post_alert(server)
            assert code == 503, body  # uvicorn's limit_concurrency: Alertmanager retries
            time.sleep(1.5)  # the idle ones hit the request deadline
            assert post_alert(server)[0] == 202
        finally:
            for s in idle:
                s.close()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_listen_backlog_is_at_least_128() -> None:
    # On main: socketserver's default of 5.
    with serving() as (server, _):
        out = subprocess.run(["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
    # State Recv-Q Send-Q Local Peer; for a listening socket Send-Q is the backlog.
    assert int(out[2]) >= 128, out


# -- TLS and the start rules ---------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("tls")
    cert, key = base / "cert.pem", base / "key.pem"
    # A throwaway self-signed certificate for 127.0.0.1 (no `cryptography` here).
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_https_with_a_test_certificate(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    with serving(tls={"cert_file": str(cert), "key_file": str(key)},
                 request_timeout="2s") as (server, h):
        assert server.url.startswith("https://")
        verified = ssl.create_default_context(cafile=str(cert))
        code, body = post_alert(server, context=verified)
        assert code == 202 and body["action"] == "rollback_requested"
        # Verification is real: without the certificate as CA the handshake fails.
        with pytest.raises(ssl.SSLCertVerificationError):
            post_alert(server, context=ssl.create_default_context())
        # A client that never starts its handshake is cut off at the deadline too.
        with socket.create_connection((server.host, server.port), 5) as s:
            began = time.monotonic()
            _, closed = read_until_closed(s, timeout=10)
            assert closed - began < 4.0
    assert len(h.store.requests) == 1


def test_bad_tls_files_are_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("not a certificate")
    alerts = cfg(tls={"cert_file": str(tmp_path / "c.pem"),
                      "key_file": str(tmp_path / "k.pem")}).alerts
    with pytest.raises(ConfigError) as err:
        check_transport(alerts, host="127.0.0.1")
    assert "alerts.tls" in err.value.message and err.value.hint


def test_short_token_off_loopback_is_refused_with_the_rule_and_a_remedy(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        json_logs: None) -> None:
    # On main: a 5-character token was accepted off loopback with a warning.
    monkeypatch.setenv("ORCHESTRATE_WEBHOOK_TOKEN", "abcde")
    with pytest.raises(ConfigError) as err:
        resolve_token(cfg().alerts, host="0.0.0.0", insecure=False)
    assert "at least 32" in err.value.message and "5 characters" in err.value.message
    assert err.value.hint and "openssl rand -hex 32" in err.value.hint
    assert "abcde" not in err.value.message + err.value.hint
    # On loopback: allowed, with a warning.
    assert resolve_token(cfg().alerts, host="127.0.0.1", insecure=False) == "abcde"
    assert "shorter than 32" in capsys.readouterr().err


def test_short_token_off_loopback_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ORCHESTRATE_WEBHOOK_TOKEN", "short-token")
    config = tmp_path / "release.yaml"
    config.write_text(json.dumps({
        "release": {"name": "shop-r1", "service": "shop"},
        "blue": {"dbname": "shop", "user": "u"}, "green": {"port": 5433, "dbname": "shop",
                                                          "user": "u"},
        "router": {"kind": "fake"}, "canary": {"checks": [], "allow_unanalysed": True}}))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--config", str(config), "--listen", "0.0.0.0:0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "at least 32" in err and "openssl rand -hex 32" in err


def test_plain_http_off_loopback_warns_loudly(capsys: pytest.CaptureFixture[str],
                                              json_logs: None) -> None:
    check_transport(cfg().alerts, host="0.0.0.0")
    assert "PLAIN HTTP on 0.0.0.0" in capsys.readouterr().err
    check_transport(cfg().alerts, host="127.0.0.1")
    assert "PLAIN HTTP" not in capsys.readouterr().err


def test_a_hung_decision_answers_503_within_the_state_timeout() -> None:
    """The HTTP side's own bound, whatever the store does (a real stalled database is
    in tests/test_alert_receiver_pg.py)."""
    with serving(state_timeout="1s") as (server, h):
        gate = threading.Event()
        h.store.get = lambda name: gate.wait(10) and None  # type: ignore[method-assign]
        began = time.monotonic()
        code, body = post_alert(server)
        took = time.monotonic() - began
        gate.set()
    assert code == 503 and "did not answer within 1s" in body["error"], body
    assert took < 2.0


def test_sigterm_stops_cleanly_and_says_so(tmp_path: Path) -> None:
    """uvicorn re-raises the signal it handled; `serve` must live on past it (to wait for
    a rollback in progress), log "stopped" and exit 0. A subprocess: signals are the
    point."""
    config = tmp_path / "release.yaml"
    config.write_text(json.dumps({
        "release": {"name": "shop-r1", "service": "shop"},
        "blue": {"host": "127.0.0.1", "port": 1, "dbname": "shop", "user": "u"},
        "green": {"port": 5433, "dbname": "shop", "user": "u"}, "router": {"kind": "fake"},
        "canary": {"checks": [], "allow_unanalysed": True}}))
    port = socket.create_server(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    env = {**os.environ, "ORCHESTRATE_WEBHOOK_TOKEN": TOKEN, "ORCHESTRATE_LOG_FORMAT": "json",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from orchestrator.cli import main; main()", "serve",
         "--config", str(config), "--listen", f"127.0.0.1:{number}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with suppress(OSError), socket.create_connection(("127.0.0.1", number), 0.5):
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode()
    assert proc.returncode == 0, text
    assert '"event": "stopping"' in text and '"event": "stopped"' in text
