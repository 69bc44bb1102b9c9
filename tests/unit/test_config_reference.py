"""docs/configuration.md is generated from the models and must be current."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current() -> None:
    spec = importlib.util.spec_from_file_location("config_reference",
                                                  ROOT / "scripts" / "config_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.render()
    assert "## ReleaseConfig" in text and "`blue`" in text and "**required**" in text
    assert (ROOT / "docs" / "configuration.md").read_text() == text, \
        "run: .venv/bin/python scripts/config_reference.py"
