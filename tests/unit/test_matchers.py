"""One label-matcher syntax for alerts.matchers and canary.builtin selectors."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.canary.builtin import matcher
from orchestrator.config import parse_config
from orchestrator.errors import ConfigError
from orchestrator.matchers import parse, parse_matcher


def test_one_parse_gives_the_promql_and_the_alert_test() -> None:
    cases = {
        # spec: (PromQL, a value that matches, a value that does not)
        "x": ('a="x"', "x", "y"),
        "~x.+": ('a=~"x.+"', "xy", "x"),
        "!x": ('a!="x"', "y", "x"),
        "!~x|y": ('a!~"x|y"', "z", "y"),
        "=~literal": ('a="~literal"', "~literal", "literal"),
    }
    for spec, (promql, yes, no) in cases.items():
        m = parse("a", spec)
        assert m.promql() == promql, spec
        assert matcher("a", spec) == promql, spec
        assert parse_matcher("a", spec).matches({"a": yes}), spec
        assert not parse_matcher("a", spec).matches({"a": no}), spec


def test_a_negated_literal_escape_means_the_same_in_selectors_and_alerts() -> None:
    # "!=~x": not equal to "~x". Selectors used to compare with "=~x" instead.
    assert matcher("a", "!=~x") == 'a!="~x"'
    assert not parse_matcher("a", "!=~x").matches({"a": "~x"})
    assert parse_matcher("a", "!=~x").matches({"a": "=~x"})


def test_selector_regexes_are_left_to_prometheus() -> None:
    # RE2 syntax that Python's re refuses: a selector is Prometheus's to compile, an
    # alert matcher is ours.
    assert matcher("route", "~\\pL+") == 'route=~"\\\\pL+"'
    raw = {
        "release": {"name": "r1"},
        "blue": {"dbname": "shop", "user": "u"},
        "green": {"port": 5433, "dbname": "shop", "user": "u"},
        "router": {"kind": "fake"},
        "canary": {"builtin": [{"check": "latency-p99", "provider": "demo",
                                "selector": {"route": "~\\pL+"}}]},
    }
    (check,) = parse_config(raw, base_dir=Path("/tmp")).canary.checks
    assert 'route=~"\\\\pL+"' in check.query
    raw["alerts"] = {"matchers": {"route": "~\\pL+"}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, base_dir=Path("/tmp"))
    assert "alerts.matchers" in err.value.message
    assert "not a valid regular expression" in err.value.message
