"""ingress-nginx router: the canary-weight annotation of a canary Ingress.

ingress-nginx is retired upstream (the Kubernetes project stopped maintaining it);
this router is kept for existing users. The Gateway API router is the primary one,
and new setups should use it.

The canary Ingress is the user's second Ingress for the same host and path, pointing
at green and annotated ``nginx.ingress.kubernetes.io/canary: "true"``. orchestrate
changes only ``nginx.ingress.kubernetes.io/canary-weight`` ("<percent>" of requests
to green, canary = green) and never touches the main Ingress. When
``canary-weight-total`` is set, the weight is scaled to it. Header and cookie canary
rules, if present, still take precedence for the requests they match, as in nginx.
"""

from __future__ import annotations

from typing import ClassVar

from orchestrator.config import IngressNginxRouterConfig
from orchestrator.routers.base import RouterError, Weights
from orchestrator.routers.kube import INGRESSES, JsonObject, PatchOp, Resource
from orchestrator.routers.weighted import WeightedObjectRouter, pointer, set_op

PREFIX = "nginx.ingress.kubernetes.io/"
CANARY = PREFIX + "canary"
CANARY_WEIGHT = PREFIX + "canary-weight"
CANARY_WEIGHT_TOTAL = PREFIX + "canary-weight-total"


class IngressNginxRouter(WeightedObjectRouter[IngressNginxRouterConfig]):
    resource: ClassVar[Resource] = INGRESSES
    name_field = "canary_ingress"
    description = "ingress-nginx canary Ingress {c.namespace}/{c.canary_ingress}"

    def _annotations(self, obj: JsonObject) -> dict[str, str]:
        annotations = obj.get("metadata", {}).get("annotations") or {}
        if annotations.get(CANARY) != "true":
            raise RouterError(
                f"{self.where} is not a canary Ingress (annotation {CANARY} is "
                f"{annotations.get(CANARY)!r})",
                hint=f'annotate it {CANARY}: "true"; it must be the Ingress pointing at '
                "green, next to the main Ingress pointing at blue",
            )
        return dict(annotations)

    def _total(self, annotations: dict[str, str]) -> int:
        raw = annotations.get(CANARY_WEIGHT_TOTAL, "100")
        total = _parse_int(raw)
        if total is None or total <= 0:
            raise RouterError(
                f"{self.where}: {CANARY_WEIGHT_TOTAL} is {raw!r}, not a positive integer"
            )
        return total

    def decode(self, obj: JsonObject) -> Weights:
        annotations = self._annotations(obj)
        total = self._total(annotations)
        # ingress-nginx's default canary weight is 0: no annotation, no canary traffic.
        raw = annotations.get(CANARY_WEIGHT, "0")
        weight = _parse_int(raw)
        if weight is None or not 0 <= weight <= total:
            raise RouterError(
                f"{self.where}: {CANARY_WEIGHT} is {raw!r}, not an integer in 0..{total}"
            )
        green = round(100 * weight / total)
        return Weights(blue=100 - green, green=green)

    def weight_ops(self, obj: JsonObject, target: Weights) -> list[PatchOp]:
        annotations = self._annotations(obj)
        total = self._total(annotations)
        value = str(round(target.green * total / 100))
        # The canary flag itself is tested so that a concurrent "un-canary" of the
        # Ingress cannot be overwritten by a weight change.
        ops: list[PatchOp] = [
            {"op": "test", "path": pointer("metadata", "annotations", CANARY), "value": "true"}
        ]
        ops += set_op(
            pointer("metadata", "annotations", CANARY_WEIGHT),
            annotations.get(CANARY_WEIGHT),
            value,
            present=CANARY_WEIGHT in annotations,
        )
        return ops


def _parse_int(raw: object) -> int | None:
    if not isinstance(raw, str) or not raw.strip().isdigit():
        return None
    return int(raw)
