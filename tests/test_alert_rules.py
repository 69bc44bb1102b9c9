"""The orchestrator's alert rules and dashboard: promtool checks and unit-tests every
rule, the PrometheusRule of k8s/ and of the chart carry exactly the plain rule file,
and every dashboard query runs on a real Prometheus."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.sandbox.prometheus import PrometheusServer
from tests.conftest import short_tmpdir
from tests.test_manifests import CHART, K8S, MONITORING_VALUES, chart_docs

ROOT = Path(__file__).resolve().parent.parent
PROMTOOL = "/usr/bin/promtool"
RULES = K8S / "alerts" / "orchestrate-rules.yaml"
RULE_TESTS = ROOT / "tests" / "alerts" / "orchestrate-rules.test.yaml"
DASHBOARD = CHART / "dashboards" / "orchestrate.json"
# Grafana's own variables, as Grafana would fill them in.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$release": ".*",
                     "$proxy": "app"}


def _promtool(*args: str) -> str:
    done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60,
                          check=False, cwd=ROOT)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _rules() -> dict[str, Any]:
    loaded = yaml.safe_load(RULES.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _alerts() -> list[str]:
    return [r["alert"] for g in _rules()["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_checks_the_rules() -> None:
    out = _promtool("check", "rules", str(RULES))
    assert f"SUCCESS: {len(_alerts())} rules found" in out


def test_promtool_unit_tests_pass_with_one_per_alert() -> None:
    out = _promtool("test", "rules", str(RULE_TESTS))
    assert "SUCCESS" in out
    tested = [t["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in test["alert_rule_test"]]
    # Every alert is tested, each with a case where it fires and one where it does not.
    assert set(tested) == set(_alerts())
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        cases = test["alert_rule_test"]
        assert any(c["exp_alerts"] for c in cases) and any(not c["exp_alerts"] for c in cases)
    assert set(_alerts()) == {
        "OrchestrateReleaseFailed", "OrchestrateReleasePastDeadline",
        "OrchestrateReleaseRolledBack", "OrchestrateReplicationLagHigh",
        "OrchestrateLeftoverReplicationSlot", "OrchestrateRollbackWindowClosing"}


def test_the_prometheus_rules_carry_the_plain_rule_file() -> None:
    k8s_rule = yaml.safe_load((K8S / "prometheusrule.yaml").read_text())
    assert (k8s_rule["apiVersion"], k8s_rule["kind"]) == ("monitoring.coreos.com/v1",
                                                         "PrometheusRule")
    assert k8s_rule["spec"] == _rules()
    assert (CHART / "files" / "orchestrate-rules.yaml").read_text() == RULES.read_text()
    [chart_rule] = [d for d in chart_docs(MONITORING_VALUES) if d["kind"] == "PrometheusRule"]
    assert chart_rule["spec"] == _rules()  # Helm left Prometheus's {{ $labels }} alone
    assert set(chart_rule["metadata"]) == {"name", "namespace", "labels"}


def test_the_dashboard_ships_in_k8s_and_the_chart() -> None:
    expected = json.loads(DASHBOARD.read_text())
    k8s_map = yaml.safe_load((K8S / "grafana-dashboard.yaml").read_text())
    [chart_map] = [d for d in chart_docs(MONITORING_VALUES)
                   if d["kind"] == "ConfigMap" and "orchestrate.json" in d.get("data", {})]
    for config_map in (k8s_map, chart_map):
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(config_map["data"]["orchestrate.json"]) == expected


def _queries() -> list[tuple[str, str]]:
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, filled in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, filled)
            assert "$" not in expr, f"{panel['title']}: unfilled variable in {expr}"
            found.append((panel["title"], expr))
    return found


@pytest.fixture(scope="module")
def prometheus() -> Iterator[PrometheusServer]:
    with short_tmpdir("orch-dash-") as base:
        prom = PrometheusServer(base / "prometheus")
        with prom:
            yield prom


def test_every_dashboard_query_runs_on_prometheus(prometheus: PrometheusServer) -> None:
    queries = _queries()
    assert len(queries) >= 14
    metrics = {m for _, q in queries for m in re.findall(r"\b(orchestrate_[a-z_]+)", q)}
    # The dashboard covers the metrics the alerts use, and the canary's own checks.
    assert {"orchestrate_release_state", "orchestrate_state_duration_seconds_bucket",
            "orchestrate_replication_lag_bytes", "orchestrate_rollbacks_total",
            "orchestrate_leftover_replication_slots"} <= metrics
    assert any("haproxy_server_http_responses_total" in q for _, q in queries)
    for title, query in queries:
        # QueryRejected (bad PromQL) or any other failure raises here.
        result = prometheus.query(query)
        assert isinstance(result, list), title
