"""Faults on real paths for the tests: a frozen cluster, a proxy that blackholes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def during(fault: Callable[[], None], repair: Callable[[], None]) -> Iterator[None]:
    """The fault for the block; always repaired, so one test never leaks it to the next."""
    fault()
    try:
        yield
    finally:
        repair()
