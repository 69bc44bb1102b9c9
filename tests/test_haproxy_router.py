"""HAProxyRouter against a real HAProxy 2.6 in front of two tiny HTTP servers."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from structlog.testing import capture_logs

from orchestrator.config import HAProxyRouterConfig
from orchestrator.routers.base import RouterError, TrafficRouter, WeightDriftError, Weights
from orchestrator.routers.haproxy import HAProxyRouter
from orchestrator.sandbox.haproxy import HAProxyServer
from orchestrator.sandbox.ports import free_port

if TYPE_CHECKING:
    from tests.conftest import ColourServer


def raw_command(sock_path: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(sock_path))
        sock.sendall(command.encode() + b"\n")
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out.decode().strip()


def get(url_port: int, path: str = "/") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", url_port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def served_by(proxy: HAProxyServer, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        status, body = get(proxy.port, "/x")
        assert status == 200
        seen[body] += 1
    return seen


def both_servers_up(proxy: HAProxyServer) -> bool:
    lines = raw_command(proxy.admin_socket, "show servers state app").splitlines()[2:]
    states = {f[3]: f[5] for f in (line.split() for line in lines) if len(f) > 5}
    return states.get("blue") == "2" and states.get("green") == "2"


@pytest.fixture(scope="module")
def proxy(
    module_sandbox_dir: Path, colour_server: Callable[..., ColourServer]
) -> Iterator[HAProxyServer]:
    blue, green = colour_server("blue"), colour_server("green")
    with HAProxyServer(
        module_sandbox_dir, blue.address, green.address, admin_port=free_port()
    ) as server:
        deadline = time.monotonic() + 15
        while not both_servers_up(server):
            assert time.monotonic() < deadline, "health checks never passed"
            time.sleep(0.2)
        yield server


@pytest.fixture
def router(proxy: HAProxyServer) -> HAProxyRouter:
    # Every test starts from the configured state: all traffic on blue.
    raw_command(proxy.admin_socket, "set weight app/blue 100")
    raw_command(proxy.admin_socket, "set weight app/green 0")
    return HAProxyRouter(
        HAProxyRouterConfig(kind="haproxy", socket=str(proxy.admin_socket), timeout=2)
    )


def test_router_reads_live_weights_and_passes_check(
    router: HAProxyRouter, proxy: HAProxyServer
) -> None:
    assert isinstance(router, TrafficRouter)
    router.check()
    assert router.current() == Weights.green_at(0)
    assert router.describe() == f"haproxy backend app via {proxy.admin_socket}"


def test_weights_move_the_traffic(router: HAProxyRouter, proxy: HAProxyServer) -> None:
    assert served_by(proxy, 50) == Counter(blue=50)

    assert router.set_weights(Weights.green_at(20), expected=Weights.green_at(0)) == (
        Weights.green_at(20)
    )
    assert raw_command(proxy.admin_socket, "get weight app/green").startswith("20 ")
    assert raw_command(proxy.admin_socket, "get weight app/blue").startswith("80 ")
    seen = served_by(proxy, 200)
    assert 25 <= seen["green"] <= 55, seen  # roundrobin: 40 expected

    router.set_weights(Weights.green_at(100), expected=Weights.green_at(20))
    assert served_by(proxy, 50) == Counter(green=50)

    router.set_weights(Weights.green_at(0), expected=Weights.green_at(100))
    assert served_by(proxy, 50) == Counter(blue=50)


def test_setting_the_same_weights_again_is_a_no_op(router: HAProxyRouter) -> None:
    router.set_weights(Weights.green_at(5))
    assert router.set_weights(Weights.green_at(5), expected=Weights.green_at(5)) == (
        Weights.green_at(5)
    )


def test_drift_is_reported_and_nothing_changes(router: HAProxyRouter, proxy: HAProxyServer) -> None:
    router.set_weights(Weights.green_at(20))
    with pytest.raises(WeightDriftError) as info:
        router.set_weights(Weights.green_at(50), expected=Weights.green_at(5))
    assert info.value.actual == Weights.green_at(20)
    assert info.value.expected == Weights.green_at(5)
    assert router.current() == Weights.green_at(20)
    assert raw_command(proxy.admin_socket, "get weight app/green").startswith("20 ")

    # Someone changes a weight by hand: blue 80, green 40 -> green has 33 %.
    raw_command(proxy.admin_socket, "set weight app/green 40")
    assert router.current() == Weights(blue=67, green=33)
    with pytest.raises(WeightDriftError, match="orchestrate last set"):
        router.set_weights(Weights.green_at(50), expected=Weights.green_at(20))
    assert raw_command(proxy.admin_socket, "get weight app/green").startswith("40 ")


def test_both_weights_zero_is_an_error(router: HAProxyRouter, proxy: HAProxyServer) -> None:
    raw_command(proxy.admin_socket, "set weight app/blue 0")
    with pytest.raises(RouterError, match="weight 0"):
        router.current()
    with pytest.raises(RouterError, match="weight 0"):
        router.set_weights(Weights.green_at(0), expected=Weights.green_at(0))
    # Without an expectation (a rollback) the outage is repaired.
    assert router.set_weights(Weights.green_at(0)) == Weights.green_at(0)
    status, body = get(proxy.port, "/x")
    assert (status, body) == (200, "blue")


def test_check_reports_missing_backend_server_and_socket(
    router: HAProxyRouter, proxy: HAProxyServer, sandbox_dir: Path
) -> None:
    sock = str(proxy.admin_socket)

    bad_backend = HAProxyRouter(HAProxyRouterConfig(kind="haproxy", socket=sock, backend="nope"))
    with pytest.raises(RouterError, match="no backend 'nope'") as info:
        bad_backend.check()
    assert info.value.hint and "router.backend" in info.value.hint

    bad_server = HAProxyRouter(
        HAProxyRouterConfig(kind="haproxy", socket=sock, green_server="canary")
    )
    with pytest.raises(RouterError, match="no server 'canary'"):
        bad_server.check()
    # HAProxy's own message reaches the caller.
    with pytest.raises(RouterError, match="No such server"):
        bad_server.current()
    with pytest.raises(RouterError, match="No such server"):
        bad_server.set_weights(Weights.green_at(10))
    assert router.current() == Weights.green_at(0)

    missing = HAProxyRouter(
        HAProxyRouterConfig(kind="haproxy", socket=str(sandbox_dir / "none.sock"), timeout=1)
    )
    started = time.monotonic()
    with pytest.raises(RouterError, match="cannot reach the HAProxy runtime API"):
        missing.check()
    assert time.monotonic() - started < 5  # bounded retries


def test_a_weight_change_is_logged_under_the_kubernetes_routers_event(
    router: HAProxyRouter,
) -> None:
    with capture_logs() as logs:
        router.set_weights(Weights.green_at(5))
    changed = [e for e in logs if e["event"] == "weights changed"]
    assert changed == [{"event": "weights changed", "log_level": "info",
                        "router": router.describe(), "weights": "blue 95% / green 5%"}]


def test_an_unreachable_socket_is_retried_by_the_socket_policy(sandbox_dir: Path) -> None:
    missing = HAProxyRouter(
        HAProxyRouterConfig(kind="haproxy", socket=str(sandbox_dir / "none.sock"), timeout=1)
    )
    with capture_logs() as logs, pytest.raises(RouterError, match=r"\(3 attempts\)"):
        missing.current()
    retries = [e for e in logs if e["event"] == "call failed, retrying"]
    assert [(e["policy"], e["attempt"]) for e in retries] == [("socket", 1), ("socket", 2)]


def test_router_over_tcp_runtime_api(router: HAProxyRouter, proxy: HAProxyServer) -> None:
    assert proxy.admin_address is not None
    tcp = HAProxyRouter(HAProxyRouterConfig(kind="haproxy", socket=proxy.admin_address))
    tcp.check()
    tcp.set_weights(Weights.green_at(30), expected=Weights.green_at(0))
    assert router.current() == Weights.green_at(30)


def test_no_request_fails_while_weights_move(router: HAProxyRouter, proxy: HAProxyServer) -> None:
    results: Counter[str] = Counter()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                status, body = get(proxy.port, "/x")
                results[body if status == 200 else f"status {status}"] += 1
            except OSError as exc:
                results[f"error {exc}"] += 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        expected = Weights.green_at(0)
        for percent in [5, 20, 50, 100, 0, 100, 0, 50, 0] * 2:
            expected = router.set_weights(Weights.green_at(percent), expected=expected)
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert set(results) == {"blue", "green"}, results
    assert sum(results.values()) > 100
