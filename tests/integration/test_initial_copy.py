"""The snapshot-consistent initial copy against real servers (blue 15 and 16, green 17).

Blue is written to (inserts, updates, deletes, cascades) all through the copy; green
must end equal to blue row for row, with every index and constraint back and valid,
and a copy killed half way must end the same after a rerun, with no slot left over.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orchestrator.config import DatabaseConfig, GreenConfig
from orchestrator.pg import catalog, initial_copy, replication, schema
from orchestrator.pg.tools import PgTools, find_tools
from orchestrator.sandbox.pgcluster import PgCluster
from tests.conftest import short_tmpdir
from tests.integration import helpers as h

REPO = Path(__file__).resolve().parents[2]
CONTROL = "orchestrate"
ROWS = 200_000
# Small chunks, so that 200k rows are split into page ranges like a big table is.
SMALL_CHUNKS = 8 * 1024 * 1024

BLUE_SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE accounts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner text NOT NULL,
    balance numeric(14, 2) NOT NULL CHECK (balance > -1000000),
    updated timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX accounts_owner ON accounts (owner) WITH (fillfactor = 80);
COMMENT ON INDEX accounts_owner IS 'who';
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    amount numeric NOT NULL,
    note text
);
CREATE INDEX orders_account ON orders (account_id);
CREATE TABLE wide (id int PRIMARY KEY, c1 int NOT NULL, %(wide_cols)s);
CREATE UNIQUE INDEX wide_c1_key ON wide (c1);
ALTER TABLE wide REPLICA IDENTITY USING INDEX wide_c1_key;
ALTER TABLE wide CLUSTER ON wide_pkey;
CREATE TABLE typed (
    id int PRIMARY KEY,
    n numeric, j jsonb, ts timestamptz, b bytea, m mood, moods mood[], arr int[],
    u uuid, iv interval, f float8, "Mixed Case" text,
    twice int GENERATED ALWAYS AS (id * 2) STORED,
    CONSTRAINT typed_u_key UNIQUE (u) DEFERRABLE INITIALLY DEFERRED
);
COMMENT ON CONSTRAINT typed_u_key ON typed IS 'unique uuid';
CREATE TABLE typed_bin (
    id int PRIMARY KEY, n numeric(20, 6), j jsonb, ts timestamptz, b bytea, d date,
    arr int[], tags text[], f float8, u uuid, ip inet
);
CREATE TABLE log (msg text NOT NULL, at timestamptz NOT NULL DEFAULT now());
ALTER TABLE log REPLICA IDENTITY FULL;
CREATE TABLE events (id bigint NOT NULL, day date NOT NULL, payload text,
                     PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
CREATE TABLE events_a PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2024-07-01');
CREATE TABLE events_b PARTITION OF events FOR VALUES FROM ('2024-07-01') TO ('2025-01-01');
CREATE TABLE bookings (id int PRIMARY KEY, period tsrange NOT NULL,
                       EXCLUDE USING gist (period WITH &&));
-- Would change every row it sees: it must not fire while green is loaded.
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN NEW.note := coalesce(NEW.note, '') || '+'; RETURN NEW; END $$;
CREATE TRIGGER orders_touch BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION touch();
"""

BLUE_DATA = """
INSERT INTO accounts (owner, balance, updated)
  SELECT 'owner ' || (g %% 997), (g %% 10000) / 7.0,
         '2024-01-01'::timestamptz + g * interval '1 min'
  FROM generate_series(1, %(rows)s) g;
INSERT INTO orders (account_id, amount, note)
  SELECT 1 + (g * 7) %% %(rows)s, g / 3.0, CASE WHEN g %% 3 = 0 THEN NULL ELSE 'n' || g END
  FROM generate_series(1, %(rows)s / 4) g;
INSERT INTO wide SELECT g, g, %(wide_values)s FROM generate_series(1, 20000) g;
INSERT INTO typed (id, n, j, ts, b, m, moods, arr, u, iv, f, "Mixed Case")
  SELECT g, g * 1.000001, jsonb_build_object('g', g, 'a', jsonb_build_array(g, 'x')),
         '2024-03-01 12:00+02'::timestamptz + g * interval '1 s', decode(md5(g::text), 'hex'),
         (ARRAY['sad', 'ok', 'happy']::mood[])[1 + g %% 3], ARRAY['ok', 'sad']::mood[],
         ARRAY[g, NULL, -g], md5(g::text)::uuid, g * interval '1 h 1 s',
         CASE g %% 4 WHEN 0 THEN 'NaN'::float8 WHEN 1 THEN 'Infinity' ELSE g / 3.0 END,
         'é ' || g
  FROM generate_series(1, 5000) g;
INSERT INTO typed_bin
  SELECT g, g / 7.0, jsonb_build_object('k', repeat('v', g %% 50)),
         '2024-03-01 12:00+00'::timestamptz + g * interval '1 s', decode(md5(g::text), 'hex'),
         '2024-01-01'::date + g, ARRAY[g, g + 1], ARRAY['a', NULL, 'c'],
         CASE WHEN g %% 5 = 0 THEN '-Infinity'::float8 ELSE 1.0 / g END, md5(g::text)::uuid,
         ('10.0.' || (g %% 250) || '.1')::inet
  FROM generate_series(1, 5000) g;
INSERT INTO log (msg) SELECT 'm' || g FROM generate_series(1, 1000) g;
INSERT INTO events SELECT g, '2024-01-01'::date + (g %% 360), 'p' || g
  FROM generate_series(1, 10000) g;
INSERT INTO bookings SELECT g, tsrange('2024-01-01'::timestamp + g * interval '1 h',
                                       '2024-01-01'::timestamp + (g + 1) * interval '1 h')
  FROM generate_series(1, 1000) g;
ANALYZE;
"""

# Tables compared row by row, with the key that orders them.
COMPARED = {"accounts": "id", "orders": "id", "wide": "id", "typed": "id", "typed_bin": "id",
            "log": "t::text", "events": "id, day", "bookings": "id"}


def _wide_sql() -> tuple[str, str]:
    cols, values = [], []
    for i in range(2, 30):
        kind = ("int", "text", "float8", "timestamptz")[i % 4]
        cols.append(f"c{i} {kind}")
        values.append({"int": f"g * {i}", "text": f"'t' || g || '-{i}'",
                       "float8": f"g / {i}.0",
                       "timestamptz": f"'2024-01-01'::timestamptz + g * interval '{i} s'"
                       }[kind])
    return ", ".join(cols), ", ".join(values)


@pytest.fixture(scope="module")
def clusters() -> Iterator[dict[str, PgCluster]]:
    with short_tmpdir("orch-ic-") as base:
        started: dict[str, PgCluster] = {}
        try:
            for name, major in (("b15", 15), ("b16", 16), ("g17", 17)):
                cluster = PgCluster(name, major, base)
                cluster.start()
                started[name] = cluster
            for name in ("b15", "b16"):
                _make_blue(started[name])
            yield started
        finally:
            for cluster in started.values():
                cluster.stop()


def _make_blue(cluster: PgCluster) -> None:
    cluster.create_database("shop")
    cols, values = _wide_sql()
    with psycopg.connect(cluster.conninfo("shop"), autocommit=True) as conn:
        conn.execute((BLUE_SCHEMA % {"wide_cols": cols}).encode())
        conn.execute((BLUE_DATA % {"rows": ROWS, "wide_values": values}).encode())


def _fresh_green(green: PgCluster, blue: DatabaseConfig, name: str, tools: PgTools
                 ) -> DatabaseConfig:
    """A new green database holding blue's schema, as the provision state leaves it."""
    with psycopg.connect(green.conninfo(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    db = h.superuser_db(green, name)
    schema.copy_schema(blue, db, tools, schema=CONTROL, release=name)
    return db


def _tables(db: DatabaseConfig) -> list[catalog.Table]:
    with psycopg.connect(db.conninfo(), autocommit=True) as conn:
        return catalog.user_tables(conn, exclude_schemas=(CONTROL,))


def _post_data(db: DatabaseConfig) -> dict[str, Any]:
    """Green's indexes and constraints as the catalog describes them."""
    with psycopg.connect(db.conninfo(), autocommit=True) as conn:
        indexes = conn.execute(
            "SELECT c.relname, i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid), "
            "i.indisvalid, i.indisclustered, i.indisreplident, "
            "obj_description(i.indexrelid, 'pg_class') "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
            "WHERE c.relnamespace = 'public'::regnamespace ORDER BY 2").fetchall()
        constraints = conn.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated, "
            "obj_description(oid, 'pg_constraint') FROM pg_constraint "
            "WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2").fetchall()
        identity = conn.execute(
            "SELECT relname, relreplident FROM pg_class WHERE relnamespace = "
            "'public'::regnamespace AND relkind IN ('r', 'p') ORDER BY 1").fetchall()
    return {"indexes": indexes, "constraints": constraints, "identity": identity}


def _fingerprint(conninfo: str) -> dict[str, tuple[int, str]]:
    out = {}
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute("SET extra_float_digits = 1")
        for table, key in COMPARED.items():
            row = conn.execute(
                f"SELECT count(*), coalesce(md5(string_agg(md5(t::text), '' ORDER BY {key})), '') "
                f"FROM {table} t").fetchone()
            assert row is not None
            out[table] = (int(row[0]), str(row[1]))
    return out


class Writer(threading.Thread):
    """The application: small transactions of every kind against blue, until stopped."""

    def __init__(self, conninfo: str, rate: float = 150.0) -> None:
        super().__init__(daemon=True)
        self.conninfo = conninfo
        self.rate = rate
        self.ops = 0
        self.errors: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        rnd = random.Random(7)
        try:
            with psycopg.connect(self.conninfo, autocommit=True) as conn:
                while not self.stopping.is_set():
                    self._step(conn, rnd)
                    time.sleep(1.0 / self.rate)
        except Exception as exc:  # reported by the test
            self.errors.append(repr(exc))

    def _step(self, conn: psycopg.Connection[Any], rnd: random.Random) -> None:
        some = rnd.randint(1, ROWS)
        ops = [
            ("INSERT INTO accounts (owner, balance) VALUES (%s, %s)", (f"w{some}", some / 3)),
            ("UPDATE accounts SET balance = balance + 1, updated = now() WHERE id = %s",
             (some,)),
            ("DELETE FROM accounts WHERE id = %s", (rnd.randint(1, ROWS),)),
            ("INSERT INTO orders (account_id, amount) SELECT id, 1.5 FROM accounts "
             "WHERE id >= %s ORDER BY id LIMIT 1", (some,)),
            ("UPDATE typed SET j = j || '{\"w\": 1}', m = 'happy', moods = moods || 'sad'::mood "
             "WHERE id = %s", (some % 5000 + 1,)),
            ("UPDATE typed_bin SET n = n + 0.5, tags = tags || 'w'::text WHERE id = %s",
             (some % 5000 + 1,)),
            ("UPDATE wide SET c4 = c4 + 1, c5 = 'w' WHERE id = %s", (some % 20000 + 1,)),
            ("INSERT INTO log (msg) VALUES (%s)", (f"w{some}",)),
            ("UPDATE log SET msg = msg || '!' WHERE msg = %s", (f"m{some % 1000 + 1}",)),
            ("INSERT INTO events VALUES (%s, %s, 'w') ON CONFLICT DO NOTHING",
             (ROWS + some, f"2024-{some % 12 + 1:02d}-03")),
            ("UPDATE events SET payload = payload || 'u' WHERE id = %s", (some % 10000 + 1,)),
        ]
        query, params = rnd.choice(ops)
        conn.execute(query.encode(), params)
        self.ops += 1


def _teardown(blue: DatabaseConfig, green: DatabaseConfig, names: replication.Names) -> None:
    with psycopg.connect(green.conninfo(), autocommit=True) as g:
        replication.drop_subscription(g, names.subscription)
    with psycopg.connect(blue.conninfo(), autocommit=True) as b:
        replication.drop_publication(b, names.publication)
        replication.drop_slot(b, names.slot)
        left = b.execute("SELECT slot_name FROM pg_replication_slots").fetchall()
    assert left == [], f"replication slots left on blue: {left}"


def _sync_and_compare(clusters: dict[str, PgCluster], blue_name: str, release: str,
                      config: initial_copy.InitialCopyConfig) -> initial_copy.SyncReport:
    blue_cluster, green_cluster = clusters[blue_name], clusters["g17"]
    blue = h.superuser_db(blue_cluster, "shop")
    tools = find_tools(17)
    green = _fresh_green(green_cluster, blue, release, tools)
    expected = _post_data(green)
    tables = _tables(blue)
    names = replication.forward(release)
    writer = Writer(blue_cluster.conninfo("shop"))
    writer.start()
    try:
        time.sleep(0.3)
        before = writer.ops
        report = initial_copy.initial_sync(blue, green, tables, names=names, tools=tools,
                                           control_schema=CONTROL, config=config,
                                           catchup_timeout=60)
        during = writer.ops - before
    finally:
        writer.stopping.set()
        writer.join(10)
    assert not writer.errors, writer.errors
    assert during > 20, "the writer should have been busy during the copy"
    with psycopg.connect(blue.conninfo(), autocommit=True) as b, \
            psycopg.connect(green.conninfo(), autocommit=True) as g:
        replication.wait_applied(b, g, schema=CONTROL, direction="fwd",
                                 subscription=names.subscription, timeout=60)
    assert _fingerprint(green_cluster.conninfo(release)) == _fingerprint(
        blue_cluster.conninfo("shop"))
    after = _post_data(green)
    assert after == expected
    assert all(row[3] for row in after["indexes"]), "every index valid"
    assert all(row[3] for row in after["constraints"]), "every constraint validated"
    _teardown(blue, green, names)
    return report


@pytest.mark.parametrize("blue_name", ["b15", "b16"])
def test_snapshot_copy_under_writes(clusters: dict[str, PgCluster], blue_name: str) -> None:
    # Split forced: at jobs=2 "auto" keeps tables whole (COPY FREEZE); the page-range
    # path must be covered too.
    config = initial_copy.InitialCopyConfig(jobs=2, chunk_bytes=SMALL_CHUNKS, split="always")
    report = _sync_and_compare(clusters, blue_name, f"snap_{blue_name}", config)
    assert report.copy is not None and report.copy.skipped is None
    assert report.copy.split_tables >= 1, "accounts should have been split into page ranges"
    # typed has an enum (text COPY); the others are built-in types only (binary COPY).
    assert report.copy.text_tables == 1
    assert report.copy.binary_tables == report.copy.tables - 1
    assert report.post_data is not None and report.post_data.items > 0


def test_plain_subscription_fallback(clusters: dict[str, PgCluster]) -> None:
    config = initial_copy.InitialCopyConfig(method="subscription", jobs=2)
    report = _sync_and_compare(clusters, "b16", "plain_b16", config)
    assert report.settings["max_sync_workers_per_subscription"] == "2"
    with psycopg.connect(clusters["g17"].conninfo(), autocommit=True) as conn:
        row = conn.execute("SELECT setting FROM pg_settings "
                           "WHERE name = 'max_sync_workers_per_subscription'").fetchone()
    assert row is not None and row[0] == "4", "the server's own value is back"


def _crash_child() -> None:
    """Run in a subprocess: copy, and die by SIGKILL when the first task is done."""
    args = json.loads(os.environ["ORCH_CRASH_ARGS"])
    blue = GreenConfig.model_validate(args["blue"])
    green = GreenConfig.model_validate(args["green"])
    tables = _tables(blue)
    config = initial_copy.InitialCopyConfig(jobs=2, chunk_bytes=SMALL_CHUNKS)

    def progress(phase: str, done: int, total: int) -> None:
        if phase != "copy" or done == 0:
            return
        # "copy": some rows are in, not all. "post-data": every row is in (and recorded
        # so), the rebuilds are not all done.
        if (done < total) == (args["kill_at"] == "copy"):
            os.kill(os.getpid(), signal.SIGKILL)

    initial_copy.copy_initial(blue, green, tables, slot_name=args["slot"],
                              publication=args["publication"], tools=find_tools(17),
                              control_schema=CONTROL, config=config, progress=progress)


@pytest.mark.parametrize("kill_at", ["copy", "post-data"])
def test_rerun_after_crash(clusters: dict[str, PgCluster], kill_at: str) -> None:
    """Killed while rows are copied: the rerun starts over with a new slot. Killed
    after the rows are in, while indexes are rebuilt: the rerun keeps the copy and the
    slot and only finishes the rebuilds."""
    blue_cluster, green_cluster = clusters["b16"], clusters["g17"]
    release = f"crash_{kill_at.replace('-', '_')}"
    blue = h.superuser_db(blue_cluster, "shop")
    tools = find_tools(17)
    green = _fresh_green(green_cluster, blue, release, tools)
    expected = _post_data(green)
    names = replication.forward(release)
    tables = _tables(blue)
    with psycopg.connect(blue.conninfo(), autocommit=True) as b:
        replication.ensure_heartbeat(b, CONTROL)
        heartbeat = catalog.Table(CONTROL, replication.HEARTBEAT_TABLE, ["direction"])
        replication.ensure_publication(b, names.publication, [*tables, heartbeat])
    args = {"blue": json.loads(blue.model_dump_json()), "green": json.loads(
        green.model_dump_json()), "slot": names.slot, "publication": names.publication,
        "kill_at": kill_at}
    child = subprocess.Popen(
        [sys.executable, "-c",
         "from tests.integration.test_initial_copy import _crash_child; _crash_child()"],
        cwd=REPO, env={**os.environ, "ORCH_CRASH_ARGS": json.dumps(args)},
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, err.decode()[-2000:]
    with psycopg.connect(green.conninfo(), autocommit=True) as g:
        state = initial_copy.copy_state(g, CONTROL, names.slot)
    assert state is not None and state.phase == ("copying" if kill_at == "copy" else "copied")
    with psycopg.connect(blue.conninfo(), autocommit=True) as b:
        assert b.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                         (names.slot,)).fetchone(), "the dead run's slot is still there"

    writer = Writer(blue_cluster.conninfo("shop"))
    writer.start()
    try:
        report = initial_copy.initial_sync(
            blue, green, tables, names=names, tools=tools, control_schema=CONTROL,
            config=initial_copy.InitialCopyConfig(jobs=2, chunk_bytes=SMALL_CHUNKS),
            catchup_timeout=60)
    finally:
        writer.stopping.set()
        writer.join(10)
    assert not writer.errors, writer.errors
    assert report.copy is not None
    if kill_at == "copy":
        assert report.copy.restarted
    else:
        assert report.copy.skipped == "the copy finished in an earlier run"
        assert report.post_data is not None and report.post_data.items > 0
    with psycopg.connect(blue.conninfo(), autocommit=True) as b, \
            psycopg.connect(green.conninfo(), autocommit=True) as g:
        replication.wait_applied(b, g, schema=CONTROL, direction="fwd",
                                 subscription=names.subscription, timeout=60)
        slots = [r[0] for r in b.execute("SELECT slot_name FROM pg_replication_slots")]
    assert slots == [names.slot]
    assert _fingerprint(green_cluster.conninfo(release)) == _fingerprint(
        blue_cluster.conninfo("shop"))
    assert _post_data(green) == expected
    _teardown(blue, green, names)
    # The dead run's psql processes (its process group) are gone too.
    with contextlib.suppress(ProcessLookupError):
        for _ in range(50):
            os.killpg(child.pid, 0)
            time.sleep(0.1)
        pytest.fail("processes of the killed copy are still running")


# ------------------------------------------------------------------ planning, no server


def test_split_pages_covers_every_page_once() -> None:
    mib = 1024 * 1024
    assert initial_copy.split_pages(1000, 10 * mib, 64 * mib) == [(0, None)]
    ranges = initial_copy.split_pages(100_000, 800 * mib, 100 * mib)
    assert len(ranges) == 8
    assert ranges[0][0] == 0 and ranges[-1][1] is None
    for (_, hi), (lo, _) in itertools.pairwise(ranges):
        assert hi == lo


def test_split_only_when_it_pays() -> None:
    # One table of 70 % on two workers: splitting cannot halve the makespan.
    assert initial_copy.lpt_makespan([70, 20, 10], 2) == 70
    assert initial_copy.lpt_makespan([35, 35, 20, 10], 2) == 55
    assert 55 * initial_copy.SPLIT_GAIN > 70
    # On four workers it can.
    assert initial_copy.lpt_makespan([18, 18, 17, 17, 20, 10], 4) * initial_copy.SPLIT_GAIN <= 70


def test_default_chunk_bytes_bounds() -> None:
    mib = 1024 * 1024
    assert initial_copy.default_chunk_bytes(10 * mib, 2) == 64 * mib
    assert initial_copy.default_chunk_bytes(8000 * mib, 2) == 1000 * mib
    assert initial_copy.default_chunk_bytes(10**13, 2) == 1024 * mib
