"""Service selector router: plain blue-green by switching one Service's selector.

``spec.selector[selector_key]`` is ``blue_value`` (all traffic to blue) or
``green_value`` (all traffic to green). A selector cannot split traffic, so only 0 %
and 100 % green exist: a release using this router needs canary stages 0 and 100.
Other selector keys, ports and everything else in the Service stay untouched.
"""

from __future__ import annotations

from typing import ClassVar

from orchestrator.config import ServiceRouterConfig
from orchestrator.routers.base import RouterError, Weights
from orchestrator.routers.kube import SERVICES, JsonObject, PatchOp, Resource
from orchestrator.routers.weighted import WeightedObjectRouter, pointer, set_op

ALL_BLUE = Weights(blue=100, green=0)
ALL_GREEN = Weights(blue=0, green=100)


class ServiceSelectorRouter(WeightedObjectRouter[ServiceRouterConfig]):
    resource: ClassVar[Resource] = SERVICES
    name_field = "service"
    description = (
        "Service {c.namespace}/{c.service} selector {c.selector_key}="
        "{c.blue_value}|{c.green_value}"
    )

    def _selector(self, obj: JsonObject) -> dict[str, str]:
        selector = obj.get("spec", {}).get("selector")
        if not isinstance(selector, dict) or not selector:
            raise RouterError(
                f"{self.where} has no spec.selector (an ExternalName or headless Service "
                "without selector cannot be switched)",
            )
        return selector

    def decode(self, obj: JsonObject) -> Weights:
        c = self.cfg
        value = self._selector(obj).get(c.selector_key)
        if value == c.blue_value:
            return ALL_BLUE
        if value == c.green_value:
            return ALL_GREEN
        raise RouterError(
            f"{self.where} selects {c.selector_key}={value!r}, which is neither blue "
            f"({c.blue_value!r}) nor green ({c.green_value!r})",
            hint="fix router.selector_key / blue_value / green_value, or the Service",
        )

    def validate_target(self, target: Weights) -> None:
        super().validate_target(target)
        if target not in (ALL_BLUE, ALL_GREEN):
            raise RouterError(
                f"the service router cannot send {target}: a Service selector points "
                "all traffic at one colour, so only green 0 % or 100 % exist",
                hint="use canary stages with weights 0 and 100 with router kind "
                "'service', or the gateway router for a gradual canary",
            )

    def weight_ops(self, obj: JsonObject, target: Weights) -> list[PatchOp]:
        c = self.cfg
        selector = self._selector(obj)
        new = c.green_value if target == ALL_GREEN else c.blue_value
        return set_op(
            pointer("spec", "selector", c.selector_key),
            selector.get(c.selector_key),
            new,
            present=c.selector_key in selector,
        )
