"""A fake Kubernetes API server over real HTTP, for tests of the Kubernetes routers.

Built on kmock's ``KubernetesEmulator`` (an aiohttp server with an in-memory object
store, request recording and a reaction DSL), running in a background thread with
its own event loop so that synchronous code (the official client) can call it.

What kmock gives as is: the HTTP server on a loopback port, URL parsing into
resource / namespace / name, the object store with per-object history, request
recording, API discovery, and the reaction DSL with priorities (ordinary reactions
win over the emulator's fallback handlers).

What this module adds, through kmock's extension points (the emulator's
``_serve_fetch`` / ``_serve_update`` fallback handlers, ``_render_error``, and
ordinary reactions), to behave like the real API server where our code relies on it:

* GET of a missing object: 404 with the server's Status body
  (reason NotFound, ``<resource> "<name>" not found``, details name/group/kind); a
  resource type the server does not serve: 404 "the server could not find the
  requested resource" with empty details (an uninstalled CRD).
* PATCH with ``application/json-patch+json`` (RFC 6902, ``test`` ops included) and
  ``application/merge-patch+json`` (RFC 7386); other patch types get 415. A JSON Patch
  that cannot be applied (a failed ``test``, a missing path) gets 422 reason Invalid
  with the generic message and empty details, as patch.go answers.
* Optimistic concurrency: when the patched object carries a resourceVersion that is
  not the stored one (a stale version in a merge patch, or a JSON Patch replacing
  it), 409 Conflict with the registry's Status (store.go, OptimisticLockErrorMsg).
* resourceVersion from one cluster-wide counter, bumped on every write; a patch that
  changes nothing is not a write (no bump), like etcd3's GuaranteedUpdate.
  ``metadata.generation`` is bumped when anything outside metadata/status changes,
  for kinds that carry one. ``?dryRun=All`` evaluates the patch but stores nothing.
* Fault injection for the next N requests (``fail_next``), answered before the
  request reaches storage, and a concurrent writer that edits an object between a
  client's read and its write (``on_next_patch``).

kmock's emulator merges every PATCH body into the stored object before any reaction
runs; for PATCH that step is bypassed so storage changes happen only in the fallback
handler, after injected faults had their chance. Other verbs (POST, DELETE, LIST,
WATCH) keep kmock's simplified emulation: the routers never use them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import pytest
import yaml

T = TypeVar("T")
JsonObject = dict[str, Any]

# kind -> (apiVersion, the resource kmock files its objects under)
KINDS: dict[str, tuple[str, kmock.resource]] = {
    "HTTPRoute": (
        "gateway.networking.k8s.io/v1",
        kmock.resource("gateway.networking.k8s.io", "v1", "httproutes"),
    ),
    "Ingress": ("networking.k8s.io/v1", kmock.resource("networking.k8s.io", "v1", "ingresses")),
    "Service": ("v1", kmock.resource("", "v1", "services")),
    "ConfigMap": ("v1", kmock.resource("", "v1", "configmaps")),
}
# Kinds whose registry strategy keeps metadata.generation (Services do not).
GENERATION_KINDS = {"HTTPRoute", "Ingress"}

OPTIMISTIC_LOCK = (
    "the object has been modified; please apply your changes to the latest version and try again"
)
PATCH_REJECTED = "the server rejected our request due to an error in our request"
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"

_REASONS = {
    400: ("BadRequest", "the server rejected our request for an unknown reason"),
    401: ("Unauthorized", "Unauthorized"),
    403: ("Forbidden", "forbidden: the request is not allowed by RBAC"),
    404: ("NotFound", "the server could not find the requested resource"),
    409: ("Conflict", OPTIMISTIC_LOCK),
    422: ("Invalid", PATCH_REJECTED),
    429: ("TooManyRequests", "Too many requests, please try again later."),
    500: ("InternalError", "Internal error occurred: injected by the test"),
    503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
    504: ("Timeout", "Timeout: request did not complete within the allowed duration"),
}


def status_body(
    code: int, reason: str, message: str, details: Mapping[str, Any] | None = None
) -> JsonObject:
    """A metav1.Status as the API server serialises it (empty details stay ``{}``)."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": dict(details or {}),
        "code": code,
    }


class ApiStatusError(Exception):
    """Raised inside handlers; rendered verbatim as the HTTP answer."""

    def __init__(
        self, code: int, body: JsonObject | bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"HTTP {code}")
        self.code = code
        self.body = body
        self.headers = dict(headers or {})


def _qualified(res: kmock.resource) -> str:
    return f"{res.plural}.{res.group}" if res.group else str(res.plural)


def _details(res: kmock.resource, name: str) -> JsonObject:
    return {"name": name, "group": res.group or "", "kind": res.plural}


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


@attrs.define(kw_only=True)
class ApiServerEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the API server semantics listed in the module docstring."""

    _revision: int = attrs.field(default=1000, init=False)
    unserved: set[kmock.resource] = attrs.field(factory=set, init=False)

    @property
    def lock(self) -> asyncio.Lock:
        return self._lock

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.action == kmock.action.UPDATE:
            # Skip the emulator's eager merge of PATCH bodies (see the module docstring):
            # storage changes happen in _serve_update, after injected faults.
            return await kmock.RawHandler._handle(self, request)
        return await super()._handle(request)

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, ApiStatusError):
            if isinstance(exc.body, bytes):
                return aiohttp.web.Response(body=exc.body, status=exc.code, headers=exc.headers)
            return aiohttp.web.json_response(exc.body, status=exc.code, headers=exc.headers)
        return await super()._render_error(exc)

    # Storage helpers (call with the lock held) ------------------------------------

    def next_revision(self) -> str:
        self._revision += 1
        return str(self._revision)

    def live(self, res: kmock.resource, namespace: str | None, name: str) -> JsonObject | None:
        key = (res, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def store(
        self,
        res: kmock.resource,
        namespace: str | None,
        name: str,
        obj: JsonObject,
        previous: JsonObject | None,
    ) -> JsonObject:
        """Write ``obj`` as the next version: new resourceVersion, maybe generation."""
        meta = obj.setdefault("metadata", {})
        if previous is not None and "generation" in meta:
            outside = {k: v for k, v in obj.items() if k not in ("metadata", "status")}
            before = {k: v for k, v in previous.items() if k not in ("metadata", "status")}
            if outside != before:
                meta["generation"] = int(previous["metadata"].get("generation", 1)) + 1
        meta["resourceVersion"] = self.next_revision()
        key = (res, namespace, name)
        if key in self.objects and not self.objects[key].deleted:
            self.objects[key].history.append(copy.deepcopy(obj))
        else:
            self.objects[key] = copy.deepcopy(obj)
        return copy.deepcopy(obj)

    # Fallback handlers (kmock registers them in __attrs_post_init__) -----------

    def _address(self, request: kmock.Request) -> tuple[kmock.resource, str | None, str]:
        res = request.resource
        if res is None or request.name is None:  # pragma: no cover - kmock routes by these
            raise ApiStatusError(404, status_body(404, *_REASONS[404]))
        if res in self.unserved:
            raise ApiStatusError(404, status_body(404, *_REASONS[404]))
        return res, request.namespace, request.name

    def _not_found(self, res: kmock.resource, name: str) -> ApiStatusError:
        message = f'{_qualified(res)} "{name}" not found'
        return ApiStatusError(404, status_body(404, "NotFound", message, _details(res, name)))

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        res, namespace, name = self._address(request)
        async with self.lock:
            obj = self.live(res, namespace, name)
        if obj is None:
            raise self._not_found(res, name)
        return obj

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        res, namespace, name = self._address(request)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        dry_run = request.params.get("dryRun")
        if dry_run not in (None, "All"):
            raise ApiStatusError(
                400, status_body(400, "BadRequest", f"unsupported dry run value {dry_run!r}")
            )
        async with self.lock:
            current = self.live(res, namespace, name)
            if current is None:
                raise self._not_found(res, name)
            patched = self._apply(content_type, request.body, current)
            stored_rv = current["metadata"]["resourceVersion"]
            meta = patched.setdefault("metadata", {})
            sent_rv = meta.get("resourceVersion")
            if sent_rv and sent_rv != stored_rv:
                raise ApiStatusError(
                    409,
                    status_body(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on {_qualified(res)} "{name}": '
                        + OPTIMISTIC_LOCK,
                        _details(res, name),
                    ),
                )
            # No resourceVersion in the result: an unconditional update.
            meta["resourceVersion"] = stored_rv
            if patched == current or dry_run == "All":
                return patched
            result = self.store(res, namespace, name, patched, previous=current)
        await self._buses[res].put({"type": "MODIFIED", "object": result})
        return result

    def _apply(self, content_type: str, body: bytes, current: JsonObject) -> JsonObject:
        try:
            patch = json.loads(body)
        except ValueError as exc:
            raise ApiStatusError(400, status_body(400, "BadRequest", str(exc))) from exc
        if content_type == MERGE_PATCH:
            if not isinstance(patch, dict):
                raise ApiStatusError(
                    400, status_body(400, "BadRequest", "a merge patch must be a JSON object")
                )
            result = _merge_patch(current, patch)
        elif content_type == JSON_PATCH:
            if not isinstance(patch, list):
                raise ApiStatusError(
                    400,
                    status_body(
                        400,
                        "BadRequest",
                        "json: cannot unmarshal object into Go value of type jsonpatch.Patch",
                    ),
                )
            try:
                result = jsonpatch.apply_patch(current, patch, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                # patch.go discards the library's message for 422: details stay empty.
                raise ApiStatusError(422, status_body(422, *_REASONS[422])) from exc
        else:
            raise ApiStatusError(
                415,
                status_body(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format - accepted media "
                    f"types include: {JSON_PATCH}, {MERGE_PATCH}",
                ),
            )
        if not isinstance(result, dict):
            raise ApiStatusError(422, status_body(422, *_REASONS[422]))
        return result


@dataclass(frozen=True)
class SeenRequest:
    """One request as the server received it."""

    method: str
    path: str
    params: dict[str, str]
    content_type: str
    authorization: str
    body: Any = None


@dataclass
class _Fault:
    remaining: int
    status: int
    body: JsonObject | bytes
    headers: dict[str, str] = field(default_factory=dict)


class FakeKubeApi:
    """The fake API server, driven synchronously from tests.

    ``with FakeKubeApi() as kube:`` starts it on a loopback port (``kube.url``);
    ``kube.put(obj)`` seeds objects, ``kube.get(kind, ns, name)`` reads what is
    stored, ``kube.requests`` lists what arrived, ``kube.fail_next(...)`` and
    ``kube.on_next_patch(...)`` inject failures and concurrent writers.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._stop: asyncio.Event | None = None
        self._emulator: ApiServerEmulator | None = None
        self._thread = threading.Thread(target=self._run, name="fake-kube-api", daemon=True)
        self.url = ""

    # Lifecycle ------------------------------------------------------------------

    def __enter__(self) -> FakeKubeApi:
        self._thread.start()
        self.url = self._ready.result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced to the test thread, never swallowed
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        emulator = ApiServerEmulator()
        async with emulator, kmock.Server(emulator) as server:
            self._emulator = emulator
            self._ready.set_result(str(server.url).rstrip("/"))
            await self._stop.wait()

    @property
    def emulator(self) -> ApiServerEmulator:
        if self._emulator is None:
            raise RuntimeError("the fake API server is not running")
        return self._emulator

    def _in_loop(self, fn: Callable[[ApiServerEmulator], T]) -> T:
        """Run ``fn`` in the server's loop with the storage lock held."""
        emulator = self.emulator

        async def run() -> T:
            async with emulator.lock:
                return fn(emulator)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    # Objects --------------------------------------------------------------------

    @staticmethod
    def resource(kind: str) -> kmock.resource:
        return KINDS[kind][1]

    def put(self, obj: Mapping[str, Any]) -> JsonObject:
        """Create or replace an object, filling the fields the server would set."""
        new = copy.deepcopy(dict(obj))
        kind = new["kind"]
        new.setdefault("apiVersion", KINDS[kind][0])
        meta = new.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", "2025-01-01T00:00:00Z")
        if kind in GENERATION_KINDS:
            meta.setdefault("generation", 1)
        res = self.resource(kind)
        return self._in_loop(
            lambda emu: emu.store(res, meta["namespace"], meta["name"], new, previous=None)
        )

    def get(self, kind: str, namespace: str, name: str) -> JsonObject | None:
        res = self.resource(kind)
        return self._in_loop(lambda emu: emu.live(res, namespace, name))

    def history(self, kind: str, namespace: str, name: str) -> list[JsonObject]:
        """Every stored version, oldest first (kmock keeps them)."""
        res = self.resource(kind)

        def read(emu: ApiServerEmulator) -> list[JsonObject]:
            versions = emu.objects[res, namespace, name].history
            return [copy.deepcopy(v.raw) for v in versions if v is not None]

        return self._in_loop(read)

    def edit(
        self, kind: str, namespace: str, name: str, change: Callable[[JsonObject], None]
    ) -> JsonObject:
        """Another writer changes the object (a new resourceVersion, like any write)."""
        res = self.resource(kind)

        def write(emu: ApiServerEmulator) -> JsonObject:
            obj = emu.live(res, namespace, name)
            if obj is None:
                raise KeyError(f"{kind} {namespace}/{name} does not exist")
            previous = copy.deepcopy(obj)
            change(obj)
            return emu.store(res, namespace, name, obj, previous=previous)

        return self._in_loop(write)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        res = self.resource(kind)
        self._in_loop(lambda emu: emu.objects[res, namespace, name].delete())

    def unserve(self, kind: str) -> None:
        """Make the server forget a resource type, like a cluster without the CRD."""
        res = self.resource(kind)
        self._in_loop(lambda emu: emu.unserved.add(res))

    # Requests and faults ---------------------------------------------------------

    @property
    def requests(self) -> list[SeenRequest]:
        def read(emu: ApiServerEmulator) -> list[SeenRequest]:
            return [
                SeenRequest(
                    method=r.method.value,
                    path=r.url.path,
                    params=dict(r.params),
                    content_type=r.headers.get("Content-Type", ""),
                    authorization=r.headers.get("Authorization", ""),
                    body=r.data,
                )
                for r in emu
            ]

        return self._in_loop(read)

    def fail_next(
        self,
        count: int,
        status: int = 503,
        *,
        method: str | None = None,
        body: JsonObject | bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """The next ``count`` API requests (of ``method``, if given) fail with ``status``
        before reaching storage. The body defaults to the Status the server sends."""
        reason, message = _REASONS.get(status, ("InternalError", f"injected HTTP {status}"))
        fault = _Fault(
            remaining=count,
            status=status,
            body=body if body is not None else status_body(status, reason, message),
            headers=dict(headers or {}),
        )
        wanted = method.upper() if method else None

        def matches(request: kmock.Request) -> bool:
            return request.resource is not None and (
                wanted is None or request.method.value == wanted
            )

        def respond(request: kmock.Request) -> Any:
            if fault.remaining <= 0:
                return NotImplemented  # kmock: not mine; the reaction retires itself
            fault.remaining -= 1
            raise ApiStatusError(fault.status, fault.body, fault.headers)

        self._in_loop(lambda emu: emu[matches] << respond)

    def delay_next(
        self, count: int, seconds: float, *, method: str | None = None, after_write: bool = False
    ) -> None:
        """The next ``count`` API requests are answered ``seconds`` late (to prove the
        client gives up after its timeout). With ``after_write``, a PATCH is applied
        first and only its answer is late: the write landed but the client never
        heard, as when a connection drops."""
        wanted = method.upper() if method else None
        left = [count]

        def matches(request: kmock.Request) -> bool:
            return request.resource is not None and (
                wanted is None or request.method.value == wanted
            )

        async def stall(request: kmock.Request) -> Any:
            # The slot is claimed before sleeping: requests arriving meanwhile must
            # not stall too.
            if left[0] <= 0:
                # Not an answer: the regular handler answers. (kmock retires a
                # reaction that declines, so it stops matching from now on.)
                return NotImplemented
            left[0] -= 1
            if after_write and request.action == kmock.action.UPDATE:
                result = await self.emulator._serve_update(request)
                await asyncio.sleep(seconds)
                return result
            await asyncio.sleep(seconds)
            return NotImplemented

        self._in_loop(lambda emu: emu[matches] << stall)

    def on_next_patch(
        self, kind: str, namespace: str, name: str, change: Callable[[JsonObject], None]
    ) -> None:
        """Just before the next PATCH of this object is applied, another writer changes
        it: the client's read is now stale, as in a real race."""
        res = self.resource(kind)
        used = [False]

        def matches(request: kmock.Request) -> bool:
            return (
                request.action == kmock.action.UPDATE
                and request.resource == res
                and request.namespace == namespace
                and request.name == name
            )

        async def race(request: kmock.Request) -> Any:
            if not used[0]:
                used[0] = True
                emu = self.emulator
                async with emu.lock:
                    obj = emu.live(res, namespace, name)
                    if obj is not None:
                        previous = copy.deepcopy(obj)
                        change(obj)
                        emu.store(res, namespace, name, obj, previous=previous)
            # Not an answer: the request goes on to the regular PATCH handler.
            return NotImplemented

        self._in_loop(lambda emu: emu[matches] << race)

    # Client side ------------------------------------------------------------------

    def write_kubeconfig(self, path: Path, *, namespace: str = "default") -> Path:
        """A kubeconfig whose context 'fake' points at this server with a bearer token."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "fake-token"}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "tester", "namespace": namespace},
                }
            ],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config))
        return path


@pytest.fixture
def fake_kube() -> Iterator[FakeKubeApi]:
    """A running fake API server; import it into a conftest.py to share it."""
    with FakeKubeApi() as api:
        yield api
