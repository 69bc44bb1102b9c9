"""A write ledger on the zoo's tables: inserts, updates and deletes, each recorded once
PostgreSQL acknowledged it, so that a test can prove none was lost.

Writes go to the side the router sends users to (a weighted draw at partial weights),
as the application role, so the fence applies to them exactly as to the application:
a write the fence refuses is not acknowledged and not recorded. Each statement runs
in autocommit: a statement that returned is committed.

Updates and deletes pick a row whose last write was on the same side, or long enough
ago for replication to have carried it: two sides changing one row at the same moment
is a conflict no tool resolves, and this ledger tests the tool, not that.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.routers.haproxy import HAProxyRouter
from orchestrator.sandbox.stack import APP_DATABASE, APP_ROLE, Sandbox
from tests.integration.zoo import build as zb

# SQLSTATE classes a ledger write may meet without anything being wrong: the fence
# (read-only transaction, sessions ended), and connections refused or cut meanwhile.
EXPECTED_ERRORS = {"25006", "57P01", "08000", "08003", "08006", "connection"}

# Long enough for either direction of replication to have applied a write.
SETTLED_S = 3.0


@dataclass(frozen=True)
class Target:
    """One zoo table the ledger writes: its name and what an insert needs besides the
    ledger's own columns (lk: the ledger's key, lv: a value it changes)."""

    label: str
    schema: str
    table: str
    extra: dict[str, Callable[[int], Any]] = field(default_factory=dict)

    @property
    def ident(self) -> sql.Composed:
        return sql.SQL(".").join([sql.Identifier(self.schema), sql.Identifier(self.table)])


TARGETS = [
    # Range partitioned; times land in the plain, the hash sub-partitioned and the
    # default partitions.
    Target("events (range, sub-partitions, default)", zb.ZOO, "events", {
        "created_at": lambda n: f"{2024 + n % 3}-0{1 + n % 9}-1{n % 10} 12:00:00+00",
        "payload": lambda n: f'{{"ledger": {n}}}'}),
    Target("regions (list, default)", zb.ZOO, "regions", {
        "region": lambda n: ("eu", "us", "apac", "latam", "venus")[n % 5],
        "name": lambda n: f"ledger {n}"}),
    Target("shards (hash)", zb.ZOO, "shards", {"body": lambda n: f"ledger body {n}"}),
    Target("audit_log (key-less, FULL)", zb.ZOO, "audit_log", {
        "at": lambda n: "2026-01-01 00:00+00", "actor": lambda n: f"ledger {n % 3}"}),
    Target("Key Less (mixed case, key-less, FULL)", zb.MIXED, zb.KEYLESS_MIXED, {
        "Some Value": lambda n: n / 4, "Tags": lambda n: ["ledger", str(n)]}),
    Target("Users (mixed case, serial, generated)", zb.MIXED, zb.USERS, {
        "Email": lambda n: f"Ledger{n}@Example.com", "First": lambda n: f"Lé{n}",
        "Last": lambda n: "L" * (n % 7)}),
    Target("dotted.schema.dotted.table", zb.DOTTED, zb.DOTTED_TABLE, {
        zb.QUOTED_COLUMN: lambda n: f'ledger "{n}"'}),
    Target("unicode", zb.UNICODE, zb.UNICODE_TABLE, {zb.UNICODE_COLUMN: lambda n: f"€ {n}"}),
    Target("63-byte names", zb.LONG_SCHEMA, zb.LONG_TABLE, {zb.LONG_COLUMN: lambda n: f"long {n}"}),
]


@dataclass
class LedgerReport:
    acked: int
    acked_by_side: dict[str, int]
    acked_by_target: dict[str, int]
    errors: Counter[str]
    # An update or delete that found no row: the row was acknowledged, so this is a
    # lost write (or a replication lag longer than SETTLED_S), seen at write time.
    vanished: list[str]

    @property
    def unexpected_errors(self) -> dict[str, int]:
        return {k: v for k, v in self.errors.items() if k.split(":")[0] not in EXPECTED_ERRORS}


class ZooLedger:
    """``start()``, then ``stop()`` for the report, then ``lost(conn)`` on the side that
    serves at the end."""

    def __init__(self, sb: Sandbox, router: HAProxyRouter, *, rate: float = 40.0,
                 seed: int = 10) -> None:
        self.sb = sb
        self.router = router
        self.rate = rate
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zoo-ledger", daemon=True)
        self._conns: dict[str, psycopg.Connection[Any]] = {}
        self._n = 0
        # (target index, lk) -> lv, or None once deleted
        self.expected: dict[tuple[int, str], int | None] = {}
        self._last: dict[tuple[int, str], tuple[str, float]] = {}
        self._by_side: Counter[str] = Counter()
        self._by_target: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._vanished: list[str] = []
        self._failure: BaseException | None = None

    # -- control ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> LedgerReport:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the ledger did not stop"
        for conn in self._conns.values():
            conn.close()
        if self._failure is not None:
            raise AssertionError("the ledger itself failed") from self._failure
        return self.report()

    def report(self) -> LedgerReport:
        return LedgerReport(sum(self._by_side.values()), dict(self._by_side),
                            dict(self._by_target), Counter(self._errors), list(self._vanished))

    def acked_on(self, side: str) -> int:
        return self._by_side.get(side, 0)

    # -- checking ---------------------------------------------------------------------

    def lost(self, conn: psycopg.Connection[Any]) -> list[str]:
        """Every acknowledged write whose effect is not in ``conn``'s database."""
        problems: list[str] = []
        for index, target in enumerate(TARGETS):
            found: dict[str, list[int]] = {}
            for lk, lv in conn.execute(
                    sql.SQL("SELECT lk, lv FROM {} WHERE lk LIKE 'L-%%'").format(target.ident)):
                found.setdefault(lk, []).append(lv)
            for (i, lk), lv in self.expected.items():
                if i != index:
                    continue
                got = found.pop(lk, [])
                want = [] if lv is None else [lv]
                if got != want:
                    problems.append(f"{target.label} {lk}: expected {want}, found {got}")
            problems += [f"{target.label} {lk}: unexpected rows {lvs}"
                         for lk, lvs in found.items()]
        return problems

    # -- the writing thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            next_at = time.monotonic()
            while not self._stop.is_set():
                self._one()
                next_at += 1.0 / self.rate
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # reported by stop()
            self._failure = exc

    def _side(self) -> str:
        weights = self.router.current()
        return "green" if self._rng.random() * 100 < weights.green else "blue"

    def _conn(self, side: str) -> psycopg.Connection[Any]:
        conn = self._conns.get(side)
        if conn is None or conn.closed:
            cluster = self.sb.blue if side == "blue" else self.sb.green
            conn = psycopg.connect(
                cluster.conninfo(APP_DATABASE, user=APP_ROLE, password=self.sb.app_password),
                autocommit=True, connect_timeout=3, options="-c statement_timeout=5000")
            self._conns[side] = conn
        return conn

    def _eligible(self, side: str) -> list[tuple[int, str]]:
        now = time.monotonic()
        return [key for key, lv in self.expected.items() if lv is not None and (
            self._last[key][0] == side or now - self._last[key][1] > SETTLED_S)]

    def _one(self) -> None:
        side = self._side()
        draw = self._rng.random()
        keys = self._eligible(side) if draw >= 0.5 else []
        if keys:
            index, lk = self._rng.choice(keys)
            target = TARGETS[index]
            if draw < 0.85:
                lv = self._rng.randrange(1_000_000)
                query = sql.SQL("UPDATE {} SET lv = %s WHERE lk = %s").format(target.ident)
                params: tuple[Any, ...] = (lv, lk)
                after: int | None = lv
            else:
                query = sql.SQL("DELETE FROM {} WHERE lk = %s").format(target.ident)
                params, after = (lk,), None
        else:
            index = self._rng.randrange(len(TARGETS))
            target = TARGETS[index]
            self._n += 1
            lk, after = f"L-{self._n}", self._n
            cols = ["lk", "lv", *target.extra]
            query = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                target.ident, sql.SQL(", ").join(map(sql.Identifier, cols)),
                sql.SQL(", ").join(sql.Placeholder() * len(cols)))
            params = (lk, after, *(f(self._n) for f in target.extra.values()))
        try:
            cur = self._conn(side).execute(query, params)
        except psycopg.Error as exc:
            code = exc.sqlstate or "connection"
            self._errors[f"{code}:{side}:{type(exc).__name__}"] += 1
            conn = self._conns.pop(side, None)
            if conn is not None:
                conn.close()
            time.sleep(0.05)
            return
        if cur.rowcount != 1:
            self._vanished.append(f"{target.label} {lk} on {side}: {cur.rowcount} rows")
            return
        self.expected[(index, lk)] = after
        self._last[(index, lk)] = (side, time.monotonic())
        self._by_side[side] += 1
        self._by_target[target.label] += 1
