"""Kubernetes access for the traffic routers: clients, retries, timeouts.

Two layers, each usable alone (the routers' shared patch loop is in ``weighted.py``):

* ``api_client(target)`` builds a client for one ``KubeTarget`` from its own
  ``Configuration`` object (kubeconfig + context, else in-cluster, else the default
  kubeconfig). The library's process-wide default configuration is never read or
  written, so two routers pointed at two clusters cannot leak into each other.
* ``KubeObjects`` reads and JSON-patches namespaced objects as plain dicts. Every
  call carries ``_request_timeout`` from ``target.timeout`` and runs under the
  ``kubernetes`` retry policy (``orchestrator.retry``). ``kube_error`` maps each
  failure to one class per meaning; the transient ones (5xx, 429, transport errors)
  are retried. Conflicts (``KubeConflict``: 409, a failed JSON Patch ``test``) are
  *not* retried here: only the caller knows how to re-read and rebuild its patch.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import tenacity
import urllib3
from kubernetes.client import (
    ApiClient,
    Configuration,
    CoreV1Api,
    CustomObjectsApi,
    NetworkingV1Api,
)
from kubernetes.client.exceptions import ApiException
from kubernetes.config import incluster_config, kube_config
from kubernetes.config.config_exception import ConfigException

from orchestrator.config import KubeTarget
from orchestrator.errors import ExternalError
from orchestrator.retry import TransientError, kube_retrying

log = structlog.get_logger(__name__)

JsonObject = dict[str, Any]
PatchOp = dict[str, Any]

JSON_PATCH = "application/json-patch+json"


class KubeError(ExternalError):
    """The Kubernetes API could not be configured, reached, or it refused a call."""


class KubeApiError(KubeError):
    """The API server answered with an error status (after any retries).

    ``kube_error`` picks the subclass from the status, once; callers test the class
    (``except KubeConflict``), never the number. ``status`` stays for messages and logs.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        details: Mapping[str, Any] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.reason = reason
        self.details: Mapping[str, Any] = details or {}


class KubeConflict(KubeApiError):
    """The object changed under us: re-read it and try again (the caller's job).

    Two answers mean that. 409 Conflict is what the registry returns when the
    resourceVersion carried by the patched object is stale (store.go,
    OptimisticLockErrorMsg). A JSON Patch whose ``test`` op fails never reaches the
    registry: the patch handler answers 422 with reason Invalid, the generic message
    "the server rejected our request due to an error in our request" and empty
    details (patch.go: NewGenericServerResponse(422, ...)).
    """


class KubeInvalid(KubeApiError):
    """422 from validation: it names the object and lists causes; never retried."""


class KubeNotFound(KubeApiError):
    """404: the object, or (no name in the details) the whole resource type, is absent."""


class KubeUnauthorized(KubeApiError):
    """401: the credentials were not accepted."""


class KubeForbidden(KubeApiError):
    """403: RBAC does not allow the verb on this resource."""


class KubeTooManyRequests(KubeApiError, TransientError):
    """429: the API server sheds load; its Retry-After is honoured (up to a bound)."""

    def __init__(self, *args: Any, retry_after: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class KubeServerError(KubeApiError, TransientError):
    """5xx: the API server or something behind it failed; worth another try."""


class KubeUnreachable(KubeError, TransientError):
    """No answer: connection refused or reset, a timeout."""


@dataclass(frozen=True)
class Resource:
    """A namespaced API resource, enough to build its URL and talk about it."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """The form the API server uses in messages and RBAC: 'httproutes.gateway...'."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


HTTPROUTES = Resource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute")
INGRESSES = Resource("networking.k8s.io", "v1", "ingresses", "Ingress")
SERVICES = Resource("", "v1", "services", "Service")


# --------------------------------------------------------------------------- clients


def api_client(target: KubeTarget) -> ApiClient:
    """A client for ``target`` with its own Configuration.

    Order: an explicit kubeconfig and/or context; otherwise the pod's service account
    when running in a cluster; otherwise the default kubeconfig ($KUBECONFIG or
    ~/.kube/config).
    """
    cfg = Configuration()
    try:
        if target.kubeconfig is not None or target.context is not None:
            _load_kubeconfig(cfg, target.kubeconfig, target.context)
        elif _in_cluster():
            incluster_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=cfg
            )
        else:
            _load_kubeconfig(cfg, None, None)
    except (ConfigException, OSError, ValueError, TypeError) as exc:
        where = str(target.kubeconfig) if target.kubeconfig else "the default kubeconfig"
        context = f" (context {target.context!r})" if target.context else ""
        raise KubeError(
            f"cannot load Kubernetes credentials from {where}{context}: {exc}",
            hint="set router.kubeconfig / router.context, or run inside the cluster "
            "with a service account",
        ) from exc
    # urllib3's own retries would multiply our timeouts and hide failures from the
    # tenacity policy below, which is the one place that decides what is retried.
    cfg.retries = 0
    return ApiClient(configuration=cfg)


def _load_kubeconfig(cfg: Configuration, path: Path | None, context: str | None) -> None:
    kube_config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(path.expanduser()) if path is not None else None,
        context=context,
        client_configuration=cfg,
        # Never write refreshed tokens back into the user's kubeconfig.
        persist_config=False,
    )


def _in_cluster() -> bool:
    return (
        bool(os.environ.get(incluster_config.SERVICE_HOST_ENV_NAME))
        and Path(incluster_config.SERVICE_TOKEN_FILENAME).is_file()
    )


# --------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter for transient Kubernetes failures."""

    attempts: int = 5
    initial_wait: float = 0.25
    max_wait: float = 4.0
    jitter: float = 0.25
    # A 429's Retry-After is honoured up to this many seconds.
    max_retry_after: float = 10.0


def kube_error(exc: BaseException, what: str, server: str, *, attempts: int = 0) -> KubeError:
    """The one mapping from what the client raised to our error classes.

    An ``ApiException`` becomes the class of its status (``_error_class``); a
    transport failure becomes ``KubeUnreachable``, except a certificate problem, which
    will not fix itself by waiting. ``attempts`` > 0: the retries are spent, and the
    message says so. 409 is not transient: a conflict needs a fresh read and a rebuilt
    patch, which only the caller can do.
    """
    if isinstance(exc, ApiException):
        return _api_error(exc, what, attempts)
    if not _transport_may_recover(exc):
        return KubeError(f"{what} failed: {exc}")
    after = f" after {attempts} attempts" if attempts else ""
    return KubeUnreachable(
        f"cannot reach {server} ({what}){after}: {exc}",
        hint="check the network path to the API server and router.timeout",
    )


def _transport_may_recover(exc: BaseException) -> bool:
    if isinstance(exc, urllib3.exceptions.MaxRetryError):
        # A certificate problem will not fix itself by waiting.
        return not isinstance(exc.reason, urllib3.exceptions.SSLError)
    if isinstance(exc, urllib3.exceptions.SSLError | urllib3.exceptions.LocationValueError):
        return False
    return isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


_STATUS_CLASSES: dict[int, type[KubeApiError]] = {
    401: KubeUnauthorized, 403: KubeForbidden, 404: KubeNotFound, 409: KubeConflict,
    429: KubeTooManyRequests,
}


def _api_error(exc: ApiException, what: str, attempts: int) -> KubeApiError:
    status = int(exc.status or 0)
    reason, message, details = _status_body(exc)
    cls = _error_class(status, details)
    text = f"{what}: HTTP {status} {reason}" + (f": {message}" if message else "")
    if attempts and issubclass(cls, TransientError):
        text += f" (after {attempts} attempts)"
    if cls is KubeTooManyRequests:
        return KubeTooManyRequests(status, reason, text, details, retry_after=_retry_after(exc))
    return cls(status, reason, text, details)


def _status_body(exc: ApiException) -> tuple[str, str, dict[str, Any]]:
    """Reason, message and details: from the body when it is a ``Status`` object,
    else the bare HTTP reason."""
    reason = str(exc.reason or "")
    try:
        body = json.loads(exc.body) if exc.body else None
    except (TypeError, ValueError):
        body = None
    if not (isinstance(body, dict) and body.get("kind") == "Status"):
        return reason, "", {}
    raw_details = body.get("details")
    return (str(body.get("reason") or reason), str(body.get("message") or ""),
            raw_details if isinstance(raw_details, dict) else {})


def _error_class(status: int, details: Mapping[str, Any]) -> type[KubeApiError]:
    if status == 422:
        # A failed ``test`` op has empty details; a validation error names the object.
        return KubeInvalid if details.get("causes") or details.get("name") else KubeConflict
    if 500 <= status <= 599:
        return KubeServerError
    return _STATUS_CLASSES.get(status, KubeApiError)


def _retry_after(exc: ApiException) -> float:
    if not exc.headers:
        return 0.0
    try:
        return max(0.0, float(exc.headers.get("Retry-After", 0)))
    except (TypeError, ValueError):
        return 0.0


def _backoff(policy: RetryPolicy) -> Callable[[tenacity.RetryCallState], float]:
    def wait(state: tenacity.RetryCallState) -> float:
        exp = policy.initial_wait * 2.0 ** (state.attempt_number - 1)
        backoff = min(policy.max_wait, exp) + random.uniform(0, policy.jitter)  # noqa: S311
        exc = state.outcome.exception() if state.outcome else None
        retry_after = exc.retry_after if isinstance(exc, KubeTooManyRequests) else 0.0
        return max(backoff, min(retry_after, policy.max_retry_after))

    return wait


# --------------------------------------------------------------------------- objects


class KubeObjects:
    """GET and JSON-PATCH of namespaced objects as plain dicts, with retries and timeouts.

    Objects are kept as the server's JSON (camelCase, unknown fields included) rather
    than the client's models: a model round-trip would drop fields the client does not
    know, and the routers need exact JSON Pointer paths anyway.
    """

    def __init__(
        self,
        target: KubeTarget,
        api: ApiClient | None = None,
        *,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.target = target
        self._api = api
        self.retry = retry or RetryPolicy()

    @property
    def api(self) -> ApiClient:
        # Built lazily so that constructing a router never touches credentials.
        if self._api is None:
            self._api = api_client(self.target)
        return self._api

    @property
    def server(self) -> str:
        host = getattr(getattr(self._api, "configuration", None), "host", None)
        return str(host) if host else "the Kubernetes API"

    def get(self, res: Resource, name: str) -> JsonObject:
        ns, timeout = self.target.namespace, self.target.timeout

        def call() -> Any:
            if res == SERVICES:
                return CoreV1Api(self.api).read_namespaced_service(
                    name, ns, _preload_content=False, _request_timeout=timeout
                )
            if res == INGRESSES:
                return NetworkingV1Api(self.api).read_namespaced_ingress(
                    name, ns, _preload_content=False, _request_timeout=timeout
                )
            return CustomObjectsApi(self.api).get_namespaced_custom_object(
                res.group,
                res.version,
                ns,
                res.plural,
                name,
                _preload_content=False,
                _request_timeout=timeout,
            )

        return self._run(f"get {res.qualified} {ns}/{name}", call)

    def json_patch(
        self, res: Resource, name: str, ops: Sequence[PatchOp], *, dry_run: bool = False
    ) -> JsonObject:
        """Apply an RFC 6902 patch. Safe to resend: callers include ``test`` ops, so a
        patch that already landed fails its tests instead of applying twice."""
        ns, timeout = self.target.namespace, self.target.timeout
        body = list(ops)
        extra: dict[str, Any] = {
            "_preload_content": False,
            "_request_timeout": timeout,
            "_content_type": JSON_PATCH,
        }
        if dry_run:
            extra["dry_run"] = "All"

        def call() -> Any:
            if res == SERVICES:
                return CoreV1Api(self.api).patch_namespaced_service(name, ns, body, **extra)
            if res == INGRESSES:
                return NetworkingV1Api(self.api).patch_namespaced_ingress(name, ns, body, **extra)
            return CustomObjectsApi(self.api).patch_namespaced_custom_object(
                res.group, res.version, ns, res.plural, name, body, **extra
            )

        verb = "dry-run patch" if dry_run else "patch"
        return self._run(f"{verb} {res.qualified} {ns}/{name}", call)

    def _run(self, what: str, call: Callable[[], Any]) -> JsonObject:
        def attempt() -> Any:
            try:
                return call()
            except KubeError:
                raise
            except Exception as exc:
                raise kube_error(exc, what, self.server) from exc

        try:
            response = kube_retrying(what, attempts=self.retry.attempts,
                                     wait=_backoff(self.retry))(attempt)
        except TransientError as exc:
            # Retries spent: the same error, saying so.
            cause = exc.__cause__
            if cause is None:
                raise
            raise kube_error(cause, what, self.server, attempts=self.retry.attempts) from cause
        try:
            data = json.loads(response.data)
        except (TypeError, ValueError) as exc:
            raise KubeError(f"{what}: the API server sent a body that is not JSON") from exc
        finally:
            # The body was read without preloading: hand the connection back to the pool.
            release = getattr(response, "release_conn", None)
            if callable(release):
                release()
        if not isinstance(data, dict):
            raise KubeError(f"{what}: the API server sent {type(data).__name__}, not an object")
        return data

