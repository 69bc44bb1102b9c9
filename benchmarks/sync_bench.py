"""Initial-load benchmark: orchestrate's sync against pg_dump/pg_restore and raw COPY.

    .venv/bin/python benchmarks/sync_bench.py [--scale 50] [--jobs N] [--keep]

Builds blue (pgbench at --scale, plus a 30-column table and a table with a foreign
key), then loads a fresh green database per method, timed from an empty database to
"green holds everything, indexed":

  ours          provision (schema-only dump + restore) + initial_sync(method=snapshot):
                slot + exported snapshot, parallel split COPY, parallel post-data,
                subscription from the slot, heartbeat catch-up
  logical       the same with initial_sync(method=subscription): logical replication's
                own copy, tuned (more sync workers, binary + parallel streaming on 16+)
  dump|restore  pg_dump -Fc | pg_restore
  dir -j N      pg_dump -Fd -j N, then pg_restore -j N
  raw COPY      COPY of the largest table into a bare table (no index), one pipe

Both throw-away clusters get the same settings (printed); fsync stays on for all.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cleanup import stop_and_clean
from orchestrator.config import GreenConfig
from orchestrator.pg import catalog, initial_copy, replication, schema
from orchestrator.pg.tools import PgTools, find_tools
from orchestrator.sandbox.pgcluster import PgCluster

CONTROL = "orchestrate"
BLUE_DB = "bench"
# Applied to both clusters alike: room for a multi-GB load without checkpoints every
# few seconds, and memory for sorts. Nothing here favours one method.
SETTINGS = {
    "shared_buffers": "1GB",
    "max_wal_size": "16GB",
    "checkpoint_timeout": "30min",
    "maintenance_work_mem": "512MB",
    "wal_buffers": "64MB",
    "max_parallel_maintenance_workers": "2",
    "autovacuum": "on",
}


@dataclass
class Result:
    method: str
    seconds: float
    note: str = ""


def sh(cmd: list[str], env: dict[str, str], **kw: Any) -> None:
    subprocess.run(cmd, env=env, check=True, **kw)


def env_for(cluster: PgCluster) -> dict[str, str]:
    return {**os.environ, "PGPASSWORD": cluster.password, "PGHOST": cluster.host,
            "PGPORT": str(cluster.port), "PGUSER": cluster.superuser}


def db_config(cluster: PgCluster, dbname: str) -> GreenConfig:
    var = f"BENCH_PW_{cluster.name.upper()}"
    os.environ[var] = cluster.password
    # GreenConfig is a DatabaseConfig that can also be provisioned into.
    return GreenConfig.model_validate(cluster.database_section(dbname, var))


def build_blue(blue: PgCluster, tools: PgTools, scale: int, wide_rows: int, fk_rows: int
               ) -> None:
    blue.create_database(BLUE_DB)
    pgbench = tools.path("pgbench")
    if not Path(pgbench).is_file():
        pgbench = "/usr/lib/postgresql/15/bin/pgbench"
    started = time.monotonic()
    sh([pgbench, "-i", "-q", "-s", str(scale), BLUE_DB], env_for(blue),
       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cols = ", ".join(f"c{i} {('int', 'text', 'float8', 'timestamptz', 'numeric')[i % 5]}"
                     for i in range(1, 30))
    values = ", ".join({
        "int": f"g * {i}", "text": f"'text value ' || g || '-{i}'", "float8": f"g / {i}.0",
        "timestamptz": f"'2024-01-01'::timestamptz + g * interval '{i} s'",
        "numeric": f"(g * {i})::numeric / 100"}[('int', 'text', 'float8', 'timestamptz',
                                                   'numeric')[i % 5]] for i in range(1, 30))
    with psycopg.connect(blue.conninfo(BLUE_DB), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE wide (id int PRIMARY KEY, {cols})".encode())
        conn.execute(f"INSERT INTO wide SELECT g, {values} FROM generate_series(1, {wide_rows}) g"
                     .encode())
        conn.execute("CREATE INDEX wide_c2 ON wide (c2)")
        conn.execute(
            "CREATE TABLE orders (id bigserial PRIMARY KEY, aid int NOT NULL REFERENCES "
            "pgbench_accounts (aid), amount numeric(12, 2) NOT NULL, "
            "created timestamptz NOT NULL DEFAULT now())")
        accounts = 100_000 * scale
        conn.execute(f"INSERT INTO orders (aid, amount, created) SELECT 1 + (g::bigint * 7919) % "
                     f"{accounts}, (g % 100000) / 100.0, '2024-01-01'::timestamptz + g * "
                     f"interval '1 s' FROM generate_series(1, {fk_rows}) g".encode())
        conn.execute("CREATE INDEX orders_aid ON orders (aid)")
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
    print(f"blue built in {time.monotonic() - started:.1f}s", flush=True)


def fresh_green(green: PgCluster, name: str) -> None:
    with psycopg.connect(green.conninfo(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())
        conn.execute(f"CREATE DATABASE {name}".encode())


def drop_green(green: PgCluster, blue: PgCluster, name: str) -> None:
    try:
        with psycopg.connect(green.conninfo(name), autocommit=True) as conn:
            for (sub,) in conn.execute("SELECT subname FROM pg_subscription").fetchall():
                replication.drop_subscription(conn, sub)
    except psycopg.OperationalError:
        pass
    with psycopg.connect(green.conninfo(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())
    with psycopg.connect(blue.conninfo(BLUE_DB), autocommit=True) as conn:
        for (pub,) in conn.execute("SELECT pubname FROM pg_publication").fetchall():
            replication.drop_publication(conn, pub)
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall():
            replication.drop_slot(conn, slot)


def settle(*clusters: PgCluster) -> None:
    """Same starting line for every method: no dirty buffers from the previous one."""
    for c in clusters:
        with psycopg.connect(c.conninfo(), autocommit=True) as conn:
            conn.execute("CHECKPOINT")


ALL_TABLES = ("pgbench_accounts", "wide", "orders")


def check_counts(blue: PgCluster, green: PgCluster, name: str, tables: Sequence[str]) -> str:
    with psycopg.connect(blue.conninfo(BLUE_DB)) as b, psycopg.connect(
            green.conninfo(name)) as g:
        for t in tables:
            q = f"SELECT count(*) FROM {t}".encode()
            nb = b.execute(q).fetchone()
            ng = g.execute(q).fetchone()
            if nb != ng:
                return f"MISMATCH {t}: {nb} vs {ng}"
    return "counts ok"


def checked_and_dropped(blue: PgCluster, green: PgCluster, name: str,
                        tables: Sequence[str] = ALL_TABLES) -> str:
    """Green's counts against blue's; then green's database and its replication go,
    so that the next method starts from nothing."""
    counts = check_counts(blue, green, name, tables)
    drop_green(green, blue, name)
    return counts


def pipe(producer: list[str], producer_env: dict[str, str], consumer: list[str],
         consumer_env: dict[str, str], what: str) -> None:
    """``producer | consumer``, both to the end; either failing ends the benchmark."""
    src = subprocess.Popen(producer, stdout=subprocess.PIPE, env=producer_env)
    dst = subprocess.run(consumer, stdin=src.stdout, env=consumer_env, check=False)
    assert src.stdout is not None
    src.stdout.close()
    if src.wait() != 0 or dst.returncode != 0:
        raise SystemExit(f"{what} failed")


def run_ours(blue: PgCluster, green: PgCluster, tools: PgTools, jobs: int, method: str
             ) -> Result:
    name = f"g_{method}"
    started = time.monotonic()
    fresh_green(green, name)
    bcfg, gcfg = db_config(blue, BLUE_DB), db_config(green, name)
    schema.copy_schema(bcfg, gcfg, tools, schema=CONTROL, release=name)
    with psycopg.connect(bcfg.conninfo(), autocommit=True) as conn:
        tables = catalog.user_tables(conn, exclude_schemas=(CONTROL,))
    cfg = initial_copy.InitialCopyConfig.model_validate({"method": method, "jobs": jobs})
    report = initial_copy.initial_sync(bcfg, gcfg, tables, names=replication.forward(name),
                                       tools=tools, control_schema=CONTROL, config=cfg,
                                       catchup_timeout=600)
    seconds = time.monotonic() - started
    detail = f"copy {report.copy_s:.1f}s"
    if report.post_data:
        detail += f", indexes+FKs+analyze {report.post_data_s:.1f}s"
    if report.copy and report.copy.skipped is None:
        detail += (f" ({report.copy.tasks} tasks, {report.copy.binary_tables} binary / "
                   f"{report.copy.text_tables} text tables)")
    detail += f", catch-up {report.catchup_s:.2f}s"
    counts = checked_and_dropped(blue, green, name)
    return Result(method, seconds, f"{detail}; {counts}")


def run_dump_pipe(blue: PgCluster, green: PgCluster, tools: PgTools) -> Result:
    name = "g_dump_pipe"
    started = time.monotonic()
    fresh_green(green, name)
    pipe([tools.path("pg_dump"), "-Fc", "-d", BLUE_DB], env_for(blue),
         [tools.path("pg_restore"), "--no-owner", "-d", name], env_for(green),
         "pg_dump | pg_restore")
    seconds = time.monotonic() - started
    counts = checked_and_dropped(blue, green, name)
    return Result("pg_dump -Fc | pg_restore", seconds, counts)


def run_dump_dir(blue: PgCluster, green: PgCluster, tools: PgTools, jobs: int, tmp: Path
                 ) -> Result:
    name = "g_dump_dir"
    out = tmp / "dumpdir"
    shutil.rmtree(out, ignore_errors=True)
    started = time.monotonic()
    fresh_green(green, name)
    sh([tools.path("pg_dump"), "-Fd", "-j", str(jobs), "-f", str(out), "-d", BLUE_DB],
       env_for(blue))
    dumped = time.monotonic() - started
    sh([tools.path("pg_restore"), "--no-owner", "-j", str(jobs), "-d", name, str(out)],
       env_for(green))
    seconds = time.monotonic() - started
    counts = checked_and_dropped(blue, green, name)
    shutil.rmtree(out, ignore_errors=True)
    return Result(f"pg_dump -Fd -j{jobs} ; pg_restore -j{jobs}", seconds,
                  f"dump {dumped:.1f}s + restore {seconds - dumped:.1f}s; {counts}")


def run_raw_copy(blue: PgCluster, green: PgCluster, tools: PgTools, fmt: str) -> Result:
    name = "g_raw"
    fresh_green(green, name)
    with psycopg.connect(green.conninfo(name), autocommit=True) as conn:
        conn.execute("CREATE TABLE pgbench_accounts (aid int NOT NULL, bid int, "
                     "abalance int, filler char(84))")
    started = time.monotonic()
    pipe([tools.path("psql"), "-X", "-q", "-d", BLUE_DB, "-c",
          f"COPY pgbench_accounts TO STDOUT (FORMAT {fmt})"], env_for(blue),
         [tools.path("psql"), "-X", "-q", "-d", name, "-c",
          f"COPY pgbench_accounts FROM STDIN (FORMAT {fmt})"], env_for(green),
         "raw COPY")
    seconds = time.monotonic() - started
    counts = checked_and_dropped(blue, green, name, ["pgbench_accounts"])
    return Result(f"raw COPY pgbench_accounts ({fmt}, no index)", seconds, counts)


def blue_row(blue: PgCluster, query: str) -> tuple[Any, ...]:
    with psycopg.connect(blue.conninfo(BLUE_DB)) as conn:
        row = conn.execute(query.encode()).fetchone()
    assert row is not None
    return row


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=initial_copy.cores())
    parser.add_argument("--blue-major", type=int, default=16)
    parser.add_argument("--green-major", type=int, default=17)
    parser.add_argument("--wide-rows", type=int, default=500_000)
    parser.add_argument("--fk-rows", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true",
                        help="leave the clusters' directory in place (it is printed)")
    parser.add_argument("--only", default="",
                        help="comma-separated subset: ours,logical,pipe,dir,raw")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))

    def wanted(key: str) -> bool:
        return not only or key in only

    base = Path(tempfile.mkdtemp(prefix="orch-syncbench-", dir="/tmp"))
    blue = PgCluster("blue", args.blue_major, base, settings=SETTINGS)
    green = PgCluster("green", args.green_major, base, settings=SETTINGS)
    results: list[Result] = []
    try:
        blue.start()
        green.start()
        tools = find_tools(max(args.blue_major, args.green_major))
        print(f"machine: {os.cpu_count()} cores, load average {loadavg()} (before)")
        print(f"blue PostgreSQL {args.blue_major}, green PostgreSQL {args.green_major}, "
              f"jobs {args.jobs}, client tools {tools.major}")
        print("settings on both clusters: " + ", ".join(f"{k}={v}" for k, v in SETTINGS.items())
              + " (fsync on)")
        build_blue(blue, tools, args.scale, args.wide_rows, args.fk_rows)
        rows = blue_row(
            blue, "SELECT sum(n_live_tup), pg_size_pretty(pg_database_size(current_database())), "
            "pg_size_pretty(pg_total_relation_size('pgbench_accounts')) FROM pg_stat_user_tables")
        print(f"blue: {int(rows[0]):,} rows, database {rows[1]}, pgbench_accounts {rows[2]}")
        steps: list[tuple[str, Callable[[], Result]]] = [
            ("ours", lambda: run_ours(blue, green, tools, args.jobs, "snapshot")),
            ("logical", lambda: run_ours(blue, green, tools, args.jobs, "subscription")),
            ("pipe", lambda: run_dump_pipe(blue, green, tools)),
            ("dir", lambda: run_dump_dir(blue, green, tools, args.jobs, base)),
            ("raw", lambda: run_raw_copy(blue, green, tools, "text")),
            ("raw", lambda: run_raw_copy(blue, green, tools, "binary")),
        ]
        for key, step in steps:
            if not wanted(key):
                continue
            settle(blue, green)
            result = step()
            results.append(result)
            print(f"  {result.method}: {result.seconds:.1f}s  ({result.note})", flush=True)
        sizes = blue_row(
            blue, "SELECT sum(pg_total_relation_size(relid) - pg_indexes_size(relid)), "
            "pg_total_relation_size('pgbench_accounts') - pg_indexes_size('pgbench_accounts') "
            "FROM pg_stat_user_tables")
        report(results, int(sizes[0]), int(sizes[1]))
        print(f"load average {loadavg()} (after)")
    finally:
        stop_and_clean(base, args.keep, blue, green)
    return 0


def report(results: list[Result], data_bytes: int, largest_bytes: int) -> None:
    ours = next((r for r in results if r.method == "snapshot"), None)
    print()
    print(f"{'method':<48} {'seconds':>8} {'vs ours':>8}")
    for r in results:
        label = {"snapshot": "ours (snapshot copy + post-data + stream)",
                 "subscription": "logical replication copy_data (tuned)"}.get(r.method,
                                                                              r.method)
        ratio = f"{r.seconds / ours.seconds:.2f}x" if ours else "-"
        print(f"{label:<48} {r.seconds:>8.1f} {ratio:>8}")
    if ours is None:
        return
    dumps = [r for r in results if r.method.startswith("pg_dump")]
    if dumps:
        best = min(dumps, key=lambda r: r.seconds)
        print(f"best of pg_dump/pg_restore ({best.method}) / ours = "
              f"{best.seconds / ours.seconds:.2f}x (target >= 1.5x)")
    raws = [r for r in results if r.method.startswith("raw COPY")]
    if raws:
        raw = min(raws, key=lambda r: r.seconds)
        ours_rate = data_bytes / ours.seconds / 1e6
        raw_rate = largest_bytes / raw.seconds / 1e6
        print(f"throughput: ours {ours_rate:.0f} MB/s of table data, whole database, indexed "
              f"and analyzed; raw COPY of the largest table {raw_rate:.0f} MB/s "
              f"({raw.method}): raw / ours = {raw_rate / ours_rate:.2f}x (target <= 2x)")
        print(f"time: ours for the whole database / raw COPY of the largest table alone = "
              f"{ours.seconds / raw.seconds:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
