"""Template variables ($service, $window, ...): one builder, one precedence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.canary.analysis import render
from orchestrator.canary.metrics import FakeMetrics
from orchestrator.config import parse_config
from orchestrator.preflight import PreflightReport, _check_metrics
from tests.unit.test_config import minimal

QUERY = 'rate(errors{service="$service",ns="$namespace",c="$colour"}[$window])'


def _cfg(tmp_path: Path, **labels: str) -> Any:
    raw = minimal(release={"name": "r1", "service": "shop", "namespace": "prod"},
                  prometheus={"labels": labels},
                  canary={"checks": [{"name": "errors", "query": QUERY, "max": 0.01}]})
    return parse_config(raw, base_dir=tmp_path)


def test_the_release_fills_in_its_own_names(tmp_path: Path) -> None:
    values = _cfg(tmp_path, cluster="eu-1").template_variables(window="30s")
    assert values == {"service": "shop", "namespace": "prod", "version": "green",
                      "release": "r1", "window": "30s", "cluster": "eu-1"}
    assert "window" not in _cfg(tmp_path).template_variables()


def test_prometheus_labels_override_the_release_and_colour_overrides_all(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path, service="shop-metrics", window="5m", colour="purple")
    values = cfg.template_variables(window="30s")
    assert values["service"] == "shop-metrics" and values["window"] == "5m"
    assert render(QUERY, values, "green") == (
        'rate(errors{service="shop-metrics",ns="prod",c="green"}[5m])')


def test_preflight_fills_in_the_checks_as_the_release_will(tmp_path: Path) -> None:
    # The preflight used to let the release's own names win over prometheus.labels,
    # the opposite of the canary stages: it tested a query the release never runs.
    cfg = _cfg(tmp_path, service="shop-metrics")
    metrics = FakeMetrics()
    report = PreflightReport()
    _check_metrics(cfg, metrics, report)
    assert metrics.queries == ['rate(errors{service="shop-metrics",ns="prod",c="blue"}[1m])']
