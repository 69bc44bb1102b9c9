"""Generated columns in the validation, on real servers of every supported major.

A stored generated column is data the application reads and green computes itself,
so a generation expression changed on green changes every row: both the expression
and the rows must be reported, and the notes must not call a column that both sides
have "only on green". The same DDL on blue 15/16 and green 17/18 must not give a
false difference; PostgreSQL 18's virtual generated columns are not stored: their
expressions are compared, not their values.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from orchestrator.config import ValidateConfig
from orchestrator.pg import catalog, generated, schema_check
from orchestrator.pg.names import QualifiedName
from orchestrator.pg.validate import ValidationReport, _plan, validate
from orchestrator.sandbox.pgcluster import PgCluster
from tests.conftest import short_tmpdir
from tests.integration.test_validate import Pair, Writer, _replicate

_names = itertools.count()

# Most kinds of expression a generated column holds: operators, casts, domains,
# enums, jsonb, text search, functions in a schema whose name needs quotes, CASE
# (deparsed over several lines), SQL-standard syntax deparsed in its own words.
SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE SCHEMA "Util s";
CREATE FUNCTION "Util s".twice(x int) RETURNS int IMMUTABLE LANGUAGE sql AS $$ SELECT x * 2 $$;
CREATE TABLE items (
    id int PRIMARY KEY, price numeric(10, 2), qty int, name text, ts timestamp,
    tz timestamptz, j jsonb, m mood, arr int[], d posint,
    total numeric GENERATED ALWAYS AS (price * qty) STORED,
    label text GENERATED ALWAYS AS (name || ' x' || qty::text) STORED,
    taxed numeric GENERATED ALWAYS AS (round(price * 1.08, 2)) STORED,
    yr numeric GENERATED ALWAYS AS (EXTRACT(year FROM ts)) STORED,
    utc timestamp GENERATED ALWAYS AS (tz AT TIME ZONE 'UTC') STORED,
    k text GENERATED ALWAYS AS (j ->> 'k') STORED,
    happy boolean GENERATED ALWAYS AS (m = 'happy') STORED,
    size int GENERATED ALWAYS AS (coalesce(qty, 0) + CASE WHEN name IS NULL THEN 1 ELSE 2 END)
        STORED,
    doc tsvector GENERATED ALWAYS AS (to_tsvector('english', coalesce(name, ''))) STORED,
    dbl int GENERATED ALWAYS AS ("Util s".twice(qty)) STORED,
    first int GENERATED ALWAYS AS (arr[1]) STORED,
    mid text GENERATED ALWAYS AS (substring(name FROM 2 FOR 3)) STORED,
    dd int GENERATED ALWAYS AS ((d + 1)::int) STORED,
    small boolean GENERATED ALWAYS AS (qty IN (1, 2, 3)) STORED,
    ratio double precision GENERATED ALWAYS AS (qty::float8 / 3) STORED
);
INSERT INTO items (id, price, qty, name, ts, tz, j, m, arr, d)
SELECT g, g * 1.25, g % 7, CASE WHEN g % 11 = 0 THEN NULL ELSE 'item ' || g END,
       TIMESTAMP '2020-01-01' + g * INTERVAL '1 day',
       TIMESTAMPTZ '2024-01-01 00:00+02' + g * INTERVAL '1 h',
       jsonb_build_object('k', 'v' || g), (ARRAY['sad', 'ok', 'happy'])[g % 3 + 1]::mood,
       ARRAY[g, g + 1], g
FROM generate_series(1, 600) g;
ANALYZE;
"""

GENERATED = ["total", "label", "taxed", "yr", "utc", "k", "happy", "size", "doc", "dbl", "first",
             "mid", "dd", "small", "ratio"]


@pytest.fixture(scope="module")
def clusters() -> Iterator[dict[int, PgCluster]]:
    with short_tmpdir("orch-gen-") as base, PgCluster("g15", 15, base) as c15, \
            PgCluster("g16", 16, base) as c16, PgCluster("g17", 17, base) as c17, \
            PgCluster("g18", 18, base) as c18:
        yield {15: c15, 16: c16, 17: c17, 18: c18}


@pytest.fixture
def pairs(clusters: dict[int, PgCluster]) -> Iterator[dict[tuple[int, int], Pair]]:
    """One database per test on each cluster; a Pair per (blue, green) major."""
    name = f"gen_{next(_names)}"
    for c in clusters.values():
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield {(b, g): Pair(clusters[b], clusters[g], name)
           for b, g in ((15, 17), (16, 17), (17, 18), (16, 18))}
    for c in clusters.values():
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _generated_findings(report: ValidationReport) -> list[schema_check.Finding]:
    return [f for f in report.findings if f.kind == "generated"]


def _only_on_green(report: ValidationReport) -> list[str]:
    return [n for n in report.notes if "only on green" in n]


def test_identical_generated_columns_pass_on_every_pair(
        clusters: dict[int, PgCluster], pairs: dict[tuple[int, int], Pair]) -> None:
    for c in clusters.values():
        with psycopg.connect(c.conninfo(pairs[15, 17].dbname), autocommit=True) as conn:
            conn.execute(SCHEMA)
    for (b, g), pair in pairs.items():
        report = pair.validate()
        assert report.ok, (b, g, report.problems)
        # no false difference from deparsing on two majors, no column "only on green"
        assert _generated_findings(report) == [], (b, g)
        assert _only_on_green(report) == [], (b, g)
        items = next(t for t in report.tables if t.table == "public.items")
        assert items.blue_rows == items.green_rows == 600 and items.method == "chunked"
        # the stored generated columns are among the compared ones
        with pair.conn("blue") as bc, pair.conn("green") as gc:
            table = next(t for t in catalog.user_tables(bc) if t.name == "items")
            plan, _ = _plan(bc, gc, table, ValidateConfig())
        assert set(GENERATED) <= {p.blue for p in plan.columns}, (b, g)


def test_expression_changed_by_hand_on_green_is_reported_with_its_rows(
        pairs: dict[tuple[int, int], Pair]) -> None:
    pair = pairs[15, 17]
    pair.both("CREATE TABLE orders (id int PRIMARY KEY, price numeric(10, 2) NOT NULL, "
              "qty int NOT NULL, total numeric GENERATED ALWAYS AS (price * qty) STORED); "
              "INSERT INTO orders SELECT g, g * 0.5, g % 4 + 1 FROM generate_series(1, 300) g;")
    # After provisioning, by hand (not a migration): green now computes other values.
    pair.run("green", "ALTER TABLE orders ALTER COLUMN total SET EXPRESSION AS "
                      "(price * qty * 2)")
    report = pair.validate()
    assert not report.ok
    [finding] = _generated_findings(report)
    assert (finding.severity, finding.object) == ("note", "public.orders.total")
    assert finding.message.startswith(
        "generation expression of public.orders.total differs: blue '(price * (qty)::numeric)', "
        "green '((price * (qty)::numeric) * (2)::numeric)'; its stored values are compared")
    assert "validate.ignore_columns" in finding.message
    orders = next(t for t in report.tables if t.table == "public.orders")
    assert orders.differing_keys == 300 and {d.kind for d in orders.diffs} == {"changed"}
    assert all(set(d.changes) == {"total"} for d in orders.diffs)
    assert "public.orders: 300 differing row(s) (300 changed)" in report.problems
    assert "public.orders id=1: total: blue '1.00', green '2.00'" in report.problems
    assert _only_on_green(report) == []
    # A migration that changes the expression on purpose declares it: an intended
    # difference, reported as a note, not a failure.
    declared = pair.validate(ValidateConfig(chunk_rows=200,
                                            ignore_columns={"public.orders": ["total"]}))
    assert declared.ok, declared.problems
    [finding] = _generated_findings(declared)
    assert finding.severity == "note"
    assert "values not compared (in validate.ignore_columns)" in finding.message
    assert _only_on_green(declared) == []


def test_generated_on_one_side_only_names_the_side(pairs: dict[tuple[int, int], Pair]) -> None:
    pair = pairs[16, 17]
    pair.run("blue", "CREATE TABLE t (id int PRIMARY KEY, a int, "
                     "g int GENERATED ALWAYS AS (a * 2) STORED);")
    pair.run("green", "CREATE TABLE t (id int PRIMARY KEY, a int, g int, added text);")
    pair.run("blue", "INSERT INTO t (id, a) SELECT g, g FROM generate_series(1, 50) g")
    pair.run("green", "INSERT INTO t (id, a, g) SELECT g, g, g * 2 FROM generate_series(1, 50) g; "
                      "UPDATE t SET g = 0 WHERE id = 7")
    report = pair.validate()
    assert [f.message for f in _generated_findings(report)] == [
        "public.t.g is stored generated on blue, not generated on green; its stored values "
        "are compared"]
    assert _only_on_green(report) == [
        "public.t: columns only on green (new in this release, not compared): added"]
    assert "public.t id=7: g: blue '14', green '0'" in report.problems


def test_virtual_generated_columns_compare_expressions_not_values(
        clusters: dict[int, PgCluster]) -> None:
    # Both sides on 18 (the first major with virtual columns): two databases of one
    # cluster, as blue and green.
    c18 = clusters[18]
    dbs = {"blue": "virt_blue", "green": "virt_green"}
    for db in dbs.values():
        c18.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    try:
        side = {s: Pair(c18, c18, db) for s, db in dbs.items()}
        for p in side.values():
            p.run("blue", "CREATE TABLE v (id int PRIMARY KEY, a int, "
                          "s int GENERATED ALWAYS AS (a + 1) STORED, "
                          "w int GENERATED ALWAYS AS (a * 10) VIRTUAL); "
                          "INSERT INTO v (id, a) SELECT g, g FROM generate_series(1, 40) g;")

        def check() -> ValidationReport:
            return validate(side["blue"].db("blue"), side["green"].db("blue"),
                            ValidateConfig(chunk_rows=100), control_schema="orchestrate")

        report = check()
        assert report.ok, report.problems
        assert _generated_findings(report) == [] and _only_on_green(report) == []
        with side["blue"].conn("blue") as bc, side["green"].conn("blue") as gc:
            table = next(t for t in catalog.user_tables(bc) if t.name == "v")
            plan, _ = _plan(bc, gc, table, ValidateConfig())
        # stored data is compared, a virtual column is not
        assert [p.blue for p in plan.columns] == ["id", "a", "s"]
        side["green"].run("blue", "ALTER TABLE v ALTER COLUMN w SET EXPRESSION AS (a * 11)")
        report = check()
        assert not report.ok
        [finding] = _generated_findings(report)
        assert finding.severity == "problem"
        assert finding.message.startswith(
            "generation expression of public.v.w differs: blue '(a * 10)', green '(a * 11)'; "
            "its values are computed on read and not compared")
        assert all(t.ok for t in report.tables)
    finally:
        for db in dbs.values():
            c18.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(db)))

T_S = QualifiedName("public", "T s")


def test_green_deparses_both_expressions_when_their_texts_differ(
        pairs: dict[tuple[int, int], Pair]) -> None:
    pair = pairs[16, 17]
    pair.run("green", 'CREATE TABLE "T s" (id int PRIMARY KEY, a int, '
                      "g int GENERATED ALWAYS AS (a * 2 + 1) STORED)")
    with pair.conn("green") as conn:
        [(stored,)] = conn.execute("SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef").fetchall()
        assert stored == "((a * 2) + 1)"
        # Texts two servers could write for one expression: the same once green
        # parsed and deparsed both; a different expression stays different.
        assert generated.same(conn, T_S, "g", "a * 2 + 1", stored)
        assert generated.same(conn, T_S, "g", "(((a * 2)) + 1)", stored)
        assert not generated.same(conn, T_S, "g", "a * 3 + 1", stored)
        assert not generated.same(conn, T_S, "g", "nope(a)", stored)
        # Only one expression is ever sent back to the server.
        assert generated.canonical(conn, T_S, "g", "1); DROP TABLE \"T s\"; --",
                                   stored) is None
        assert conn.execute("SELECT to_regclass('public.\"T s\"') IS NOT NULL").fetchone() == (
            True,)
        # A session that cannot create temporary tables compares the texts as read.
        conn.execute("SET default_transaction_read_only = on")
        assert generated.canonical(conn, T_S, "g", "a * 2 + 1", stored) is None
        assert not generated.same(conn, T_S, "g", "a * 2 + 1", stored)
        assert generated.same(conn, T_S, "g", "((a  *  2) + 1)", stored)
        # nothing was left behind in the session
        conn.execute("SET default_transaction_read_only = off")
        assert conn.execute("SELECT to_regclass('pg_temp.orch_expr_probe')").fetchone() == (None,)


def test_under_replication_green_computes_the_same_values(
        pairs: dict[tuple[int, int], Pair]) -> None:
    # Logical replication does not carry generated columns (before 18, and not by
    # default on 18): green computes them on apply; a writer on blue must not make
    # them look different.
    pair = pairs[16, 17]
    pair.both("CREATE TABLE acc (id bigint PRIMARY KEY, v int NOT NULL, note text, "
              "vv bigint GENERATED ALWAYS AS (v::bigint * 2 + length(note)) STORED)")
    pair.run("blue", "INSERT INTO acc SELECT g, g, 'n' || g FROM generate_series(1, 3000) g; "
                     "ANALYZE acc;")
    catch_up = _replicate(pair)
    writer = Writer(pair.conn("blue"))
    try:
        writer.start()
        time.sleep(0.3)
        report = pair.validate(ValidateConfig(chunk_rows=500, leaf_rows=32), catch_up=catch_up)
    finally:
        writer.stop.set()
        writer.join(timeout=10)
        catch_up.drop()  # type: ignore[attr-defined]
    assert writer.error is None, writer.error
    assert writer.commits > 20
    assert report.ok, report.problems
    assert _generated_findings(report) == [] and _only_on_green(report) == []
