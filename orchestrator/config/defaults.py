"""Default checks: what a canary measures when its configuration names no checks.

A canary that advances on time alone promotes a broken green as surely as a good one,
so a config that names no checks (neither ``canary.checks`` nor ``canary.builtin``)
gets two from the router's own metrics, both relative to blue, so that a bad hour for
everyone does not roll back a good release:

* ``request-success-rate``: green's share of non-5xx answers at most 1 point below
  blue's (``max_decrease_from_blue: 0.01``); while blue serves nobody (100 % after one
  window, the rollback window) at least 0.99 instead (``blue_idle``), Flagger's
  default. Two failed evaluations fail the stage.
* latency: green at most 1.5 x blue's (``max_ratio_to_blue``), blue counted as at
  least 10 ms so that a 1 ms service is not rolled back for a 2 ms green.

  - HAProxy 2.6 exports no latency histogram; the best signal it has is
    ``haproxy_server_response_time_average_seconds`` (``latency-average``), an average
    over each server's last 1024 responses, not over the window. Green's is read only
    while green has requests in the window; blue's is read as it stands, so that at
    100 % blue's last average remains the baseline.
  - ingress-nginx exports a histogram: ``latency-p99``, and while blue serves nobody
    at most 0.5 s (Flagger's default).

The Gateway API and Service routers have no metric source that every installation
has (Envoy, Istio, the application's own...): such a config must name its checks
(e.g. ``canary.builtin: [{check: request-success-rate, provider: istio}]``) or say
``checks: []`` with ``allow_unanalysed: true``.

The defaults are ordinary checks, added to the raw configuration before it is
validated: ``plan``, preflight and ``status`` show them like any other, and a stage's
``checks`` list may name them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.config.builtin import BuiltinCheck, expand, matcher

# Blue's latency counts as at least this much (seconds): HAProxy rounds to whole
# milliseconds, and a ratio of two near-zero numbers is noise.
LATENCY_FLOOR_S = 0.01
LATENCY_RATIO = 1.5
SUCCESS_DECREASE = 0.01
SUCCESS_MIN_BLUE_IDLE = 0.99
P99_MAX_BLUE_IDLE = 0.5
# Which router kinds have defaults; the others must name their checks.
SOURCES = {"haproxy": "HAProxy's exporter (provider haproxy)",
           "ingress-nginx": "the ingress-nginx controller's metrics (provider ingress-nginx)"}


def _success(provider: str, selector: dict[str, Any]) -> dict[str, Any]:
    return _dump(BuiltinCheck.model_validate({
        "check": "request-success-rate", "provider": provider, "selector": selector,
        "max_decrease_from_blue": SUCCESS_DECREASE,
        "blue_idle": {"min": SUCCESS_MIN_BLUE_IDLE}, "failure_limit": 2}))


def _haproxy(router: Mapping[str, Any]) -> list[dict[str, Any]]:
    selector = {"proxy": router.get("backend", "app"),
                "server": {"blue": router.get("blue_server", "blue"),
                           "green": router.get("green_server", "green")}}
    latency = _dump(BuiltinCheck.model_validate({
        "check": "latency-average", "provider": "haproxy", "selector": selector,
        "max_ratio_to_blue": LATENCY_RATIO, "failure_limit": 2}))
    blue = ",".join([matcher("proxy", selector["proxy"]),
                     matcher("server", selector["server"]["blue"])])
    # Unguarded for blue: an idle server's gauge keeps its last average, the baseline
    # green is compared with at 100 % (a server that never served reads 0: the floor).
    latency["baseline_query"] = (
        f"clamp_min(max(avg_over_time(haproxy_server_response_time_average_seconds"
        f"{{{blue}}}[$window])), {LATENCY_FLOOR_S:g})")
    return [_success("haproxy", selector), latency]


def _ingress_nginx(router: Mapping[str, Any]) -> list[dict[str, Any]]:
    # The controller labels requests with the Ingress's namespace, which is the
    # router's (it may differ from the release's).
    selector = {"namespace": router.get("namespace", "default")}
    latency = _dump(BuiltinCheck.model_validate({
        "check": "latency-p99", "provider": "ingress-nginx", "selector": selector,
        "max_ratio_to_blue": LATENCY_RATIO, "blue_idle": {"max": P99_MAX_BLUE_IDLE},
        "failure_limit": 2}))
    latency["baseline_query"] = f"clamp_min({latency['baseline_query']}, {LATENCY_FLOOR_S:g})"
    return [_success("ingress-nginx", selector), latency]


def _dump(spec: BuiltinCheck) -> dict[str, Any]:
    return expand(spec).model_dump(exclude_none=True)


def default_checks(router: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The checks for a router section (raw), or None when its kind has no defaults."""
    kind = router.get("kind")
    if kind == "haproxy":
        return _haproxy(router)
    if kind == "ingress-nginx":
        return _ingress_nginx(router)
    return None


def with_defaults(data: Any) -> Any:
    """The raw configuration with the router's default checks when it names none.

    Anything malformed is left alone for validation to report."""
    if not isinstance(data, Mapping):
        return data
    canary = data.get("canary", {})
    router = data.get("router")
    if not isinstance(canary, Mapping) or "checks" in canary or "builtin" in canary:
        return data
    checks = default_checks(router) if isinstance(router, Mapping) else None
    # Always a canary section, so that its validator can refuse "no checks at all".
    return {**data, "canary": {**canary, **({"checks": checks} if checks else {})}}
