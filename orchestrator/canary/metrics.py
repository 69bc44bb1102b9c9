"""Where measurements come from: Prometheus (real) or a table of values (fake).

A query that returns nothing, NaN, or cannot be answered is ``None``: no data is
never read as success.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from requests.adapters import Retry

from orchestrator.config import PrometheusConfig
from orchestrator.errors import ExternalError
from orchestrator.retry import http_retrying


class MetricsUnavailable(ExternalError):
    """Prometheus could not answer (down, timeout, bad query)."""


class MetricsSource(Protocol):
    def check(self) -> None:
        """Preflight: reachable and answering. Raises MetricsUnavailable."""
        ...

    def query(self, promql: str) -> float | None:
        """An instant query reduced to one number; None when there is no data."""
        ...


def _reduce(result: list[dict[str, Any]]) -> float | None:
    values = []
    for series in result:
        try:
            values.append(float(series["value"][1]))
        except (KeyError, IndexError, TypeError, ValueError):
            continue
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return None
    if len(finite) > 1:
        # A check must aggregate to one series; taking the worst keeps a bad pod from
        # hiding behind good ones.
        return max(finite)
    return finite[0]


class PrometheusMetrics:
    def __init__(self, cfg: PrometheusConfig, attempts: int = 3) -> None:
        headers = None
        if cfg.bearer_token is not None:
            headers = {"Authorization": f"Bearer {cfg.bearer_token.resolve()}"}
        # The client's own urllib3 retries are switched off: the http policy bounds
        # attempts explicitly.
        self._client = PrometheusConnect(url=cfg.url.rstrip("/"), headers=headers,
                                         retry=Retry(total=0), timeout=cfg.timeout)
        self._url = cfg.url
        self._timeout = cfg.timeout
        self._attempts = attempts

    def _raw(self, promql: str) -> list[dict[str, Any]]:
        retrying = http_retrying(f"prometheus query at {self._url}", attempts=self._attempts,
                                 multiplier=0.2, max_wait=2.0)
        try:
            result: list[dict[str, Any]] = retrying(
                self._client.custom_query, promql,
                params={"timeout": f"{int(self._timeout * 1000)}ms"})
        except requests.RequestException as exc:
            raise MetricsUnavailable(f"Prometheus at {self._url} is unreachable: "
                                     f"{type(exc).__name__}") from exc
        except PrometheusApiClientException as exc:
            raise MetricsUnavailable(f"Prometheus rejected the query {promql!r}: {exc}") from exc
        return result

    def check(self) -> None:
        value = _reduce(self._raw("vector(1)"))
        if value != 1.0:
            raise MetricsUnavailable(f"Prometheus at {self._url} answered oddly to vector(1)")

    def query(self, promql: str) -> float | None:
        return _reduce(self._raw(promql))


class FakeMetrics:
    """Values by query substring; used where a test needs exact numbers."""

    def __init__(self, values: dict[str, float | None] | None = None) -> None:
        self.values: dict[str, float | None] = dict(values or {})
        self.queries: list[str] = []
        self.down = False

    def check(self) -> None:
        if self.down:
            raise MetricsUnavailable("fake Prometheus is down")

    def query(self, promql: str) -> float | None:
        self.queries.append(promql)
        if self.down:
            raise MetricsUnavailable("fake Prometheus is down")
        for key, value in self.values.items():
            if key in promql:
                return value
        return None
