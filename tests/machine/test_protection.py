"""Protection until the window closes, and lag that fails a stage, in process: the
window's analysis, the guard's lag streaks and the window's tolerance of a lagging
reverse path (recorded, never acted on alone)."""

from __future__ import annotations

import time

import pytest

from orchestrator.datapath import Lag, ReplicationCheck, ReplicationPair
from orchestrator.events import Kind
from orchestrator.record import State, Status
from orchestrator.routers.base import Weights
from tests.machine.conftest import SWITCHED_OVER, FakeSleep, Pair, Stop

PROMOTED = {**SWITCHED_OVER, "stage": 2}


def lagging(direction: str, lag_bytes: int, seconds: float) -> ReplicationCheck:
    return ReplicationCheck(lags=[Lag(direction, lag_bytes, seconds)])


def test_a_check_that_fails_in_the_window_rolls_the_promoted_release_back(pair: Pair) -> None:
    cfg = pair.config()
    pair.seed(cfg, State.WINDOW, status=Status.PROMOTED, promoted_at=time.time(), **PROMOTED)
    pair.router.weights = Weights.green_at(100)
    # Green got worse after promotion: the last stage's check, still evaluated.
    pair.metrics.values["app_errors{colour='green'}"] = 0.4

    outcome = pair.release(cfg, sleep=FakeSleep(limit=100_000), wait_window=True).run()

    assert (outcome.state, outcome.status) == (State.ROLLED_BACK, Status.ROLLED_BACK)
    row = pair.row(cfg)
    assert row.facts.rollback_from == State.WINDOW
    assert row.facts.rollback_reason is not None
    assert row.facts.rollback_reason.startswith(
        "analysis in the rollback window: check error-rate failed: 0.4 > max 0.05")
    assert pair.router.weights == Weights.green_at(0)
    rolled = [e for e in pair.events.events if e.kind == Kind.ROLLED_BACK]
    assert len(rolled) == 1 and rolled[0].reason == row.facts.rollback_reason


def test_the_window_compares_with_nothing_and_an_idle_night_is_not_a_failure(
        pair: Pair) -> None:
    # A check relative to blue only: blue serves nobody after promotion, so the
    # window evaluates nothing of it; and a check without data stays inconclusive.
    cfg = pair.config(rollback={"window": "1s"}, canary={"checks": [
        {"name": "vs-blue", "query": "lat{colour='$colour'}", "max_increase_over_blue": 0.1},
        {"name": "error-rate", "query": "app_errors{colour='$colour'}", "max": 0.05,
         "inconclusive_limit": 1}]})
    pair.seed(cfg, State.WINDOW, status=Status.PROMOTED, promoted_at=time.time(), **PROMOTED)
    pair.router.weights = Weights.green_at(100)
    pair.metrics.values["lat{colour='green'}"] = 9.0

    outcome = pair.release(cfg, sleep=FakeSleep(limit=1_000_000), wait_window=True).run()

    assert (outcome.state, outcome.status) == (State.DONE, Status.PROMOTED)
    assert not any("lat{" in q for q in pair.metrics.queries)
    assert any(m.startswith("analysis in the rollback window inconclusive")
               for m in pair.log(cfg))
    assert [e.kind for e in pair.events.events if e.kind in {
        Kind.WINDOW_CLOSED, Kind.DONE}] == [Kind.WINDOW_CLOSED, Kind.DONE]


def test_sustained_lag_fails_the_stage_with_the_lag_in_the_reason(
        pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = pair.config(sync={"max_lag_bytes": 1_000_000, "max_lag_seconds": "10s",
                            "lag_failure_limit": 3})
    pair.seed(cfg, State.CANARY, **{**SWITCHED_OVER, "stage": 1})
    pair.router.weights = Weights.green_at(100)
    pair.metrics.values["app_errors"] = 0.0
    checks = iter([lagging("reverse", 5_000_000, 1.0),
                   lagging("reverse", 100, 0.1),  # caught up once: the streak restarts
                   lagging("reverse", 5_000_000, 1.0),
                   lagging("reverse", 200, 42.0),
                   lagging("reverse", 6_000_000, 50.0)])
    monkeypatch.setattr(ReplicationPair, "health", lambda self, index: next(checks))

    outcome = pair.release(cfg, sleep=FakeSleep(limit=1_000_000)).run()

    assert (outcome.state, outcome.status) == (State.ROLLED_BACK, Status.ROLLED_BACK)
    reason = pair.row(cfg).facts.rollback_reason or ""
    assert "reverse replication lag 6000000 bytes > 1000000, 50.0s > 10s in 3 checks in a row" \
        in reason, reason
    verdicts = [(e.details["check"], e.details["verdict"]) for e in pair.events.events
                if e.kind == Kind.MEASUREMENT
                and e.details["check"].startswith("replication-lag")]
    assert verdicts[:2] == [("replication-lag:reverse", "inconclusive"),
                            ("replication-lag-seconds:reverse", "pass")]
    assert verdicts[-2:] == [("replication-lag:reverse", "fail"),
                             ("replication-lag-seconds:reverse", "fail")]


def test_a_lagging_reverse_path_in_the_window_is_reported_not_acted_on(
        pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = pair.config(sync={"lag_failure_limit": 1})
    pair.seed(cfg, State.WINDOW, status=Status.PROMOTED, promoted_at=time.time(), **PROMOTED)
    pair.router.weights = Weights.green_at(100)
    pair.metrics.values["app_errors"] = 0.0
    # Growing, as lag does: the report is once per streak, not once per value.
    grows = iter(range(1_000_000))
    monkeypatch.setattr(ReplicationPair, "health", lambda self, index: lagging(
        "reverse", 50_000_000 + (n := next(grows)), 120.0 + n))
    sleep = FakeSleep(limit=3_000)

    with pytest.raises(Stop):
        pair.release(cfg, sleep=sleep, wait_window=True).run()

    row = pair.row(cfg)
    assert (row.state, row.status) == (State.WINDOW, Status.PROMOTED)
    errors = [m for m in pair.log(cfg) if m.startswith("in the rollback window: reverse")]
    assert len(errors) == 1 and "not rolling back on it" in errors[0]
    assert pair.router.history == []


def test_a_slot_standing_still_behind_the_wal_counts_as_seconds_of_lag() -> None:
    from orchestrator.guard import LagStreaks

    now = [100.0]
    streaks = LagStreaks(clock=lambda: now[0])
    # replay_lag says 0.2 s (last measured before the worker got stuck) every time.
    stuck = Lag("forward", 4096, 0.2, confirmed="0/1A2B3C")
    assert streaks.judge(stuck, max_bytes=10**9, max_seconds=5.0) == ("", 0)
    now[0] += 6
    assert streaks.judge(stuck, max_bytes=10**9, max_seconds=5.0) == (
        "forward replication lag 6.0s > 5s", 1)
    # It moved: not stuck any more, whatever the bytes say.
    now[0] += 1
    moved = Lag("forward", 4096, 0.2, confirmed="0/1A2C00")
    assert streaks.judge(moved, max_bytes=10**9, max_seconds=5.0) == ("", 0)
    # Caught up (no WAL waiting): standing still is idle, not stuck.
    now[0] += 60
    idle = Lag("forward", 0, None, confirmed="0/1A2C00")
    assert streaks.judge(idle, max_bytes=10**9, max_seconds=5.0) == ("", 0)
    assert streaks.seconds(idle) is None


def test_the_window_judges_a_relative_check_by_its_blue_idle_limits() -> None:
    from orchestrator.config.metrics import MetricCheck
    from orchestrator.stages import window_checks

    relative = MetricCheck(name="p", query="q", max_ratio_to_blue=1.5, max=2.0,
                           blue_idle={"max": 0.5})
    only_relative = MetricCheck(name="r", query="q", max_increase_over_blue=0.1)
    (judged,) = window_checks([relative, only_relative])
    assert (judged.max, judged.min, judged.compares_with_blue) == (0.5, None, False)


def test_a_request_taken_as_the_window_closes_is_still_obeyed(pair: Pair) -> None:
    # Alertmanager was answered 202 in the window's last poll: the promise holds.
    cfg = pair.config(rollback={"window": "1s"})
    pair.seed(cfg, State.WINDOW, status=Status.PROMOTED, promoted_at=time.time() - 5,
              **PROMOTED)
    pair.router.weights = Weights.green_at(100)
    pair.store(cfg).request_rollback(cfg.release.name, "alert in the last poll")

    outcome = pair.release(cfg, sleep=FakeSleep()).run()

    assert (outcome.state, outcome.status) == (State.ROLLED_BACK, Status.ROLLED_BACK)
    assert pair.row(cfg).facts.rollback_reason == "alert in the last poll"
    assert pair.router.weights == Weights.green_at(0)
