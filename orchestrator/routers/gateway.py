"""Gateway API router: weighted backendRefs of one HTTPRoute rule (the primary way).

The route (gateway.networking.k8s.io/v1) is the user's: orchestrate changes the
``weight`` of two backendRefs in rule ``cfg.rule`` and nothing else. Matches, filters,
other rules, other backendRefs and every other field stay exactly as written.

Both backendRefs must already exist. When the green one is missing, orchestrate
refuses instead of adding it: a backendRef carries more than a name (port, namespace,
kind, filters), and guessing those would invent routing the user never wrote or
reviewed. Adding ``{name: <green>, port: ..., weight: 0}`` to the rule costs the user
one line and sends no traffic until the canary starts.

Gateway API weights are relative (a missing weight means 1). orchestrate writes
``100 - p`` and ``p`` so the numbers read as percentages, and reads any pair as
``round(100 * green / (blue + green))``. Other backendRefs in the same rule must have
weight 0, otherwise "5 % to green" would be false.
"""

from __future__ import annotations

from typing import Any, ClassVar

from orchestrator.config import GatewayRouterConfig
from orchestrator.routers.base import RouterError, Weights
from orchestrator.routers.kube import HTTPROUTES, JsonObject, PatchOp, Resource
from orchestrator.routers.weighted import WeightedObjectRouter, pointer, set_op

# Gateway API: "If unspecified, weight defaults to 1."
DEFAULT_WEIGHT = 1


class GatewayRouter(WeightedObjectRouter[GatewayRouterConfig]):
    resource: ClassVar[Resource] = HTTPROUTES
    name_field = "route"
    description = (
        "gateway HTTPRoute {c.namespace}/{c.route} rule {c.rule} "
        "({c.blue_service} -> {c.green_service})"
    )

    def _missing_api_hint(self) -> str:
        return (
            "install the Gateway API CRDs (standard channel, v1 HTTPRoute) and a "
            "Gateway controller, or choose another router kind"
        )

    def _refs(self, obj: JsonObject) -> tuple[list[Any], int, int]:
        """The rule's backendRefs and the indexes of blue's and green's."""
        c = self.cfg
        rules = obj.get("spec", {}).get("rules")
        if not isinstance(rules, list) or not rules:
            raise RouterError(f"{self.where} has no spec.rules")
        if c.rule >= len(rules):
            raise RouterError(
                f"{self.where} has {len(rules)} rule(s); router.rule is {c.rule}",
                hint="router.rule counts from 0 in the order of spec.rules",
            )
        refs = rules[c.rule].get("backendRefs")
        if not isinstance(refs, list):
            refs = []
        blue = self._index(refs, c.blue_service)
        green = self._index(refs, c.green_service)
        if blue is None or green is None:
            missing = c.blue_service if blue is None else c.green_service
            raise RouterError(
                f"{self.where} rule {c.rule} has no backendRef named {missing!r}",
                hint=f"add both backendRefs to rule {c.rule}, e.g. "
                f"{{name: {c.blue_service}, port: 80, weight: 100}} and "
                f"{{name: {c.green_service}, port: 80, weight: 0}}; orchestrate changes "
                "weights only and never adds backends itself",
            )
        for i, ref in enumerate(refs):
            if i not in (blue, green) and _weight(ref) != 0:
                raise RouterError(
                    f"{self.where} rule {c.rule} also sends traffic to "
                    f"{ref.get('name')!r} (weight {_weight(ref)}), so blue/green "
                    "percentages would be wrong",
                    hint="give other backendRefs in this rule weight 0, or move them to "
                    "another rule",
                )
        return refs, blue, green

    def _index(self, refs: list[Any], name: str) -> int | None:
        found = [i for i, r in enumerate(refs) if isinstance(r, dict) and r.get("name") == name]
        if len(found) > 1:
            raise RouterError(
                f"{self.where} rule {self.cfg.rule} has {len(found)} backendRefs named "
                f"{name!r}; orchestrate cannot tell which one to weigh",
            )
        return found[0] if found else None

    def decode(self, obj: JsonObject) -> Weights:
        refs, blue, green = self._refs(obj)
        wb, wg = _weight(refs[blue]), _weight(refs[green])
        if wb + wg == 0:
            raise RouterError(
                f"{self.where}: both {self.cfg.blue_service} and {self.cfg.green_service} "
                "have weight 0, so the rule serves only errors",
                hint="set the blue backendRef's weight to 100 (or run orchestrate rollback)",
            )
        green_pct = round(100 * wg / (wb + wg))
        return Weights(blue=100 - green_pct, green=green_pct)

    def weight_ops(self, obj: JsonObject, target: Weights) -> list[PatchOp]:
        refs, blue, green = self._refs(obj)
        ops: list[PatchOp] = []
        for index, name, value in (
            (blue, self.cfg.blue_service, target.blue),
            (green, self.cfg.green_service, target.green),
        ):
            base = ("spec", "rules", self.cfg.rule, "backendRefs", index)
            # The indexes came from our read; make the server confirm they still name
            # the same backends before the weights at those indexes change.
            ops.append({"op": "test", "path": pointer(*base, "name"), "value": name})
            ref = refs[index]
            ops += set_op(
                pointer(*base, "weight"), ref.get("weight"), value, present="weight" in ref
            )
        return ops


def _weight(ref: Any) -> int:
    if not isinstance(ref, dict):
        return 0
    value = ref.get("weight", DEFAULT_WEIGHT)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        # The API server's schema forbids this, so something else is badly wrong.
        raise RouterError(
            f"HTTPRoute backendRef {ref.get('name')!r} has an invalid weight {value!r}"
        )
    return value
