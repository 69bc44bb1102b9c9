"""A running sandbox per test module: real PostgreSQL (two majors), demo apps,
HAProxy and Prometheus, all on loopback, stopped after the module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from orchestrator.sandbox.stack import Sandbox
from tests.conftest import short_tmpdir


def _sandbox(blue: int, green: int) -> Iterator[Sandbox]:
    with short_tmpdir("orch-it-") as base, Sandbox(base, blue_major=blue, green_major=green) as sb:
        yield sb


@pytest.fixture(scope="module")
def sandbox_16_17() -> Iterator[Sandbox]:
    yield from _sandbox(16, 17)


@pytest.fixture(scope="module")
def sandbox_15_17() -> Iterator[Sandbox]:
    yield from _sandbox(15, 17)
