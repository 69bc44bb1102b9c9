"""The client tools a release picks: pg_dump writes for its own major, so the schema
script restored into green comes from the tools of green's major (pg_dump 18 puts
``SET transaction_timeout`` into every script, which PostgreSQL 15 and 16 refuse)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from orchestrator.errors import PreflightError
from orchestrator.pg import tools
from orchestrator.record import State
from tests.machine.conftest import FakeSleep, Pair


def test_a_release_from_15_to_15_provisions_green(pair: Pair) -> None:
    cfg = pair.config()
    pair.seed(cfg, State.PROVISION, mode="switchover", majors={"blue": 15, "green": 15})
    with psycopg.connect(pair.cluster.conninfo(pair.blue), autocommit=True) as blue:
        blue.execute('CREATE TABLE "Orders" (id bigint PRIMARY KEY, note text)')
    machine = pair.release(cfg, sleep=FakeSleep())
    machine.facts = pair.row(cfg).facts

    assert machine.provision() == State.MIGRATE

    with psycopg.connect(pair.cluster.conninfo(pair.green), autocommit=True) as green:
        assert green.execute("SELECT to_regclass('\"Orders\"') IS NOT NULL").fetchone() == (
            True,)


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> dict[Path, int]:
    found = {Path("/opt/pg18/bin"): 18, Path("/opt/pg16/bin"): 16,
             Path("/usr/lib/postgresql/15/bin"): 15}

    def candidates(configured: Path | None) -> list[Path]:
        return ([configured] if configured else []) + list(found)

    monkeypatch.setattr(tools, "_candidates", candidates)
    monkeypatch.setattr(tools, "_version_of", found.get)
    return found


@pytest.mark.parametrize(("server", "target", "major"), [
    (15, 15, 15),    # same major: its own tools
    (15, None, 15),  # a backup of blue: blue's tools
    (15, 16, 16),
    (16, 17, 18),    # no 17 installed: the nearest newer
    (17, 18, 18),
])
def test_the_target_majors_tools_win_then_the_nearest_newer(
        installed: dict[Path, int], server: int, target: int | None, major: int) -> None:
    assert tools.find_tools(server, target_major=target).major == major


def test_a_configured_bindir_wins_when_it_can_dump_the_server(
        installed: dict[Path, int]) -> None:
    assert tools.find_tools(15, Path("/opt/pg18/bin"), target_major=15).major == 18
    # Too old for the server: the configured one cannot be used.
    with pytest.raises(PreflightError, match="cannot dump a PostgreSQL 19 server"):
        tools.find_tools(19, Path("/usr/lib/postgresql/15/bin"))
