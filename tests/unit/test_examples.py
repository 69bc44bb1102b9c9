"""The example configuration in the README parses."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_example_release_config_is_valid() -> None:
    cfg = load_config(ROOT / "examples" / "release.yaml")
    assert cfg.release.name == "shop-2026-11-24"
    assert [s.weight for s in cfg.canary.stages] == [0, 5, 20, 100]
    # It names no checks: the HAProxy router's defaults, for its backend.
    success, latency = cfg.canary.checks
    assert success.name == "request-success-rate" and success.max_decrease_from_blue == 0.01
    assert 'proxy="shop"' in success.query
    assert latency.name == "latency-average" and latency.max_ratio_to_blue == 1.5
    assert cfg.migrations.dir == (ROOT / "examples" / "migrations").resolve()
