"""The schema zoo (issue 10): a whole release of a database holding what real schemas
hold, on every supported pair of majors, with backup on and no table left out, under
a write ledger on the zoo's own tables. After promotion the test compares blue and
green row by row itself, then checks that `orchestrate validate` agrees."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from orchestrator.routers.base import Weights
from orchestrator.sandbox.loadgen import LoadGenerator
from orchestrator.sandbox.stack import Sandbox
from tests.conftest import short_tmpdir
from tests.integration import helpers as h
from tests.integration.zoo import build as zb
from tests.integration.zoo import compare
from tests.integration.zoo.ledger import TARGETS, ZooLedger

pytestmark = pytest.mark.slow

ZERO_THEN_ALL = {
    "interval": "1s",
    "window": "10s",
    "stages": [{"weight": 0, "duration": "1s"}, {"weight": 100, "duration": "3s"}],
}


@dataclass(frozen=True)
class Pair:
    blue: int
    green: int
    mode: str

    @property
    def canary(self) -> dict[str, Any]:
        return ZERO_THEN_ALL if self.mode == "switchover" else h.FAST_CANARY


PAIRS = [Pair(15, 17, "switchover"), Pair(16, 17, "bidirectional"),
         Pair(17, 18, "bidirectional")]


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: f"{p.blue}-{p.green}-{p.mode}")
def zoo_sandbox(request: pytest.FixtureRequest) -> Iterator[tuple[Sandbox, Pair, zb.Zoo]]:
    pair: Pair = request.param
    with short_tmpdir("orch-zoo-") as base, \
            Sandbox(base, blue_major=pair.blue, green_major=pair.green) as sb:
        zoo = zb.build_zoo(sb)
        for ext, reason in zoo.skipped.items():
            warnings.warn(f"zoo on {pair.blue}->{pair.green} without {ext}: {reason}",
                          stacklevel=1)
        yield sb, pair, zoo


def _ident(name: str) -> str:
    """How format('%I') writes a name: quoted only when it has to be."""
    plain = name.isascii() and name.replace("_", "a").isalnum() and name == name.lower() \
        and not name[0].isdigit()
    return name if plain else zb.q(name)


def _matviews_unpopulated(conn: psycopg.Connection[Any]) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT oid::regclass::text FROM pg_class WHERE relkind = 'm' AND NOT relispopulated")]


def test_the_zoo_releases_with_every_write_and_row_intact(
        zoo_sandbox: tuple[Sandbox, Pair, zb.Zoo]) -> None:
    sb, pair, zoo = zoo_sandbox
    h.reset(sb)
    assert sorted([*zoo.extensions, *zoo.skipped]) == sorted(zb.WANTED_EXTENSIONS)
    with psycopg.connect(sb.blue.conninfo("shop"), autocommit=True) as b:
        held = zb.describe(b)
    assert held["partitioned"] >= 4 and held["matviews"] == 3 and held["full_identity"] == 2
    assert held["policies"] == 2

    name = f"zoo-{pair.blue}-{pair.green}"
    cfg = h.write_config(sb, name, canary=pair.canary)
    traffic = h.router(sb)
    load = LoadGenerator(sb.haproxy.url, rate=30.0, write_ratio=0.3)
    ledger = ZooLedger(sb, traffic)
    load.start()
    ledger.start()
    try:
        result = h.run_cli(sb, "release", "--config", str(cfg))
        row = h.release_row(sb, name)
        assert result.code == 0, (row or {}).get("error") or result.err[-3000:]
        assert row is not None and row["status"] == "promoted", row
        assert row["facts"]["mode"] == pair.mode
        assert row["facts"]["majors"] == {"blue": pair.blue, "green": pair.green}
        assert row["facts"]["backup"]["path"]
        assert traffic.current() == Weights.green_at(100)
        # Green serves alone for a moment; its writes flow back to blue.
        at_promotion = ledger.acked_on("green")
        assert h.wait_for(lambda: ledger.acked_on("green") > at_promotion + 40, timeout=30)
    finally:
        report = ledger.stop()
        load.stop()

    print(f"zoo {pair}: ledger acked {report.acked} {report.acked_by_side}, refused "
          f"{dict(report.errors)}; extensions {zoo.extensions}, skipped {zoo.skipped}")
    assert report.unexpected_errors == {}, report.errors
    assert report.vanished == []
    assert report.acked_by_side.get("blue", 0) > 0 and report.acked_by_side.get("green", 0) > 0
    assert set(report.acked_by_target) == {t.label for t in TARGETS}, report.acked_by_target

    # Every acknowledged write is on green (serving) and, through reverse
    # replication, on blue.
    compare.wait_replicated(sb.green)
    with h.green_conn(sb) as g:
        assert _matviews_unpopulated(g) == []
        lost_on_green = ledger.lost(g)
    assert lost_on_green == [], f"{len(lost_on_green)} acknowledged writes lost on green"
    with psycopg.connect(sb.blue.conninfo("shop"), autocommit=True) as b:
        lost_on_blue = ledger.lost(b)
    assert lost_on_blue == [], f"{len(lost_on_blue)} acknowledged writes missing on blue"

    # The test's own comparison: every relation, row by row.
    diffs, missing = compare.compare(sb.blue, sb.green)
    assert missing == []
    compared = {d.relation for d in diffs}
    expected = {'zoo.events', 'zoo.regions', 'zoo.shards', 'zoo.audit_log', 'zoo.types_zoo',
                'zoo.invoice_totals', '"Mixed Case Schema"."Big Customers"',
                '"Mixed Case Schema"."Users"', f"{_ident(zb.DOTTED)}.{_ident(zb.DOTTED_TABLE)}",
                f"{_ident(zb.UNICODE)}.{_ident(zb.UNICODE_TABLE)}",
                f"{_ident(zb.LONG_SCHEMA)}.{_ident(zb.LONG_TABLE)}"}
    assert expected <= compared, expected - compared
    differing = [d for d in diffs if d.differing]
    assert differing == [], "\n".join(
        f"{d.relation}: {d.only_blue} only on blue, {d.only_green} only on green "
        f"({d.blue_rows} / {d.green_rows} rows) {d.samples}" for d in differing)
    assert sum(d.blue_rows for d in diffs if d.relation == "zoo.types_zoo") == zb.SEED_ROWS
    print(f"compared {len(diffs)} relations, {sum(d.blue_rows for d in diffs)} rows on blue")

    # orchestrate's own validation agrees: ok, nothing differing, every table seen.
    checked = h.run_cli(sb, "validate", "--config", str(cfg), "--output", "json")
    assert checked.code == 0, checked.out[-3000:] + checked.err[-2000:]
    doc = json.loads(checked.out)
    assert doc["ok"] is True and doc["problems"] == [], doc["problems"]
    assert all(t.get("differing_keys", 0) == 0 for t in doc["tables"])
    validated = {t["table"] for t in doc["tables"]}
    tables = {d.relation for d in diffs if d.kind in ("r", "p")}
    assert len(validated) >= len(tables), sorted(tables)
