"""Safe defaults through the real CLI, HAProxy and Prometheus: a release whose config
names no checks at all is analysed on HAProxy's own metrics against blue. The demo's
``--fail-green`` (30 % of green's answers 500) rolls back; a healthy green passes,
also through a 100 % stage long enough that blue goes idle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.routers.base import Weights
from orchestrator.sandbox.demo import FAIL_GREEN_RATE
from orchestrator.sandbox.loadgen import LoadGenerator
from orchestrator.sandbox.stack import Sandbox
from tests.integration import helpers as h
from tests.integration.test_canary_analysis import measurements

pytestmark = pytest.mark.slow

DEFAULTS = {"request-success-rate", "latency-average"}
# Longer than the window at 100 %: blue's 10 s rate window empties while the stage runs.
STAGES = [{"weight": 0, "duration": "2s"}, {"weight": 5, "duration": "8s"},
          {"weight": 20, "duration": "6s"}, {"weight": 100, "duration": "16s"}]


def unchecked_config(sb: Sandbox, name: str) -> Path:
    """The sandbox's release config with no ``checks`` and no ``builtin`` at all."""
    raw = sb.release_config(name, canary={"interval": "2s", "window": "10s",
                                          "stages": STAGES}, rollback={"window": "1h"})
    del raw["canary"]["checks"]
    assert "builtin" not in raw["canary"]
    path = sb.base_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def load(sandbox_16_17: Sandbox) -> Iterator[LoadGenerator]:
    with h.under_load(sandbox_16_17, rate=30.0, write_ratio=0.3) as generator:
        yield generator


@pytest.fixture
def sb(sandbox_16_17: Sandbox) -> Iterator[Sandbox]:
    # The promoted "defaults-healthy" is rolled back after its test: the next starts
    # from blue.
    yield from h.fresh(sandbox_16_17)


def default_measurements(sb: Sandbox, name: str) -> list[dict[str, Any]]:
    return [m for m in measurements(sb, name) if m["check"] in DEFAULTS]


def test_plan_shows_the_default_checks(sb: Sandbox) -> None:
    cfg = unchecked_config(sb, "defaults-plan")
    result = h.run_cli(sb, "plan", "--config", str(cfg))
    assert result.code == 0, result.err[-3000:]
    assert "request-success-rate: (sum(rate(haproxy_server_http_responses_total" in result.out
    assert ">= blue - 0.01 (blue idle: >= 0.99)" in result.out
    assert "latency-average:" in result.out and "<= 1.5 x blue" in result.out


def test_a_healthy_green_passes_the_default_checks(sb: Sandbox, load: LoadGenerator) -> None:
    cfg = unchecked_config(sb, "defaults-healthy")
    result = h.run_cli(sb, "release", "--config", str(cfg))
    assert result.code == 0, (result.out + result.err)[-4000:]
    assert h.router(sb).current() == Weights.green_at(100)
    seen = default_measurements(sb, "defaults-healthy")
    print("\n".join(f"{m['weight']:>3}% {m['check']:<21} {m['verdict']:<12} "
                    f"{m['value']} vs {m['baseline']}: {m['detail']}" for m in seen))
    assert {m["check"] for m in seen if m["verdict"] == "pass"} == DEFAULTS
    assert not [m for m in seen if m["verdict"] == "fail"], seen
    # Both sides were measured while blue served (a comparison, with blue's value) ...
    compared = [m for m in seen if m["verdict"] == "pass" and m["baseline"] is not None]
    assert {m["check"] for m in compared} == DEFAULTS
    # ... and at 100 %, with blue idle, the success rate fell back to its absolute floor
    # instead of being inconclusive, while latency kept blue's last average.
    idle = [m for m in seen if m["weight"] == 100 and m["check"] == "request-success-rate"
            and m["baseline"] is None]
    assert idle and all(m["verdict"] == "pass" for m in idle), seen
    assert all("blue_idle" in m["detail"] for m in idle)
    late_latency = [m for m in seen if m["weight"] == 100 and m["check"] == "latency-average"]
    assert late_latency and all(m["baseline"] is not None for m in late_latency), seen


def test_the_demos_failing_green_rolls_back_on_the_default_checks(
        sb: Sandbox, load: LoadGenerator) -> None:
    h.set_fault(sb, "green", fail_rate=FAIL_GREEN_RATE)
    cfg = unchecked_config(sb, "defaults-fail-green")
    result = h.run_cli(sb, "release", "--config", str(cfg))
    assert result.code == 1 and "ROLLED BACK" in result.out, (result.out + result.err)[-4000:]
    assert "check request-success-rate failed" in result.out and "< blue" in result.out
    assert h.router(sb).current() == Weights.green_at(0)
    row = h.rolled_back_row(sb, "defaults-fail-green")
    assert "request-success-rate" in (row["error"] or "")
    failed = [m for m in default_measurements(sb, "defaults-fail-green")
              if m["verdict"] == "fail"]
    # Caught at the first stage with traffic, against blue's real value.
    assert failed and failed[0]["weight"] == 5, failed
    # Judged against blue's real value, less the default's one point.
    assert failed[0]["baseline"] == pytest.approx(1.0)
    assert failed[0]["value"] < failed[0]["baseline"] - 0.01
