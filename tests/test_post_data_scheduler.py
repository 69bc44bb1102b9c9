"""The post-data restore on the shared scheduler (``orchestrator.pg.scheduler``): the
steps one after another with the largest table first, a rerun skipping what is back,
and a real PostgreSQL for what has to stop: the first failure cancels the statements
still running and the deadline ends the run, each leaving no session behind."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from orchestrator.config import DatabaseConfig
from orchestrator.errors import ReleaseFailed
from orchestrator.pg import post_data, post_data_restore
from orchestrator.pg.post_data import STEP_ATTACH, STEP_BUILD, STEP_FOREIGN_KEYS, Deferred
from orchestrator.pg.post_data_restore import Unit, graph, restore_post_data
from orchestrator.pg.scheduler import Node, Scheduler, Sessions
from orchestrator.sandbox.pgcluster import PgCluster
from tests.pg_helpers import module_cluster, superuser_config

CONTROL = "orchestrate"
SLEEP = "SELECT pg_sleep(60)"


pg = module_cluster("postdata", 15, "orch-pd-")


_made = iter(range(1_000_000))


@pytest.fixture
def green(pg: PgCluster, monkeypatch: pytest.MonkeyPatch) -> DatabaseConfig:
    """A database of its own with ``t`` (ids 1..2000, ``v`` with duplicates) and an
    empty control schema."""
    name = f"pd{next(_made)}"
    pg.create_database(name)
    cfg = superuser_config(pg, monkeypatch, "ORCH_TEST_PD_PW").model_copy(
        update={"dbname": name})
    with psycopg.connect(pg.conninfo(name), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int NOT NULL, v int)")
        conn.execute("INSERT INTO t SELECT g, g % 10 FROM generate_series(1, 2000) g")
        conn.execute("CREATE TABLE small (id int NOT NULL)")
        post_data.ensure_table(conn, CONTROL)
    return cfg


def _record(pg: PgCluster, cfg: DatabaseConfig,
            rows: list[tuple[int, str, str, str, list[str]]]) -> None:
    """Record (step, kind, table, object, statements) as ``post_data_defer`` does."""
    with psycopg.connect(pg.conninfo(cfg.dbname), autocommit=True) as conn:
        for step, kind, table, name, statements in rows:
            conn.execute(
                f"INSERT INTO {CONTROL}.{post_data.DEFERRED_TABLE} (step, kind, schema_name, "
                "table_name, object_name, statements) VALUES (%s, %s, 'public', %s, %s, %s)",
                (step, kind, table, name, statements))


def _sessions(pg: PgCluster, cfg: DatabaseConfig, tag: str, *, wait: float = 10.0) -> int:
    """Backends still connected as ``tag`` once closed connections had time to go."""
    with psycopg.connect(pg.conninfo(cfg.dbname), autocommit=True) as conn:
        end = time.monotonic() + wait
        while True:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity "
                               "WHERE application_name = %s", (tag,)).fetchone()
            assert row is not None
            if row[0] == 0 or time.monotonic() > end:
                return int(row[0])
            time.sleep(0.1)


def _pending(pg: PgCluster, cfg: DatabaseConfig) -> list[str]:
    with psycopg.connect(pg.conninfo(cfg.dbname), autocommit=True) as conn:
        return sorted(i.name for i in post_data.pending(conn, CONTROL))


def _item(id: int, step: int, kind: str, table: str, name: str) -> Deferred:
    return Deferred(id, step, kind, "public", table, name, [], False)


def test_steps_in_order_largest_table_first_one_session_per_table() -> None:
    items = [_item(1, STEP_BUILD, "index", "small", "small_idx"),
             _item(2, STEP_BUILD, "index", "big", "big_idx"),
             _item(3, STEP_ATTACH, "constraint", "small", "small_pkey"),
             _item(4, STEP_ATTACH, "constraint", "big", "big_pkey"),
             _item(5, STEP_ATTACH, "extra", "big", "big_comment"),
             _item(6, STEP_FOREIGN_KEYS, "fk", "small", "small_fk")]
    nodes = graph(items, {("public", "small"): 10, ("public", "big"): 1000},
                  [("public", "small"), ("public", "big")])
    ran: list[list[str]] = []

    def work(node: Node[Unit], conn: psycopg.Connection[Any] | None) -> int:
        assert conn is None
        ran.append([i.name for i in node.job.items] or [node.name])
        return 0

    Scheduler[Unit](jobs=1, deadline=time.monotonic() + 30,
                    sessions=Sessions(lambda: pytest.fail("no session wanted")),
                    work=work, in_session=lambda n: False, finished=lambda n, r: None,
                    cancel=lambda: None, late=lambda: ReleaseFailed("late")).run(nodes)
    assert ran == [
        ["big_idx"], ["small_idx"], ["end of indexes"],
        # A table's ALTERs in one unit, in the order recorded.
        ["big_pkey", "big_comment"], ["small_pkey"], ["end of constraints"],
        ["small_fk"], ["end of foreign keys"],
        ["analyze public.small"], ["analyze public.big"], ["end of analyze"]]


def test_restore_reports_progress_and_a_rerun_skips_what_is_back(
        pg: PgCluster, green: DatabaseConfig) -> None:
    rows: list[tuple[int, str, str, str, list[str]]] = [
        (STEP_BUILD, "index", "t", "t_v_idx", ["CREATE INDEX t_v_idx ON public.t (v)"]),
        # As pg_dump names them: the constraint takes over its index's name.
        (STEP_BUILD, "index", "t", "t_pkey", ["CREATE UNIQUE INDEX t_pkey ON public.t (id)"]),
        (STEP_ATTACH, "constraint", "t", "t_pkey",
         ["ALTER TABLE public.t ADD CONSTRAINT t_pkey PRIMARY KEY USING INDEX t_pkey"])]
    _record(pg, green, rows)
    seen: list[tuple[str, int, int]] = []
    stats = restore_post_data(green, control_schema=CONTROL, jobs=2,
                              analyze=[("public", "t")], tag="orch-pd-ok",
                              progress=lambda *a: seen.append(a))
    assert (stats.items, stats.skipped) == (3, 0)
    assert seen == [("post-data", n, 4) for n in range(1, 5)]
    assert set(stats.seconds_by_step) == {"indexes", "constraints", "foreign keys",
                                          "analyze"}
    assert _pending(pg, green) == []
    with psycopg.connect(pg.conninfo(green.dbname), autocommit=True) as conn:
        got = conn.execute("SELECT conname FROM pg_constraint "
                           "WHERE conrelid = 'public.t'::regclass").fetchall()
        assert got == [("t_pkey",)]
        analyzed = conn.execute("SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables "
                                "WHERE relname = 't'").fetchone()
        assert analyzed == (True,)
    # A crash after the work but before the records were forgotten: all is skipped.
    _record(pg, green, rows)
    again = restore_post_data(green, control_schema=CONTROL, jobs=2, tag="orch-pd-ok")
    assert (again.items, again.skipped) == (3, 3)
    assert _sessions(pg, green, "orch-pd-ok") == 0


def test_first_failure_cancels_the_rest_and_leaves_no_session(
        pg: PgCluster, green: DatabaseConfig) -> None:
    _record(pg, green, [
        (STEP_BUILD, "extra", "t", "slow", [SLEEP]),
        # v has duplicates: this one fails at once.
        (STEP_BUILD, "index", "small", "t_v_key", ["CREATE UNIQUE INDEX t_v_key ON public.t (v)"]),
        (STEP_ATTACH, "constraint", "small", "small_pkey",
         ["ALTER TABLE public.small ADD CONSTRAINT small_pkey PRIMARY KEY (id)"])])
    began = time.monotonic()
    with pytest.raises(ReleaseFailed, match=r"restoring index public\.t_v_key on green failed"):
        restore_post_data(green, control_schema=CONTROL, jobs=2, tag="orch-pd-fail")
    assert time.monotonic() - began < 20, "the 60 s statement was cancelled"
    assert _sessions(pg, green, "orch-pd-fail") == 0
    # Nothing is forgotten, and the next step never started.
    assert _pending(pg, green) == ["slow", "small_pkey", "t_v_key"]
    with psycopg.connect(pg.conninfo(green.dbname), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_constraint "
                            "WHERE conrelid = 'public.small'::regclass").fetchone() == (0,)


def test_deadline_ends_the_restore_and_cancels_its_statement(
        pg: PgCluster, green: DatabaseConfig) -> None:
    _record(pg, green, [(STEP_BUILD, "extra", "t", "slow", [SLEEP])])
    began = time.monotonic()
    with pytest.raises(ReleaseFailed, match="timed out") as caught:
        restore_post_data(green, control_schema=CONTROL, jobs=2, timeout=1.5,
                          tag="orch-pd-late")
    assert 1.5 <= time.monotonic() - began < 20
    assert caught.value.hint == "raise sync.initial_copy_timeout"
    assert _sessions(pg, green, "orch-pd-late") == 0
    assert _pending(pg, green) == ["slow"]


def test_scheduler_closes_its_sessions_after_a_failure(
        pg: PgCluster, green: DatabaseConfig) -> None:
    """Before, a failed run kept its idle sessions open for as long as the pool lived."""
    sessions = Sessions(lambda: post_data_restore.session(
        green, maintenance_work_mem="64MB", parallel_workers=1, tag="orch-pd-pool"))
    quick = [Node(f"quick {n}", 1, n) for n in range(3)]
    failing = Node("failing", 1, -1)
    failing.after(quick)
    cancelled: list[bool] = []

    def work(node: Node[int], conn: psycopg.Connection[Any] | None) -> int:
        assert conn is not None
        if node.job < 0:
            conn.execute("SELECT 1/0")
        return int(conn.execute("SELECT 1").fetchone() == (1,))

    with pytest.raises(psycopg.errors.DivisionByZero):
        Scheduler[int](jobs=3, deadline=time.monotonic() + 30, sessions=sessions,
                       work=work, in_session=lambda n: True, finished=lambda n, r: None,
                       cancel=lambda: cancelled.append(True),
                       late=lambda: ReleaseFailed("late")).run([*quick, failing])
    assert cancelled == [True]
    assert _sessions(pg, green, "orch-pd-pool") == 0
