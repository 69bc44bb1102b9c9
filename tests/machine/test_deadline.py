"""Deadlines and signals driven in process: the machine's own stop (``Stop``) with a
clock that follows the fake sleep, and signals delivered as the handler would."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from orchestrator.datapath import ReplicationCheck, ReplicationPair
from orchestrator.errors import STOPPED_EXIT, Interrupted
from orchestrator.events import Kind
from orchestrator.interrupts import Stop
from orchestrator.record import State, Status
from orchestrator.routers.base import Weights
from orchestrator.schedule import Limit
from tests.machine.conftest import SWITCHED_OVER, FakeSleep, Pair

# A canary half-way: green at 50 %, taking writes (risk accepted: PostgreSQL 15 has
# no reverse replication), the 50 % stage an hour long.
MID_CANARY: dict[str, Any] = {
    "mode": "switchover", "majors": {"blue": 15, "green": 15}, "stage": 1,
    "green_writable": True, "weights": Weights.green_at(50),
    "weights_target": Weights.green_at(50)}
STAGES = {"sync": {"accept_write_loss_risk": True}, "canary": {"interval": "1s", "stages": [
    {"weight": 0, "duration": 0}, {"weight": 50, "duration": "1h"},
    {"weight": 100, "duration": 0}]}}


@pytest.fixture(autouse=True)
def _data_path_healthy(monkeypatch: pytest.MonkeyPatch) -> None:
    # The seeded canary has no real subscription; these tests are about the stop, so
    # the guard's data-path check (once a real second) finds the path healthy.
    monkeypatch.setattr(ReplicationPair, "health", lambda self, index: ReplicationCheck())


def stop_after(sleep: FakeSleep, seconds: float | None, pair_cfg: Any = None) -> Stop:
    """A stop whose clock is the fake sleep's; its limit ``seconds`` in."""
    started = time.time()
    limit = None if seconds is None else Limit(started + seconds, "deadline of the test")
    return Stop(limit, cfg=pair_cfg, clock=lambda: started + sleep.clock)


def test_the_deadline_before_promotion_rolls_back_with_the_reason(pair: Pair) -> None:
    cfg = pair.config(**STAGES)
    pair.seed(cfg, State.CANARY, **MID_CANARY)
    pair.router.weights = Weights.green_at(50)
    pair.metrics.values["app_errors"] = 0.0  # green is fine: only time ends the stage
    sleep = FakeSleep()
    stop = stop_after(sleep, 5.0, cfg)

    outcome = pair.release(cfg, sleep=sleep, stop=stop).run()

    assert (outcome.state, outcome.status) == (State.ROLLED_BACK, Status.ROLLED_BACK)
    assert outcome.error is not None
    assert "aborted: deadline: deadline of the test: all traffic back to blue" in outcome.error
    assert stop.exit_code(outcome) == STOPPED_EXIT == 4
    assert pair.router.weights == Weights.green_at(0)
    # Acted at the first poll past the limit (0.5 s polls), not at the stage's end.
    assert 5.0 <= sleep.clock <= 6.0, sleep.clock
    row = pair.row(cfg)
    assert row.facts.rollback_from == State.CANARY
    assert row.facts.rollback_reason is not None and "deadline" in row.facts.rollback_reason
    rolled = [e for e in pair.events.events if e.kind == Kind.ROLLED_BACK]
    assert len(rolled) == 1 and rolled[0].reason is not None and "deadline" in rolled[0].reason
    # Each state tells the metrics when the run's limit falls (the past-deadline alert).
    assert stop.limit is not None
    assert [e.details.get("deadline_at") for e in pair.events.events
            if e.kind == Kind.STATE] == [stop.limit.at, stop.limit.at]  # canary, rollback


def test_the_deadline_after_promotion_leaves_it_promoted(pair: Pair) -> None:
    cfg = pair.config()
    pair.seed(cfg, State.WINDOW, status=Status.PROMOTED, promoted_at=time.time(),
              **SWITCHED_OVER, stage=2)
    pair.router.weights = Weights.green_at(100)
    # The window is analysed as a stage is: it sleeps at most one check interval
    # (10 ms in these configs) at a time.
    sleep = FakeSleep(limit=1_000)
    stop = stop_after(sleep, 3.0, cfg)

    outcome = pair.release(cfg, sleep=sleep, wait_window=True, stop=stop).run()

    assert (outcome.state, outcome.status) == (State.WINDOW, Status.PROMOTED)
    assert stop.exit_code(outcome) == 0
    assert 3.0 <= sleep.clock <= 4.0  # stopped waiting at the limit
    assert pair.router.history == [] and pair.router.weights == Weights.green_at(100)
    row = pair.row(cfg)
    assert row.facts.rollback_reason is None and row.error is None


def test_sigterm_mid_canary_rolls_back_and_a_second_one_lets_it_finish(
        pair: Pair, capfd: pytest.CaptureFixture[str]) -> None:
    cfg = pair.config(**STAGES)
    pair.seed(cfg, State.CANARY, **MID_CANARY)
    pair.router.weights = Weights.green_at(50)
    pair.metrics.values["app_errors"] = 0.0  # green is fine: only time ends the stage
    sleep = FakeSleep()
    stop = stop_after(sleep, None)
    sleep.on(3, lambda: stop.deliver(signal.SIGTERM))
    machine = pair.release(cfg, sleep=sleep, stop=stop)
    # The second signal comes while the rollback routes traffic back.
    set_weights = pair.router.set_weights

    def second_signal(target: Weights, **kw: Any) -> Weights:
        if target == Weights.green_at(0):
            stop.deliver(signal.SIGTERM)
        return set_weights(target, **kw)

    pair.router.set_weights = second_signal  # type: ignore[method-assign]
    outcome = machine.run()

    assert (outcome.state, outcome.status) == (State.ROLLED_BACK, Status.ROLLED_BACK)
    assert outcome.error is not None and "SIGTERM received" in outcome.error
    assert len(sleep.calls) == 3  # obeyed at the poll after the signal
    assert stop.exit_code(outcome) == STOPPED_EXIT
    assert pair.router.weights == Weights.green_at(0)
    err = capfd.readouterr().err
    assert "SIGTERM received (canary): rolling back: all traffic back to blue" in err
    assert "SIGTERM received (rolling back): finishing the rollback first" in err


def test_sigint_before_any_traffic_moved_stops_for_a_resume(pair: Pair) -> None:
    cfg = pair.config(canary={"stages": [{"weight": 0, "duration": "1h"},
                                         {"weight": 100, "duration": 0}]})
    pair.seed(cfg, State.CANARY, mode="switchover", majors={"blue": 15, "green": 15})
    sleep = FakeSleep()
    stop = stop_after(sleep, None)
    sleep.on(2, lambda: stop.deliver(signal.SIGINT))

    with pytest.raises(Interrupted, match="SIGINT received before the canary moved any "
                       "traffic: stopped, nothing to undo") as stopped:
        pair.release(cfg, sleep=sleep, stop=stop).run()
    assert stopped.value.exit_code == STOPPED_EXIT
    row = pair.row(cfg)
    assert (row.state, row.status, row.error) == (State.CANARY, Status.RUNNING, None)
    assert row.facts.rollback_reason is None
    assert pair.router.weights == Weights.green_at(0)
    # The lock is free: the next run resumes (here: straight to the rollback asked for).
    assert pair.release(cfg, sleep=FakeSleep()).run(rollback="done for today").status == (
        Status.ROLLED_BACK)


def test_a_canary_that_cannot_end_before_the_window_closes_does_not_start(
        pair: Pair) -> None:
    cfg = pair.config(**STAGES)
    pair.seed(cfg, State.CANARY, mode="switchover", majors={"blue": 15, "green": 15})
    sleep = FakeSleep()
    stop = stop_after(sleep, 1800.0, cfg)  # the stages take an hour

    outcome = pair.release(cfg, sleep=sleep, stop=stop).run()

    assert (outcome.state, outcome.status) == (State.CANARY, Status.RUNNING)
    assert stop.exit_code(outcome) == STOPPED_EXIT
    assert pair.router.history == [] and sleep.calls == []
    assert any(m.startswith("canary not started: its stages take 3600s") for m in pair.log(cfg))
    # In the next window there is time: it starts (and a SIGTERM at 50 % ends it).
    sleep = FakeSleep()
    later = stop_after(sleep, 7200.0, cfg)
    sleep.on(1, lambda: later.deliver(signal.SIGTERM))
    outcome = pair.release(cfg, sleep=sleep, stop=later).run()
    assert outcome.status == Status.ROLLED_BACK
    assert pair.router.history == [Weights.green_at(0), Weights.green_at(50),
                                   Weights.green_at(0)]
