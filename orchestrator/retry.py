"""Bounded retry policies (tenacity) shared by every external call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

T = TypeVar("T")


def _transient_pg(exc: BaseException) -> bool:
    # OperationalError covers refused/dropped connections and server shutdowns;
    # a serialization failure or deadlock is safe to retry for idempotent steps.
    if isinstance(exc, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected):
        return True
    return isinstance(exc, psycopg.OperationalError) and not isinstance(
        exc, psycopg.errors.InsufficientPrivilege | psycopg.errors.InvalidPassword
    )


def pg_retrying(attempts: int = 5, max_delay: float = 30.0) -> Retrying:
    return Retrying(
        retry=retry_if_exception(_transient_pg),
        stop=stop_after_attempt(attempts) | stop_after_delay(max_delay),
        wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
        reraise=True,
    )


def call_with_retry(fn: Callable[..., T], *args: Any, policy: Retrying, **kwargs: Any) -> T:
    for attempt in policy:
        with attempt:
            return fn(*args, **kwargs)
    raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover
