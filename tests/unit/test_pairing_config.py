"""A database pair in the config (``pair: {a, b}``), the sides a run picks, and the
names a release gets when the config gives none. No database needed."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from orchestrator import naming, pairing
from orchestrator.canary.analysis import render
from orchestrator.config import parse_config
from orchestrator.errors import ConfigError
from orchestrator.record import config_digest


def db(port: int, dbname: str = "shop", **extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "dbname": dbname, "user": "postgres", **extra}


def raw_pair(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "release": {"service": "shop", "version": "2.0.0"},
        "pair": {"a": db(5432, password={"env": "A_PW"}), "b": db(5433)},
        "state": {"database": db(5434, "orchestrate")},
        "router": {"kind": "haproxy", "socket": "/run/haproxy.sock"},
    }
    raw.update(over)
    return raw


def test_pair_fills_blue_and_green_from_a_and_b(tmp_path: Path) -> None:
    cfg = parse_config(raw_pair(), base_dir=tmp_path)
    assert (cfg.blue.port, cfg.green.port) == (5432, 5433)
    assert cfg.state_db.port == 5434
    assert cfg.release.name == ""  # named by orchestrate when it runs


def test_initial_live_b_makes_b_blue(tmp_path: Path) -> None:
    raw = raw_pair()
    raw["pair"]["initial_live"] = "b"
    cfg = parse_config(raw, base_dir=tmp_path)
    assert (cfg.blue.port, cfg.green.port) == (5433, 5432)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r.update(blue=db(5432)), "pair and blue are exclusive"),
    (lambda r: r.update(blue=db(5432), green=db(5433)), "pair and blue and green are exclusive"),
    (lambda r: r.pop("state"), "pair needs state.database"),
    (lambda r: r.update(state={"database": db(5433)}), "state.database is pair.b"),
    (lambda r: r["pair"].pop("b"), "pair needs both sides"),
    (lambda r: r["pair"].update(initial_live="c"), "pair.initial_live"),
    (lambda r: r.update(router={"kind": "ingress-nginx", "canary_ingress": "web-canary"}),
     "ingress-nginx"),
])
def test_bad_pair_configs_are_refused_plainly(tmp_path: Path, mutate: Any,
                                              message: str) -> None:
    raw = raw_pair()
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, base_dir=tmp_path)


def test_blue_green_configs_are_unchanged_by_the_pair_rules(tmp_path: Path) -> None:
    raw = raw_pair()
    raw.pop("pair")
    raw.pop("state")
    raw.update(release={"name": "r1"}, blue=db(5432), green=db(5433))
    cfg = parse_config(raw, base_dir=tmp_path)
    assert cfg.pair is None and cfg.state_db == cfg.blue


def test_live_b_swaps_databases_router_servers_and_colours(tmp_path: Path) -> None:
    cfg = parse_config(raw_pair(), base_dir=tmp_path)
    b_live = pairing.with_sides(cfg, "b")
    assert (b_live.blue.port, b_live.green.port) == (5433, 5432)
    assert b_live.blue.password is None and b_live.green.password is not None
    assert b_live.router.kind == "haproxy"
    # The router's "blue" is the server in front of the live database.
    assert (b_live.router.blue_server, b_live.router.green_server) == ("green", "blue")
    assert pairing.green_side(b_live) == "a"
    labels = b_live.template_variables()
    query = 'rate(x{server="$colour"}) / rate(x{server="$other_colour"})'
    assert render(query, labels, "green") == 'rate(x{server="blue"}) / rate(x{server="green"})'
    a_live = pairing.with_sides(cfg, "a")
    assert (a_live.router.blue_server, a_live.router.green_server) == ("blue", "green")
    assert pairing.green_side(a_live) == "b"
    assert render(query, a_live.template_variables(), "green") == (
        'rate(x{server="green"}) / rate(x{server="blue"})')


def test_pair_routes_name_the_servers(tmp_path: Path) -> None:
    raw = raw_pair()
    raw["pair"]["routes"] = {"a": "web-a", "b": "web-b"}
    cfg = pairing.with_sides(parse_config(raw, base_dir=tmp_path), "b")
    assert (cfg.router.blue_server, cfg.router.green_server) == ("web-b", "web-a")


def test_digest_is_stable_per_side_and_differs_between_sides(tmp_path: Path) -> None:
    cfg = parse_config(raw_pair(), base_dir=tmp_path)
    again = parse_config(raw_pair(), base_dir=tmp_path)
    assert config_digest(pairing.with_sides(cfg, "b"))[0] == config_digest(
        pairing.with_sides(again, "b"))[0]
    assert config_digest(pairing.with_sides(cfg, "a"))[0] != config_digest(
        pairing.with_sides(cfg, "b"))[0]


def test_names_from_service_and_version(tmp_path: Path) -> None:
    cfg = parse_config(raw_pair(), base_dir=tmp_path)
    assert naming.base_name(cfg) == "shop-2-0-0"
    when = datetime(2026, 1, 5, 3, 0, 7, tzinfo=UTC)
    assert naming.stamped("shop-2-0-0", when) == "shop-2-0-0-20260105t030007z"


def test_long_names_stay_valid_and_distinct() -> None:
    one = naming.slug("service-" + "x" * 60 + "-1")
    two = naming.slug("service-" + "x" * 60 + "-2")
    assert len(one) == len(two) == naming.MAX_NAME
    assert one != two
    stamp = naming.stamped(one, datetime(2026, 1, 5, tzinfo=UTC))
    assert len(stamp) <= naming.MAX_NAME and stamp.endswith("-20260105t000000z")
    assert naming.slug("Web_App 1.2+build") == "web_app-1-2-build"
    assert naming.slug("...") == "release"


def test_the_default_checks_follow_the_swapped_servers(tmp_path: Path) -> None:
    # With b live, green is a: the default checks must read a's server for green and
    # b's for blue, or a broken green would be compared with itself.
    cfg = parse_config(raw_pair(router={"kind": "haproxy", "socket": "/run/h.sock",
                                        "blue_server": "app_a", "green_server": "app_b"}),
                       base_dir=tmp_path)
    swapped = pairing.with_sides(cfg, "b")
    for check in swapped.canary.checks:
        assert 'server="app_a"' in check.query, check.query
        assert check.baseline_query is None or 'server="app_b"' in check.baseline_query
    assert [c.name for c in swapped.canary.checks] == [c.name for c in cfg.canary.checks]
    # Checks a person wrote are theirs: left as written.
    own = parse_config(raw_pair(canary={"checks": [
        {"name": "e", "query": 'x{server="$colour"}', "max": 1}]}), base_dir=tmp_path)
    assert pairing.with_sides(own, "b").canary.checks == own.canary.checks
