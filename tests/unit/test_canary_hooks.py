"""Stage hooks against a real local HTTP server: verdicts, bounded retries, secrets in
headers, the JSON body, and stopping at the first blocking failure."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.canary.hooks import HookResult, call_hook, first_blocking, run_hooks
from orchestrator.config import Webhook
from tests.local_http import LocalServer, QuietHandler


class HookServer:
    """Answers each path with a scripted list of statuses (the last one repeats)."""

    def __init__(self) -> None:
        self.script: dict[str, list[int]] = {}
        self.delay: dict[str, float] = {}
        self.calls: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        server = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.calls.append((self.path, dict(self.headers), body))
                statuses = server.script.get(self.path, [200])
                status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
                if self.path in server.delay:
                    threading.Event().wait(server.delay[self.path])
                data = f"answer {status}".encode()
                self.send_response(status)
                if status in (301, 302):
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._local = LocalServer(Handler)
        self.url = self._local.url

    def close(self) -> None:
        self._local.close()


@pytest.fixture
def server() -> Iterator[HookServer]:
    s = HookServer()
    yield s
    s.close()


def hook(server: HookServer, path: str, **kw: Any) -> Webhook:
    return Webhook.model_validate({"name": path.strip("/"), "url": server.url + path, **kw})


def no_sleep(_: float) -> None:
    pass


CONTEXT = {"release": "r1", "stage": 1, "stages": 4, "weight": 0, "colour": "green"}


def test_2xx_passes_and_the_body_describes_the_stage(
        server: HookServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOKE_TOKEN", "s3cret-value")
    h = hook(server, "/smoke", metadata={"suite": "checkout"},
             headers={"Authorization": {"env": "SMOKE_TOKEN", "prefix": "Bearer "},
                      "X-Team": "payments"})
    (result,) = run_hooks([h], phase="before", context=CONTEXT, sleep=no_sleep)
    assert result.ok and result.status == 200 and result.attempts == 1
    path, headers, body = server.calls[0]
    assert path == "/smoke"
    assert headers["Authorization"] == "Bearer s3cret-value"
    assert headers["X-Team"] == "payments"
    assert body == {**CONTEXT, "hook": "smoke", "phase": "before",
                    "metadata": {"suite": "checkout"}}
    assert "s3cret" not in result.describe()


def test_a_failing_answer_is_the_verdict_and_is_not_retried(server: HookServer) -> None:
    server.script["/smoke"] = [500]
    result = call_hook(hook(server, "/smoke", retries=3), {}, phase="before", sleep=no_sleep)
    assert not result.ok and result.blocks
    assert result.status == 500 and result.attempts == 1
    assert "answer 500" in result.detail


def test_try_again_answers_are_retried_then_pass(server: HookServer) -> None:
    server.script["/smoke"] = [503, 429, 204]
    result = call_hook(hook(server, "/smoke", retries=2), {}, phase="before", sleep=no_sleep)
    assert result.ok and result.status == 204 and result.attempts == 3


def test_retries_are_bounded(server: HookServer) -> None:
    server.script["/smoke"] = [503]
    result = call_hook(hook(server, "/smoke", retries=2), {}, phase="after", sleep=no_sleep)
    assert not result.ok and result.attempts == 3 and result.status == 503
    assert len(server.calls) == 3


def test_a_hook_that_does_not_answer_in_time_fails(server: HookServer) -> None:
    server.delay["/slow"] = 1.0
    result = call_hook(hook(server, "/slow", timeout="200ms", retries=1), {}, phase="before",
                       sleep=no_sleep)
    assert not result.ok and result.status is None and result.attempts == 2
    assert "no answer within 0.2s" in result.detail


def test_unreachable_hook_fails_after_its_retries() -> None:
    h = Webhook(name="gone", url="http://127.0.0.1:9/", retries=1, timeout=1.0)
    result = call_hook(h, {}, phase="before", sleep=no_sleep)
    assert not result.ok and result.attempts == 2 and "cannot reach" in result.detail


def test_redirects_are_not_followed(server: HookServer) -> None:
    server.script["/moved"] = [302]
    result = call_hook(hook(server, "/moved"), {}, phase="before", sleep=no_sleep)
    assert not result.ok and result.status == 302 and len(server.calls) == 1


def test_missing_secret_fails_without_calling(
        server: HookServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_TOKEN", raising=False)
    h = hook(server, "/smoke", headers={"Authorization": {"env": "NOT_SET_TOKEN"}})
    result = call_hook(h, {}, phase="before", sleep=no_sleep)
    assert not result.ok and result.attempts == 0 and server.calls == []
    assert "NOT_SET_TOKEN" in result.detail


def test_run_hooks_stops_at_the_first_blocking_failure(server: HookServer) -> None:
    server.script["/bad"] = [500]
    hooks = [hook(server, "/notify", on_failure="ignore"), hook(server, "/bad"),
             hook(server, "/never")]
    server.script["/notify"] = [500]
    seen: list[HookResult] = []
    results = run_hooks(hooks, phase="before", context=CONTEXT, record=seen.append,
                        sleep=no_sleep)
    assert [r.hook for r in results] == ["notify", "bad"] == [r.hook for r in seen]
    assert not results[0].ok and not results[0].blocks
    blocking = first_blocking(results)
    assert blocking is not None and blocking.hook == "bad"
    assert "/never" not in [c[0] for c in server.calls]
