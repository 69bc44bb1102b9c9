"""Stage hooks: HTTP calls before and after a canary stage.

A ``before`` hook runs once a stage may begin (after its manual gate, if any) and
*before* traffic moves to the stage's weight, like Flagger's pre-rollout hooks and
Argo Rollouts' pre-promotion analysis: it decides whether users may reach the new
weight. In a 0 % stage that means a smoke test runs against green while no user
does. An ``after`` hook runs once the stage's analysis passed, before the next
stage (a load test report, a notification).

Each call sends a JSON body describing where the release is::

    {"release": "shop-2026-11-24", "service": "shop", "namespace": "default",
     "version": "v2", "hook": "smoke", "phase": "before", "stage": 1, "stages": 4,
     "weight": 0, "colour": "green", "weights": {"blue": 100, "green": 0},
     "metadata": {...}}

A 2xx answer passes. Connection errors, timeouts and answers that say "try again"
(408, 425, 429, 502, 503, 504) are retried a bounded number of times with backoff;
any other answer is the hook's verdict and is not retried (a smoke test that
answers 500 failed; asking again would only delay the rollback). Redirects are not
followed: a hook URL that redirects is a misconfiguration, and following it could
send the headers elsewhere.

A failed hook with ``on_failure: rollback`` ends the stage and rolls the release
back; with ``ignore`` it is recorded and the release goes on. Hooks must be safe to
call twice: a resumed release runs the stage's hooks again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import requests

from orchestrator.config import Webhook
from orchestrator.errors import ConfigError
from orchestrator.logging import scrub
from orchestrator.retry import TransientError, http_retrying

__all__ = ["HookResult", "Webhook", "call_hook", "run_hooks"]


RETRY_STATUSES = frozenset({408, 425, 429, 502, 503, 504})
# Enough of the answer to say why a smoke test failed, not a whole page.
MAX_DETAIL_CHARS = 300


@dataclass(frozen=True)
class HookResult:
    hook: str
    phase: str
    ok: bool
    status: int | None  # the last HTTP status, None when no answer came
    attempts: int
    seconds: float
    detail: str
    on_failure: str

    @property
    def blocks(self) -> bool:
        """A failure that must stop the release."""
        return not self.ok and self.on_failure == "rollback"

    def describe(self) -> str:
        verdict = "passed" if self.ok else "FAILED"
        answer = f"HTTP {self.status}" if self.status is not None else "no answer"
        return (f"{self.phase} hook {self.hook} {verdict}: {answer} after {self.attempts} "
                f"attempt{'s' if self.attempts != 1 else ''} in {self.seconds:.2f}s"
                + (f" ({self.detail})" if self.detail else ""))


class _TryAgain(TransientError):
    """An answer or a failure worth another attempt."""

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


def _headers(hook: Webhook) -> dict[str, str]:
    out = {"Content-Type": "application/json", "User-Agent": "orchestrate-hooks"}
    for name, value in hook.headers.items():
        out[name] = value.resolve()
    return out


def _excerpt(response: requests.Response) -> str:
    return scrub(response.text[:MAX_DETAIL_CHARS].strip().replace("\n", " "))


def call_hook(hook: Webhook, body: Mapping[str, Any], *, phase: str,
              session: requests.Session | None = None,
              sleep: Callable[[float], None] = time.sleep) -> HookResult:
    """Call one hook with bounded retries; never raises for what the hook answers."""
    started = time.monotonic()
    attempts = 0
    try:
        headers = _headers(hook)
    except ConfigError as exc:
        # The header's secret is missing: the call cannot be made as configured.
        return HookResult(hook.name, phase, False, None, 0, 0.0,
                          f"{exc.message}; {exc.hint}" if exc.hint else exc.message,
                          hook.on_failure)
    http = session or requests.Session()

    def attempt() -> tuple[int, str]:
        nonlocal attempts
        attempts += 1
        try:
            response = http.request(hook.method, hook.url, json=dict(body), headers=headers,
                                    timeout=hook.timeout, allow_redirects=False)
        except requests.Timeout as exc:
            raise _TryAgain(f"no answer within {hook.timeout:g}s") from exc
        except requests.RequestException as exc:
            raise _TryAgain(f"cannot reach {hook.url}: {type(exc).__name__}") from exc
        if response.status_code in RETRY_STATUSES:
            raise _TryAgain(_excerpt(response), response.status_code)
        return response.status_code, _excerpt(response)

    # 0.5 s, 1 s, 2 s... up to 5 s, plus up to 0.5 s of jitter.
    retrying = http_retrying(f"{phase} hook {hook.name}", attempts=hook.retries + 1,
                             multiplier=0.5, max_wait=5.0, jitter=0.5, sleep=sleep)
    try:
        status, detail = retrying(attempt)
    except _TryAgain as exc:
        return HookResult(hook.name, phase, False, exc.status, attempts,
                          time.monotonic() - started, exc.detail, hook.on_failure)
    finally:
        if session is None:
            http.close()
    ok = 200 <= status < 300
    return HookResult(hook.name, phase, ok, status, attempts, time.monotonic() - started,
                      "" if ok else detail, hook.on_failure)


def run_hooks(
    hooks: Sequence[Webhook],
    *,
    phase: str,
    context: Mapping[str, Any],
    record: Callable[[HookResult], None] | None = None,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[HookResult]:
    """Call ``hooks`` in order and return their results.

    Stops at the first failure that blocks (``on_failure: rollback``): the hooks
    after it would test a release that is about to be rolled back.
    """
    results: list[HookResult] = []
    for hook in hooks:
        body = {**context, "hook": hook.name, "phase": phase, "metadata": dict(hook.metadata)}
        result = call_hook(hook, body, phase=phase, session=session, sleep=sleep)
        results.append(result)
        if record is not None:
            record(result)
        if result.blocks:
            break
    return results


def first_blocking(results: Sequence[HookResult]) -> HookResult | None:
    return next((r for r in results if r.blocks), None)
