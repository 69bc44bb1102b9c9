"""``router``: which traffic router moves requests between blue and green."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from orchestrator.config._base import Duration, _Model


class HAProxyRouterConfig(_Model):
    kind: Literal["haproxy"]
    # The runtime API: a unix socket path, or host:port of a TCP stats socket.
    socket: str
    backend: str = "app"
    blue_server: str = "blue"
    green_server: str = "green"
    timeout: Duration = 5.0


class KubeTarget(_Model):
    kubeconfig: Path | None = None
    context: str | None = None
    namespace: str = "default"
    timeout: Duration = 10.0


class GatewayRouterConfig(KubeTarget):
    kind: Literal["gateway"]
    route: str
    # Index of the HTTPRoute rule carrying the blue/green backendRefs.
    rule: int = Field(default=0, ge=0)
    blue_service: str
    green_service: str


class IngressNginxRouterConfig(KubeTarget):
    kind: Literal["ingress-nginx"]
    # The canary Ingress (annotated nginx.ingress.kubernetes.io/canary: "true").
    canary_ingress: str


class ServiceRouterConfig(KubeTarget):
    kind: Literal["service"]
    service: str
    selector_key: str = "colour"
    blue_value: str = "blue"
    green_value: str = "green"


class FakeRouterConfig(_Model):
    """In-memory router, for plans and tests that do not need a real one."""

    kind: Literal["fake"]


RouterConfig = Annotated[
    HAProxyRouterConfig
    | GatewayRouterConfig
    | IngressNginxRouterConfig
    | ServiceRouterConfig
    | FakeRouterConfig,
    Field(discriminator="kind"),
]
