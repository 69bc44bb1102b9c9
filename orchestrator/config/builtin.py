"""Built-in checks: request success rate and latency, per metrics provider.

A release engineer should not have to write PromQL for the two checks every canary
needs. ``canary.builtin`` names a check and the provider whose metrics to read:

    canary:
      builtin:
        - {check: request-success-rate, provider: haproxy, min: 0.99}
        - {check: latency-p99, provider: demo, max: 0.5, selector: {route: "/orders"}}

Each entry becomes an ordinary ``MetricCheck`` when the config is loaded (so
``plan``, preflight and ``status`` see it like any other); a check in
``canary.checks`` with the same name replaces it.

Values are ratios (0..1) and seconds, whatever unit the provider uses (Envoy and
Istio export milliseconds: the query divides). Success means "not 5xx", as in
Flagger. A query over a window without requests divides 0 by 0: NaN, which the
analysis counts as inconclusive, never as a pass; where a provider exports a gauge
that reads 0 without traffic (HAProxy's average response time) the query is
guarded by the request rate for the same reason.

Providers and their default label matchers (override with ``selector``):

* ``haproxy``: HAProxy's built-in exporter (2.x), one server per colour in the
  router's backend: ``proxy="app"`` (the backend), ``server="$colour"``. HAProxy
  2.6 exports no latency histogram, so ``latency-p99`` is refused; ``latency-average``
  reads ``haproxy_server_response_time_average_seconds``, an average over the
  server's last 1024 successful responses, not over the window: at a low weight it
  moves slowly and it never sees failed requests.
* ``ingress-nginx``: ``nginx_ingress_controller_requests`` and
  ``..._request_duration_seconds``. Requests routed by the canary Ingress carry
  the canary backend's name in the ``canary`` label (empty for the main one), which
  is how green is told from blue: ``canary: {blue: "", green: "!"}``, plus
  ``namespace="$namespace"``, ``ingress="$service"`` (the main Ingress).
* ``envoy``: Envoy cluster statistics, for Gateway API implementations that keep a
  cluster per backend Service (Contour names them ``<namespace>_<service>_<port>``):
  ``envoy_cluster_name=~"${namespace}_${service}-${colour}_.+"``. Envoy Gateway puts
  all backendRefs of a rule into one cluster and cannot tell colours apart; use the
  application's metrics (or Istio's) there.
* ``istio``: ``istio_requests_total`` / ``istio_request_duration_milliseconds``,
  reporter ``destination``, ``destination_workload_namespace="$namespace"``,
  ``destination_service_name="${service}-${colour}"`` (Istio also implements the
  Gateway API).
* ``demo``: the demo application's own metrics, ``demo_http_requests_total`` and
  ``demo_http_request_duration_seconds``, by ``colour="$colour"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_validator

from orchestrator.config._base import Name, _Model
from orchestrator.config.metrics import Limits, MetricCheck
from orchestrator.matchers import parse

Selector = Mapping[str, str]
QueryBuilder = Callable[[Selector], str]

# Thresholds used when an entry names none at all (Flagger's defaults, as ratios).
DEFAULT_THRESHOLDS: dict[str, dict[str, float]] = {
    "request-success-rate": {"min": 0.99},
    "latency-p99": {"max": 0.5},
    "latency-average": {"max": 0.25},
}


class ColourValues(_Model):
    """A selector label whose value differs by colour, e.g. ingress-nginx's ``canary``
    label: ``{blue: "", green: "!"}`` (empty on blue's requests, set on green's)."""

    blue: str
    green: str


class BuiltinCheck(Limits):
    """A named check from the library in ``orchestrator/canary/builtin.py``, written for
    one metrics provider; expanded into a ``MetricCheck`` when the config is loaded.

    ``selector`` overrides the provider's default label matchers (see docs/canary.md):
    ``"v"`` equals, ``"~re"`` matches a regex, ``"!v"`` / ``"!~re"`` negate, ``null``
    drops a default label, ``{blue: .., green: ..}`` gives a value per colour.
    Without any threshold the library's default applies (success rate >= 0.99,
    p99 <= 0.5 s, average <= 0.25 s).
    """

    check: Literal["request-success-rate", "latency-p99", "latency-average"]
    provider: Literal["haproxy", "ingress-nginx", "envoy", "istio", "demo"]
    # The check's name in measurements and in stage ``checks`` lists; default: ``check``.
    name: Name | None = None
    selector: dict[str, str | ColourValues | None] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _supported(self) -> BuiltinCheck:
        problem = unsupported(self.check, self.provider)
        if problem:
            raise ValueError(problem)
        return self


def matcher(label: str, spec: str) -> str:
    """One PromQL label matcher from the selector syntax (see orchestrator/matchers.py):
    "v" equals, "~re" regex, "!v" and "!~re" negate, "=v" equals a value that starts
    with ~ or !."""
    return parse(label, spec).promql()


def _sel(selector: Selector, *extra: str) -> str:
    parts = [matcher(k, v) for k, v in sorted(selector.items())]
    return "{" + ",".join([*parts, *extra]) + "}"


def _success_rate(counter: str, ok: str) -> QueryBuilder:
    # "or vector(0)": when every request failed there is no non-5xx series at all,
    # and an empty numerator would read as "no data" exactly when green is worst.
    def build(s: Selector) -> str:
        return (f"(sum(rate({counter}{_sel(s, ok)}[$window])) or vector(0)) / "
                f"sum(rate({counter}{_sel(s)}[$window]))")
    return build


# Over a histogram ``{h}`` (its series' prefix) selected by ``{s}``.
_P99 = "histogram_quantile(0.99, sum by (le) (rate({h}_bucket{s}[$window])))"
_AVERAGE = "sum(rate({h}_sum{s}[$window])) / sum(rate({h}_count{s}[$window]))"


def _histogram(shape: str, histogram: str, scale: float = 1.0) -> QueryBuilder:
    # ``scale``: the histogram's unit per second (Envoy and Istio: milliseconds).
    def build(s: Selector) -> str:
        query = shape.format(h=histogram, s=_sel(s))
        if scale == 1.0:
            return query
        # A quotient is grouped before it is divided again.
        return f"({query}) / {scale:g}" if " / " in query else f"{query} / {scale:g}"
    return build


def _haproxy_average(s: Selector) -> str:
    # The gauge reads 0 for a server that served nothing; "and on()" the request rate
    # turns "no requests in the window" into no data instead of a perfect 0 s.
    return (f"max(avg_over_time(haproxy_server_response_time_average_seconds{_sel(s)}"
            f"[$window])) and on() "
            f"(sum(rate(haproxy_server_http_responses_total{_sel(s)}[$window])) > 0)")


_NGINX_DURATION = "nginx_ingress_controller_request_duration_seconds"
_ISTIO_DURATION = "istio_request_duration_milliseconds"


@dataclass(frozen=True)
class Provider:
    selector: dict[str, str | ColourValues]
    queries: dict[str, QueryBuilder]
    # Why a check is missing, for the error message.
    missing: dict[str, str] = field(default_factory=dict)


PROVIDERS: dict[str, Provider] = {
    "haproxy": Provider(
        selector={"proxy": "app", "server": "$colour"},
        queries={
            "request-success-rate": _success_rate("haproxy_server_http_responses_total",
                                                  'code!="5xx"'),
            "latency-average": _haproxy_average,
        },
        missing={"latency-p99": (
            "HAProxy's exporter has no latency histogram, so it cannot give a p99; use "
            "check latency-average with provider haproxy (an average over HAProxy's last "
            "1024 responses), or latency-p99 from the application's histogram (provider "
            "demo, or a check of your own in canary.checks)")},
    ),
    "ingress-nginx": Provider(
        selector={"namespace": "$namespace", "ingress": "$service",
                  "canary": ColourValues(blue="", green="!")},
        queries={
            "request-success-rate": _success_rate("nginx_ingress_controller_requests",
                                                  'status!~"5.."'),
            "latency-p99": _histogram(_P99, _NGINX_DURATION),
            "latency-average": _histogram(_AVERAGE, _NGINX_DURATION),
        },
    ),
    "envoy": Provider(
        selector={"envoy_cluster_name": "~${namespace}_${service}-${colour}_.+"},
        queries={
            "request-success-rate": _success_rate("envoy_cluster_upstream_rq_xx",
                                                  'envoy_response_code_class!="5"'),
            "latency-p99": _histogram(_P99, "envoy_cluster_upstream_rq_time", 1000.0),
            "latency-average": _histogram(_AVERAGE, "envoy_cluster_upstream_rq_time", 1000.0),
        },
    ),
    "istio": Provider(
        selector={"reporter": "destination", "destination_workload_namespace": "$namespace",
                  "destination_service_name": "${service}-${colour}"},
        queries={
            "request-success-rate": _success_rate("istio_requests_total",
                                                  'response_code!~"5.."'),
            "latency-p99": _histogram(_P99, _ISTIO_DURATION, 1000.0),
            "latency-average": _histogram(_AVERAGE, _ISTIO_DURATION, 1000.0),
        },
    ),
    "demo": Provider(
        selector={"colour": "$colour"},
        queries={
            "request-success-rate": _success_rate("demo_http_requests_total", 'code!~"5.."'),
            "latency-p99": _histogram(_P99, "demo_http_request_duration_seconds"),
            "latency-average": _histogram(_AVERAGE, "demo_http_request_duration_seconds"),
        },
    ),
}


def unsupported(check: str, provider: str) -> str | None:
    """Why ``check`` cannot be built for ``provider``, or None when it can."""
    p = PROVIDERS.get(provider)
    if p is None:
        return f"unknown provider {provider!r}; known: {', '.join(sorted(PROVIDERS))}"
    if check in p.queries:
        return None
    return p.missing.get(check) or (
        f"provider {provider} has no built-in check {check!r}; it has "
        f"{', '.join(sorted(p.queries))}")


def selector_for(spec: BuiltinCheck, colour: str) -> dict[str, str]:
    """The provider's default matchers with the entry's overrides, for one colour."""
    merged: dict[str, str | ColourValues | None] = {**PROVIDERS[spec.provider].selector,
                                                    **spec.selector}
    out: dict[str, str] = {}
    for label, value in merged.items():
        if value is None:
            continue
        out[label] = getattr(value, colour) if isinstance(value, ColourValues) else value
    return out


def queries(spec: BuiltinCheck) -> tuple[str, str]:
    """(green's query, blue's query), both still templates ($window, $colour...)."""
    build = PROVIDERS[spec.provider].queries[spec.check]
    return build(selector_for(spec, "green")), build(selector_for(spec, "blue"))


def expand(spec: BuiltinCheck) -> MetricCheck:
    problem = unsupported(spec.check, spec.provider)
    if problem:
        raise ValueError(problem)
    green, blue = queries(spec)
    limits = {k: getattr(spec, k) for k in LIMITS if getattr(spec, k) is not None}
    return MetricCheck(
        name=spec.name or spec.check,
        query=green,
        # Only when substituting $colour is not enough to select blue.
        baseline_query=blue if blue != green else None,
        blue_idle=spec.blue_idle,
        failure_limit=spec.failure_limit,
        inconclusive_limit=spec.inconclusive_limit,
        **(limits or DEFAULT_THRESHOLDS[spec.check]),
    )


# The thresholds an entry may give; without any, DEFAULT_THRESHOLDS applies.
LIMITS = ("max", "min", "max_increase_over_blue", "max_decrease_from_blue",
          "max_ratio_to_blue")
