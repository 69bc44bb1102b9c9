"""What logical replication cannot carry, on PostgreSQL 16 -> 17: key-less tables with
REPLICA IDENTITY FULL written on both sides, large objects and unlogged tables
(refused in preflight), materialized views (refreshed on green and compared), and
DDL on blue during the release (detected, rolled back)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orchestrator.routers.base import Weights
from orchestrator.sandbox.stack import DEMO_MIGRATIONS, Sandbox
from tests.integration import helpers as h

pytestmark = pytest.mark.slow

# Held at 20 % by the gate of the last stage, so that the test writes on both sides.
HELD_AT_20: dict[str, Any] = {"interval": "1s", "window": "10s", "checks": [],
    "allow_unanalysed": True, "stages": [
    {"weight": 0, "duration": "1s"}, {"weight": 20, "duration": "1s"},
    {"weight": 100, "duration": "1s", "manual_gate": True}]}
GATE_AT_0: dict[str, Any] = {"interval": "1s", "window": "10s", "checks": [],
    "allow_unanalysed": True, "stages": [
    {"weight": 0, "duration": "1s", "manual_gate": True}, {"weight": 100, "duration": "1s"}]}
QUICK: dict[str, Any] = {"interval": "1s", "window": "10s", "checks": [], "allow_unanalysed": True,
    "stages": [
    {"weight": 0, "duration": "1s"}, {"weight": 100, "duration": "1s"}]}


def _rows(conn: psycopg.Connection[Any], query: str) -> list[tuple[Any, ...]]:
    return sorted(conn.execute(query).fetchall())


def _on_blue(sb: Sandbox, setup: list[str], teardown: str) -> Iterator[Sandbox]:
    """For a fixture: the sandbox reset, then ``setup`` run on blue; after the test,
    reset again and ``teardown`` run on blue."""
    h.reset(sb)
    with h.blue_conn(sb) as b:
        for statement in setup:
            b.execute(statement)
    yield sb
    h.reset(sb)
    with h.blue_conn(sb) as b:
        b.execute(teardown)


@pytest.fixture
def keyless(sandbox_16_17: Sandbox) -> Iterator[Sandbox]:
    yield from _on_blue(sandbox_16_17, [
        "CREATE TABLE public.notes (author text NOT NULL, body text, n int)",
        "ALTER TABLE public.notes REPLICA IDENTITY FULL",
        "INSERT INTO public.notes SELECT 'a' || g % 5, 'note ' || g, g "
        "FROM generate_series(1, 200) g"], "DROP TABLE IF EXISTS public.notes")


def test_full_identity_table_takes_updates_and_deletes_on_both_sides(keyless: Sandbox
                                                                     ) -> None:
    """Defect 3: with a column list in green's reverse publication, PostgreSQL refused
    every UPDATE/DELETE of the table on green, the forward apply's included."""
    sb = keyless
    cfg = h.write_config(sb, "full-identity", canary=HELD_AT_20)
    with h.spawned(sb, "release", "--config", str(cfg), log=sb.base_dir / "full.log") as proc:
        def at_gate() -> bool:
            row = h.release_row(sb, "full-identity")
            return bool(row and row["facts"].get("stage") == 2)

        assert h.wait_for(at_gate, timeout=180), (sb.base_dir / "full.log").read_text()[-3000:]
        assert h.router(sb).current() == Weights.green_at(20)
        with h.blue_conn(sb) as b, h.green_conn(sb) as g:
            b.execute("UPDATE public.notes SET body = 'blue edit' WHERE n BETWEEN 1 AND 20")
            b.execute("DELETE FROM public.notes WHERE n BETWEEN 21 AND 30")
            g.execute("UPDATE public.notes SET body = 'green edit' WHERE n BETWEEN 101 AND 120")
            g.execute("DELETE FROM public.notes WHERE n BETWEEN 121 AND 130")
            g.execute("INSERT INTO public.notes VALUES ('green', 'new on green', 1000)")
            query = "SELECT author, body, n FROM public.notes"

            def equal() -> bool:
                return _rows(b, query) == _rows(g, query)

            assert h.wait_for(equal, timeout=30), "the two sides did not converge"
            rows = _rows(g, query)
        assert len(rows) == 200 - 20 + 1
        assert sum(1 for r in rows if r[1] == "blue edit") == 20
        assert sum(1 for r in rows if r[1] == "green edit") == 20
        approved = h.run_cli(sb, "promote", "--config", str(cfg))
        assert approved.code == 0, approved.out + approved.err[-2000:]
        assert proc.wait(timeout=120) == 0, (sb.base_dir / "full.log").read_text()[-3000:]
    row = h.release_row(sb, "full-identity")
    assert row is not None and row["status"] == "promoted", row
    with h.blue_conn(sb) as b, h.green_conn(sb) as g:
        g.execute("DELETE FROM public.notes WHERE n = 1000")
        assert h.wait_for(lambda: _rows(b, query) == _rows(g, query), timeout=30)
    # Back to blue inside the window (also leaves no replication object behind).
    back = h.run_cli(sb, "rollback", "--config", str(cfg))
    assert back.code == 0, back.err[-2000:]
    with h.blue_conn(sb) as b:
        assert len(_rows(b, query)) == 200 - 20
    assert h.replication_leftovers(sb) == []


def test_full_identity_table_with_a_column_only_green_has_is_refused(keyless: Sandbox,
                                                                      tmp_path: Path) -> None:
    """The whole row is the identity: one side's extra column cannot replicate. The
    release stops before the copy, long before green takes writes."""
    sb = keyless
    migrations = tmp_path / "migrations"
    shutil.copytree(DEMO_MIGRATIONS, migrations)
    (migrations / "0003_notes_tag.up.sql").write_text(
        "ALTER TABLE public.notes ADD COLUMN tag text NOT NULL DEFAULT 'x';\n")
    (migrations / "0003_notes_tag.down.sql").write_text(
        "ALTER TABLE public.notes DROP COLUMN tag;\n")
    cfg = h.write_config(sb, "full-new-column", canary=QUICK,
                         migrations={"dir": str(migrations)})
    result = h.run_cli(sb, "release", "--config", str(cfg))
    assert result.code == 1
    row = h.rolled_back_row(sb, "full-new-column")
    error = row["error"] or ""
    assert "REPLICA IDENTITY FULL" in error and "public.notes (green has tag" in error, error
    assert "sync failed" in error
    assert "green_writable" not in row["facts"] and "sync" not in row["facts"]
    assert h.router(sb).current() == Weights.green_at(0)
    assert h.replication_leftovers(sb) == []
    assert "REPLICA IDENTITY USING INDEX" in result.out + result.err


def test_large_objects_and_unlogged_tables_are_refused_in_preflight(
        sandbox_16_17: Sandbox) -> None:
    sb = sandbox_16_17
    h.reset(sb)
    with h.blue_conn(sb) as b:
        oid = b.execute("SELECT lo_from_bytea(0, 'scan of an invoice')").fetchone()[0]
        b.execute("CREATE UNLOGGED TABLE public.cache (k text PRIMARY KEY, v text)")
        b.execute("CREATE UNLOGGED TABLE public.skipped (k text PRIMARY KEY)")
    try:
        cfg = h.write_config(sb, "uncarried", sync={"exclude_tables": ["public.skipped"]})
        result = h.run_cli(sb, "release", "--config", str(cfg))
        assert result.code == 2, result.err[-2000:]
        assert "1 large object(s)" in result.err and "bytea" in result.err
        assert "table public.cache is UNLOGGED" in result.err
        assert "ALTER TABLE public.cache SET LOGGED" in result.err
        assert "public.skipped" not in result.err
        assert h.release_row(sb, "uncarried") is None
        with h.green_conn(sb, "postgres") as g:
            assert g.execute("SELECT 1 FROM pg_database WHERE datname = 'shop'"
                             ).fetchone() is None
    finally:
        with h.blue_conn(sb) as b:
            b.execute("SELECT lo_unlink(%s)", (oid,))
            b.execute("DROP TABLE public.cache, public.skipped")


@pytest.fixture
def with_matviews(sandbox_16_17: Sandbox) -> Iterator[Sandbox]:
    yield from _on_blue(sandbox_16_17, [
        "CREATE TABLE public.sales (id int PRIMARY KEY, region text NOT NULL, "
        "amount numeric NOT NULL)",
        "INSERT INTO public.sales SELECT g, 'r' || g % 7, g * 1.5 "
        "FROM generate_series(1, 5000) g",
        # a_top is created first (lower OID) and reads z_by_region through a view that
        # is pointed at it afterwards: OID or name order would refresh it too early.
        "CREATE VIEW public.m_regions AS SELECT 'none'::text AS region, 0::numeric AS total",
        "CREATE MATERIALIZED VIEW public.a_top AS SELECT region, total "
        "FROM public.m_regions ORDER BY total DESC LIMIT 3",
        "CREATE MATERIALIZED VIEW public.z_by_region AS SELECT region, "
        "sum(amount) AS total, count(*) AS n FROM public.sales GROUP BY region",
        "CREATE UNIQUE INDEX ON public.z_by_region (region)",
        "CREATE OR REPLACE VIEW public.m_regions AS SELECT region, total "
        "FROM public.z_by_region",
        "REFRESH MATERIALIZED VIEW public.a_top",
        "CREATE MATERIALIZED VIEW public.never_filled AS SELECT id FROM "
        "public.sales WITH NO DATA"], "DROP TABLE public.sales CASCADE")


def test_materialized_views_are_refreshed_on_green_and_compared(with_matviews: Sandbox
                                                               ) -> None:
    sb = with_matviews
    cfg = h.write_config(sb, "matviews", canary=GATE_AT_0)
    proc = h.spawn_cli(sb, "release", "--config", str(cfg), log=sb.base_dir / "mv.log")
    try:
        def in_canary() -> bool:
            row = h.release_row(sb, "matviews")
            return bool(row and row["state"] in {"canary", "rollback", "rolled_back"})

        assert h.wait_for(in_canary, timeout=180), (sb.base_dir / "mv.log").read_text()[-3000:]
        row = h.release_row(sb, "matviews")
        assert row is not None and row["state"] == "canary", row
        # Before green takes any traffic: green's views hold blue's rows.
        with h.blue_conn(sb) as b, h.green_conn(sb) as g:
            for mv in ("public.z_by_region", "public.a_top"):
                query = f"SELECT * FROM {mv}"
                assert _rows(g, query) == _rows(b, query) != []
            assert not g.execute("SELECT relispopulated FROM pg_class "
                                 "WHERE oid = 'public.never_filled'::regclass").fetchone()[0]
        refreshed = [(m["matview"], m["mode"]) for m in row["facts"]["matviews_refreshed"]]
        assert sorted(refreshed) == [("public.a_top", "plain"),
                                     ("public.never_filled", "skipped (unpopulated on blue)"),
                                     ("public.z_by_region", "plain")]
        order = [name for name, _ in refreshed]
        assert order.index("public.z_by_region") < order.index("public.a_top")
        from orchestrator.pg import matviews  # here: the module must import on main

        with h.blue_conn(sb) as b:
            on_blue = [m.qualified for m in matviews.matviews(b, exclude_schemas=("orchestrate",))]
        assert on_blue.index("public.z_by_region") < on_blue.index("public.a_top")
        verdicts = {m["matview"]: m["verdict"] for m in row["facts"]["validation"]["matviews"]}
        assert verdicts["public.z_by_region"] == "ok" and verdicts["public.a_top"] == "ok"

        # Validation compares contents. Green is not writable yet (no reverse
        # replication): a view refreshed from empty tables, and one left unpopulated.
        with h.green_conn(sb) as g:
            g.execute("DELETE FROM public.sales")
            g.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY public.z_by_region")
            g.execute("REFRESH MATERIALIZED VIEW public.a_top WITH NO DATA")
        checked = h.run_cli(sb, "validate", "--config", str(cfg))
        assert checked.code == 1
        assert "materialized view public.z_by_region differs: blue 7 rows" in checked.out, \
            checked.out
        assert "materialized view public.a_top is not populated on green" in checked.out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        # The killed run still holds its replication: a rollback takes it down.
        back = h.run_cli(sb, "rollback", "--config", str(cfg))
    assert back.code == 0, back.err[-2000:]
    assert h.replication_leftovers(sb) == []


def test_ddl_on_blue_during_the_release_rolls_back(keyless: Sandbox) -> None:
    sb = keyless
    stages = {"interval": "1s", "window": "10s", "checks": [], "allow_unanalysed": True, "stages": [
        {"weight": 0, "duration": "1s", "manual_gate": True}, {"weight": 20, "duration": "1s"},
        {"weight": 100, "duration": "1s"}]}
    cfg = h.write_config(sb, "ddl-on-blue", canary=stages)
    with h.spawned(sb, "release", "--config", str(cfg), log=sb.base_dir / "ddl.log") as proc:
        def at_gate() -> bool:
            row = h.release_row(sb, "ddl-on-blue")
            return bool(row and row["state"] == "canary")

        assert h.wait_for(at_gate, timeout=180), (sb.base_dir / "ddl.log").read_text()[-3000:]
        with h.blue_conn(sb) as b:
            b.execute("ALTER TABLE public.notes ADD COLUMN added_on_blue int")
        approved = h.run_cli(sb, "promote", "--config", str(cfg))
        assert approved.code == 0, approved.out + approved.err[-2000:]
        assert proc.wait(timeout=120) == 1
    row = h.rolled_back_row(sb, "ddl-on-blue")
    error = row["error"] or ""
    assert "blue's schema changed during the release (changed public.notes)" in error, error
    assert "before canary stage" in error
    assert not row["facts"].get("green_writable")
    assert h.router(sb).current() == Weights.green_at(0)
    assert h.replication_leftovers(sb) == []
