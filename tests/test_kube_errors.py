"""Kubernetes API failures: one class per meaning, mapped from the answer in one place,
and the retry decision carried by the class (against the fake API server, over HTTP)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException
from structlog.testing import capture_logs

from orchestrator.retry import TransientError
from orchestrator.routers.base import RouterError, Weights
from orchestrator.routers.gateway import GatewayRouter
from orchestrator.routers.kube import (
    HTTPROUTES,
    KubeApiError,
    KubeConflict,
    KubeError,
    KubeForbidden,
    KubeInvalid,
    KubeNotFound,
    KubeServerError,
    KubeTooManyRequests,
    KubeUnauthorized,
    KubeUnreachable,
    kube_error,
)
from tests.fakes.kube_api import FakeKubeApi, status_body
from tests.test_kube_routers import FAST, NS, ROUTE, _gateway

WHAT = "patch httproutes.gateway.networking.k8s.io shop/web"


def _answer(status: int, details: dict[str, Any] | None = None,
            headers: dict[str, str] | None = None) -> ApiException:
    exc = ApiException(status=status, reason="Reason")
    exc.body = json.dumps(status_body(status, f"Reason{status}", "what the server said", details))
    exc.headers = headers
    return exc


@pytest.mark.parametrize(
    ("status", "details", "cls", "transient"),
    [
        (401, None, KubeUnauthorized, False),
        (403, {"name": "web"}, KubeForbidden, False),
        (404, {"name": "web"}, KubeNotFound, False),
        (409, {"name": "web"}, KubeConflict, False),
        # A failed JSON Patch ``test``: 422 with empty details means "changed under us".
        (422, None, KubeConflict, False),
        (422, {"name": "web", "causes": [{"field": "spec"}]}, KubeInvalid, False),
        (429, None, KubeTooManyRequests, True),
        (500, None, KubeServerError, True),
        (503, None, KubeServerError, True),
        (418, None, KubeApiError, False),
    ],
)
def test_each_status_maps_to_one_class(
    status: int, details: dict[str, Any] | None, cls: type[KubeApiError], transient: bool
) -> None:
    err = kube_error(_answer(status, details), WHAT, "the fake")
    assert type(err) is cls
    assert isinstance(err, TransientError) is transient
    assert isinstance(err, KubeApiError) and err.status == status
    assert err.message == f"{WHAT}: HTTP {status} Reason{status}: what the server said"


def test_spent_retries_are_named_only_for_transient_classes() -> None:
    assert kube_error(_answer(503), WHAT, "x", attempts=4).message.endswith("(after 4 attempts)")
    assert "attempts" not in kube_error(_answer(403), WHAT, "x", attempts=4).message


def test_retry_after_is_carried_by_the_429_class() -> None:
    err = kube_error(_answer(429, headers={"Retry-After": "3"}), WHAT, "x")
    assert isinstance(err, KubeTooManyRequests) and err.retry_after == 3.0


def test_transport_failures_are_transient_unless_a_certificate_is_wrong() -> None:
    refused = kube_error(ConnectionRefusedError("refused"), WHAT, "https://k8s")
    assert isinstance(refused, KubeUnreachable) and isinstance(refused, TransientError)
    assert refused.message == f"cannot reach https://k8s ({WHAT}): refused"
    bad_cert = urllib3.exceptions.MaxRetryError(
        None, "/", urllib3.exceptions.SSLError("certificate verify failed"))  # type: ignore[arg-type]
    err = kube_error(bad_cert, WHAT, "https://k8s")
    assert type(err) is KubeError and not isinstance(err, TransientError)


def _patches(kube: FakeKubeApi) -> int:
    return sum(1 for r in kube.requests if r.method == "PATCH")


def _refused_once(kube: FakeKubeApi, kubeconfig: Path, status: int,
                  cls: type[KubeApiError]) -> GatewayRouter:
    """A router whose first patch the API refuses with ``status``: the transport
    raises ``cls`` (not transient) after that one request, and sends no other."""
    kube.put(ROUTE)
    router = _gateway(kubeconfig)
    kube.fail_next(1, status, method="PATCH")
    with pytest.raises(cls) as raised:
        router.objects.json_patch(HTTPROUTES, "web", [])
    assert raised.value.status == status and not isinstance(raised.value, TransientError)
    assert _patches(kube) == 1
    return router


def test_a_conflict_is_not_resent_by_the_transport_but_retried_by_the_router(
    kube: FakeKubeApi, kubeconfig: Path
) -> None:
    router = _refused_once(kube, kubeconfig, 409, KubeConflict)
    # The router re-reads and rebuilds its patch: the conflict is retried there.
    kube.fail_next(1, 409, method="PATCH")
    assert router.set_weights(Weights(blue=0, green=100)) == Weights(blue=0, green=100)
    assert _patches(kube) == 1 + 2


def test_a_forbidden_answer_is_not_retried(kube: FakeKubeApi, kubeconfig: Path) -> None:
    router = _refused_once(kube, kubeconfig, 403, KubeForbidden)
    kube.fail_next(5, 403, method="PATCH")
    with pytest.raises(RouterError, match="not allowed"):
        router.set_weights(Weights(blue=0, green=100))
    assert _patches(kube) == 2
    assert len(kube.history("HTTPRoute", NS, "web")) == 1


def test_a_transient_answer_is_retried_and_logged_before_each_sleep(
    kube: FakeKubeApi, kubeconfig: Path
) -> None:
    kube.put(ROUTE)
    router = _gateway(kubeconfig)
    kube.fail_next(2, 503, method="GET")
    with capture_logs() as logs:
        router.current()
    retries = [e for e in logs if e["event"] == "call failed, retrying"]
    assert [(e["policy"], e["attempt"], e["of"]) for e in retries] == [
        ("kubernetes", 1, FAST.attempts), ("kubernetes", 2, FAST.attempts)]
    assert "HTTP 503" in retries[0]["error"]
