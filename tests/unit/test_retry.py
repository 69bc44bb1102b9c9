"""The named retry policies: what each retries is decided by the exception's class."""

from __future__ import annotations

import psycopg
import pytest
import requests
from structlog.testing import capture_logs
from tenacity import Retrying, wait_none

from orchestrator.retry import (
    TransientError,
    http_retrying,
    pg_retrying,
    socket_retrying,
)


class _Flaky(TransientError):
    pass


def _fast(policy: Retrying) -> Retrying:
    return policy.copy(wait=wait_none(), sleep=lambda _s: None)


def _calls(policy: Retrying, exc: BaseException) -> int:
    count = 0

    def fail() -> None:
        nonlocal count
        count += 1
        raise exc

    with pytest.raises(type(exc)):
        policy(fail)
    return count


@pytest.mark.parametrize("policy", [
    pg_retrying(attempts=3),
    http_retrying("hook", attempts=3),
    socket_retrying("haproxy", attempts=3),
])
def test_a_transient_error_is_retried_by_every_policy_and_nothing_else(policy: Retrying) -> None:
    assert _calls(_fast(policy), _Flaky("503")) == 3
    assert _calls(_fast(policy), ValueError("a bug, not a blip")) == 1


def test_each_policy_retries_its_drivers_transport_failures() -> None:
    assert _calls(_fast(socket_retrying("s", attempts=2)), ConnectionRefusedError()) == 2
    assert _calls(_fast(http_retrying("h", attempts=2)), requests.ConnectionError()) == 2
    assert _calls(_fast(pg_retrying(attempts=2)), psycopg.OperationalError("reset")) == 2
    refused = psycopg.OperationalError('password authentication failed for user "app"')
    assert _calls(_fast(pg_retrying(attempts=2)), refused) == 1


def test_a_policy_logs_before_it_sleeps() -> None:
    with capture_logs() as logs:
        _calls(_fast(http_retrying("before hook smoke", attempts=3)), _Flaky("HTTP 503"))
    assert [(e["event"], e["policy"], e["call"], e["attempt"], e["error"]) for e in logs] == [
        ("call failed, retrying", "http", "before hook smoke", 1, "HTTP 503"),
        ("call failed, retrying", "http", "before hook smoke", 2, "HTTP 503"),
    ]
