"""How long from "green starts failing" to "traffic back on blue"?

    .venv/bin/python benchmarks/rollback_latency.py [--runs 3] [--path both]

Starts the sandbox (PostgreSQL blue 16 / green 17, the demo app in both colours,
HAProxy, Prometheus scraping every second), puts live load on it, and runs a real
release (`orchestrate release` as a subprocess) whose 20 % stage lasts long. Once
that stage has passed a couple of evaluations, green is switched to answer every
data request with 500 (``POST /admin/fault {"fail_rate": 1.0}``) at T0, and the
script measures, on two paths:

(a) analysis: the orchestrator's own check (HAProxy's 5xx ratio for green over a
    10 s window, evaluated every 5 s) fails and the release rolls back;
(b) alert: a Prometheus alerting rule (same expression, evaluated every second)
    fires, Prometheus notifies Alertmanager (the real one when installed, 0.25 from
    Debian; otherwise this script forwards Prometheus's firing alerts exactly as
    Alertmanager would, and says so), which calls `orchestrate serve`; the running
    orchestrator picks the request up within 0.5 s. The release's own checks are
    off on this path, so only the alert can act.

For each run it prints T0 -> detected (first failed evaluation / alert firing in
Prometheus) -> rollback requested (path b: the receiver wrote the request) ->
weights changed (HAProxy's runtime API says green 0) -> traffic fully on blue (a
probe sending a request every 50 ms through HAProxy sees only ``X-Served-By: blue``
from then on). The target is under 15 s with a 5 s evaluation interval (Flagger's
default interval is one minute).

The sandbox scrapes every second; a production Prometheus commonly scrapes every
15-30 s, which adds up to one scrape interval to every figure here (and to the rate
window's reaction); the orchestrator's part (request -> weights) does not change.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.routers.base import Weights  # noqa: E402
from orchestrator.sandbox.loadgen import LoadGenerator  # noqa: E402
from orchestrator.sandbox.ports import free_port  # noqa: E402
from orchestrator.sandbox.process import ManagedProcess, wait_until  # noqa: E402
from orchestrator.sandbox.stack import ERROR_RATE_QUERY, Sandbox  # noqa: E402
from tests.integration.helpers import blue_conn, reset, router  # noqa: E402

ALERTMANAGER = Path("/usr/bin/prometheus-alertmanager")
TOKEN = "bench-" + os.urandom(16).hex()
ALERT_NAME = "OrchestrateGreenErrorRate"
INTERVAL_S = 5.0
WINDOW = "10s"
ERROR_RATE_MAX = 0.05
HTTP_TIMEOUT_S = 3.0


# -- measurements ------------------------------------------------------------------------


@dataclass
class Run:
    path: str
    index: int
    t0: float = 0.0  # epoch seconds
    detected: float | None = None
    requested: float | None = None
    weights: float | None = None
    last_green: float | None = None
    all_blue: float | None = None
    outcome: str = ""
    notes: list[str] = field(default_factory=list)

    def since(self, t: float | None) -> str:
        return "-" if t is None else f"{t - self.t0:6.2f}s"


class Poller:
    """Calls ``tick`` every ``period`` seconds on a daemon thread, from ``start`` until
    ``stop``."""

    def __init__(self, period: float, name: str) -> None:
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.tick()

    def tick(self) -> None:
        raise NotImplementedError


class Probe(Poller):
    """A request every 50 ms through HAProxy, each on a fresh connection, recording
    which colour answered (the demo app's X-Served-By header)."""

    def __init__(self, url: str, period: float = 0.05) -> None:
        super().__init__(period, "probe")
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.samples: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._sent = 0

    def tick(self) -> None:
        self._sent += 1
        conn = http.client.HTTPConnection(self.host, self.port, timeout=HTTP_TIMEOUT_S)
        try:
            conn.request("GET", f"/items/{self._sent % 1000 + 1}")
            resp = conn.getresponse()
            resp.read()
            colour = resp.getheader("X-Served-By") or "?"
        except (OSError, http.client.HTTPException):
            colour = "error"
        finally:
            conn.close()
        with self._lock:
            self.samples.append((time.time(), colour))

    def last_not_blue(self, after: float, until: float) -> float | None:
        """When the last answer not from blue (green's, or an error) came, in a period."""
        with self._lock:
            return max((t for t, c in self.samples if after <= t <= until and c != "blue"),
                       default=None)

    def blue_after(self, moment: float, until: float) -> bool:
        with self._lock:
            later = [c for t, c in self.samples if moment < t <= until]
        return bool(later) and all(c == "blue" for c in later)


def _open(url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
          timeout: float = HTTP_TIMEOUT_S) -> bytes:
    """One HTTP call to a sandbox component (always an http:// URL built here)."""
    req = urllib.request.Request(url, data=body,  # noqa: S310
                                 method="POST" if body is not None else "GET",
                                 headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
        data: bytes = resp.read()
        return data


def db_time(value: datetime) -> float:
    return value.timestamp()


def first_failed_evaluation(sb: Sandbox, release: str, after: float) -> float | None:
    with blue_conn(sb) as conn:
        row = conn.execute(
            "SELECT min(at) FROM orchestrate.stage_measurements WHERE release = %s AND "
            "verdict = 'fail' AND at >= to_timestamp(%s)", (release, after)).fetchone()
    return db_time(row[0]) if row and row[0] else None


def logged_at(sb: Sandbox, release: str, fragment: str) -> float | None:
    try:
        with blue_conn(sb) as conn:
            row = conn.execute(
                "SELECT min(at) FROM orchestrate.release_log WHERE release = %s AND "
                "message LIKE %s", (release, f"%{fragment}%")).fetchone()
    except psycopg.Error:
        return None  # the control schema does not exist before the first release
    return db_time(row[0]) if row and row[0] else None


def passed_evaluations(sb: Sandbox, release: str, stage: int) -> int:
    try:
        with blue_conn(sb) as conn:
            row = conn.execute(
                "SELECT count(*) FROM orchestrate.stage_measurements WHERE release = %s AND "
                "stage = %s AND verdict = 'pass'", (release, stage)).fetchone()
    except psycopg.Error:
        return 0
    return int(row[0]) if row else 0


def set_fault(sb: Sandbox, colour: str, fail_rate: float) -> None:
    body = json.dumps({"fail_rate": fail_rate, "extra_latency": 0.0}).encode()
    _open(f"{sb.app_urls[colour]}/admin/fault", body, {"Content-Type": "application/json"})


def prometheus_alert_active_at(sb: Sandbox) -> float | None:
    """When Prometheus's rule for green's error rate started firing, if it does."""
    alerts = json.loads(_open(f"{sb.prometheus.url}/api/v1/alerts"))["data"]["alerts"]
    for a in alerts:
        if a["labels"].get("alertname") == ALERT_NAME and a["state"] == "firing":
            return datetime.fromisoformat(a["activeAt"].replace("Z", "+00:00")).timestamp()
    return None


# -- alerting set-up ----------------------------------------------------------------------


def green_error_rate() -> str:
    return ERROR_RATE_QUERY.replace("$colour", "green").replace("$window", WINDOW)


def enable_alerting(sb: Sandbox, alertmanager_port: int | None) -> None:
    """Give the sandbox's Prometheus the rule (and Alertmanager) before it starts."""
    rules = sb.base_dir / "prometheus" / "rules.yml"
    rules.parent.mkdir(parents=True, exist_ok=True)
    rules.write_text(yaml.safe_dump({"groups": [{
        "name": "orchestrate-bench", "interval": "1s",
        "rules": [{"alert": ALERT_NAME, "expr": f"({green_error_rate()}) > {ERROR_RATE_MAX}",
                   "for": "0s", "labels": {"severity": "critical", "service": "shop"},
                   "annotations": {"summary": "green answers 5xx"}}]}]}))
    render = sb.prometheus.render_config

    def with_alerting() -> dict[str, Any]:
        cfg = render()
        cfg["rule_files"] = [str(rules)]
        if alertmanager_port is not None:
            cfg["alerting"] = {"alertmanagers": [{"static_configs": [
                {"targets": [f"127.0.0.1:{alertmanager_port}"]}]}]}
        return cfg

    # The sandbox writes its Prometheus config from render_config() at start.
    sb.prometheus.render_config = with_alerting  # type: ignore[method-assign]


def start_alertmanager(base: Path, port: int, receiver_port: int,
                       token_file: Path) -> ManagedProcess:
    config = base / "alertmanager.yml"
    config.write_text(yaml.safe_dump({
        "route": {"receiver": "orchestrate", "group_by": ["alertname"],
                  # No batching delay: the first notification of a group goes at once.
                  "group_wait": "0s", "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "orchestrate", "webhook_configs": [{
            "url": f"http://127.0.0.1:{receiver_port}/alertmanager", "send_resolved": False,
            "http_config": {"authorization": {"type": "Bearer",
                                              "credentials_file": str(token_file)}}}]}],
    }))
    proc = ManagedProcess("alertmanager", [
        ALERTMANAGER, f"--config.file={config}", f"--storage.path={base / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        # No gossip cluster: a single instance, and no port 9094 taken on this machine.
        "--cluster.listen-address=",
    ], base / "alertmanager.log")
    proc.start()
    wait_until(lambda: _http_ok(f"http://127.0.0.1:{port}/-/ready"), what="Alertmanager",
               timeout=30, proc=proc)
    return proc


def _http_ok(url: str) -> bool:
    try:
        _open(url, timeout=1.0)
    except OSError:
        return False
    return True


class Forwarder(Poller):
    """Without Alertmanager: poll Prometheus's firing alerts every 0.5 s and POST them
    to the receiver as an Alertmanager webhook (payload version 4) would."""

    def __init__(self, sb: Sandbox, receiver_url: str) -> None:
        super().__init__(0.5, "forwarder")
        self.sb = sb
        self.receiver_url = receiver_url

    def tick(self) -> None:
        try:
            alerts = json.loads(_open(f"{self.sb.prometheus.url}/api/v1/alerts"))[
                "data"]["alerts"]
            firing = [a for a in alerts if a["state"] == "firing"]
            if not firing:
                return
            body = json.dumps({"version": "4", "status": "firing",
                               "receiver": "orchestrate", "groupLabels": {},
                               "commonLabels": {}, "commonAnnotations": {},
                               "externalURL": "", "groupKey": "bench",
                               "truncatedAlerts": 0, "alerts": [
                                   {"status": "firing", "labels": a["labels"],
                                    "annotations": a.get("annotations", {}),
                                    "startsAt": a["activeAt"], "fingerprint": ""}
                                   for a in firing]}).encode()
            _open(self.receiver_url, body, {"Authorization": f"Bearer {TOKEN}",
                                            "Content-Type": "application/json"})
        except (OSError, ValueError, KeyError):
            return


# -- one run -----------------------------------------------------------------------------


def cli_env(sb: Sandbox) -> dict[str, str]:
    return {**os.environ, **sb.secrets_env, "ORCHESTRATE_LOG_FORMAT": "json",
            "PYTHONPATH": str(REPO)}


def write_config(sb: Sandbox, name: str, path: str, receiver_port: int,
                 token_file: Path) -> Path:
    checks = [] if path == "alert" else [{
        "name": "error-rate", "query": ERROR_RATE_QUERY, "max": ERROR_RATE_MAX,
        "inconclusive_limit": 100}]
    raw = sb.release_config(
        name,
        # The alert path runs without checks, and must say so.
        canary={"interval": f"{INTERVAL_S:g}s", "window": WINDOW, "checks": checks,
                "allow_unanalysed": not checks,
                "stages": [{"weight": 0, "duration": "1s"},
                           {"weight": 20, "duration": "600s"},
                           {"weight": 100, "duration": "5s"}]},
        rollback={"window": "1h"},
        alerts={"matchers": {"service": "shop", "severity": "critical"},
                "token": {"file": str(token_file)},
                "listen": f"127.0.0.1:{receiver_port}"},
    )
    cfg = sb.base_dir / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return cfg


def one_run(sb: Sandbox, path: str, index: int, probe: Probe, token_file: Path,
            receiver_port: int, am_port: int | None, phase: str) -> Run:
    run = Run(path, index)
    name = f"bench-{path}-{index}-{int(time.time())}"
    reset(sb)
    set_fault(sb, "green", 0.0)
    cfg = write_config(sb, name, path, receiver_port, token_file)
    helpers: list[ManagedProcess] = []
    forwarder: Forwarder | None = None
    orchestrate = [sys.executable, "-m", "orchestrator"]
    try:
        if path == "alert" and am_port is not None:
            # A fresh Alertmanager per run: no group state carried over from the last.
            run_dir = sb.base_dir / name
            run_dir.mkdir()
            helpers.append(start_alertmanager(run_dir, am_port, receiver_port, token_file))
        if path == "alert":
            serve = ManagedProcess("orchestrate serve", [*orchestrate, "serve", "--config",
                                                         str(cfg)],
                                   sb.base_dir / f"{name}-serve.log", env=cli_env(sb),
                                   cwd=REPO)
            helpers.append(serve)
            serve.start()
            wait_until(lambda: _http_ok(f"http://127.0.0.1:{receiver_port}/healthz"),
                       what="orchestrate serve", timeout=30, proc=serve)
            if am_port is None:
                forwarder = Forwarder(sb, f"http://127.0.0.1:{receiver_port}/alertmanager")
                forwarder.start()
        release = ManagedProcess("orchestrate release", [*orchestrate, "release", "--config",
                                                         str(cfg)],
                                 sb.base_dir / f"{name}.log", env=cli_env(sb), cwd=REPO,
                                 stop_signal=signal.SIGINT)
        helpers.append(release)
        release.start()
        wait_until(lambda: (logged_at(sb, name, "stage 2/3: 20% to green") or 0) > 0,
                   what="the 20 % stage", timeout=180, proc=release, interval=0.2)
        if path == "analysis":
            # "Has begun and passed a couple of evaluations".
            wait_until(lambda: passed_evaluations(sb, name, 1) >= 2, what="two evaluations",
                       timeout=60, proc=release, interval=0.2)
        else:
            # The same time into the stage (two intervals), so both paths start from
            # steady rate windows.
            time.sleep(2 * INTERVAL_S + 0.5)
        # A failure starts at any moment of the evaluation cycle; right after an
        # evaluation (phase 0) is the slow end for the analysis path.
        time.sleep(random.uniform(0, INTERVAL_S) if phase == "random" else 0.0)  # noqa: S311
        run.t0 = time.time()
        set_fault(sb, "green", 1.0)

        while time.time() - run.t0 < 60:
            if run.weights is None and router(sb).current() == Weights.green_at(0):
                run.weights = time.time()
            if path == "alert" and run.detected is None:
                run.detected = prometheus_alert_active_at(sb)
            if run.weights is not None and time.time() - run.weights > 3.0:
                break
            time.sleep(0.05)
        if path == "analysis":
            run.detected = first_failed_evaluation(sb, name, run.t0)
        else:
            run.requested = logged_at(sb, name, "rollback requested by Alertmanager")
        # The orchestrator logs right after the router call: more exact than the poll.
        logged = logged_at(sb, name, "traffic back on blue")
        if logged is not None and (run.weights is None or logged < run.weights):
            run.weights = logged
        if run.weights is not None:
            end = run.weights + 3.0
            run.last_green = probe.last_not_blue(run.t0, end)
            # Fully on blue: the router changed and green's last answer came; every
            # probe answer after that (3 s of them) must be blue's.
            done = max(run.weights, run.last_green or run.weights)
            run.all_blue = done if probe.blue_after(done, end) else None
        wait_until(lambda: not release.running, what="the release to finish", timeout=120,
                   interval=0.2)
        run.outcome = "rolled back" if release.returncode == 1 else f"exit {release.returncode}"
        with blue_conn(sb) as conn:
            row = conn.execute("SELECT error FROM orchestrate.releases WHERE name = %s",
                               (name,)).fetchone()
        run.notes.append(str(row[0]) if row else "")
    finally:
        if forwarder is not None:
            forwarder.stop()
        for proc in reversed(helpers):
            proc.stop()
        set_fault(sb, "green", 0.0)
    return run


# -- main --------------------------------------------------------------------------------


def report(runs: list[Run], how: str, phase: str) -> str:
    lines = [
        f"Rollback latency: T0 = green starts failing (fail_rate 1.0) at 20 % weight; "
        f"interval {INTERVAL_S:g}s, window {WINDOW}, Prometheus scrape and rule "
        f"evaluation every 1s; alert path via {how}; T0 at phase {phase} of the "
        f"evaluation cycle.",
        f"{'path':<9} {'run':>3}  {'detected':>9} {'requested':>9} {'weights':>9} "
        f"{'last green':>10} {'all blue':>9}  outcome",
    ]
    for r in runs:
        lines.append(f"{r.path:<9} {r.index:>3}  {r.since(r.detected):>9} "
                     f"{r.since(r.requested):>9} {r.since(r.weights):>9} "
                     f"{r.since(r.last_green):>10} {r.since(r.all_blue):>9}  "
                     f"{r.outcome}: {r.notes[0][:60] if r.notes else ''}")
    for path in sorted({r.path for r in runs}):
        done = [r.all_blue - r.t0 for r in runs if r.path == path and r.all_blue is not None]
        if done:
            lines.append(f"{path:<9} T0 -> traffic fully on blue: median "
                         f"{statistics.median(done):.2f}s, max {max(done):.2f}s over "
                         f"{len(done)} runs (target < 15 s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--path", choices=["analysis", "alert", "both"], default="both")
    parser.add_argument("--rate", type=float, default=40.0, help="load, requests per second")
    parser.add_argument("--phase", choices=["random", "after-evaluation"], default="random",
                        help="when green starts failing: at a random point of the "
                        "evaluation cycle, or right after an evaluation (the analysis "
                        "path's slow end)")
    parser.add_argument("--forwarder", action="store_true",
                        help="forward Prometheus's alerts from this script even when "
                        "Alertmanager is installed")
    args = parser.parse_args(argv)
    paths = ["analysis", "alert"] if args.path == "both" else [args.path]
    use_am = "alert" in paths and ALERTMANAGER.exists() and not args.forwarder
    how = ("Alertmanager 0.25 (real, group_wait 0s)" if use_am else
           "this script forwarding Prometheus's firing alerts every 0.5 s as Alertmanager "
           "would (Alertmanager not installed)")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="orch-bench-", dir="/tmp") as tmp:
        base = Path(tmp)
        token_file = base / "webhook-token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        sb = Sandbox(base / "sb", blue_major=16, green_major=17)
        am_port = free_port() if use_am else None
        receiver_port = free_port()
        enable_alerting(sb, am_port)
        with sb:
            load = LoadGenerator(sb.haproxy.url, rate=args.rate, write_ratio=0.3, workers=8)
            probe = Probe(sb.haproxy.url)
            load.start()
            probe.start()
            try:
                for path in paths:
                    for i in range(1, args.runs + 1):
                        run = one_run(sb, path, i, probe, token_file, receiver_port,
                                      am_port if path == "alert" else None, args.phase)
                        runs.append(run)
                        print(report([run], how, args.phase).splitlines()[2], flush=True)
            finally:
                probe.stop()
                load.stop()
    print()
    print(report(runs, how, args.phase))
    return 0


if __name__ == "__main__":
    sys.exit(main())
