"""Notifications from a real state machine (real store on a real PostgreSQL) to a
real local HTTP receiver: what a release tells, and that a receiver that is dead or
slow costs the release nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from orchestrator.config import ReleaseConfig
from orchestrator.events import Event, EventSink, Kind
from orchestrator.notify import attach_notifications, verify
from orchestrator.record import State, Status
from orchestrator.routers.base import Weights
from tests.machine.conftest import SWITCHED_OVER, FakeSleep, Pair
from tests.notify_receiver import Receiver, closed_port, receiver

SECRET_ENV = "ORCH_MACHINE_NOTIFY_SECRET"
SECRET = "the-machine-tests-webhook-secret"
TOKEN = "XOXB-machine-0123456789"


@pytest.fixture
def rx(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    with receiver() as made:
        yield made


# The last stage short: the promotion path, without the fixture's 5 s of analysis.
SHORT = {"stages": [{"weight": 0, "duration": 0}, {"weight": 100, "duration": "300ms"}]}


def notified(pair: Pair, **targets_and_section: Any) -> tuple[ReleaseConfig, list[EventSink]]:
    """The config with a notifications section, and the sinks release_for would add."""
    cfg = pair.config(notifications=targets_and_section, canary=SHORT)
    return cfg, attach_notifications(cfg).sinks


class Timed:
    """Wraps a sink and keeps how long each emit took on the release's thread."""

    def __init__(self, inner: EventSink) -> None:
        self.inner = inner
        self.seconds: list[float] = []

    def emit(self, event: Event) -> None:
        started = time.monotonic()
        self.inner.emit(event)
        self.seconds.append(time.monotonic() - started)

    def close(self) -> None:
        self.inner.close()


def test_a_rollback_in_the_window_is_told_with_its_reason(pair: Pair, rx: Receiver) -> None:
    cfg, sinks = notified(pair, targets=[
        {"kind": "webhook", "name": "ops", "url": rx.url("/hook"), "secret": {"env": SECRET_ENV}},
        {"kind": "slack", "name": "chat", "url": rx.url("/slack")}])
    pair.seed(cfg, State.WINDOW, status=Status.PROMOTED, promoted_at=time.time(), **SWITCHED_OVER,
              stage=2)
    pair.router.weights = Weights.green_at(100)
    other = pair.store(cfg)
    sleep = FakeSleep(limit=20)
    sleep.on(2, lambda: other.request_rollback(cfg.release.name, "error budget burnt"))

    outcome = pair.release(cfg, sleep=sleep, wait_window=True, sinks=sinks).run()

    assert (outcome.state, outcome.status) == (State.ROLLED_BACK, Status.ROLLED_BACK)
    got = rx.wait_for(4)
    hook = [r for r in got if r.path == "/hook"]
    assert [(b["event"], b["state"], b["reason"]) for b in (r.json() for r in hook)] == [
        ("rolling_back", "window", "error budget burnt"),
        ("rolled_back", "rolled_back", "error budget burnt")]
    assert all(verify(SECRET, r.body, r.headers) for r in hook)
    assert hook[1].json()["labels"] == {"service": "app", "namespace": "default",
                                        "version": "v2"}
    assert [r.json()["text"] for r in got if r.path == "/slack"] == [
        f"orchestrate {cfg.release.name}: rolling back from window: error budget burnt",
        f"orchestrate {cfg.release.name}: rolled back, all traffic on blue: error budget burnt"]


def test_a_promotion_is_told_after_the_last_stage_passed(pair: Pair, rx: Receiver) -> None:
    cfg, sinks = notified(pair, targets=[
        {"kind": "webhook", "url": rx.url(), "secret": {"env": SECRET_ENV}}])
    pair.seed(cfg, State.CANARY, **{**SWITCHED_OVER, "stage": 1})
    pair.router.weights = Weights.green_at(100)
    pair.metrics.values["app_errors"] = 0.0

    outcome = pair.release(cfg, sleep=FakeSleep(), sinks=sinks).run()

    assert (outcome.state, outcome.status) == (State.WINDOW, Status.PROMOTED)
    got = rx.wait_for(2)
    assert [(b["event"], b["stage"], b["stages"], b["weight"])
            for b in (r.json() for r in got)] == [
        ("stage_passed", 2, 2, 100), ("promoted", None, None, None)]
    # The machine's measurements and state changes stay off a default target.
    assert Kind.MEASUREMENT in pair.events.kinds() and Kind.STATE in pair.events.kinds()
    assert all(verify(SECRET, r.body, r.headers) for r in got)


def test_dead_and_slow_receivers_do_not_hold_the_release(pair: Pair) -> None:
    with receiver(delay=60) as slow, capture_logs() as logs:
        cfg, sinks = notified(pair, flush_timeout="500ms", targets=[
            {"kind": "slack", "name": "dead-chat", "retries": 3, "timeout": "1500ms",
             "url": f"http://127.0.0.1:{closed_port()}/services/{TOKEN}"},
            {"kind": "webhook", "name": "slow-audit", "retries": 3, "timeout": "1500ms",
             "url": slow.url(f"/{TOKEN}"), "events": [k.value for k in Kind]}])
        timed = [Timed(s) for s in sinks]
        pair.seed(cfg, State.CANARY, **{**SWITCHED_OVER, "stage": 1})
        pair.router.weights = Weights.green_at(100)
        pair.metrics.values["app_errors"] = 0.0

        started = time.monotonic()
        outcome = pair.release(cfg, sleep=FakeSleep(), sinks=timed).run()
        took = time.monotonic() - started
        # The attempt in flight when close() gave up ends at its timeout, and says so.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
                e["event"] == "call failed, retrying" for e in logs):
            time.sleep(0.05)

    assert (outcome.state, outcome.status) == (State.WINDOW, Status.PROMOTED)
    emits = [s for t in timed for s in t.seconds]
    assert len(emits) > 5 and max(emits) < 0.05, emits
    # Retrying one event against the slow target alone takes 4 x 1.5 s and more; the
    # run waited for the sender only for flush_timeout at its end.
    assert took < 5.0, took
    given_up = [e for e in logs if e["event"] == "notifications not sent: the release "
                "is ending"]
    assert len(given_up) == 1 and given_up[0]["not_sent"] >= 1
    retried = [(e["call"], e["error"]) for e in logs if e["event"] == "call failed, retrying"]
    assert retried == [("notification slow-audit", "no answer within 1.5s")]
    assert TOKEN not in repr(logs)
