"""The read / check drift / patch / re-read loop shared by the HTTPRoute, ingress-nginx
and Service routers, and the JSON Patch pieces it is built from.

A subclass of ``WeightedObjectRouter`` says where the weights live in its object; the
base class guarantees that only those paths change.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, TypeVar

import structlog

from orchestrator.config import KubeTarget
from orchestrator.routers.base import RouterError, WeightDriftError, Weights
from orchestrator.routers.kube import (
    JsonObject,
    KubeApiError,
    KubeConflict,
    KubeError,
    KubeForbidden,
    KubeNotFound,
    KubeObjects,
    KubeUnauthorized,
    PatchOp,
    Resource,
)

log = structlog.get_logger(__name__)

TargetT = TypeVar("TargetT", bound=KubeTarget)


# --------------------------------------------------------------------------- JSON Pointer


def pointer(*parts: str | int) -> str:
    """An RFC 6901 JSON Pointer; '~' and '/' inside a key must be escaped."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def set_op(path: str, current: Any, new: Any, *, present: bool) -> list[PatchOp]:
    """Ops that change one scalar only if it still holds the value we read.

    A missing member cannot be tested, so it is set with ``add``; the resourceVersion
    test that leads every patch already guarantees nothing changed since the read.
    """
    if not present:
        return [{"op": "add", "path": path, "value": new}]
    return [
        {"op": "test", "path": path, "value": current},
        {"op": "replace", "path": path, "value": new},
    ]


# --------------------------------------------------------------------------- routers


class WeightedObjectRouter(ABC, Generic[TargetT]):
    """Read, check drift, patch the weights only, re-read: the loop all Kubernetes
    routers share. Subclasses map their object to Weights and back to patch ops."""

    # What subclasses declare: the kind of object, the config field naming it, and
    # how the router reads in messages (str.format of the config as ``c``).
    resource: ClassVar[Resource]
    name_field: ClassVar[str]
    description: ClassVar[str]
    # How often a conflicting write is re-read and retried before giving up.
    conflict_attempts: ClassVar[int] = 5

    def __init__(self, cfg: TargetT, objects: KubeObjects | None = None) -> None:
        self.cfg = cfg
        self.objects = objects or KubeObjects(cfg)

    @property
    def name(self) -> str:
        return str(getattr(self.cfg, self.name_field))

    def describe(self) -> str:
        return self.description.format(c=self.cfg)

    # What subclasses provide ---------------------------------------------------

    @abstractmethod
    def decode(self, obj: JsonObject) -> Weights:
        """The weights the object holds. Raises RouterError when it has none."""

    @abstractmethod
    def weight_ops(self, obj: JsonObject, target: Weights) -> list[PatchOp]:
        """Ops that move ``obj`` to ``target``; they touch the weight paths only."""

    def validate_target(self, target: Weights) -> None:
        """Refuse targets this router cannot represent, before any API call."""
        if target.blue < 0 or target.green < 0 or target.blue + target.green != 100:
            raise RouterError(f"invalid target weights {target}: blue + green must be 100")

    # The shared behaviour ------------------------------------------------------

    @property
    def where(self) -> str:
        return f"{self.resource.kind} {self.cfg.namespace}/{self.name}"

    def check(self) -> None:
        obj = self._read()
        self.decode(obj)
        # A dry-run patch that only tests the resourceVersion proves we may patch,
        # without changing anything (RBAC checks the verb even for dry runs).
        rv = obj.get("metadata", {}).get("resourceVersion")
        ops: list[PatchOp] = (
            [{"op": "test", "path": "/metadata/resourceVersion", "value": rv}] if rv else []
        )
        try:
            self.objects.json_patch(self.resource, self.name, ops, dry_run=True)
        except KubeConflict:
            return  # it changed since our read: we could patch it, which is the point
        except KubeError as exc:
            raise self._router_error(exc) from exc

    def current(self) -> Weights:
        return self.decode(self._read())

    def set_weights(self, target: Weights, *, expected: Weights | None = None) -> Weights:
        self.validate_target(target)
        for attempt in range(1, self.conflict_attempts + 1):
            obj = self._read()
            live = self.decode(obj)
            if live == target:
                # Already there (or our previous write landed but its answer was lost):
                # the read we just made is the verification.
                return live
            if expected is not None and live != expected:
                raise WeightDriftError(expected, live, self.where)
            rv = obj.get("metadata", {}).get("resourceVersion")
            if not rv:
                raise RouterError(f"{self.where} has no metadata.resourceVersion")
            ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv}]
            ops += self.weight_ops(obj, target)
            try:
                self.objects.json_patch(self.resource, self.name, ops)
            except KubeConflict as exc:
                log.info(
                    "weights patch conflicted, re-reading",
                    router=self.describe(),
                    attempt=attempt,
                    status=exc.status,
                )
                # A little jitter keeps two writers from colliding in lockstep.
                time.sleep(random.uniform(0.02, 0.1) * attempt)  # noqa: S311
                continue
            except KubeError as exc:
                raise self._router_error(exc) from exc
            after = self.decode(self._read())
            if after != target:
                # Someone (or a mutating webhook) changed the weights right after us.
                raise WeightDriftError(target, after, self.where)
            log.info("weights changed", router=self.describe(), weights=str(after))
            return after
        raise RouterError(
            f"{self.where} kept changing while orchestrate tried to set {target}: "
            f"{self.conflict_attempts} conflicting writes in a row",
            hint="another controller or person is editing it; stop them, then retry",
        )

    # Helpers -------------------------------------------------------------------

    def _read(self) -> JsonObject:
        try:
            return self.objects.get(self.resource, self.name)
        except KubeError as exc:
            raise self._router_error(exc) from exc

    def _router_error(self, exc: KubeError) -> RouterError:
        if not isinstance(exc, KubeApiError):
            return RouterError(exc.message, hint=exc.hint)
        res, ns = self.resource, self.cfg.namespace
        if isinstance(exc, KubeNotFound):
            if not exc.details.get("name"):
                # Only the *type* is unknown: no object name in the Status details.
                return RouterError(
                    f"the API server does not serve {res.qualified} ({res.api_version}); "
                    f"cannot use {self.where}",
                    hint=self._missing_api_hint(),
                )
            return RouterError(
                f"{self.where} not found",
                hint=f"check the router's name and namespace ({ns!r}) in the release "
                f"config, or create the {res.kind} first",
            )
        if isinstance(exc, KubeUnauthorized | KubeForbidden):
            return RouterError(
                f"not allowed to read or patch {self.where}: {exc.message}",
                hint=f"grant get and patch on {res.qualified} in namespace {ns!r} "
                "(see the Role in k8s/ or the Helm chart)",
            )
        return RouterError(exc.message, hint=exc.hint)

    def _missing_api_hint(self) -> str:
        return f"install the API that provides {self.resource.qualified}"
