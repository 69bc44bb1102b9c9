"""Which pytest-xdist worker this process is: each worker gets its own slice of
anything two workers could otherwise pick at once (ports, subnets)."""

from __future__ import annotations

import os


def worker_index() -> int | None:
    """0, 1, ... under pytest-xdist (``PYTEST_XDIST_WORKER=gwN``); None outside it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit():
        return int(worker[2:])
    return None


def worker_count() -> int:
    return max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
