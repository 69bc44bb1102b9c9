"""Canary analysis against the real Prometheus, demo app and HAProxy: built-in checks,
comparison with blue, inconclusive data, manual gates, stage hooks and the
Alertmanager receiver (`orchestrate serve`), each through the real CLI."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from orchestrator.canary.analysis import render
from orchestrator.canary.metrics import PrometheusMetrics
from orchestrator.config import parse_config
from orchestrator.routers.base import Weights
from orchestrator.sandbox.loadgen import LoadGenerator
from orchestrator.sandbox.ports import free_port
from orchestrator.sandbox.stack import Sandbox
from tests.integration import helpers as h

pytestmark = pytest.mark.slow

NO_DATA = {"name": "nodata", "query": 'orchestrate_test_no_such_metric{colour="$colour"}',
           "max": 1.0, "inconclusive_limit": 2}
TOKEN = "it-token-5b0f8d3c2a6e41f7"


# -- helpers -------------------------------------------------------------------------


def canary(stages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    # Only the checks a test names: the sandbox's default ones would read, through
    # their 10 s rate window, what the previous test did to the apps. None at all must
    # be said explicitly.
    named = bool(extra.get("checks") or extra.get("builtin"))
    return {"interval": "1s", "window": "10s", "stages": stages, "checks": [],
            **({} if named else {"allow_unanalysed": True}), **extra}


def log_messages(sb: Sandbox, name: str) -> list[str]:
    with h.blue_conn(sb) as conn:
        return [r[0] for r in conn.execute(
            "SELECT message FROM orchestrate.release_log WHERE release = %s ORDER BY id",
            (name,)).fetchall()]


def measurements(sb: Sandbox, name: str) -> list[dict[str, Any]]:
    with h.blue_conn(sb) as conn:
        rows = conn.execute(
            "SELECT stage, weight, check_name, value, baseline, verdict, detail FROM "
            "orchestrate.stage_measurements WHERE release = %s "
            # The stage guard's replication-lag and probe rows are not what these tests
            # count.
            "AND check_name NOT LIKE 'replication-lag%%' AND check_name NOT LIKE 'probe:%%' "
            "ORDER BY id", (name,)).fetchall()
    keys = ("stage", "weight", "check", "value", "baseline", "verdict", "detail")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def logged(sb: Sandbox, name: str, fragment: str) -> bool:
    try:
        return any(fragment in m for m in log_messages(sb, name))
    except Exception:  # the control schema may not exist yet
        return False


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the release did not finish:\n{log.read_text()[-3000:]}") from None


def served_by(sb: Sandbox, requests: int = 20) -> set[str]:
    """Which colours answer through HAProxy right now (X-Served-By of each answer)."""
    host, port = sb.haproxy.url.removeprefix("http://").split(":")
    seen = set()
    for i in range(requests):
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            conn.request("GET", f"/items/{i + 1}")
            resp = conn.getresponse()
            resp.read()
            seen.add(resp.getheader("X-Served-By") or "?")
        finally:
            conn.close()
    return seen


class _HookHandler(BaseHTTPRequestHandler):
    server: HookServer

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        body["_path"] = self.path
        self.server.bodies.append(body)
        code = self.server.status.get(self.path, 200)
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok" if code < 300 else b"no")

    def log_message(self, format: str, *args: object) -> None:
        pass


class HookServer(ThreadingHTTPServer):
    """Stands in for a smoke test: answers ``status`` and keeps each body it got."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HookHandler)
        self.status: dict[str, int] = {}
        self.bodies: list[dict[str, Any]] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def hooks() -> Iterator[HookServer]:
    with HookServer() as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield server
        server.shutdown()


@pytest.fixture
def load(sandbox_16_17: Sandbox) -> Iterator[LoadGenerator]:
    # Enough workers that 0.3 s of injected latency does not throttle the rate.
    with h.under_load(sandbox_16_17, rate=20.0, write_ratio=0.3, workers=16) as generator:
        yield generator


@pytest.fixture
def sb(sandbox_16_17: Sandbox) -> Iterator[Sandbox]:
    yield from h.fresh(sandbox_16_17)


# -- comparison with blue -------------------------------------------------------------------

COMPARE = [{"check": "latency-p99", "provider": "demo", "name": "p99-vs-blue",
            "max_increase_over_blue": 0.1, "inconclusive_limit": 5}]
COMPARE_STAGES = [{"weight": 0, "duration": "1s"}, {"weight": 20, "duration": "4s"},
                  {"weight": 100, "duration": "2s"}]

# "Only green slow" runs first: after "both slow", blue's 10 s window would still hold
# slow requests and excuse a slow green.


def test_comparison_with_blue_fails_when_only_green_is_bad(
        sb: Sandbox, load: LoadGenerator) -> None:
    h.set_fault(sb, "green", extra_latency=0.3)
    cfg = h.write_config(sb, "green-slow", canary=canary(COMPARE_STAGES, builtin=COMPARE))
    result = h.run_cli(sb, "release", "--config", str(cfg))
    assert result.code == 1 and "ROLLED BACK" in result.out, result.err[-3000:]
    assert "p99-vs-blue" in result.out and "> blue" in result.out
    assert h.router(sb).current() == Weights.green_at(0)


def test_comparison_with_blue_passes_when_both_are_bad_alike(
        sb: Sandbox, load: LoadGenerator) -> None:
    h.set_fault(sb, "blue", extra_latency=0.3)
    h.set_fault(sb, "green", extra_latency=0.3)
    cfg = h.write_config(sb, "both-slow", canary=canary(COMPARE_STAGES, builtin=COMPARE))
    result = h.run_cli(sb, "release", "--config", str(cfg))
    assert result.code == 0, result.err[-3000:]
    evaluated = [m for m in measurements(sb, "both-slow") if m["check"] == "p99-vs-blue"]
    passed = [m for m in evaluated if m["verdict"] == "pass"]
    assert passed, evaluated
    # Both slow indeed: an absolute 0.25 s limit would have rolled this release back.
    assert all(m["value"] > 0.25 and m["baseline"] > 0.25 for m in passed)


# -- inconclusive data ---------------------------------------------------------------------


def test_no_data_rolls_back_by_default(sb: Sandbox, load: LoadGenerator) -> None:
    cfg = h.write_config(sb, "no-data", canary=canary(
        [{"weight": 0, "duration": "1s"}, {"weight": 5, "duration": "5s"},
         {"weight": 100, "duration": "1s"}], checks=[NO_DATA]))
    result = h.run_cli(sb, "release", "--config", str(cfg))
    assert result.code == 1 and "ROLLED BACK" in result.out, result.err[-3000:]
    assert "inconclusive 2 times" in result.out
    verdicts = [m["verdict"] for m in measurements(sb, "no-data")]
    assert verdicts == ["inconclusive", "inconclusive"]
    assert h.router(sb).current() == Weights.green_at(0)


def test_no_data_pauses_when_configured_and_promote_resumes(
        sb: Sandbox, load: LoadGenerator, tmp_path: Path) -> None:
    cfg = h.write_config(sb, "no-data-pause", canary=canary(
        [{"weight": 0, "duration": "1s"},
         {"weight": 5, "duration": "5s", "checks": ["nodata"]},
         {"weight": 100, "duration": "1s", "checks": []}],
        checks=[NO_DATA], on_inconclusive="pause"))
    log = tmp_path / "release.log"
    with h.spawned(sb, "release", "--config", str(cfg), log=log) as proc:
        assert h.wait_for(lambda: logged(sb, "no-data-pause", "inconclusive, waiting for a "
                                         "person"), timeout=90), log.read_text()[-3000:]
        time.sleep(1.5)  # paused, not merely slow: nothing moves
        assert proc.poll() is None
        assert h.router(sb).current() == Weights.green_at(5)
        approved = h.run_cli(sb, "promote", "--config", str(cfg))
        assert approved.code == 0, approved.err
        assert finish(proc, log) == 0, log.read_text()[-3000:]
    row = h.release_row(sb, "no-data-pause")
    assert row is not None and row["status"] == "promoted"
    assert h.router(sb).current() == Weights.green_at(100)


# -- manual gate and hooks ------------------------------------------------------------------


def test_manual_gate_waits_for_promote_and_hooks_are_recorded(
        sb: Sandbox, load: LoadGenerator, hooks: HookServer, tmp_path: Path) -> None:
    stages = [
        {"weight": 0, "duration": "1s",
         "before": [{"name": "smoke", "url": f"{hooks.url}/smoke",
                     "metadata": {"suite": "checkout"}}]},
        {"weight": 5, "duration": "2s", "manual_gate": True,
         "after": [{"name": "notify", "url": f"{hooks.url}/notify", "on_failure": "ignore"}]},
        {"weight": 100, "duration": "1s"},
    ]
    hooks.status["/notify"] = 500  # ignored: recorded, and the release goes on
    cfg = h.write_config(sb, "gated", canary=canary(stages))
    log = tmp_path / "release.log"
    with h.spawned(sb, "release", "--config", str(cfg), log=log) as proc:
        assert h.wait_for(lambda: logged(sb, "gated", "waiting for approval of stage 2"),
                          timeout=90), log.read_text()[-3000:]
        time.sleep(1.5)
        assert proc.poll() is None
        # Held before the gated stage: green still gets nothing.
        assert h.router(sb).current() == Weights.green_at(0)
        approved = h.run_cli(sb, "promote", "--config", str(cfg))
        assert approved.code == 0 and "stage 2" in approved.out, approved.err
        assert finish(proc, log) == 0, log.read_text()[-3000:]
    smoke = next(b for b in hooks.bodies if b["_path"] == "/smoke")
    assert smoke["phase"] == "before" and smoke["weight"] == 0 and smoke["stage"] == 1
    assert smoke["release"] == "gated" and smoke["metadata"] == {"suite": "checkout"}
    notify = next(b for b in hooks.bodies if b["_path"] == "/notify")
    assert notify["phase"] == "after" and notify["weight"] == 5
    assert notify["weights"] == {"blue": 95, "green": 5}
    recorded = {(m["check"], m["verdict"]) for m in measurements(sb, "gated")}
    assert ("hook:smoke", "pass") in recorded and ("hook:notify", "fail") in recorded
    status = h.run_cli(sb, "status", "--config", str(cfg))
    assert "hook:smoke" in status.out and "hook:notify" in status.out


def test_abort_at_a_manual_gate_rolls_back(sb: Sandbox, load: LoadGenerator,
                                           tmp_path: Path) -> None:
    cfg = h.write_config(sb, "gate-abort", canary=canary(
        [{"weight": 0, "duration": "1s"}, {"weight": 20, "duration": "2s"},
         {"weight": 100, "duration": "1s", "manual_gate": True}]))
    log = tmp_path / "release.log"
    with h.spawned(sb, "release", "--config", str(cfg), log=log) as proc:
        assert h.wait_for(lambda: logged(sb, "gate-abort", "waiting for approval of stage 3"),
                          timeout=90), log.read_text()[-3000:]
        assert h.router(sb).current() == Weights.green_at(20)
        aborted = h.run_cli(sb, "abort", "--config", str(cfg))
        assert aborted.code == 0, aborted.out + aborted.err
        assert finish(proc, log) == 1
    row = h.rolled_back_row(sb, "gate-abort")
    assert "aborted" in (row["error"] or "")
    assert h.router(sb).current() == Weights.green_at(0)


def test_failing_smoke_test_at_0_percent_rolls_back(sb: Sandbox, hooks: HookServer) -> None:
    hooks.status["/smoke"] = 500
    cfg = h.write_config(sb, "smoke-fails", canary=canary([
        {"weight": 0, "duration": "1s",
         "before": [{"name": "smoke", "url": f"{hooks.url}/smoke", "retries": 1}]},
        {"weight": 100, "duration": "1s"}]))
    result = h.run_cli(sb, "release", "--config", str(cfg))
    assert result.code == 1 and "ROLLED BACK" in result.out, result.err[-3000:]
    assert "before hook smoke FAILED: HTTP 500" in result.out
    # A failing answer is a verdict, not retried.
    assert len(hooks.bodies) == 1
    (m,) = measurements(sb, "smoke-fails")
    assert m["check"] == "hook:smoke" and m["verdict"] == "fail" and m["value"] == 500
    assert h.router(sb).current() == Weights.green_at(0)
    # Green never took a write: the rollback had nothing to carry back.
    row = h.release_row(sb, "smoke-fails")
    assert row is not None and not row["facts"].get("green_writable")


# -- Alertmanager receiver -------------------------------------------------------------------


class Receiver:
    """`orchestrate serve` as a subprocess, for one release's config."""

    def __init__(self, sb: Sandbox, cfg: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = h.spawn_cli(sb, "serve", "--config", str(cfg), "--listen",
                                f"127.0.0.1:{self.port}", log=log)
        assert h.wait_for(self.healthy, timeout=30), log.read_text()[-3000:]

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def alert(self, labels: dict[str, str], *, token: str = TOKEN,
              status: str = "firing") -> tuple[int, dict[str, Any]]:
        body = json.dumps({
            "version": "4", "status": status, "receiver": "orchestrate",
            "groupLabels": {"alertname": labels.get("alertname", "")},
            "commonLabels": labels, "commonAnnotations": {}, "externalURL": "http://am",
            "groupKey": "{}", "truncatedAlerts": 0,
            "alerts": [{"status": status, "labels": labels,
                        "annotations": {"summary": "green is failing"},
                        # Now: the receiver ignores alerts older than the release.
                        "startsAt": datetime.now(UTC).isoformat(),
                        "endsAt": "0001-01-01T00:00:00Z",
                        "generatorURL": "http://prometheus", "fingerprint": "f00d"}],
        }).encode()
        req = urllib.request.Request(f"{self.url}/alertmanager", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


ALERT = {"alertname": "GreenErrorRate", "service": "shop", "severity": "critical"}


def alerting_config(sb: Sandbox, name: str) -> Path:
    token_file = sb.base_dir / "webhook-token"
    token_file.write_text(TOKEN + "\n")
    # A long 20 % stage whose own checks would never fire: only the alert acts.
    return h.write_config(sb, name, canary=canary(
        [{"weight": 0, "duration": "1s"}, {"weight": 20, "duration": "90s"},
         {"weight": 100, "duration": "1s"}]),
        alerts={"matchers": {"service": "$service", "severity": "~critical|page"},
                "token": {"file": str(token_file)}})


def test_alert_rolls_back_the_running_release(sb: Sandbox, load: LoadGenerator,
                                              tmp_path: Path) -> None:
    cfg = alerting_config(sb, "alerted")
    receiver = Receiver(sb, cfg, tmp_path / "serve.log")
    log = tmp_path / "release.log"
    proc = h.spawn_cli(sb, "release", "--config", str(cfg), log=log)
    try:
        assert h.wait_for(lambda: logged(sb, "alerted", "stage 2/3: 20% to green"),
                          timeout=90), log.read_text()[-3000:]
        code, _ = receiver.alert(ALERT, token="wrong-token")
        assert code == 401
        code, body = receiver.alert({**ALERT, "service": "billing"})
        assert code == 200 and body["action"] == "ignored"
        code, body = receiver.alert({**ALERT, "severity": "warning"})
        assert code == 200 and body["action"] == "ignored"
        code, body = receiver.alert(ALERT, status="resolved")
        assert code == 200 and body["action"] == "ignored"
        assert proc.poll() is None and h.router(sb).current() == Weights.green_at(20)

        sent = time.monotonic()
        code, body = receiver.alert(ALERT)
        assert code == 202, body
        assert body["action"] == "rollback_requested" and body["executor"] == "orchestrator"
        # Idempotent: the same alert again queues nothing new.
        code, again = receiver.alert(ALERT)
        assert code == 200 and again["action"] in {"none", "ignored"}, again
        assert h.wait_for(lambda: h.router(sb).current() == Weights.green_at(0), timeout=15,
                          interval=0.05)
        reacted = time.monotonic() - sent
        assert finish(proc, log) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        receiver.stop()
    print(f"alert -> traffic back on blue: {reacted:.2f}s")
    # The orchestrator polls for requests every 0.5 s while it waits between evaluations.
    assert reacted < 3.0
    assert served_by(sb) == {"blue"}
    row = h.rolled_back_row(sb, "alerted")
    assert "alert GreenErrorRate firing" in (row["error"] or "")
    assert logged(sb, "alerted", "rollback requested by Alertmanager")
    # A finished release is never rolled back again.
    receiver = Receiver(sb, cfg, tmp_path / "serve-2.log")
    try:
        code, body = receiver.alert(ALERT)
    finally:
        receiver.stop()
    assert code == 200 and body["action"] == "ignored" and "rolled_back" in body["reason"]
    assert "wrong-token" not in (tmp_path / "serve.log").read_text()
    assert TOKEN not in (tmp_path / "serve.log").read_text()


def test_alert_rolls_back_a_release_whose_orchestrator_died(
        sb: Sandbox, load: LoadGenerator, tmp_path: Path) -> None:
    cfg = alerting_config(sb, "orphaned")
    log = tmp_path / "release.log"
    proc = h.spawn_cli(sb, "release", "--config", str(cfg), log=log)
    assert h.wait_for(lambda: logged(sb, "orphaned", "stage 2/3: 20% to green"),
                      timeout=90), log.read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    receiver = Receiver(sb, cfg, tmp_path / "serve.log")
    try:
        # PostgreSQL drops the dead session's lock once it notices the closed socket.
        code, body = 0, dict[str, Any]()
        for _ in range(20):
            code, body = receiver.alert(ALERT)
            if body.get("executor") == "receiver":
                break
            time.sleep(0.5)
        assert code == 202 and body["executor"] == "receiver", body
        assert h.wait_for(lambda: (h.release_row(sb, "orphaned") or {}).get("status")
                          == "rolled_back", timeout=60), \
            (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        receiver.stop()
    assert h.router(sb).current() == Weights.green_at(0)
    assert served_by(sb) == {"blue"}


# -- built-in checks ----------------------------------------------------------------------
# Last in the module: green answers 503 here (no database), which any later test's
# 10 s rate window would still see.


def test_builtin_checks_evaluate_to_real_numbers(sb: Sandbox, load: LoadGenerator) -> None:
    """The haproxy and demo queries work on the real exporters, tell the colours apart,
    and read 'no traffic' as no data."""
    raw = sb.release_config("builtins")
    raw["canary"] = {"builtin": [
        {"check": "request-success-rate", "provider": "haproxy", "name": "haproxy-success"},
        {"check": "latency-average", "provider": "haproxy", "name": "haproxy-latency"},
        {"check": "request-success-rate", "provider": "demo", "name": "demo-success"},
        {"check": "latency-p99", "provider": "demo", "name": "demo-p99"},
        {"check": "latency-average", "provider": "demo", "name": "demo-average"},
        # A route the load never calls: its series exist, with no traffic.
        {"check": "request-success-rate", "provider": "demo", "name": "idle-route",
         "selector": {"route": "/orders/:id"}},
    ]}
    cfg = parse_config(raw, base_dir=sb.base_dir)
    # Half the traffic to green, whose database does not exist yet: it answers 503.
    h.router(sb).set_weights(Weights.green_at(50))
    metrics = PrometheusMetrics(cfg.prometheus)
    labels = {"window": "10s", "service": "shop", "namespace": "default"}

    def value(name: str, colour: str) -> float | None:
        check = next(c for c in cfg.canary.checks if c.name == name)
        return metrics.query(render(check.query, labels, colour))

    # Blue 50 ms slower than green: the latency queries must tell the colours apart.
    h.set_fault(sb, "blue", extra_latency=0.05)

    def settled() -> bool:
        green_success = value("haproxy-success", "green")
        blue_p99, blue_average = value("demo-p99", "blue"), value("demo-average", "blue")
        # The average lags the p99: the window must fill with slow requests first.
        return (green_success is not None and green_success < 0.5
                and blue_p99 is not None and blue_p99 > 0.04
                and blue_average is not None and blue_average > 0.04)

    assert h.wait_for(settled, timeout=30, interval=0.5)
    values = {(n, c): value(n, c) for n in ("haproxy-success", "haproxy-latency",
                                            "demo-success", "demo-p99", "demo-average",
                                            "idle-route") for c in ("blue", "green")}
    print(json.dumps({f"{n}/{c}": v for (n, c), v in values.items()}, indent=1))
    assert values[("haproxy-success", "blue")] == pytest.approx(1.0)
    assert values[("demo-success", "blue")] == pytest.approx(1.0)
    green_haproxy = values[("haproxy-success", "green")]
    green_demo = values[("demo-success", "green")]
    assert green_haproxy is not None and green_haproxy < 0.5
    assert green_demo is not None and green_demo < 0.5
    for name in ("demo-p99", "demo-average"):
        blue, green = values[(name, "blue")], values[(name, "green")]
        assert blue is not None and 0.04 < blue < 1.0, name
        assert green is not None and 0.0 <= green < 0.04, name
    # HAProxy's average covers each server's last 1024 responses, whatever the window:
    # it still remembers the earlier tests' slow green (docs/canary.md), so only its
    # being a real number is certain here.
    for colour in ("blue", "green"):
        latency = values[("haproxy-latency", colour)]
        assert latency is not None and 0.0 < latency < 1.0, colour
    assert values[("idle-route", "blue")] is None
    assert values[("idle-route", "green")] is None
