"""The control schema module against a real PostgreSQL: a control schema as the code
before ``orchestrator.pg.control_schema`` created it is upgraded in place with nothing
lost, a second ensure is a no-op, each object stays on its side, and concurrent
orchestrators do not race."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from orchestrator.config import DatabaseConfig
from orchestrator.pg import control_schema, schema_sections
from orchestrator.sandbox.pgcluster import PgCluster
from tests.pg_helpers import module_cluster

S = "orchestrate"

# What main (77e439a) ran, verbatim: store._DDL with SCHEMA_VERSION 1 on the state
# database; migrations.TRACKING_DDL, the heartbeat, the provision marker, the copy's
# state, deferred and settings tables on green (blue, as the state database and a
# former green, holds all of them).
LEGACY = (Path(__file__).parent / "data" / "control_schema_v0.sql").read_text()

ROWS = """
INSERT INTO {schema}.releases (name, state, status, config_sha256, config, facts)
  VALUES ('shop-r1', 'canary', 'running', 'abc', '{{"a": 1}}', '{{"stage": 2}}');
INSERT INTO {schema}.release_log (release, level, state, message)
  VALUES ('shop-r1', 'warning', 'canary', 'slow'), ('shop-r1', 'info', 'canary', 'ok');
INSERT INTO {schema}.stage_measurements (release, stage, weight, check_name, value, verdict)
  VALUES ('shop-r1', 1, 10, 'errors', 0.5, 'pass');
INSERT INTO {schema}.migrations (migration_name, version, checksum, status)
  VALUES ('0001_init', '0001', 'c1', 'completed');
INSERT INTO {schema}.migration_log (migration_id, log_level, message)
  SELECT id, 'error', 'boom' FROM {schema}.migrations;
INSERT INTO {schema}.provisioned (release) VALUES ('shop-r1');
INSERT INTO {schema}.heartbeat (direction, beat) VALUES ('fwd', 7);
INSERT INTO {schema}.initial_copy (slot, phase, jobs) VALUES ('s1', 'copied', 2);
INSERT INTO {schema}.initial_copy_deferred (step, kind, schema_name, table_name,
  object_name, statements) VALUES (1, 'index', 'public', 't', 't_idx', ARRAY['SELECT 1']);
INSERT INTO {schema}.initial_copy_settings (name, previous)
  VALUES ('max_sync_workers_per_subscription', '2');
"""

# The shape of the control schema: relations, columns, constraints, indexes, types.
SHAPE = """
SELECT 'rel', c.relname, c.relkind::text FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %(s)s
UNION ALL
SELECT 'col', c.relname || '.' || a.attname,
  format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull::text || ' '
  || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE n.nspname = %(s)s AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'con', conname, pg_get_constraintdef(k.oid) FROM pg_constraint k
  JOIN pg_namespace n ON n.oid = k.connamespace WHERE n.nspname = %(s)s
UNION ALL
SELECT 'idx', indexname, indexdef FROM pg_indexes WHERE schemaname = %(s)s
UNION ALL
SELECT 'type', t.typname, string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
JOIN pg_enum e ON e.enumtypid = t.oid WHERE n.nspname = %(s)s GROUP BY t.typname
ORDER BY 1, 2, 3
"""

TABLES = ["releases", "release_log", "stage_measurements", "migrations", "migration_log",
          "provisioned", "heartbeat", "initial_copy", "initial_copy_deferred",
          "initial_copy_settings"]


pg = module_cluster("control", 15, "orch-ctl-")


_made = iter(range(1_000_000))


@pytest.fixture
def db(pg: PgCluster) -> Iterator[psycopg.Connection[Any]]:
    """A connection to a database of its own (the cluster is shared by the module)."""
    name = f"ctl{next(_made)}"
    pg.create_database(name)
    with psycopg.connect(pg.conninfo(name), autocommit=True) as conn:
        yield conn


def run(conn: psycopg.Connection[Any], template: str) -> None:
    conn.execute(sql.SQL(template).format(schema=sql.Identifier(S)))  # type: ignore[arg-type]


def shape(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(SHAPE, {"s": S}).fetchall()


def data(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[Any, ...]]]:
    return {t: conn.execute(sql.SQL("SELECT * FROM {}.{} ORDER BY 1").format(
        sql.Identifier(S), sql.Identifier(t))).fetchall() for t in TABLES}


def versions(conn: psycopg.Connection[Any]) -> list[int]:
    return [r[0] for r in conn.execute(
        "SELECT version FROM orchestrate.schema_version ORDER BY 1").fetchall()]


def ensure_all(conn: psycopg.Connection[Any]) -> list[int]:
    """Blue by default: the state database, a former green, and a replication end."""
    return (control_schema.ensure_state(conn, S) + control_schema.ensure_green(conn, S)
            + control_schema.ensure_peer(conn, S))


def test_legacy_control_schema_is_upgraded_in_place(db: psycopg.Connection[Any],
                                                    pg: PgCluster) -> None:
    run(db, LEGACY)
    run(db, ROWS)
    before_data, before_shape = data(db), shape(db)
    assert versions(db) == [1]

    ran = ensure_all(db)

    assert sorted(ran) == [2, 3, 4, 5, 6, 7, 8]
    assert versions(db) == [s.version for s in control_schema.STEPS]
    assert data(db) == before_data
    # Only what steps after main's legacy schema add (8: the pair's live side) is new.
    upgraded = shape(db)
    assert [r for r in upgraded if not _added_later(r)] == before_shape
    assert {r[1] for r in upgraded if r[0] == "rel" and _added_later(r)} == {
        "live_side", "live_side_pkey"}
    # The upgraded schema is the very one the module creates from nothing.
    pg.create_database("ctlfresh")
    with psycopg.connect(pg.conninfo("ctlfresh"), autocommit=True) as fresh:
        ensure_all(fresh)
        assert shape(fresh) == upgraded

    assert ensure_all(db) == []
    assert data(db) == before_data
    assert shape(db) == upgraded


def _added_later(row: tuple[Any, ...]) -> bool:
    return str(row[1]).startswith("live_side")


def test_second_ensure_is_a_no_op(db: psycopg.Connection[Any]) -> None:
    assert control_schema.ensure_green(db, S) == [1, 3, 4, 5, 6, 7]
    first = shape(db)
    assert control_schema.ensure_green(db, S) == []
    assert shape(db) == first


def test_log_level_is_one_enum_for_both_logs(db: psycopg.Connection[Any]) -> None:
    control_schema.ensure_state(db, S)
    control_schema.ensure_green(db, S)
    types = db.execute(
        "SELECT a.atttypid::regtype::text FROM pg_attribute a "
        "WHERE a.attrelid IN ('orchestrate.release_log'::regclass, "
        "'orchestrate.migration_log'::regclass) AND a.attname IN ('level', 'log_level')"
    ).fetchall()
    assert types == [("orchestrate.log_level",), ("orchestrate.log_level",)]
    assert db.execute("SELECT count(*) FROM pg_type WHERE typname = 'log_level'"
                      ).fetchone() == (1,)


def test_each_object_stays_on_its_side(db: psycopg.Connection[Any]) -> None:
    def relations() -> set[str]:
        return {r[1] for r in shape(db) if r[0] == "rel" and r[2] == "r"}

    control_schema.ensure_peer(db, S)
    assert relations() == {"schema_version", "heartbeat"}
    control_schema.ensure_state(db, S)
    assert relations() == {"schema_version", "heartbeat", "releases", "release_log",
                           "stage_measurements", "live_side"}
    assert "migrations" not in relations()


def test_concurrent_orchestrators_do_not_race(pg: PgCluster) -> None:
    pg.create_database("ctlrace")
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def worker(i: int) -> None:
        try:
            with psycopg.connect(pg.conninfo("ctlrace"), autocommit=True) as conn:
                start.wait(timeout=30)
                (control_schema.ensure_state if i % 2 else control_schema.ensure_green)(conn, S)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with psycopg.connect(pg.conninfo("ctlrace"), autocommit=True) as conn:
        assert versions(conn) == [s.version for s in control_schema.STEPS]


def test_post_data_session_connects_through_pg_conn(pg: PgCluster, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(pg.password)
    cfg = DatabaseConfig.model_validate({
        "host": pg.host, "port": pg.port, "dbname": "postgres", "user": pg.superuser,
        "password": {"file": str(pw)}, "sslmode": "disable"})
    with schema_sections.session(cfg, maintenance_work_mem="64MB", parallel_workers=3,
                                 tag="orch-post-data-test") as conn:
        got = conn.execute(
            "SELECT current_setting('application_name'), current_setting('lock_timeout'), "
            "current_setting('statement_timeout'), current_setting('maintenance_work_mem'), "
            "current_setting('max_parallel_maintenance_workers'), "
            "current_setting('synchronous_commit'), "
            "current_setting('client_connection_check_interval')").fetchone()
        assert got == ("orch-post-data-test", "5min", "0", "64MB", "3", "off", "1s")
        assert conn.autocommit
        # The connection comes from pg.conn: no client deadline for hours-long builds.
        assert getattr(conn, "deadline", "absent") is None
