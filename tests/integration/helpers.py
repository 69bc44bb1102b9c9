"""Helpers for the integration tests: run the real CLI, inspect and reset a sandbox."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import yaml

from orchestrator.config import GreenConfig, HAProxyRouterConfig, SecretRef
from orchestrator.routers.base import Weights
from orchestrator.routers.haproxy import HAProxyRouter
from orchestrator.sandbox.loadgen import LoadGenerator, LoadReport
from orchestrator.sandbox.pgcluster import PgCluster
from orchestrator.sandbox.process import ManagedProcess
from orchestrator.sandbox.stack import APP_DATABASE, APP_ROLE, Sandbox

REPO = Path(__file__).resolve().parents[2]
ORCHESTRATE = [sys.executable, "-m", "orchestrator"]
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")

# Short stages so that a whole release takes seconds; the checks keep their shape.
FAST_CANARY: dict[str, Any] = {"interval": "1s", "window": "10s", "stages": [
    {"weight": weight, "duration": f"{seconds}s"}
    for weight, seconds in ((0, 1), (5, 4), (20, 3), (100, 3))]}


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(sb: Sandbox, *args: str, timeout: float = 240) -> CliResult:
    env = {**os.environ, **sb.secrets_env, "ORCHESTRATE_LOG_FORMAT": "json"}
    done = subprocess.run([*ORCHESTRATE, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, check=False)
    return CliResult(done.returncode, done.stdout, done.stderr)


def spawn_cli(sb: Sandbox, *args: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **sb.secrets_env, "ORCHESTRATE_LOG_FORMAT": "json"}
    fh = log.open("wb")
    return subprocess.Popen([*ORCHESTRATE, *args], env=env, stdout=fh, stderr=subprocess.STDOUT,
                            cwd=REPO)


@contextlib.contextmanager
def spawned(sb: Sandbox, *args: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``orchestrate *args`` in the background, killed at the end if it still runs (a
    failed assertion must not leave a release running into the next test)."""
    proc = spawn_cli(sb, *args, log=log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()


@contextlib.contextmanager
def under_load(sb: Sandbox, rate: float = 60.0, write_ratio: float = 0.5,
               workers: int = 8) -> Iterator[LoadGenerator]:
    """The demo app under load through HAProxy; stopped at the end, when
    ``load.report()`` still tells what it saw."""
    load = LoadGenerator(sb.haproxy.url, rate=rate, write_ratio=write_ratio, workers=workers)
    load.start()
    try:
        yield load
    finally:
        load.stop()


@contextlib.contextmanager
def release_under_load(sb: Sandbox, cfg: Path, *args: str, log: Path
                       ) -> Iterator[tuple[subprocess.Popen[bytes], LoadGenerator]]:
    """``orchestrate release`` in the background while 60 requests a second, half of
    them writes, go through HAProxy. At the end the release is killed if it still
    runs, then the load stops."""
    with under_load(sb) as load, spawned(sb, "release", "--config", str(cfg), *args,
                                         log=log) as proc:
        yield proc, load


def write_config(sb: Sandbox, name: str, **overrides: Any) -> Path:
    merged = {"canary": FAST_CANARY, "rollback": {"window": "1h"}, **overrides}
    return sb.write_config(sb.base_dir / f"{name}.yaml", name=name, **merged)


def superuser_db(cluster: PgCluster, dbname: str) -> GreenConfig:
    """``dbname`` of a cluster of its own (no sandbox) as its superuser, the password
    in an environment variable named after the cluster (children inherit it). A
    GreenConfig: a DatabaseConfig that can also be provisioned into."""
    env = f"ORCH_TEST_PW_{cluster.name.upper()}"
    os.environ[env] = cluster.password
    return GreenConfig(host=cluster.host, port=cluster.port, dbname=dbname,
                       user=cluster.superuser, password=SecretRef(env=env), sslmode="disable")


def blue_conn(sb: Sandbox, dbname: str = APP_DATABASE) -> psycopg.Connection[Any]:
    return psycopg.connect(sb.blue.conninfo(dbname), autocommit=True)


def green_conn(sb: Sandbox, dbname: str = APP_DATABASE) -> psycopg.Connection[Any]:
    return psycopg.connect(sb.green.conninfo(dbname), autocommit=True)


def router(sb: Sandbox) -> HAProxyRouter:
    return HAProxyRouter(HAProxyRouterConfig(kind="haproxy", socket=str(sb.haproxy.admin_socket),
                                             backend="app"))


def release_row(sb: Sandbox, name: str) -> dict[str, Any] | None:
    with blue_conn(sb) as conn:
        exists = conn.execute("SELECT to_regclass('orchestrate.releases')").fetchone()
        if not exists or exists[0] is None:
            return None
        row = conn.execute("SELECT state, status, error, facts FROM orchestrate.releases "
                           "WHERE name = %s", (name,)).fetchone()
    if row is None:
        return None
    return {"state": row[0], "status": row[1], "error": row[2], "facts": row[3]}


def rolled_back_row(sb: Sandbox, name: str) -> dict[str, Any]:
    """The release's row, which must say it was rolled back."""
    row = release_row(sb, name)
    assert row is not None and row["status"] == "rolled_back", row
    return row


def green_weight(sb: Sandbox, name: str) -> int | None:
    """The green weight the release last recorded; None before it set any."""
    row = release_row(sb, name)
    weights = (row["facts"].get("weights") or {}) if row else {}
    green = weights.get("green")
    return None if green is None else int(green)


def replication_leftovers(sb: Sandbox) -> list[str]:
    """Every publication, subscription and slot still present on either side."""
    found: list[str] = []
    for side, cluster in (("blue", sb.blue), ("green", sb.green)):
        with psycopg.connect(cluster.conninfo("postgres"), autocommit=True) as conn:
            found += [f"{side} slot {r[0]}" for r in
                      conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall()]
            found += [f"{side} subscription {r[0]}" for r in
                      conn.execute("SELECT subname FROM pg_subscription").fetchall()]
        try:
            with psycopg.connect(cluster.conninfo(APP_DATABASE), autocommit=True) as conn:
                found += [f"{side} publication {r[0]}" for r in
                          conn.execute("SELECT pubname FROM pg_publication").fetchall()]
        except psycopg.OperationalError:
            pass
    return found


def set_fault(sb: Sandbox, colour: str, fail_rate: float = 0.0,
              extra_latency: float = 0.0) -> None:
    """What share of ``colour``'s demo app answers fail, and how much slower it answers."""
    body = json.dumps({"fail_rate": fail_rate, "extra_latency": extra_latency}).encode()
    req = urllib.request.Request(f"{sb.app_urls[colour]}/admin/fault", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def _drop_subscriptions(conn: psycopg.Connection[Any]) -> None:
    """The subscriptions of ``conn``'s database (ALTER and DROP SUBSCRIPTION reach no
    other), detached from their slots first: the slots are dropped separately."""
    for (sub,) in conn.execute(
            "SELECT subname FROM pg_subscription WHERE subdbid = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())").fetchall():
        conn.execute(f'ALTER SUBSCRIPTION "{sub}" DISABLE')
        conn.execute(f'ALTER SUBSCRIPTION "{sub}" SET (slot_name = NONE)')
        conn.execute(f'DROP SUBSCRIPTION "{sub}"')


def _drop_slots(conn: psycopg.Connection[Any]) -> None:
    """Every replication slot, its walsender ended first (an active slot cannot be
    dropped, and its walsender keeps a DROP DATABASE waiting)."""
    conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                 "WHERE active_pid IS NOT NULL")
    for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall():
        for _ in range(50):
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.1)  # the terminated walsender is still exiting


def reset(sb: Sandbox) -> None:
    """Back to the starting line: traffic on blue, no green database, no leftovers.

    Blue's subscriptions go first: blue's apply worker reconnecting to green would
    keep green's database busy."""
    r = router(sb)
    r.set_weights(Weights.green_at(0))
    set_fault(sb, "green")
    with blue_conn(sb) as conn:
        _drop_subscriptions(conn)
    with psycopg.connect(sb.green.conninfo("postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                        (APP_DATABASE,)).fetchone():
            with green_conn(sb) as app_db:
                _drop_subscriptions(app_db)
        _drop_slots(conn)
        conn.execute(f"DROP DATABASE IF EXISTS {APP_DATABASE} WITH (FORCE)")
    with blue_conn(sb) as conn:
        conn.execute(f"ALTER ROLE {APP_ROLE} IN DATABASE {APP_DATABASE} "
                     "RESET default_transaction_read_only")
        for (pub,) in conn.execute("SELECT pubname FROM pg_publication").fetchall():
            conn.execute(f'DROP PUBLICATION "{pub}"')
        _drop_slots(conn)
        has_state = conn.execute("SELECT to_regclass('orchestrate.releases')").fetchone()
        if has_state and has_state[0] is not None:
            conn.execute("UPDATE orchestrate.releases SET status = 'failed', state = 'failed' "
                         "WHERE status = 'running'")


def roll_back_promoted(sb: Sandbox) -> None:
    """Roll back, the way an operator would, every release waiting in its rollback
    window: it keeps green -> blue replication, which reset() does not undo."""
    with blue_conn(sb) as conn:
        has_state = conn.execute("SELECT to_regclass('orchestrate.releases')").fetchone()
        promoted = [] if not has_state or has_state[0] is None else [r[0] for r in conn.execute(
            "SELECT name FROM orchestrate.releases WHERE state = 'window'").fetchall()]
    for name in promoted:
        cfg = sb.base_dir / f"{name}.yaml"
        done = run_cli(sb, "rollback", "--config", str(cfg), "--reason", "cleanup")
        assert done.code == 0, done.err[-3000:]


def fresh(sb: Sandbox) -> Iterator[Sandbox]:
    """For a fixture: the sandbox reset before the test; after it both apps healthy
    again and no release left in its window."""
    reset(sb)
    yield sb
    set_fault(sb, "blue")
    set_fault(sb, "green")
    roll_back_promoted(sb)


def order_ids(conn: psycopg.Connection[Any]) -> set[int]:
    return {r[0] for r in conn.execute("SELECT id FROM orders").fetchall()}


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def blue_fenced(sb: Sandbox) -> bool:
    """Whether blue's application role is still read-only in the app database."""
    with blue_conn(sb) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
            "JOIN pg_database d ON d.oid = s.setdatabase WHERE r.rolname = %s "
            "AND d.datname = %s AND 'default_transaction_read_only=on' = ANY(s.setconfig)",
            (APP_ROLE, APP_DATABASE)).fetchone()
    return bool(row and row[0])


def assert_acked_writes_on_blue(sb: Sandbox, load: LoadReport) -> None:
    """Every write the load generator saw acknowledged is in blue."""
    with blue_conn(sb) as b:
        missing = set(load.acked_order_ids) - order_ids(b)
    assert missing == set(), f"{len(missing)} acknowledged writes missing on blue"


def assert_left_clean(sb: Sandbox, load: LoadReport) -> None:
    """What every rollback must leave behind."""
    assert not blue_fenced(sb), "blue's application role is still read-only"
    assert router(sb).current() == Weights.green_at(0)
    assert replication_leftovers(sb) == []
    assert_acked_writes_on_blue(sb, load)


def alertmanager(workdir: Path, port: int, webhook_url: str, token_file: Path,
                 ca_file: Path | None = None) -> ManagedProcess:
    """Debian's Alertmanager on 127.0.0.1:``port``, not started yet: it sends each
    alert at once to ``webhook_url`` with the bearer token of ``token_file`` (over
    HTTPS verified against ``ca_file`` when given)."""
    http_config: dict[str, Any] = {"authorization": {"type": "Bearer",
                                                     "credentials_file": str(token_file)}}
    if ca_file is not None:
        http_config["tls_config"] = {"ca_file": str(ca_file)}
    config = workdir / "am.yml"
    config.write_text(yaml.safe_dump({
        "route": {"receiver": "orchestrate", "group_by": ["alertname"], "group_wait": "0s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "orchestrate", "webhook_configs": [{
            "url": webhook_url, "send_resolved": False, "http_config": http_config}]}]}))
    assert ALERTMANAGER is not None
    return ManagedProcess("alertmanager", [
        ALERTMANAGER, f"--config.file={config}", f"--storage.path={workdir / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        workdir / "am.log")


def alertmanager_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False
