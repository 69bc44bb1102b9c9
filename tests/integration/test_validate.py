"""Validation against real servers of two majors (blue 16, green 17).

Every kind of difference is planted on green and must be found *and named* (table,
key, column): missing row, extra row, changed value, NULL vs empty string, changed
sequence, missing or invalid index, missing or NOT VALID constraint (FOREIGN KEY,
CHECK, NOT NULL), missing extension; identical data passes, migrations' expected
changes (added column, renamed column with a mapping, changed type) do not fail,
composite keys and tables without a key work, and under live logical replication
with a writer on blue nothing is reported but the planted divergence.

Each test gets its own pair of databases; the two clusters are shared by the module.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql

from orchestrator.config import DatabaseConfig, SecretRef, ValidateConfig
from orchestrator.pg import catalog, diff, replication
from orchestrator.pg.validate import ValidationReport, _plan, render_text, validate
from orchestrator.sandbox.pgcluster import PgCluster
from tests.conftest import short_tmpdir

CONTROL = "orchestrate"
_names = itertools.count()


@pytest.fixture(scope="module")
def clusters() -> Iterator[tuple[PgCluster, PgCluster]]:
    with short_tmpdir("orch-val-") as base, PgCluster("blue", 16, base) as blue, \
            PgCluster("green", 17, base) as green:
        yield blue, green


@dataclass
class Pair:
    blue_cluster: PgCluster
    green_cluster: PgCluster
    dbname: str

    def db(self, side: str) -> DatabaseConfig:
        c = self.blue_cluster if side == "blue" else self.green_cluster
        return DatabaseConfig(host=c.host, port=c.port, dbname=self.dbname, user=c.superuser,
                              password=SecretRef(file=c.pwfile), sslmode="disable",
                              connect_timeout=5)

    def conn(self, side: str) -> psycopg.Connection[Any]:
        c = self.blue_cluster if side == "blue" else self.green_cluster
        return psycopg.connect(c.conninfo(self.dbname), autocommit=True)

    def both(self, statements: str) -> None:
        for side in ("blue", "green"):
            self.run(side, statements)

    def run(self, side: str, statements: str) -> None:
        with self.conn(side) as conn:
            conn.execute(statements)  # several statements: simple query protocol

    def validate(self, cfg: ValidateConfig | None = None, **kwargs: Any) -> ValidationReport:
        report = validate(self.db("blue"), self.db("green"),
                          cfg or ValidateConfig(chunk_rows=200), control_schema=CONTROL,
                          **kwargs)
        # Whatever the outcome, the report must serialise and render.
        json.dumps(report.as_dict())
        assert render_text(report)
        return report


@pytest.fixture
def pair(clusters: tuple[PgCluster, PgCluster]) -> Iterator[Pair]:
    blue, green = clusters
    name = f"val_{next(_names)}"
    for c in (blue, green):
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield Pair(blue, green, name)
    for c in (blue, green):
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _data_problems(report: ValidationReport) -> list[str]:
    return [p for p in report.problems if not p.startswith("sequence")]


def _said(problems: list[str], *expected: str) -> None:
    """Each of ``expected`` is in one of the report's ``problems``, as text."""
    text = "\n".join(problems)
    missing = [e for e in expected if e not in text]
    assert not missing, f"not reported: {missing}\n{text}"


# A table with most column types, whose text forms differ between settings and
# majors when nobody pins them (floats, timestamps, intervals, bytea, json).
MIXED = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE mixed (
    id bigserial PRIMARY KEY, i2 smallint, i4 int, f4 real, f8 double precision,
    n numeric(12, 3), t text, vc varchar(20), c char(5), b bool, d date, tm time,
    ts timestamp, tz timestamptz, iv interval, u uuid, j json, jb jsonb, by bytea,
    arr int[], m mood, ip inet, mac macaddr, lsn pg_lsn);
INSERT INTO mixed (i2, i4, f4, f8, n, t, vc, c, b, d, tm, ts, tz, iv, u, j, jb, by, arr, m, ip,
                   mac, lsn)
SELECT g % 100, g, g / 7.0, g / 3.0, g * 1.125, CASE WHEN g % 5 = 0 THEN NULL
       WHEN g % 5 = 1 THEN '' ELSE 'text ' || g END, 'v' || g, 'c', g % 2 = 0,
       DATE '2024-01-01' + g, TIME '00:00' + g * INTERVAL '1 s',
       TIMESTAMP '2024-01-01' + g * INTERVAL '1 min',
       TIMESTAMPTZ '2024-01-01 00:00+02' + g * INTERVAL '1 h',
       g * INTERVAL '90 min', md5(g::text)::uuid, json_build_object('g', g, 'f', g / 3.0),
       jsonb_build_object('g', g, 'x', ARRAY[g, g + 1]), decode(md5(g::text), 'hex'),
       ARRAY[g, g * 2], (ARRAY['sad', 'ok', 'happy'])[g % 3 + 1]::mood, '10.0.0.1'::inet + g,
       '08:00:2b:01:02:03', ('0/' || to_hex(g))::pg_lsn
FROM generate_series(1, 1500) g;
INSERT INTO mixed (id) VALUES (1501);  -- NULL in every column but the key
CREATE TABLE pairs (a int, b text, v text, PRIMARY KEY (a, b));
INSERT INTO pairs SELECT g % 7, 'k' || g, 'v' || g FROM generate_series(1, 1200) g;
ANALYZE;
"""


def test_identical_data_passes_across_majors(pair: Pair) -> None:
    pair.both(MIXED)
    report = pair.validate(ValidateConfig(chunk_rows=200, strong_checksums=True))
    assert report.ok, report.problems
    mixed = next(t for t in report.tables if t.table == "public.mixed")
    assert mixed.blue_rows == mixed.green_rows == 1501
    assert mixed.chunks > 1 and mixed.method == "chunked"
    pairs = next(t for t in report.tables if t.table == "public.pairs")
    assert pairs.ok and pairs.chunks > 1


def test_15_to_17_identical_passes_and_a_change_is_found(
        clusters: tuple[PgCluster, PgCluster]) -> None:
    # PostgreSQL 15 (Debian's build, with JIT) as blue: text forms and hashes must agree.
    _, green = clusters
    with short_tmpdir("orch-v15-") as base, PgCluster("blue15", 15, base) as blue:
        for c in (blue, green):
            c.execute("CREATE DATABASE v15")
        try:
            p = Pair(blue, green, "v15")
            p.both(MIXED)
            report = p.validate(ValidateConfig(chunk_rows=300))
            assert report.ok, report.problems
            p.run("green", "UPDATE mixed SET tz = tz + INTERVAL '1 microsecond' WHERE id = 9")
            report = p.validate(ValidateConfig(chunk_rows=300))
            assert [p for p in report.problems if p.startswith("public.mixed id=")] == [
                "public.mixed id=9: tz: blue '2024-01-01 07:00:00+00', "
                "green '2024-01-01 07:00:00.000001+00'"]
        finally:
            green.execute("DROP DATABASE IF EXISTS v15 WITH (FORCE)")


def test_every_kind_of_row_difference_is_found_and_named(pair: Pair) -> None:
    pair.both(MIXED)
    pair.run("green", """
        DELETE FROM mixed WHERE id IN (1, 777);             -- missing on green
        INSERT INTO mixed (id, t) VALUES (5000, 'extra');    -- extra on green
        UPDATE mixed SET f8 = f8 + 1e-9 WHERE id = 100;      -- changed value
        UPDATE mixed SET t = '' WHERE id = 200;              -- NULL on blue, '' on green
        UPDATE mixed SET t = NULL WHERE id = 301;            -- '' on blue, NULL on green
        UPDATE mixed SET m = 'sad', jb = '{"g": 0}' WHERE id = 1400;
        UPDATE mixed SET i4 = 0, ip = '0.0.0.0', mac = '00:00:00:00:00:00', lsn = '0/0',
                         u = '00000000-0000-0000-0000-000000000000', tz = 'epoch', f8 = 0,
                         b = false, vc = '', c = '' WHERE id = 1501;  -- NULL vs "zero"
        UPDATE pairs SET v = 'changed' WHERE a = 3 AND b = 'k3';
        DELETE FROM pairs WHERE a = 0 AND b = 'k700';
    """)
    report = pair.validate()
    assert not report.ok
    mixed = next(t for t in report.tables if t.table == "public.mixed")
    got = {d.key["id"]: d for d in mixed.diffs}
    assert set(got) == {"1", "777", "5000", "100", "200", "301", "1400", "1501"}
    assert got["1501"].changes == {c: (None, v) for c, v in [
        ("i4", "0"), ("ip", "0.0.0.0/32"), ("mac", "00:00:00:00:00:00"), ("lsn", "0/0"),
        ("u", "00000000-0000-0000-0000-000000000000"), ("tz", "1970-01-01 00:00:00+00"),
        ("f8", "0"), ("b", "false"), ("vc", ""), ("c", "")]}
    assert got["1"].kind == got["777"].kind == "missing_on_green"
    assert got["5000"].kind == "extra_on_green"
    assert set(got["100"].changes) == {"f8"}
    assert got["200"].changes == {"t": (None, "")}
    assert got["301"].changes == {"t": ("", None)}
    assert set(got["1400"].changes) == {"m", "jb"}
    assert got["1400"].changes["m"] == ("happy", "sad")
    _said(report.problems,
          "public.mixed id=1: missing on green",
          "public.mixed id=5000: extra on green",
          "public.mixed id=200: t: blue NULL, green ''",
          "public.mixed id=301: t: blue '', green NULL",
          "public.pairs a=3, b=k3: v: blue 'v3', green 'changed'",
          "public.pairs a=0, b=k700: missing on green")
    as_json = report.as_dict()
    table = next(t for t in as_json["tables"] if t["table"] == "public.mixed")
    assert table["differing_keys"] == 8
    assert {"key": {"id": "200"}, "kind": "changed",
            "changes": {"t": {"blue": None, "green": ""}}} in table["diffs"]


def test_bisection_reports_first_keys_and_a_total(pair: Pair) -> None:
    pair.both("CREATE TABLE big (id int PRIMARY KEY, v int); "
              "INSERT INTO big SELECT g, g FROM generate_series(1, 20000) g; ANALYZE big;")
    pair.run("green", "UPDATE big SET v = -v WHERE id % 500 = 0")  # 40 rows
    report = pair.validate(ValidateConfig(chunk_rows=1000, max_reported_keys=5))
    big = report.tables[0]
    assert big.differing_keys == 40 and big.complete
    assert big.chunks == 20 and big.mismatched_chunks == 20
    # each chunk is split once into 32 parts; only the mismatching ones are fetched
    assert big.ranges_compared <= 20 + 20 * 32
    assert sum(p.startswith("public.big id=") for p in report.problems) == 5
    assert "public.big: 40 differing row(s) (40 changed)" in report.problems
    assert len(report.as_dict()["tables"][0]["diffs"]) == 5


def test_table_without_primary_key_is_compared_whole(pair: Pair) -> None:
    pair.both("CREATE TABLE log (at int, msg text); "
              "INSERT INTO log SELECT g, 'm' || g FROM generate_series(1, 300) g; "
              "INSERT INTO log VALUES (1, 'm1');")  # a duplicate row too
    report = pair.validate()
    assert report.ok, report.problems
    assert any("public.log has no primary key" in n for n in report.notes)
    pair.run("green", "DELETE FROM log WHERE ctid = (SELECT min(ctid) FROM log WHERE at = 1); "
                      "UPDATE log SET msg = 'M5' WHERE at = 5")
    report = pair.validate()
    log = report.tables[0]
    assert log.method == "whole-table"
    rows = {(d.kind, d.row["at"] if d.row else None, d.row["msg"] if d.row else None)
            for d in log.diffs}
    assert rows == {("missing_on_green", "1", "m1"), ("missing_on_green", "5", "m5"),
                    ("extra_on_green", "5", "M5")}
    assert any("row (at='5', msg='M5') extra on green" in p for p in report.problems)


def test_schema_differences_are_named(pair: Pair) -> None:
    have_trgm = True
    for side in ("blue", "green"):
        with pair.conn(side) as conn:
            have_trgm = have_trgm and "pg_trgm" in catalog.available_extensions(conn)
    pair.both("""
        CREATE TABLE parent (id int PRIMARY KEY, name text);
        CREATE TABLE child (id int PRIMARY KEY, parent_id int NOT NULL
                                CONSTRAINT child_parent_fk REFERENCES parent (id),
                            qty int CONSTRAINT child_qty_check CHECK (qty >= 0),
                            label text NOT NULL, grp int);
        CREATE INDEX child_label_idx ON child (label);
        CREATE INDEX child_grp_idx ON child (grp);
        CREATE TABLE other (id int PRIMARY KEY,
                            ref int CONSTRAINT other_ref_fk REFERENCES parent (id));
        INSERT INTO parent VALUES (1, 'p');
        INSERT INTO child SELECT g, 1, g, 'l' || g, g % 3 FROM generate_series(1, 50) g;
        INSERT INTO other VALUES (1, 1);
    """)
    if have_trgm:
        pair.run("blue", "CREATE EXTENSION pg_trgm")
    pair.run("green", """
        DROP INDEX child_label_idx;
        ALTER TABLE child DROP CONSTRAINT child_parent_fk;
        ALTER TABLE child DROP CONSTRAINT child_qty_check;
        ALTER TABLE child ALTER COLUMN label DROP NOT NULL;
        ALTER TABLE other DROP CONSTRAINT other_ref_fk;
        ALTER TABLE other ADD CONSTRAINT other_ref_fk FOREIGN KEY (ref) REFERENCES parent (id)
            NOT VALID;
        DROP INDEX child_grp_idx;
        CREATE TABLE extra_on_green (id int PRIMARY KEY);
    """)
    # What a failed CREATE INDEX CONCURRENTLY leaves behind: an invalid index.
    with pair.conn("green") as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("CREATE UNIQUE INDEX CONCURRENTLY child_grp_idx ON child (grp)")
    report = pair.validate()
    _said(report.problems,
          "index child_label_idx on public.child is missing on green",
          "index child_grp_idx on public.child is not valid on green",
          "foreign key child_parent_fk on public.child is missing on green",
          "check constraint child_qty_check on public.child is missing on green",
          "NOT NULL on public.child.label is missing on green",
          "foreign key other_ref_fk on public.other is NOT VALID on green",
          *(["extension pg_trgm"] if have_trgm else []))
    assert any("table public.extra_on_green exists only on green" in n for n in report.notes)
    kinds = {f["kind"] for f in report.as_dict()["findings"] if f["severity"] == "problem"}
    assert {"index", "constraint", "not_null"} <= kinds
    # the data itself is identical
    assert all(t.ok for t in report.tables)


def test_sequences_behind_are_a_note_before_green_takes_writes(pair: Pair) -> None:
    pair.both("CREATE TABLE s (id serial PRIMARY KEY, v int); CREATE SEQUENCE tickets;")
    pair.run("blue", "INSERT INTO s (v) SELECT g FROM generate_series(1, 50) g; "
                     "SELECT setval('tickets', 900);")
    pair.run("green", "INSERT INTO s (id, v) SELECT g, g FROM generate_series(1, 50) g; "
                      "SELECT setval('tickets', 1000);")
    report = pair.validate()
    assert report.ok, report.problems
    assert any("sequence public.s_id_seq on green" in n and "behind blue (50)" in n
               for n in report.notes)
    after = pair.validate(expect_sequences_ahead=True)
    assert not after.ok
    assert [p for p in after.problems if "sequence" in p] == [
        "sequence public.s_id_seq on green (0) is behind blue (50): green would hand out "
        "values blue already used"]
    status = {s["sequence"]: s["status"] for s in after.as_dict()["sequences"]}
    assert status == {"public.s_id_seq": "behind", "public.tickets": "ahead"}


def test_migration_changes_are_notes_or_mapped(pair: Pair) -> None:
    pair.both("CREATE TABLE orders (id int PRIMARY KEY, amount int NOT NULL, qty int, memo text); "
              "INSERT INTO orders SELECT g, g * 10, g % 4, 'm' || g "
              "FROM generate_series(1, 400) g;")
    pair.run("green", """
        ALTER TABLE orders ADD COLUMN created timestamptz DEFAULT now();  -- added
        ALTER TABLE orders RENAME COLUMN amount TO amount_cents;          -- renamed
        ALTER TABLE orders ALTER COLUMN qty TYPE bigint;                  -- widened
    """)
    unmapped = pair.validate()
    assert any("column public.orders.amount is on blue but not on green" in p
               for p in unmapped.problems)
    cfg = ValidateConfig(chunk_rows=200, column_map={"public.orders": {"amount_cents": "amount"}})
    report = pair.validate(cfg)
    assert report.ok, report.problems
    orders = report.tables[0]
    assert orders.green_only_columns == ["created"]
    assert any("columns only on green" in n and "created" in n for n in report.notes)
    assert any("public.orders.qty: type integer on blue, bigint on green" in n
               for n in report.notes)
    # a real difference in a mapped column is still found, named by green's column
    pair.run("green", "UPDATE orders SET amount_cents = 1 WHERE id = 42")
    report = pair.validate(cfg)
    assert [d.changes for d in report.tables[0].diffs] == [
        {"amount_cents (blue amount)": ("420", "1")}]
    ignored = pair.validate(ValidateConfig(
        chunk_rows=200, column_map=cfg.column_map,
        ignore_columns={"public.orders": ["amount", "amount_cents"]}))
    assert ignored.ok, ignored.problems


def test_counts_only(pair: Pair) -> None:
    pair.both("CREATE TABLE c (id int PRIMARY KEY, v int); "
              "INSERT INTO c SELECT g, g FROM generate_series(1, 100) g;")
    pair.run("green", "DELETE FROM c WHERE id = 3; UPDATE c SET v = 0 WHERE id = 4")
    report = pair.validate(ValidateConfig(checksums=False))
    assert report.problems == ["public.c: 100 rows on blue, 99 on green"]


# ---------------------------------------------------------------- under writes


class Writer(threading.Thread):
    """Updates, inserts and deletes on blue until stopped, each in its own commit."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        super().__init__(daemon=True)
        self.conn = conn
        self.stop = threading.Event()
        self.commits = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        rnd = random.Random(7)
        next_id = 100_000
        try:
            while not self.stop.is_set():
                op = rnd.random()
                if op < 0.6:
                    # Batches of 300 rows among the first 3,300 keys: green applies them a
                    # moment after blue commits them, so chunks read meanwhile differ.
                    # (Without a catch-up, validation reports such rows as different.)
                    first = rnd.randint(1, 3000)
                    self.conn.execute("UPDATE acc SET v = v + 1, note = md5(random()::text) "
                                      "WHERE id BETWEEN %s AND %s", (first, first + 300))
                elif op < 0.9:
                    next_id += 1
                    self.conn.execute("INSERT INTO acc VALUES (%s, 0, 'new')", (next_id,))
                else:
                    self.conn.execute("DELETE FROM acc WHERE id = %s",
                                      (rnd.randint(100_001, max(100_001, next_id)),))
                self.commits += 1
                time.sleep(0.001)
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def _replicate(pair: Pair) -> Callable[[], None]:
    """Blue -> green logical replication like the release's sync state sets it up."""
    blue, green = pair.conn("blue"), pair.conn("green")
    names = replication.forward(pair.dbname)
    for conn in (blue, green):
        replication.ensure_heartbeat(conn, CONTROL)
    tables = [catalog.Table("public", "acc", ["id"]),
              catalog.Table(CONTROL, replication.HEARTBEAT_TABLE, ["direction"])]
    replication.ensure_publication(blue, names.publication, tables)
    replication.ensure_subscription(
        green, names.subscription, pair.blue_cluster.conninfo(pair.dbname), names.publication,
        replication.SubscriptionOptions(origin_none=True))
    replication.wait_initial_copy(green, names.subscription, timeout=60, poll=0.1)
    replication.wait_applied(blue, green, schema=CONTROL, direction="fwd",
                             subscription=names.subscription, timeout=60)

    def catch_up() -> None:
        replication.wait_applied(blue, green, schema=CONTROL, direction="fwd",
                                 subscription=names.subscription, timeout=60)

    def drop() -> None:
        replication.drop_subscription(green, names.subscription)
        blue.close()
        green.close()

    catch_up.drop = drop  # type: ignore[attr-defined]
    return catch_up


@pytest.mark.pg(">=16")
def test_under_writes_only_real_differences_are_reported(pair: Pair) -> None:
    pair.both("CREATE TABLE acc (id bigint PRIMARY KEY, v int NOT NULL, note text)")
    pair.run("blue", "INSERT INTO acc SELECT g, g, 'n' || g FROM generate_series(1, 6000) g; "
                     "ANALYZE acc;")
    catch_up = _replicate(pair)
    writer = Writer(pair.conn("blue"))
    cfg = ValidateConfig(chunk_rows=500, leaf_rows=32)
    try:
        # Divergences replication will not undo: rows blue's writer never touches,
        # changed on green behind replication's back.
        pair.run("green", "UPDATE acc SET note = 'diverged' WHERE id = 4000; "
                          "DELETE FROM acc WHERE id = 5000;")
        writer.start()
        time.sleep(0.3)
        before = writer.commits
        report = pair.validate(cfg, catch_up=catch_up)
        during = writer.commits - before
        # The confirmation step on its own: rows changing right now (the writer's
        # range) offered as differing keys must come out equal, the planted ones not.
        comparer = diff.Comparer(pair.db("blue"), pair.db("green"), cfg, catch_up=catch_up)
        try:
            with pair.conn("blue") as b, pair.conn("green") as g:
                table = next(t for t in catalog.user_tables(b) if t.name == "acc")
                plan, _ = _plan(b, g, table, cfg)
            state = diff._State(plan, diff.TableResult(plan.table))
            state.candidates = {(str(i),) for i in range(1000, 1100)} | {("4000",), ("5000",)}
            comparer._confirm(state)
        finally:
            comparer.close()
    finally:
        writer.stop.set()
        writer.join(timeout=10)
        catch_up.drop()  # type: ignore[attr-defined]
    assert writer.error is None, writer.error
    assert during > 20, "the writer must keep writing while validation runs"
    acc = next(t for t in report.tables if t.table == "public.acc")
    found = {(d.key["id"], d.kind) for d in acc.diffs}
    assert found == {("4000", "changed"), ("5000", "missing_on_green")}, report.problems
    assert acc.diffs[0].changes["note"] == ("n4000", "diverged")
    assert _data_problems(report) == [
        "public.acc: 2 differing row(s) (1 missing on green, 1 changed)",
        "public.acc id=4000: note: blue 'n4000', green 'diverged'",
        "public.acc id=5000: missing on green"]
    assert report.under_writes
    confirmed = {(d.key["id"], d.kind) for d in state.result.diffs}
    assert confirmed == {("4000", "changed"), ("5000", "missing_on_green")}
    assert state.result.transient == 100 and state.result.unconfirmed == 0
