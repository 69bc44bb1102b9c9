"""Switchover benchmark: the write pause and lost writes when green takes over.

    .venv/bin/python benchmarks/switchover_bench.py [--rate 500] [--seconds 4] [--keep]

Blue (16) and green (17) are real clusters, with green loaded and streaming the way
orchestrate's sync state leaves it (initial_copy.initial_sync). A writer thread is
"the application": it inserts --rate rows per second through the application role,
into blue until the router says green, then into green; a write that fails (fenced,
session ended) is retried, on whatever side the router names at that moment. Every
acknowledged write is recorded with its id and side.

The switchover is machine._switchover's steps, called directly and timed by phase:
fence blue's application role, wait until green applied everything (heartbeat),
move green's sequences past blue's, set up the reverse direction, flip the router.
Cases:
  switchover/current    mode "switchover" (no origin filtering), machine's order
  switchover/proposed   the reverse slot is created on green before the flip and the
                        reverse subscription after it (outside the pause)
  bidirectional/current mode "bidirectional": reverse replication already runs
                        (started when green first took canary traffic)
Printed per case: longest gap between acknowledged writes, the phases, the writes
acknowledged, and how many of them green (and blue, through the reverse direction)
does not have afterwards.
"""

from __future__ import annotations

import argparse
import itertools
import os
import secrets
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cleanup import stop_and_clean
from orchestrator.config import DatabaseConfig, GreenConfig, SecretRef
from orchestrator.pg import catalog, fence, initial_copy, replication, schema, sequences
from orchestrator.pg.tools import find_tools
from orchestrator.sandbox.pgcluster import PgCluster

CONTROL = "orchestrate"
APP = "app"
# Throw-away clusters on loopback; the password lives only in this process.
APP_PASSWORD = secrets.token_urlsafe(18)
MARGIN = 1_000_000


class Router:
    """Where the application sends its writes; the switchover flips it."""

    def __init__(self) -> None:
        self.target = "blue"
        self.flipped_at: float | None = None

    def flip(self) -> None:
        self.target = "green"
        self.flipped_at = time.monotonic()


@dataclass
class Ack:
    payload: str
    id: int
    side: str
    at: float


@dataclass
class Writer:
    """``threads`` connections (an application's pool), ``rate`` writes/s in total."""

    conninfo: dict[str, str]
    router: Router
    rate: float
    threads: int = 4
    acks: list[Ack] = field(default_factory=list)
    failures: int = 0
    reconnects: int = 0
    stopping: threading.Event = field(default_factory=threading.Event)
    workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for n in range(self.threads):
            thread = threading.Thread(target=self._run, args=(n,), daemon=True)
            thread.start()
            self.workers.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.workers:
            thread.join(30)

    def _connect(self, side: str) -> psycopg.Connection[Any] | None:
        with self._lock:
            self.reconnects += 1
        try:
            return psycopg.connect(self.conninfo[side], autocommit=True, connect_timeout=2)
        except psycopg.OperationalError:
            return None

    def _run(self, n: int) -> None:
        side = self.router.target
        conn = self._connect(side)
        seq = 0
        interval = self.threads / self.rate
        next_at = time.monotonic() + interval * n / self.threads
        while not self.stopping.is_set():
            seq += 1
            payload = f"w{n}-{seq}"
            # The same write is retried until acknowledged, as an application would.
            while not self.stopping.is_set():
                if self.router.target != side or conn is None or conn.closed:
                    if conn is not None:
                        conn.close()
                    side = self.router.target
                    conn = self._connect(side)
                    if conn is None:
                        time.sleep(0.002)
                        continue
                try:
                    row = conn.execute("INSERT INTO writes (payload, side) VALUES (%s, %s) "
                                       "RETURNING id", (payload, side)).fetchone()
                except psycopg.Error:
                    with self._lock:
                        self.failures += 1
                    if conn.closed or conn.broken:
                        conn = None
                    time.sleep(0.002)
                    continue
                assert row is not None
                self.acks.append(Ack(payload, int(row[0]), side, time.monotonic()))
                break
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()  # behind: do not burst to catch up
        if conn is not None:
            conn.close()


def db_config(cluster: PgCluster, dbname: str) -> GreenConfig:
    var = f"SWITCH_PW_{cluster.name.upper()}"
    os.environ[var] = cluster.password
    # GreenConfig is a DatabaseConfig that can also be provisioned into.
    return GreenConfig(host=cluster.host, port=cluster.port, dbname=dbname,
                       user=cluster.superuser, password=SecretRef(env=var),
                       sslmode="disable", app_role=APP)


def connect(db: DatabaseConfig) -> psycopg.Connection[Any]:
    return psycopg.connect(db.conninfo(), autocommit=True,
                           options="-c lock_timeout=10000 -c statement_timeout=60000")


def start_reverse(blue: psycopg.Connection[Any], green: psycopg.Connection[Any],
                  green_db: DatabaseConfig, names: replication.Names, origin_none: bool,
                  *, slot_first: bool) -> None:
    """machine._start_reverse (publication on green, subscription on blue)."""
    tables = catalog.user_tables(green, exclude_schemas=(CONTROL,))
    heartbeat = catalog.Table(CONTROL, replication.HEARTBEAT_TABLE, ["direction"])
    replication.ensure_publication(green, names.publication, [*tables, heartbeat])
    opts = replication.SubscriptionOptions(copy_data=False, origin_none=origin_none,
                                           binary=True)
    if slot_first:
        initial_copy.subscribe_from_slot(blue, names.subscription,
                                         green_db.conninfo(for_peer=True),
                                         names.publication, opts, slot_name=names.slot,
                                         control_schema=None)
    else:
        replication.ensure_subscription(blue, names.subscription,
                                        green_db.conninfo(for_peer=True), names.publication,
                                        opts)


def switchover(blue_db: DatabaseConfig, green_db: DatabaseConfig, router: Router, *,
               mode: str, order: str, release: str) -> dict[str, float]:
    fwd, rev = replication.forward(release), replication.reverse(release)
    bidirectional = mode == "bidirectional"
    phases: dict[str, float] = {}
    started = mark = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        phases[name] = now - mark
        mark = now

    with connect(blue_db) as blue, connect(green_db) as green:
        fence.fence(blue, APP)
        lap("fence")
        replication.wait_applied(blue, green, schema=CONTROL, direction="fwd",
                                 subscription=fwd.subscription, timeout=60)
        lap("catch-up")
        sequences.sync_past(blue, green, margin=MARGIN, exclude_schemas=(CONTROL,))
        lap("sequences")
        if not bidirectional:
            replication.drop_subscription(green, fwd.subscription)
            replication.drop_slot(blue, fwd.slot)
            lap("drop forward")
        if order == "current":
            start_reverse(blue, green, green_db, rev, bidirectional, slot_first=False)
            replication.wait_applied(green, blue, schema=CONTROL, direction="rev",
                                     subscription=rev.subscription, timeout=60)
            lap("reverse setup + proof")
            router.flip()
            lap("router flip")
            phases["pause (fence -> flip)"] = time.monotonic() - started
        else:
            # The slot fixes where green's changes start to count; it must exist before
            # the first write reaches green. The subscription can come after the flip.
            tables = catalog.user_tables(green, exclude_schemas=(CONTROL,))
            heartbeat = catalog.Table(CONTROL, replication.HEARTBEAT_TABLE, ["direction"])
            replication.ensure_publication(green, rev.publication, [*tables, heartbeat])
            green.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')",
                          (rev.slot,))
            lap("reverse slot")
            router.flip()
            lap("router flip")
            phases["pause (fence -> flip)"] = time.monotonic() - started
            start_reverse(blue, green, green_db, rev, bidirectional, slot_first=True)
            replication.wait_applied(green, blue, schema=CONTROL, direction="rev",
                                     subscription=rev.subscription, timeout=60)
            lap("after flip: reverse subscription + proof")
    return phases


def prepare(blue: PgCluster, green: PgCluster, case: str, mode: str, tools: Any
            ) -> tuple[DatabaseConfig, DatabaseConfig]:
    dbname = f"sw_{case}"
    for cluster in (blue, green):
        with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)".encode())
    blue.create_database(dbname)
    with psycopg.connect(blue.conninfo(dbname), autocommit=True) as conn:
        conn.execute("CREATE TABLE writes (id bigserial PRIMARY KEY, payload text NOT NULL, "
                     "side text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())")
        conn.execute("INSERT INTO writes (payload, side) "
                     "SELECT 'seed' || g, 'seed' FROM generate_series(1, 100000) g")
        conn.execute(f"GRANT SELECT, INSERT ON writes TO {APP}".encode())
        conn.execute(f"GRANT USAGE ON SEQUENCE writes_id_seq TO {APP}".encode())
    with psycopg.connect(green.conninfo(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {dbname}".encode())
    blue_db, green_db = db_config(blue, dbname), db_config(green, dbname)
    schema.copy_schema(blue_db, green_db, tools, schema=CONTROL, release=case)
    with connect(blue_db) as conn:
        tables = catalog.user_tables(conn, exclude_schemas=(CONTROL,))
    initial_copy.initial_sync(blue_db, green_db, tables, names=replication.forward(case),
                              tools=tools, control_schema=CONTROL,
                              origin_none=mode == "bidirectional", catchup_timeout=60)
    if mode == "bidirectional":
        # Green opened for writes at the first canary stage: sequences moved and the
        # reverse direction running, long before the switchover.
        with connect(blue_db) as b, connect(green_db) as g:
            sequences.sync_past(b, g, margin=MARGIN, exclude_schemas=(CONTROL,))
            start_reverse(b, g, green_db, replication.reverse(case), True, slot_first=False)
            replication.wait_applied(g, b, schema=CONTROL, direction="rev",
                                     subscription=replication.reverse(case).subscription,
                                     timeout=60)
    return blue_db, green_db


def teardown(blue: PgCluster, green: PgCluster, blue_db: DatabaseConfig,
             green_db: DatabaseConfig, case: str) -> None:
    fwd, rev = replication.forward(case), replication.reverse(case)
    with connect(blue_db) as b, connect(green_db) as g:
        replication.drop_subscription(g, fwd.subscription)
        replication.drop_subscription(b, rev.subscription)
        replication.drop_publication(b, fwd.publication)
        replication.drop_publication(g, rev.publication)
        replication.drop_slot(b, fwd.slot)
        replication.drop_slot(g, rev.slot)
        fence.unfence(b, APP)
    for cluster in (blue, green):
        with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {blue_db.dbname} WITH (FORCE)".encode())


def run_case(blue: PgCluster, green: PgCluster, tools: Any, *, mode: str, order: str,
             rate: float, seconds: float, threads: int) -> dict[str, Any]:
    case = f"{mode[:2]}_{order}"
    blue_db, green_db = prepare(blue, green, case, mode, tools)
    router = Router()
    writer = Writer({side: c.conninfo(blue_db.dbname, user=APP, password=APP_PASSWORD)
                     for side, c in (("blue", blue), ("green", green))}, router, rate, threads)
    writer.start()
    try:
        time.sleep(seconds)
        phases = switchover(blue_db, green_db, router, mode=mode, order=order, release=case)
        time.sleep(seconds)
    finally:
        writer.stop()
    acks = sorted(writer.acks, key=lambda a: a.at)
    gaps = [(b.at - a.at, a, b) for a, b in itertools.pairwise(acks)]
    longest = max(gaps, key=lambda g: g[0]) if gaps else (0.0, None, None)
    with connect(blue_db) as b, connect(green_db) as g:
        # Green's changes reach blue through the reverse direction: wait for them too.
        replication.wait_applied(g, b, schema=CONTROL, direction="rev",
                                 subscription=replication.reverse(case).subscription,
                                 timeout=60)
        on_green = {r[0]: r[1] for r in g.execute(
            "SELECT id, payload FROM writes WHERE side <> 'seed'").fetchall()}
        on_blue = {r[0]: r[1] for r in b.execute(
            "SELECT id, payload FROM writes WHERE side <> 'seed'").fetchall()}
    missing_green = [a for a in acks if on_green.get(a.id) != a.payload]
    missing_blue = [a for a in acks if on_blue.get(a.id) != a.payload]
    teardown(blue, green, blue_db, green_db, case)
    window = acks[-1].at - acks[0].at if acks else 0.0
    return {
        "case": f"{mode}/{order}", "phases": phases, "longest_gap": longest[0],
        "acked": len(acks), "acked_blue": sum(a.side == "blue" for a in acks),
        "acked_green": sum(a.side == "green" for a in acks),
        "rate": len(acks) / window if window else 0.0,
        "failed_attempts": writer.failures, "reconnects": writer.reconnects,
        "missing_green": len(missing_green), "missing_blue": len(missing_blue),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500.0, help="writes per second")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="steady writing before and after the switchover")
    parser.add_argument("--writers", type=int, default=4,
                        help="writer connections sharing the rate (an application's pool)")
    parser.add_argument("--blue-major", type=int, default=16)
    parser.add_argument("--green-major", type=int, default=17)
    parser.add_argument("--cases", default="switchover/current,switchover/proposed,"
                        "bidirectional/current")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="orch-switchbench-", dir="/tmp"))
    blue = PgCluster("blue", args.blue_major, base)
    green = PgCluster("green", args.green_major, base)
    results = []
    try:
        blue.start()
        green.start()
        for cluster in (blue, green):
            cluster.create_role(APP, APP_PASSWORD)
        tools = find_tools(max(args.blue_major, args.green_major))
        load = os.getloadavg()
        print(f"blue {args.blue_major} -> green {args.green_major}, {args.rate:.0f} writes/s "
              f"from {args.writers} connections, "
              f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
              flush=True)
        for case in args.cases.split(","):
            mode, order = case.split("/")
            result = run_case(blue, green, tools, mode=mode, order=order, rate=args.rate,
                              seconds=args.seconds, threads=args.writers)
            results.append(result)
            report(result)
        load = os.getloadavg()
        print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (after)")
    finally:
        stop_and_clean(base, args.keep, blue, green)
    bad = [r for r in results if r["missing_green"] or r["longest_gap"] >= 1.0]
    return 1 if bad else 0


def report(r: dict[str, Any]) -> None:
    print(f"\n{r['case']}")
    for name, seconds in r["phases"].items():
        print(f"  {name:<42} {seconds * 1000:8.1f} ms")
    print(f"  longest gap between acknowledged writes  {r['longest_gap'] * 1000:8.1f} ms "
          f"(target < 1000 ms)")
    print(f"  acknowledged writes {r['acked']} ({r['acked_blue']} on blue, {r['acked_green']} "
          f"on green, {r['rate']:.0f}/s), failed attempts retried {r['failed_attempts']}, "
          f"reconnects {r['reconnects']}")
    print(f"  acknowledged writes missing on green afterwards: {r['missing_green']} "
          f"(target 0); missing on blue (via reverse replication): {r['missing_blue']}",
          flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
