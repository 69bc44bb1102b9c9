"""The Kubernetes routers against a fake API server, over real HTTP, with the official client.

Every router is driven through a kubeconfig pointing at the fake, so these tests also
cover the client factory, the bearer token, the retry policy and the timeouts.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import Configuration
from kubernetes.config import incluster_config, kube_config

from orchestrator.config import (
    GatewayRouterConfig,
    IngressNginxRouterConfig,
    KubeTarget,
    ServiceRouterConfig,
)
from orchestrator.routers import TrafficRouter, build_router
from orchestrator.routers.base import RouterError, WeightDriftError, Weights
from orchestrator.routers.gateway import GatewayRouter
from orchestrator.routers.ingress_nginx import CANARY, CANARY_WEIGHT, IngressNginxRouter
from orchestrator.routers.kube import KubeError, KubeObjects, RetryPolicy, api_client
from orchestrator.routers.service import ServiceSelectorRouter
from orchestrator.routers.weighted import WeightedObjectRouter, pointer
from tests.conftest import KUBE_NAMESPACE
from tests.fakes.kube_api import JSON_PATCH, FakeKubeApi

JsonObject = dict[str, Any]
NS = KUBE_NAMESPACE
# Quick retries: the behaviour under test is "retried and bounded", not the waiting.
FAST = RetryPolicy(attempts=4, initial_wait=0.01, max_wait=0.05, jitter=0.01)


# --------------------------------------------------------------------------- objects

ROUTE: JsonObject = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {
        "name": "web",
        "namespace": NS,
        "labels": {"app": "web", "team": "payments"},
        "annotations": {"owner": "payments@example.com", "note": "hand-written, keep"},
    },
    "spec": {
        "parentRefs": [{"name": "public", "namespace": "gateways", "sectionName": "https"}],
        "hostnames": ["shop.example.com"],
        "rules": [
            {
                "matches": [
                    {"path": {"type": "PathPrefix", "value": "/"}},
                    {"headers": [{"name": "x-beta", "value": "1"}]},
                ],
                "filters": [
                    {
                        "type": "RequestHeaderModifier",
                        "requestHeaderModifier": {"add": [{"name": "x-via", "value": "gw"}]},
                    }
                ],
                "timeouts": {"request": "10s"},
                "backendRefs": [
                    {
                        "group": "",
                        "kind": "Service",
                        "name": "web-blue",
                        "port": 8080,
                        "weight": 100,
                        "filters": [
                            {
                                "type": "ResponseHeaderModifier",
                                "responseHeaderModifier": {
                                    "set": [{"name": "x-colour", "value": "blue"}]
                                },
                            }
                        ],
                    },
                    {"name": "web-green", "namespace": NS, "port": 8080, "weight": 0},
                    {"name": "web-shadow", "port": 9090, "weight": 0},
                ],
            },
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                "backendRefs": [
                    {"name": "api", "port": 80, "weight": 3},
                    {"name": "api-next", "port": 80, "weight": 1},
                ],
            },
        ],
    },
    "status": {
        "parents": [
            {
                "parentRef": {"name": "public", "namespace": "gateways"},
                "controllerName": "example.com/gateway",
                "conditions": [
                    {
                        "type": "Accepted",
                        "status": "True",
                        "reason": "Accepted",
                        "message": "",
                        "observedGeneration": 1,
                        "lastTransitionTime": "2025-01-01T00:00:00Z",
                    }
                ],
            }
        ]
    },
}

CANARY_INGRESS: JsonObject = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "Ingress",
    "metadata": {
        "name": "web-canary",
        "namespace": NS,
        "labels": {"app": "web", "colour": "green"},
        "annotations": {
            CANARY: "true",
            CANARY_WEIGHT: "0",
            "nginx.ingress.kubernetes.io/proxy-body-size": "8m",
            "owner": "payments@example.com",
        },
    },
    "spec": {
        "ingressClassName": "nginx",
        "tls": [{"hosts": ["shop.example.com"], "secretName": "shop-tls"}],
        "rules": [
            {
                "host": "shop.example.com",
                "http": {
                    "paths": [
                        {
                            "path": "/",
                            "pathType": "Prefix",
                            "backend": {"service": {"name": "web-green", "port": {"number": 8080}}},
                        }
                    ]
                },
            }
        ],
    },
}

SERVICE: JsonObject = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {
        "name": "web",
        "namespace": NS,
        "labels": {"app": "web"},
        "annotations": {"owner": "payments@example.com"},
    },
    "spec": {
        "type": "ClusterIP",
        "clusterIP": "10.96.0.10",
        "selector": {"app": "web", "colour": "blue"},
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
    },
}


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One router kind: its object, how to build it, where its weights live."""

    kind: str
    name: str
    seed: JsonObject
    build: Callable[[Path], WeightedObjectRouter]
    # The paths a weight change may touch (anything else must stay as written).
    weight_paths: frozenset[str]
    # Another writer sets green to this percentage, the way a person would.
    set_green: Callable[[JsonObject, int], None]
    stages: tuple[int, ...]


def _route_set_green(obj: JsonObject, pct: int) -> None:
    refs = obj["spec"]["rules"][0]["backendRefs"]
    refs[0]["weight"], refs[1]["weight"] = 100 - pct, pct


def _ingress_set_green(obj: JsonObject, pct: int) -> None:
    obj["metadata"]["annotations"][CANARY_WEIGHT] = str(pct)


def _service_set_green(obj: JsonObject, pct: int) -> None:
    obj["spec"]["selector"]["colour"] = "green" if pct == 100 else "blue"


def _target(kubeconfig: Path) -> dict[str, Any]:
    """Where every router under test points: the fake API server's namespace."""
    return {"kubeconfig": kubeconfig, "context": "fake", "namespace": NS, "timeout": 5}


def _gateway(kubeconfig: Path) -> GatewayRouter:
    cfg = GatewayRouterConfig(
        kind="gateway",
        **_target(kubeconfig),
        route="web",
        blue_service="web-blue",
        green_service="web-green",
    )
    return GatewayRouter(cfg, KubeObjects(cfg, retry=FAST))


def _ingress(kubeconfig: Path) -> IngressNginxRouter:
    cfg = IngressNginxRouterConfig(
        kind="ingress-nginx",
        **_target(kubeconfig),
        canary_ingress="web-canary",
    )
    return IngressNginxRouter(cfg, KubeObjects(cfg, retry=FAST))


def _service(kubeconfig: Path) -> ServiceSelectorRouter:
    cfg = ServiceRouterConfig(
        kind="service",
        **_target(kubeconfig),
        service="web",
    )
    return ServiceSelectorRouter(cfg, KubeObjects(cfg, retry=FAST))


CASES = {
    "gateway": Case(
        "HTTPRoute",
        "web",
        ROUTE,
        _gateway,
        frozenset(
            {
                pointer("spec", "rules", 0, "backendRefs", 0, "weight"),
                pointer("spec", "rules", 0, "backendRefs", 1, "weight"),
            }
        ),
        _route_set_green,
        (0, 5, 20, 100),
    ),
    "ingress-nginx": Case(
        "Ingress",
        "web-canary",
        CANARY_INGRESS,
        _ingress,
        frozenset({pointer("metadata", "annotations", CANARY_WEIGHT)}),
        _ingress_set_green,
        (0, 5, 20, 100),
    ),
    "service": Case(
        "Service",
        "web",
        SERVICE,
        _service,
        frozenset({pointer("spec", "selector", "colour")}),
        _service_set_green,
        (0, 100),
    ),
}


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[str(request.param)]


@pytest.fixture
def router(case: Case, kube: FakeKubeApi, kubeconfig: Path) -> WeightedObjectRouter:
    """The case's router, its object already in the API."""
    kube.put(case.seed)
    return case.build(kubeconfig)


def _without_weights(case: Case, obj: JsonObject) -> JsonObject:
    """The object minus what a weight change may legitimately alter."""
    out = copy.deepcopy(obj)
    del out["metadata"]["resourceVersion"]
    out["metadata"].pop("generation", None)
    for path in case.weight_paths:
        *parents, leaf = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
        node: Any = out
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node.pop(leaf, None)
    return out


def _reaches(router: WeightedObjectRouter, target: Weights, **kw: Any) -> None:
    """``set_weights`` answers with the target, and the object then reads as it."""
    assert router.set_weights(target, **kw) == target
    assert router.current() == target


def _patches(kube: FakeKubeApi) -> list[Any]:
    return [r for r in kube.requests if r.method == "PATCH"]


# --------------------------------------------------------------------------- every router


def test_routers_follow_the_protocol(case: Case, kube: FakeKubeApi, kubeconfig: Path) -> None:
    router = case.build(kubeconfig)
    assert isinstance(router, TrafficRouter)
    assert case.name in router.describe()
    # Building a router talks to nobody: credentials are loaded on first use.
    assert kube.requests == []


def test_reads_the_initial_weights(
    case: Case, kube: FakeKubeApi, router: WeightedObjectRouter
) -> None:
    router.check()
    assert router.current() == Weights(blue=100, green=0)
    seen = kube.requests
    assert all(r.authorization == "Bearer fake-token" for r in seen)
    # check() proved it may patch with a dry run, and changed nothing.
    dry = [r for r in seen if r.method == "PATCH"]
    assert len(dry) == 1 and dry[0].params == {"dryRun": "All"}
    assert len(kube.history(case.kind, NS, case.name)) == 1


def test_canary_stages_change_only_the_weights(
    case: Case, kube: FakeKubeApi, kubeconfig: Path
) -> None:
    original = kube.put(case.seed)
    router = case.build(kubeconfig)
    last = Weights(blue=100, green=0)
    versions = [original["metadata"]["resourceVersion"]]
    for pct in case.stages:
        target = Weights.green_at(pct)
        _reaches(router, target, expected=last)
        stored = kube.get(case.kind, NS, case.name)
        assert stored is not None
        assert _without_weights(case, stored) == _without_weights(case, original)
        versions.append(stored["metadata"]["resourceVersion"])
        last = target

    # 0 % was already live: no write. Every other stage: exactly one write.
    assert versions[1] == versions[0]
    assert len(set(versions)) == len(case.stages)
    patches = _patches(kube)
    assert len(patches) == len(case.stages) - 1
    assert not [r for r in kube.requests if r.method in ("PUT", "POST", "DELETE")]
    for request in patches:
        assert request.content_type == JSON_PATCH
        ops = request.body
        assert ops[0]["op"] == "test" and ops[0]["path"] == "/metadata/resourceVersion"
        changed = {op["path"] for op in ops if op["op"] != "test"}
        assert changed and changed <= case.weight_paths
        # Each changed value was tested against what we read first.
        tested = {op["path"] for op in ops if op["op"] == "test"}
        assert changed <= tested


def test_setting_the_live_weights_again_writes_nothing(
    case: Case, kube: FakeKubeApi, router: WeightedObjectRouter
) -> None:
    assert router.set_weights(Weights(blue=100, green=0)) == Weights(blue=100, green=0)
    assert _patches(kube) == []


def test_a_concurrent_write_is_retried_and_kept(
    case: Case, kube: FakeKubeApi, router: WeightedObjectRouter
) -> None:

    def someone_else(obj: JsonObject) -> None:
        obj["metadata"]["labels"]["touched-by"] = "other-controller"

    kube.on_next_patch(case.kind, NS, case.name, someone_else)
    target = Weights.green_at(case.stages[1])
    assert router.set_weights(target, expected=Weights(blue=100, green=0)) == target

    stored = kube.get(case.kind, NS, case.name)
    assert stored is not None
    assert stored["metadata"]["labels"]["touched-by"] == "other-controller"
    assert router.current() == target
    # The first patch carried a stale resourceVersion test and was refused (422);
    # the router re-read, re-checked drift, and the second one landed.
    assert len(_patches(kube)) == 2


def test_injected_conflicts_are_retried(
    case: Case, kube: FakeKubeApi, router: WeightedObjectRouter
) -> None:
    kube.fail_next(2, 409, method="PATCH")
    _reaches(router, Weights.green_at(case.stages[-1]), expected=Weights(blue=100, green=0))
    assert len(_patches(kube)) == 3


def test_endless_conflicts_give_up_with_a_router_error(
    case: Case, kube: FakeKubeApi, router: WeightedObjectRouter
) -> None:
    kube.fail_next(100, 409, method="PATCH")
    with pytest.raises(RouterError, match="kept changing"):
        router.set_weights(Weights.green_at(case.stages[-1]))
    assert len(_patches(kube)) == router.conflict_attempts
    assert len(kube.history(case.kind, NS, case.name)) == 1


def test_unavailable_api_is_retried(
    case: Case, kube: FakeKubeApi, router: WeightedObjectRouter
) -> None:
    kube.fail_next(2, 503, method="GET")
    assert router.current() == Weights(blue=100, green=0)
    kube.fail_next(1, 503, method="PATCH")
    kube.fail_next(1, 429, method="PATCH", headers={"Retry-After": "0"})
    _reaches(router, Weights.green_at(case.stages[-1]))


def test_a_persistent_outage_is_a_router_error(
    case: Case, kube: FakeKubeApi, router: WeightedObjectRouter
) -> None:
    kube.fail_next(50, 503)
    with pytest.raises(RouterError, match="503"):
        router.current()
    assert len(kube.requests) == FAST.attempts


def test_a_slow_api_times_out_and_is_retried(
    case: Case, kube: FakeKubeApi, router: WeightedObjectRouter
) -> None:
    router.objects.target = router.objects.target.model_copy(update={"timeout": 0.3})
    kube.delay_next(1, 2.0, method="GET")
    started = time.monotonic()
    assert router.current() == Weights(blue=100, green=0)
    assert time.monotonic() - started < 1.5


def test_a_write_whose_answer_was_lost_is_not_applied_twice(
    case: Case, kube: FakeKubeApi, router: WeightedObjectRouter
) -> None:
    router.objects.target = router.objects.target.model_copy(update={"timeout": 0.3})
    kube.delay_next(1, 1.0, method="PATCH", after_write=True)
    target = Weights.green_at(case.stages[-1])
    # The resend fails its resourceVersion test (422), the router re-reads and finds
    # the target already live: success, with exactly one write.
    assert router.set_weights(target, expected=Weights.green_at(0)) == target
    assert len(kube.history(case.kind, NS, case.name)) == 2
    assert len(_patches(kube)) == 2


def test_a_missing_object_is_a_clear_router_error(
    case: Case, kube: FakeKubeApi, kubeconfig: Path
) -> None:
    router = case.build(kubeconfig)
    with pytest.raises(RouterError, match=f"{case.kind} {NS}/{case.name} not found") as exc:
        router.check()
    assert exc.value.hint and "namespace" in exc.value.hint
    with pytest.raises(RouterError, match="not found"):
        router.current()
    with pytest.raises(RouterError, match="not found"):
        router.set_weights(Weights.green_at(100))


def test_drift_is_reported_and_nothing_changes(
    case: Case, kube: FakeKubeApi, router: WeightedObjectRouter
) -> None:
    # Someone moves traffic by hand after orchestrate last set 0 %.
    by_hand = kube.edit(case.kind, NS, case.name, lambda o: case.set_green(o, case.stages[-1]))
    # A target other than the drifted value (a Service has only two values).
    target = case.stages[1] if case.stages[1] != case.stages[-1] else 0
    with pytest.raises(WeightDriftError) as exc:
        router.set_weights(Weights.green_at(target), expected=Weights.green_at(0))
    assert exc.value.actual == Weights.green_at(case.stages[-1])
    assert exc.value.expected == Weights.green_at(0)
    assert kube.get(case.kind, NS, case.name) == by_hand
    assert _patches(kube) == []


@pytest.mark.parametrize("kind", ["gateway", "ingress-nginx"])
def test_drift_during_our_write_is_reported(kind: str, kube: FakeKubeApi, kubeconfig: Path) -> None:
    # (A selector has no value between the colours: see the Service test below.)
    case = CASES[kind]
    kube.put(case.seed)
    router = case.build(kubeconfig)
    # Between our read and our write, someone moves traffic to 50 %.
    kube.on_next_patch(case.kind, NS, case.name, lambda o: case.set_green(o, 50))
    with pytest.raises(WeightDriftError) as exc:
        router.set_weights(Weights.green_at(5), expected=Weights.green_at(0))
    assert exc.value.actual == Weights.green_at(50)
    assert router.current() == Weights.green_at(50)
    assert len(_patches(kube)) == 1


def test_service_race_to_the_same_colour_is_not_a_drift(
    kube: FakeKubeApi, kubeconfig: Path
) -> None:
    kube.put(SERVICE)
    router = _service(kubeconfig)
    # The other writer switched to green too: the goal is reached, nothing to fight.
    kube.on_next_patch("Service", NS, "web", lambda o: _service_set_green(o, 100))
    assert router.set_weights(Weights.green_at(100), expected=Weights.green_at(0)) == (
        Weights.green_at(100)
    )
    assert len(_patches(kube)) == 1


def test_forbidden_patch_fails_the_preflight(
    case: Case, kube: FakeKubeApi, router: WeightedObjectRouter
) -> None:
    message = f'{case.kind.lower()}s is forbidden: User "system:serviceaccount:shop:x" cannot patch'
    kube.fail_next(
        1,
        403,
        method="PATCH",
        body={
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "Forbidden",
            "details": {"name": case.name},
            "code": 403,
        },
    )
    with pytest.raises(RouterError, match="not allowed") as exc:
        router.check()
    assert exc.value.hint and "patch" in exc.value.hint


# --------------------------------------------------------------------------- per router


def test_gateway_refuses_to_invent_a_missing_green_backend(
    kube: FakeKubeApi, kubeconfig: Path
) -> None:
    route = copy.deepcopy(ROUTE)
    del route["spec"]["rules"][0]["backendRefs"][1]
    kube.put(route)
    router = _gateway(kubeconfig)
    with pytest.raises(RouterError, match="no backendRef named 'web-green'") as exc:
        router.check()
    assert exc.value.hint and "add both backendRefs" in exc.value.hint
    with pytest.raises(RouterError):
        router.set_weights(Weights.green_at(5))
    assert _patches(kube) == []


def test_gateway_refuses_a_rule_that_feeds_other_backends(
    kube: FakeKubeApi, kubeconfig: Path
) -> None:
    route = copy.deepcopy(ROUTE)
    route["spec"]["rules"][0]["backendRefs"][2]["weight"] = 10
    kube.put(route)
    with pytest.raises(RouterError, match="also sends traffic to 'web-shadow'"):
        _gateway(kubeconfig).current()


def test_gateway_rule_out_of_range(kube: FakeKubeApi, kubeconfig: Path) -> None:
    kube.put(ROUTE)
    router = _gateway(kubeconfig)
    router.cfg = router.cfg.model_copy(update={"rule": 5})
    with pytest.raises(RouterError, match="has 2 rule"):
        router.current()


def test_gateway_default_weights_are_read_and_written(kube: FakeKubeApi, kubeconfig: Path) -> None:
    route = copy.deepcopy(ROUTE)
    for ref in route["spec"]["rules"][0]["backendRefs"][:2]:
        del ref["weight"]  # the Gateway API default weight is 1
    kube.put(route)
    router = _gateway(kubeconfig)
    assert router.current() == Weights(blue=50, green=50)
    assert router.set_weights(Weights.green_at(20)) == Weights.green_at(20)
    stored = kube.get("HTTPRoute", NS, "web")
    assert stored is not None
    refs = stored["spec"]["rules"][0]["backendRefs"]
    assert [r.get("weight") for r in refs] == [80, 20, 0]
    ops = _patches(kube)[-1].body
    assert {op["op"] for op in ops if op["path"].endswith("/weight")} == {"add"}


def test_gateway_api_missing_from_the_cluster(kube: FakeKubeApi, kubeconfig: Path) -> None:
    kube.unserve("HTTPRoute")
    with pytest.raises(RouterError, match="does not serve httproutes") as exc:
        _gateway(kubeconfig).check()
    assert exc.value.hint and "Gateway API CRDs" in exc.value.hint


def test_ingress_must_be_a_canary(kube: FakeKubeApi, kubeconfig: Path) -> None:
    ingress = copy.deepcopy(CANARY_INGRESS)
    del ingress["metadata"]["annotations"][CANARY]
    kube.put(ingress)
    with pytest.raises(RouterError, match="not a canary Ingress") as exc:
        _ingress(kubeconfig).check()
    assert exc.value.hint and '"true"' in exc.value.hint


def test_ingress_weight_missing_means_zero_and_total_scales(
    kube: FakeKubeApi, kubeconfig: Path
) -> None:
    ingress = copy.deepcopy(CANARY_INGRESS)
    annotations = ingress["metadata"]["annotations"]
    del annotations[CANARY_WEIGHT]
    annotations["nginx.ingress.kubernetes.io/canary-weight-total"] = "1000"
    kube.put(ingress)
    router = _ingress(kubeconfig)
    assert router.current() == Weights.green_at(0)
    assert router.set_weights(Weights.green_at(5)) == Weights.green_at(5)
    stored = kube.get("Ingress", NS, "web-canary")
    assert stored is not None
    assert stored["metadata"]["annotations"][CANARY_WEIGHT] == "50"


def test_service_router_refuses_a_partial_split(kube: FakeKubeApi, kubeconfig: Path) -> None:
    kube.put(SERVICE)
    router = _service(kubeconfig)
    with pytest.raises(RouterError, match="only green 0 % or 100 %") as exc:
        router.set_weights(Weights.green_at(5))
    assert exc.value.hint and "stages" in exc.value.hint
    assert kube.requests == []


def test_service_router_switches_back_for_a_rollback(kube: FakeKubeApi, kubeconfig: Path) -> None:
    kube.put(SERVICE)
    router = _service(kubeconfig)
    assert router.set_weights(Weights.green_at(100)) == Weights.green_at(100)
    assert router.set_weights(Weights.green_at(0), expected=Weights.green_at(100)) == Weights(
        blue=100, green=0
    )
    stored = kube.get("Service", NS, "web")
    assert stored is not None
    assert stored["spec"]["selector"] == {"app": "web", "colour": "blue"}


def test_service_with_an_unknown_colour(kube: FakeKubeApi, kubeconfig: Path) -> None:
    service = copy.deepcopy(SERVICE)
    service["spec"]["selector"]["colour"] = "purple"
    kube.put(service)
    with pytest.raises(RouterError, match="neither blue"):
        _service(kubeconfig).current()


def test_build_router_makes_the_kubernetes_routers(tmp_path: Path) -> None:
    absent = tmp_path / "absent"
    gateway = build_router(
        GatewayRouterConfig(
            kind="gateway",
            kubeconfig=absent,
            route="web",
            blue_service="b",
            green_service="g",
        )
    )
    ingress = build_router(
        IngressNginxRouterConfig(kind="ingress-nginx", kubeconfig=absent, canary_ingress="c")
    )
    service = build_router(ServiceRouterConfig(kind="service", kubeconfig=absent, service="w"))
    assert isinstance(gateway, GatewayRouter)
    assert isinstance(ingress, IngressNginxRouter)
    assert isinstance(service, ServiceSelectorRouter)
    # The kubeconfig is only read on first use, and a bad one is a RouterError there.
    with pytest.raises(RouterError, match="cannot load Kubernetes credentials"):
        gateway.check()


# --------------------------------------------------------------------------- client factory


def test_api_client_uses_its_own_configuration(kube: FakeKubeApi, kubeconfig: Path) -> None:
    before = Configuration.get_default_copy().host
    client = api_client(KubeTarget(kubeconfig=kubeconfig, context="fake"))
    assert client.configuration.host == kube.url
    assert client.configuration is not Configuration.get_default()
    assert Configuration.get_default_copy().host == before


def test_api_client_unknown_context(kubeconfig: Path) -> None:
    with pytest.raises(KubeError, match="context 'elsewhere'"):
        api_client(KubeTarget(kubeconfig=kubeconfig, context="elsewhere"))


def test_api_client_in_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("in-cluster-token")
    ca.write_text("not really a certificate")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    cfg = api_client(KubeTarget()).configuration
    assert cfg.host == "https://10.96.0.1:443"
    assert cfg.api_key["BearerToken"] == "bearer in-cluster-token"


def test_api_client_falls_back_to_the_default_kubeconfig(
    kube: FakeKubeApi, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    assert api_client(KubeTarget()).configuration.host == kube.url


# --------------------------------------------------------------------------- the fake itself


def test_fake_answers_like_the_api_server(kube: FakeKubeApi, kubeconfig: Path) -> None:
    """The behaviours the routers rely on, checked against the fake directly."""
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    api = CustomObjectsApi(api_client(KubeTarget(kubeconfig=kubeconfig, context="fake")))
    group, version, plural = "gateway.networking.k8s.io", "v1", "httproutes"
    stored = kube.put(ROUTE)

    def patch(body: Any, **kw: Any) -> Any:
        return api.patch_namespaced_custom_object(group, version, NS, plural, "web", body, **kw)
    rv = stored["metadata"]["resourceVersion"]

    with pytest.raises(ApiException) as missing:
        api.get_namespaced_custom_object(group, version, NS, plural, "nope")
    assert missing.value.status == 404
    assert '"reason":"NotFound"' in str(missing.value.body).replace(" ", "")

    # A stale resourceVersion in a merge patch: 409 Conflict, nothing stored.
    kube.edit("HTTPRoute", NS, "web", lambda o: o["metadata"]["labels"].update(x="1"))
    with pytest.raises(ApiException) as conflict:
        patch({"metadata": {"resourceVersion": rv}})
    assert conflict.value.status == 409
    assert "the object has been modified" in str(conflict.value.body)

    # A failed JSON Patch test: 422 Invalid with empty details.
    with pytest.raises(ApiException) as invalid:
        patch([{"op": "test", "path": "/metadata/resourceVersion", "value": rv}],
              _content_type=JSON_PATCH)
    assert invalid.value.status == 422
    assert '"details":{}' in str(invalid.value.body).replace(" ", "")

    # A spec change bumps resourceVersion and generation; a no-op bumps nothing.
    current = kube.get("HTTPRoute", NS, "web")
    assert current is not None
    changed = patch({"spec": {"hostnames": ["a.example.com"]}})
    assert int(changed["metadata"]["resourceVersion"]) > int(current["metadata"]["resourceVersion"])
    assert changed["metadata"]["generation"] == current["metadata"]["generation"] + 1
    same = patch({"spec": {"hostnames": ["a.example.com"]}})
    assert same["metadata"]["resourceVersion"] == changed["metadata"]["resourceVersion"]

    # A dry run answers with the result and stores nothing.
    dry = patch({"spec": {"hostnames": ["b.example.com"]}}, dry_run="All")
    assert dry["spec"]["hostnames"] == ["b.example.com"]
    after = kube.get("HTTPRoute", NS, "web")
    assert after is not None and after["spec"]["hostnames"] == ["a.example.com"]

    # Strategic merge patch is not served for custom resources.
    with pytest.raises(ApiException) as unsupported:
        patch({"spec": {}}, _content_type="application/strategic-merge-patch+json")
    assert unsupported.value.status == 415
