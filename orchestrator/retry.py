"""Bounded retry policies (tenacity) shared by every external call."""

from __future__ import annotations

import re
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


# A server that answered and said no: retrying cannot change its mind, and repeated
# failed logins can lock the role out (fail2ban, pgaudit alarms). libpq reports these
# as text only (no SQLSTATE before the session exists), so they are matched here, once.
_REFUSED = re.compile(
    r"password authentication failed|no password supplied|authentication failed"
    r"|pg_hba\.conf rejects|no pg_hba\.conf entry|role \"[^\"]*\" does not exist"
    r"|database \"[^\"]*\" does not exist",
    re.I)
_CREDENTIALS = re.compile(r"password|authentication|pg_hba|role \"", re.I)


def refused_by_server(exc: BaseException) -> str | None:
    """``"credentials"`` or ``"missing"`` when a connection attempt was refused for a
    reason that will not go away by itself; None when it may be transient."""
    if isinstance(exc, psycopg.errors.InvalidPassword
                  | psycopg.errors.InvalidAuthorizationSpecification):
        return "credentials"
    if not isinstance(exc, psycopg.OperationalError):
        return None
    text = str(exc)
    if not _REFUSED.search(text):
        return None
    return "credentials" if _CREDENTIALS.search(text) else "missing"


def _transient_pg(exc: BaseException) -> bool:
    # OperationalError covers refused/dropped connections and server shutdowns;
    # a serialization failure or deadlock is safe to retry for idempotent steps.
    if isinstance(exc, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected):
        return True
    return (isinstance(exc, psycopg.OperationalError)
            and not isinstance(exc, psycopg.errors.InsufficientPrivilege)
            and refused_by_server(exc) is None)


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
