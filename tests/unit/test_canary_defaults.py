"""Safe defaults: a release names its checks, gets the router's default ones, or says
explicitly that it runs without analysis; limits relative to blue need no PromQL."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from orchestrator.canary.analysis import evaluate, render
from orchestrator.canary.metrics import FakeMetrics
from orchestrator.config import MetricCheck, ReleaseConfig, parse_config
from orchestrator.errors import ConfigError
from orchestrator.plan import _canary_steps
from orchestrator.preflight import PreflightReport, _check_metrics

HAPROXY = {"kind": "haproxy", "socket": "/run/haproxy.sock", "backend": "shop",
           "blue_server": "b1", "green_server": "g1"}
INGRESS = {"kind": "ingress-nginx", "namespace": "edge", "canary_ingress": "web-canary"}
GATEWAY = {"kind": "gateway", "route": "web", "blue_service": "web-blue",
           "green_service": "web-green"}
SERVICE = {"kind": "service", "service": "web"}
LABELS = {"window": "30s", "service": "web", "namespace": "shop"}


def raw(router: dict[str, Any], canary: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "release": {"name": "r1", "service": "web", "namespace": "shop"},
        "blue": {"dbname": "shop", "user": "u"},
        "green": {"port": 5433, "dbname": "shop", "user": "u"},
        "router": router,
    }
    if canary is not None:
        out["canary"] = canary
    return out


def cfg(router: dict[str, Any], canary: dict[str, Any] | None = None) -> ReleaseConfig:
    return parse_config(raw(router, canary), base_dir=Path("/tmp"))


def refused(router: dict[str, Any], canary: dict[str, Any] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        cfg(router, canary)
    assert err.value.exit_code == 2
    return err.value


def by_name(c: ReleaseConfig) -> dict[str, MetricCheck]:
    return {check.name: check for check in c.canary.checks}


# -- the defaults -----------------------------------------------------------------------


@pytest.mark.parametrize("canary", [None, {}, {"interval": "1m", "window": "2m"}])
def test_haproxy_with_no_checks_gets_success_rate_and_latency_against_blue(
        canary: dict[str, Any] | None) -> None:
    checks = by_name(cfg(HAPROXY, canary))
    assert set(checks) == {"request-success-rate", "latency-average"}
    success, latency = checks["request-success-rate"], checks["latency-average"]
    # Relative to blue, from the router's own backend and server names.
    assert success.max_decrease_from_blue == 0.01 and success.max is None
    assert success.min is None
    assert success.blue_idle is not None and success.blue_idle.min == 0.99
    green = render(success.query, LABELS, "green")
    assert 'haproxy_server_http_responses_total{proxy="shop",server="g1"}' in green
    assert 'code!="5xx"' in green
    assert success.baseline_query is not None
    assert 'server="b1"' in render(success.baseline_query, LABELS, "blue")
    assert latency.max_ratio_to_blue == 1.5 and latency.max is None
    assert "haproxy_server_response_time_average_seconds" in latency.query
    # Green's latency reads "no data" without requests; blue's last average stays the
    # baseline (with a 10 ms floor), so that the comparison still works at 100 %.
    assert "and on()" in latency.query
    assert latency.baseline_query is not None
    assert "and on()" not in latency.baseline_query
    assert latency.baseline_query.startswith("clamp_min(") and ", 0.01)" in latency.baseline_query
    assert 'proxy="shop",server="b1"' in latency.baseline_query


def test_ingress_nginx_with_no_checks_gets_defaults_from_the_controller_metrics() -> None:
    checks = by_name(cfg(INGRESS))
    assert set(checks) == {"request-success-rate", "latency-p99"}
    p99 = checks["latency-p99"]
    assert p99.max_ratio_to_blue == 1.5
    assert p99.blue_idle is not None and p99.blue_idle.max == 0.5
    assert "nginx_ingress_controller_request_duration_seconds_bucket" in p99.query
    # The Ingress's namespace is the router's; green is the canary Ingress's traffic.
    assert 'namespace="edge"' in p99.query and 'canary!=""' in p99.query
    assert p99.baseline_query is not None and 'canary=""' in p99.baseline_query
    assert p99.baseline_query.startswith("clamp_min(")
    success = checks["request-success-rate"]
    assert 'nginx_ingress_controller_requests' in success.query
    assert success.max_decrease_from_blue == 0.01


@pytest.mark.parametrize("router", [GATEWAY, SERVICE, {"kind": "fake"}])
def test_routers_without_a_metric_source_must_choose(router: dict[str, Any]) -> None:
    err = refused(router)
    assert "invalid configuration: canary: no checks" in err.message
    # Both ways out are named.
    assert "canary.builtin" in err.message and "provider" in err.message
    assert "'checks: []'" in err.message and "'allow_unanalysed: true'" in err.message
    # With a provider named it is accepted.
    chosen = cfg(router, {"builtin": [{"check": "request-success-rate", "provider": "istio",
                                       "max_decrease_from_blue": 0.01}]})
    assert [c.name for c in chosen.canary.checks] == ["request-success-rate"]


def test_named_checks_get_no_defaults_added() -> None:
    own = {"name": "errors", "query": 'rate(e{c="$colour"}[$window])', "max": 0.01}
    assert list(by_name(cfg(HAPROXY, {"checks": [own]}))) == ["errors"]
    builtin = {"check": "request-success-rate", "provider": "demo"}
    assert list(by_name(cfg(HAPROXY, {"builtin": [builtin]}))) == ["request-success-rate"]
    only = by_name(cfg(HAPROXY, {"builtin": [builtin]}))["request-success-rate"]
    assert only.min == 0.99 and only.max_decrease_from_blue is None  # the builtin's own


def test_a_stage_may_name_a_default_check() -> None:
    c = cfg(HAPROXY, {"stages": [{"weight": 0}, {"weight": 100,
                                                  "checks": ["request-success-rate"]}]})
    assert [x.name for x in c.canary.checks_for(c.canary.stages[1])] == ["request-success-rate"]


# -- no analysis, said explicitly ---------------------------------------------------------


@pytest.mark.parametrize("router", [HAPROXY, INGRESS, GATEWAY])
def test_empty_checks_without_allow_unanalysed_is_refused(router: dict[str, Any]) -> None:
    err = refused(router, {"checks": []})
    assert "no checks: stages would advance on time alone" in err.message
    assert "'allow_unanalysed: true'" in err.message
    assert "nothing was changed" in (err.hint or "")


@pytest.mark.parametrize("router", [HAPROXY, GATEWAY, SERVICE])
def test_empty_checks_with_allow_unanalysed_is_accepted(router: dict[str, Any]) -> None:
    c = cfg(router, {"checks": [], "allow_unanalysed": True})
    assert c.canary.checks == [] and c.canary.allow_unanalysed


def test_allow_unanalysed_alone_is_not_enough() -> None:
    err = refused(GATEWAY, {"allow_unanalysed": True})
    assert "needs 'checks: []' as well" in err.message
    # With HAProxy the defaults would apply: allow_unanalysed contradicts them.
    err = refused(HAPROXY, {"allow_unanalysed": True})
    assert "allow_unanalysed is true, yet there are checks" in err.message
    assert "request-success-rate" in err.message


def test_allow_unanalysed_with_named_checks_is_refused() -> None:
    own = {"name": "errors", "query": "e", "max": 0.01}
    err = refused(HAPROXY, {"checks": [own], "allow_unanalysed": True})
    assert "yet there are checks (errors" in err.message


def test_blue_idle_needs_a_comparison_and_a_limit() -> None:
    err = refused(GATEWAY, {"checks": [{"name": "e", "query": "q", "max": 1.0,
                                        "blue_idle": {"max": 2.0}}]})
    assert "compares nothing with blue" in err.message
    err = refused(GATEWAY, {"checks": [{"name": "e", "query": "q", "max_ratio_to_blue": 2,
                                        "blue_idle": {}}]})
    assert "blue_idle needs 'max' or 'min'" in err.message
    err = refused(GATEWAY, {"checks": [{"name": "e", "query": "q", "max_ratio_to_blue": 0}]})
    assert "max_ratio_to_blue" in err.message


# -- max_ratio_to_blue and an idle blue ---------------------------------------------------


def ratio_check(**extra: Any) -> MetricCheck:
    return MetricCheck(name="latency", query='lat{colour="$colour"}', max_ratio_to_blue=1.5,
                       **extra)


def measure(check: MetricCheck, green: float | None, blue: float | None) -> tuple[str, str]:
    source = FakeMetrics({'colour="green"': green, 'colour="blue"': blue})
    ev = evaluate(check, source, {})
    return ev.verdict, ev.detail


@pytest.mark.parametrize(("green", "blue", "verdict"), [
    (0.15, 0.1, "pass"),          # exactly 1.5 x
    (0.1501, 0.1, "fail"),
    (0.05, 0.1, "pass"),          # faster than blue
    (0.0, 0.0, "pass"),           # blue at 0 allows 0 ...
    (0.001, 0.0, "fail"),         # ... and nothing more
    (0.1, None, "inconclusive"),  # no data for blue is never a pass
    (0.1, math.nan, "inconclusive"),
    (math.nan, 0.1, "inconclusive"),
    (None, 0.1, "inconclusive"),
])
def test_max_ratio_to_blue(green: float | None, blue: float | None, verdict: str) -> None:
    assert measure(ratio_check(), green, blue)[0] == verdict


def test_ratio_failure_says_what_was_compared() -> None:
    verdict, detail = measure(ratio_check(), 0.3, 0.1)
    assert verdict == "fail" and detail == "0.3 > 1.5 x blue 0.1"


def test_an_idle_blue_falls_back_to_the_blue_idle_limits_only_when_configured() -> None:
    idle = ratio_check(blue_idle={"max": 0.5})
    assert measure(idle, 0.4, None) == ("pass", "no data for blue: within the blue_idle limits")
    verdict, detail = measure(idle, 0.6, None)
    assert verdict == "fail" and "blue idle: 0.6 > max 0.5" in detail
    assert measure(idle, 0.6, math.nan)[0] == "fail"
    # With blue's data the comparison decides, not the idle limits.
    assert measure(idle, 0.6, 0.5)[0] == "pass"
    # No data for green stays inconclusive whatever blue does.
    assert measure(idle, None, None)[0] == "inconclusive"


def test_a_nan_is_no_data_for_plain_limits_too() -> None:
    # Every comparison with NaN is false: a NaN used to pass any max.
    check = MetricCheck(name="e", query='e{colour="$colour"}', max=0.05)
    assert measure(check, math.nan, None)[0] == "inconclusive"


def test_default_success_rate_catches_a_failing_green_and_spares_a_bad_hour() -> None:
    (success,) = [c for c in cfg(HAPROXY).canary.checks if c.name == "request-success-rate"]

    def verdict(green: float, blue: float | None) -> str:
        source = FakeMetrics({'server="g1"': green, 'server="b1"': blue})
        return evaluate(success, source, LABELS).verdict

    assert verdict(0.7, 1.0) == "fail"      # the demo's --fail-green: 30 % 500s
    assert verdict(0.995, 1.0) == "pass"
    assert verdict(0.9, 0.905) == "pass"    # everyone is bad: not green's fault
    assert verdict(1.0, None) == "pass"     # 100 %: blue idle, green at least 0.99
    assert verdict(0.98, None) == "fail"


# -- plan and preflight see them ----------------------------------------------------------


def test_plan_and_preflight_render_the_default_checks() -> None:
    c = cfg(HAPROXY)
    steps = _canary_steps(c)
    listed = "\n".join(steps[0].statements)
    assert "request-success-rate: (sum(rate(haproxy_server_http_responses_total" in listed
    assert 'server="g1"' in listed and "[30s]" in listed
    assert ">= blue - 0.01 (blue idle: >= 0.99)" in listed
    assert "<= 1.5 x blue; blue: clamp_min(" in listed
    metrics = FakeMetrics()
    report = PreflightReport()
    _check_metrics(c, metrics, report)
    assert not report.warnings and not report.problems
    # Both sides' queries are tried, as the stages will run them.
    assert any('server="b1"' in q and "clamp_min" in q for q in metrics.queries)
    assert any('server="b1"' in q and "http_responses_total" in q for q in metrics.queries)


def test_preflight_warns_about_an_unanalysed_release() -> None:
    report = PreflightReport()
    _check_metrics(cfg(GATEWAY, {"checks": [], "allow_unanalysed": True}), FakeMetrics(), report)
    assert report.warnings == ["canary.checks is empty (allow_unanalysed): stages advance on "
                               "time alone"]
