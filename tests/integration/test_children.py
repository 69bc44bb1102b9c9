"""psql / pg_dump children die with orchestrate, against a real PostgreSQL 16.

An orchestrator-like parent runs one copy pipe of the initial copy (the real
``_Copier``, on a ThreadPoolExecutor worker as the copy does) from a view that
yields a row every 10 ms, and is killed with SIGKILL while the rows flow: both psql
children and both of their server sessions must be gone within seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from orchestrator.config import GreenConfig
from orchestrator.pg import children, initial_copy
from orchestrator.pg.tools import find_tools
from orchestrator.sandbox.pgcluster import PgCluster
from tests.integration import helpers as h
from tests.pg_helpers import tmp_cluster

REPO = Path(__file__).resolve().parents[2]
SLOT = "children_test"
APP = initial_copy.COPY_APP_PREFIX + SLOT


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    with tmp_cluster("c16", 16, "orch-ch-") as pg:
        pg.create_database("blue")
        pg.create_database("green")
        pg.execute("CREATE VIEW slow AS SELECT g AS id, "
                   "repeat('x', 20000) || pg_sleep(0.01)::text AS payload "
                   "FROM generate_series(1, 100000) g", dbname="blue")
        pg.execute("CREATE TABLE slow (id int, payload text)", dbname="green")
        yield pg


def _copy_parent() -> None:
    """Run in a subprocess: one copy pipe, blue.slow into green.slow, until killed."""
    args = json.loads(os.environ["ORCH_CHILDREN_ARGS"])
    blue = GreenConfig.model_validate(args["blue"])
    green = GreenConfig.model_validate(args["green"])
    with psycopg.connect(blue.conninfo(), autocommit=True) as snap:
        snap.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        row = snap.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        copier = initial_copy._Copier(
            blue, green, find_tools(16), snapshot=row[0], slot=SLOT, encoding="UTF8",
            replica_role=False, deadline=time.monotonic() + 600)
        task = initial_copy.CopyTask(target=("public", "slow"), source=("public", "slow"),
                                     columns=["id", "payload"], binary=False, cost=1,
                                     only=False)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy") as pool:
            pool.submit(copier.run, task).result()


def _alive(pid: int) -> bool:
    """Running, not a zombie: a killed child waits to be reaped by whoever adopted it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in {"Z", "X"}


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _sessions(pg: PgCluster) -> list[tuple[str, str]]:
    with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
        return [(r[0], r[1]) for r in conn.execute(
            "SELECT datname, state FROM pg_stat_activity WHERE application_name = %s",
            (APP,)).fetchall()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_copy_children_and_sessions_end_with_a_killed_parent(cluster: PgCluster) -> None:
    args = {"blue": json.loads(h.superuser_db(cluster, "blue").model_dump_json()),
            "green": json.loads(h.superuser_db(cluster, "green").model_dump_json())}
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "from tests.integration.test_children import _copy_parent; _copy_parent()"],
        cwd=REPO, env={**os.environ, "ORCH_CHILDREN_ARGS": json.dumps(args)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pids: list[int] = []
    try:
        copying = h.wait_for(
            lambda: sorted(d for d, s in _sessions(cluster) if s == "active")
            == ["blue", "green"], timeout=60, interval=0.05)
        assert copying, parent.stderr.read().decode()[-2000:] if parent.poll() else "no copy"
        pids = [p for p in _children_of(parent.pid)
                if Path(f"/proc/{p}/exe").resolve().name == "psql"]
        assert len(pids) == 2, pids
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        assert h.wait_for(lambda: not any(_alive(p) for p in pids), timeout=5, interval=0.05), (
            "psql children outlived their parent")
        assert h.wait_for(lambda: not _sessions(cluster), timeout=10, interval=0.05), (
            f"server sessions outlived the copy: {_sessions(cluster)}")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in pids:  # on failure only: the children this test caused to run
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if parent.stderr:
            parent.stderr.close()


def test_children_are_private_and_started_from_one_long_lived_thread() -> None:
    """Whatever thread asks, the fork happens on the forker thread, with umask 077."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(
            lambda _: children.run(["sh", "-c", "umask"], timeout=10), range(4)))
    assert {r[1].strip() for r in results} == {b"0077"}
    assert all(r[0] == 0 for r in results)
    forkers = [t for t in threading.enumerate() if t.name == "orchestrate-forker"]
    assert len(forkers) == 1 and forkers[0].daemon
    # The kernel's death signal follows the forking thread: a child asked for by a
    # thread that then ends must live on.
    started: list[subprocess.Popen[bytes]] = []
    asker = threading.Thread(target=lambda: started.append(children.popen(["sleep", "30"])))
    asker.start()
    asker.join()
    try:
        time.sleep(0.5)
        assert started[0].poll() is None, "the child died with the thread that asked for it"
    finally:
        started[0].kill()
        started[0].wait()
