"""Built-in checks, per-stage overrides and hooks in the config: expansion at load time,
overrides, selector syntax, and errors that say what to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator.canary.analysis import render
from orchestrator.canary.builtin import PROVIDERS, expand, matcher, unsupported
from orchestrator.config import BuiltinCheck, ReleaseConfig, parse_config
from orchestrator.errors import ConfigError
from orchestrator.machine import config_digest


def config(canary: dict[str, Any], **extra: Any) -> ReleaseConfig:
    raw: dict[str, Any] = {
        "release": {"name": "r1", "service": "shop", "namespace": "prod"},
        "blue": {"dbname": "shop", "user": "u"},
        "green": {"port": 5433, "dbname": "shop", "user": "u"},
        "router": {"kind": "fake"},
        "canary": canary,
        **extra,
    }
    return parse_config(raw, base_dir=Path("/tmp"))


def test_builtins_expand_into_checks_with_default_thresholds() -> None:
    cfg = config({"builtin": [
        {"check": "request-success-rate", "provider": "haproxy"},
        {"check": "latency-p99", "provider": "demo"},
    ]})
    by_name = {c.name: c for c in cfg.canary.checks}
    assert set(by_name) == {"request-success-rate", "latency-p99"}
    assert by_name["request-success-rate"].min == 0.99
    assert by_name["request-success-rate"].max is None
    assert by_name["latency-p99"].max == 0.5
    q = render(by_name["request-success-rate"].query, {"window": "30s"}, "green")
    assert q == (
        '(sum(rate(haproxy_server_http_responses_total{proxy="app",server="green",'
        'code!="5xx"}[30s])) or vector(0)) / '
        'sum(rate(haproxy_server_http_responses_total{proxy="app",server="green"}[30s]))')


def test_thresholds_given_replace_the_defaults() -> None:
    cfg = config({"builtin": [{"check": "request-success-rate", "provider": "demo",
                               "max_decrease_from_blue": 0.01}]})
    (check,) = cfg.canary.checks
    assert check.min is None and check.max_decrease_from_blue == 0.01


def test_a_user_check_with_the_same_name_wins() -> None:
    cfg = config({
        "builtin": [{"check": "latency-p99", "provider": "demo"},
                    {"check": "request-success-rate", "provider": "demo"}],
        "checks": [{"name": "latency-p99", "query": "my_query", "max": 2.0}],
    })
    by_name = {c.name: c for c in cfg.canary.checks}
    assert by_name["latency-p99"].query == "my_query"
    assert len(cfg.canary.checks) == 2


def test_two_providers_need_distinct_names() -> None:
    with pytest.raises(ConfigError) as err:
        config({"builtin": [{"check": "latency-p99", "provider": "demo"},
                            {"check": "latency-p99", "provider": "istio"}]})
    assert "give one of them a 'name'" in err.value.message
    cfg = config({"builtin": [{"check": "latency-p99", "provider": "demo"},
                              {"check": "latency-p99", "provider": "istio",
                               "name": "mesh-p99"}]})
    assert [c.name for c in cfg.canary.checks] == ["latency-p99", "mesh-p99"]


def test_haproxy_has_no_p99_and_says_what_to_use() -> None:
    with pytest.raises(ConfigError) as err:
        config({"builtin": [{"check": "latency-p99", "provider": "haproxy"}]})
    assert "canary.builtin[0]" in err.value.message
    assert "latency-average" in err.value.message


def test_every_provider_has_a_success_rate_and_some_latency() -> None:
    for name, provider in PROVIDERS.items():
        assert "request-success-rate" in provider.queries, name
        assert "latency-average" in provider.queries, name
    assert unsupported("latency-p99", "haproxy") is not None
    assert unsupported("latency-p99", "istio") is None


def test_selector_syntax() -> None:
    assert matcher("a", "x") == 'a="x"'
    assert matcher("a", "~x.+") == 'a=~"x.+"'
    assert matcher("a", "!x") == 'a!="x"'
    assert matcher("a", "!") == 'a!=""'
    assert matcher("a", "!~x|y") == 'a!~"x|y"'
    assert matcher("a", "=~literal") == 'a="~literal"'
    assert matcher("a", 'say "hi"') == 'a="say \\"hi\\""'


def test_selector_overrides_drops_and_per_colour_values() -> None:
    spec = BuiltinCheck.model_validate({
        "check": "request-success-rate", "provider": "istio",
        "selector": {"destination_service_name": {"blue": "web", "green": "web-canary"},
                     "reporter": None, "route": "~/api/.*"},
    })
    check = expand(spec)
    assert 'destination_service_name="web-canary"' in check.query
    assert "reporter" not in check.query
    assert 'route=~"/api/.*"' in check.query
    assert check.baseline_query is not None
    assert 'destination_service_name="web"' in check.baseline_query


def test_ingress_nginx_tells_colours_apart_by_the_canary_label() -> None:
    check = expand(BuiltinCheck(check="latency-p99", provider="ingress-nginx"))
    assert 'canary!=""' in check.query
    assert check.baseline_query is not None and 'canary=""' in check.baseline_query
    labels = {"window": "1m", "namespace": "prod", "service": "shop"}
    assert 'ingress="shop",namespace="prod"' in render(check.query, labels, "green")


def test_milliseconds_become_seconds() -> None:
    for provider in ("envoy", "istio"):
        check = expand(BuiltinCheck(check="latency-p99", provider=provider))
        assert check.query.endswith("/ 1000"), provider


def test_envoy_template_keeps_variables_apart_from_underscores() -> None:
    check = expand(BuiltinCheck(check="latency-average", provider="envoy"))
    rendered = render(check.query, {"window": "1m", "namespace": "prod", "service": "shop"},
                      "green")
    assert 'envoy_cluster_name=~"prod_shop-green_.+"' in rendered


def test_stage_overrides_interval_and_checks() -> None:
    cfg = config({
        "interval": "10s",
        "checks": [{"name": "a", "query": "qa", "max": 1}, {"name": "b", "query": "qb", "max": 1}],
        "stages": [{"weight": 5, "interval": "2s", "checks": ["b"]}, {"weight": 100}],
    })
    first, last = cfg.canary.stages
    assert cfg.canary.interval_for(first) == 2.0 and cfg.canary.interval_for(last) == 10.0
    assert [c.name for c in cfg.canary.checks_for(first)] == ["b"]
    assert [c.name for c in cfg.canary.checks_for(last)] == ["a", "b"]


def test_stage_naming_an_unknown_check_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        config({"checks": [{"name": "a", "query": "qa", "max": 1}],
                "stages": [{"weight": 100, "checks": ["typo"]}]})
    assert "typo" in err.value.message and "known: a" in err.value.message


@pytest.mark.parametrize(
    ("hook", "problem"),
    [
        ({"name": "h", "url": "ftp://x"}, "not an http"),
        ({"name": "h", "url": "https://user:pw@x/"}, "credentials"),
        ({"name": "h", "url": "http://x", "timeout": 0}, "more than 0s"),
        ({"name": "h", "url": "http://x", "on_failure": "panic"}, "on_failure"),
        ({"name": "h", "url": "http://x", "headers": {"A": {"env": "X", "file": "/y"}}},
         "exactly one"),
        ({"name": "h", "url": "http://x", "headers": {"A": 5}}, "a header is a string"),
    ],
)
def test_bad_hooks_are_refused(hook: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        config({"stages": [{"weight": 0, "before": [hook]}, {"weight": 100}]})
    assert "canary.stages[0].before[0]" in err.value.message
    assert problem in err.value.message


def test_config_with_everything_has_a_stable_digest() -> None:
    canary = {
        "builtin": [{"check": "request-success-rate", "provider": "haproxy"}],
        "stages": [{"weight": 0, "before": [{"name": "smoke", "url": "http://x/s", "headers": {
            "Authorization": {"env": "SMOKE_TOKEN", "prefix": "Bearer "}}}]},
                   {"weight": 100, "interval": "1s"}],
    }
    alerts = {"matchers": {"severity": "~critical|page"}, "token": {"file": "/run/token"}}
    a = config_digest(config(canary, alerts=alerts))
    b = config_digest(config(canary, alerts=alerts))
    assert a[0] == b[0]
    # Secrets are references: the stored config names the variable, never a value.
    assert a[1]["canary"]["stages"][0]["before"][0]["headers"]["Authorization"] == {
        "value": None, "env": "SMOKE_TOKEN", "file": None, "prefix": "Bearer "}


@pytest.mark.parametrize(
    ("alerts", "problem"),
    [
        ({"matchers": {"alertname": "~("}}, "not a valid regular expression"),
        ({"listen": "8080"}, "host:port"),
        ({"token": {"env": "A", "file": "/b"}}, "exactly one"),
    ],
)
def test_bad_alerts_section_is_refused(alerts: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        config({"checks": [], "allow_unanalysed": True}, alerts=alerts)
    assert "alerts" in err.value.message and problem in err.value.message
