"""Traffic routers: HAProxy, Gateway API HTTPRoute, ingress-nginx canary, Service selector."""

from __future__ import annotations

from orchestrator.config import RouterConfig
from orchestrator.routers.base import RouterError, TrafficRouter, WeightDriftError, Weights

__all__ = ["RouterError", "TrafficRouter", "WeightDriftError", "Weights", "build_router"]


def build_router(cfg: RouterConfig) -> TrafficRouter:
    # Imports are local so that a host without the kubernetes client configured can
    # still use HAProxy, and the other way round.
    if cfg.kind == "haproxy":
        from orchestrator.routers.haproxy import HAProxyRouter

        return HAProxyRouter(cfg)
    if cfg.kind == "gateway":
        from orchestrator.routers.gateway import GatewayRouter

        return GatewayRouter(cfg)
    if cfg.kind == "ingress-nginx":
        from orchestrator.routers.ingress_nginx import IngressNginxRouter

        return IngressNginxRouter(cfg)
    if cfg.kind == "service":
        from orchestrator.routers.service import ServiceSelectorRouter

        return ServiceSelectorRouter(cfg)
    from orchestrator.routers.fake import FakeRouter

    return FakeRouter()
