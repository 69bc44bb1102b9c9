"""Bounded retry policies (tenacity), one per kind of external call.

Every external call runs under one of the named policies below; none builds its own
``Retrying``. Each is bounded (attempts, and for PostgreSQL a total delay) and logs
one ``"call failed, retrying"`` warning before it sleeps, naming the policy and the
call.

What is retried is decided by the exception's class, as in kopf's
``TemporaryError``/``PermanentError``: a failure that may go away by itself is raised
as a ``TransientError`` (mixed into the error a person reads once retries run out),
and everything else ends the call at once. Foreign exceptions are mapped to our
classes where they are raised (``routers.kube.kube_error`` for the Kubernetes API).
The exceptions are the drivers whose classes already say it: psycopg's (matched
below, once), the socket's ``OSError`` and requests' ``RequestException``.

=============  ========================================================
policy         retried
=============  ========================================================
``pg``         TransientError; psycopg OperationalError (not a refused
               login), serialization failures, deadlocks
``kubernetes`` TransientError only (5xx, 429, transport: see routers.kube)
``http``       TransientError; requests.RequestException (transport)
``socket``     TransientError; OSError (refused, reset, timed out)
=============  ========================================================
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import requests
import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_exponential_jitter,
    wait_random,
)
from tenacity.stop import stop_base
from tenacity.wait import WaitBaseT

log = structlog.get_logger(__name__)

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


class TransientError(Exception):
    """A failure that may go away by itself: the named policies retry it, nothing else.

    A mixin, like kopf's ``TemporaryError``: combine it with the ``OrchestrateError``
    subclass a person should read once the attempts run out
    (``class KubeServerError(KubeApiError, TransientError)``).
    """


# How much of a failure the retry warning quotes: enough to tell one cause from another.
_MAX_ERROR_CHARS = 300


def _describe(exc: BaseException | None) -> str:
    text = str(exc) if exc is not None else ""
    text = text or type(exc).__name__
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "..."


def _policy(
    name: str,
    what: str,
    *,
    transient: Callable[[BaseException], bool],
    attempts: int,
    wait: WaitBaseT,
    max_delay: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Retrying:
    stop: stop_base = stop_after_attempt(attempts)
    if max_delay is not None:
        stop = stop | stop_after_delay(max_delay)

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("call failed, retrying", policy=name, call=what,
                    attempt=state.attempt_number, of=attempts, error=_describe(exc),
                    wait_s=round(state.upcoming_sleep, 3))

    return Retrying(retry=retry_if_exception(transient), stop=stop, wait=wait, sleep=sleep,
                    before_sleep=before_sleep, reraise=True)


def _marked(exc: BaseException) -> bool:
    return isinstance(exc, TransientError)


def pg_retrying(attempts: int = 5, max_delay: float = 30.0, *,
                what: str = "connect to PostgreSQL") -> Retrying:
    """PostgreSQL: a dropped or refused connection, a server restarting."""
    return _policy("pg", what, transient=lambda e: _marked(e) or _transient_pg(e),
                   attempts=attempts, max_delay=max_delay,
                   wait=wait_exponential_jitter(multiplier=0.2, max=5.0))


def kube_retrying(what: str, *, attempts: int, wait: WaitBaseT) -> Retrying:
    """The Kubernetes API. Only ``TransientError`` is retried: ``routers.kube`` maps
    every answer and transport failure to its class first. Conflicts are not
    transient here (only the caller can re-read and rebuild its patch)."""
    return _policy("kubernetes", what, transient=_marked, attempts=attempts, wait=wait)


def http_retrying(what: str, *, attempts: int, multiplier: float = 0.2, max_wait: float = 2.0,
                  jitter: float | None = None,
                  sleep: Callable[[float], None] = time.sleep) -> Retrying:
    """An HTTP service (Prometheus, a stage hook): transport failures and answers the
    caller raised as ``TransientError`` ("try again": 429, 503...).

    ``jitter`` (seconds) adds ``wait_random(0, jitter)`` to plain exponential backoff;
    without it the backoff is tenacity's ``wait_exponential_jitter``.
    """
    wait: WaitBaseT = wait_exponential_jitter(multiplier=multiplier, max=max_wait)
    if jitter is not None:
        # wait_exponential_jitter's arguments changed between tenacity 8 and 9; this
        # spelling means the same in both.
        wait = wait_exponential(multiplier=multiplier, max=max_wait) + wait_random(0, jitter)
    return _policy("http", what, attempts=attempts, wait=wait, sleep=sleep,
                   transient=lambda e: _marked(e) or isinstance(e, requests.RequestException))


def socket_retrying(what: str, *, attempts: int, multiplier: float = 0.2,
                    max_wait: float = 2.0) -> Retrying:
    """A short socket exchange (the HAProxy runtime API). Only for idempotent commands:
    a broken connection may have delivered the command before it broke."""
    return _policy("socket", what, attempts=attempts,
                   wait=wait_exponential(multiplier=multiplier, max=max_wait),
                   transient=lambda e: _marked(e) or isinstance(e, OSError))


def call_with_retry(fn: Callable[..., T], *args: Any, policy: Retrying, **kwargs: Any) -> T:
    return policy(fn, *args, **kwargs)
