"""The state machine driven in process: each test starts from the release row a run
left (written with the store's own methods), runs ``Release.run`` once or twice, and
reads the outcome, the row, the log and the fake router. Nothing sleeps."""

from __future__ import annotations

import time

import psycopg
import pytest

from orchestrator.errors import OrchestrateError, PreflightError, ReleaseFailed
from orchestrator.events import Kind
from orchestrator.record import State, Status
from orchestrator.routers.base import Weights
from tests.machine.conftest import SWITCHED_OVER, FakeSleep, Pair, Stop

PROMOTED = {**SWITCHED_OVER, "stage": 2}


def test_cleanup_failure_stays_promoted_and_the_rerun_retries_it(pair: Pair) -> None:
    cfg = pair.config()
    pair.seed(cfg, State.CLEANUP, status=Status.PROMOTED,
              promoted_at=time.time() - 7200, **PROMOTED)
    pair.router.weights = Weights.green_at(100)
    # Green's database is gone (a person dropped it, a restore is under way): cleanup
    # cannot reach it.
    with psycopg.connect(pair.cluster.conninfo(), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{pair.green}"')

    with pytest.raises(ReleaseFailed, match="cleanup did not complete") as failed:
        pair.release(cfg, sleep=FakeSleep()).run()
    assert "does not exist" in failed.value.message
    row = pair.row(cfg)
    assert (row.state, row.status) == (State.CLEANUP, Status.PROMOTED)
    assert row.error is not None and pair.green in row.error
    assert row.facts.rollback_reason is None
    assert pair.router.history == []

    pair.cluster.create_database(pair.green)
    outcome = pair.release(cfg, sleep=FakeSleep()).run()
    assert (outcome.state, outcome.status, outcome.exit_code) == (
        State.DONE, Status.PROMOTED, 0)
    assert "replication objects removed; release complete" in pair.log(cfg)
    assert pair.router.history == []


def test_cleanup_refuses_a_rollback(pair: Pair) -> None:
    cfg = pair.config()
    store = pair.seed(cfg, State.CLEANUP, status=Status.PROMOTED,
                      promoted_at=time.time() - 7200, **PROMOTED)
    pair.router.weights = Weights.green_at(100)
    assert store.request_rollback(cfg.release.name, "too late") is False

    with pytest.raises(OrchestrateError, match=r"past its rollback window \(cleanup started\)"
                       ) as refused:
        pair.release(cfg, sleep=FakeSleep()).run(rollback="green is slow")
    assert refused.value.hint == "roll forward with a new release instead"
    row = pair.row(cfg)
    assert (row.state, row.status, row.rollback_requested) == (
        State.CLEANUP, Status.PROMOTED, None)
    assert row.facts.rollback_reason is None
    assert pair.router.history == []


def test_a_rollback_requested_in_the_window_is_obeyed_at_the_next_poll(pair: Pair) -> None:
    cfg = pair.config()
    pair.seed(cfg, State.WINDOW, status=Status.PROMOTED, promoted_at=time.time(), **PROMOTED)
    pair.router.weights = Weights.green_at(100)
    # Another process (`orchestrate rollback`) asks while the machine waits.
    other = pair.store(cfg)
    sleep = FakeSleep(limit=20)
    sleep.on(3, lambda: other.request_rollback(cfg.release.name, "error budget burnt"))

    started = time.monotonic()
    outcome = pair.release(cfg, sleep=sleep, wait_window=True).run()
    assert time.monotonic() - started < 5.0

    assert len(sleep.calls) == 3, sleep.calls
    assert all(0 < s <= 1.0 for s in sleep.calls)
    assert (outcome.state, outcome.status) == (State.ROLLED_BACK, Status.ROLLED_BACK)
    assert pair.router.weights == Weights.green_at(0)
    row = pair.row(cfg)
    assert row.facts.rollback_from == State.WINDOW
    assert row.facts.rollback_reason == "error budget burnt"
    assert row.facts.rolled_back_at is not None
    milestones = [e for e in pair.events.events
                  if e.kind in {Kind.ROLLING_BACK, Kind.ROLLED_BACK}]
    assert [(e.kind, e.state, e.reason) for e in milestones] == [
        (Kind.ROLLING_BACK, "window", "error budget burnt"),
        (Kind.ROLLED_BACK, "rolled_back", "error budget burnt")]


def test_weights_drifted_to_the_target_are_adopted_on_resume(pair: Pair) -> None:
    """A crash between the router change and recording it: the router holds the
    target of the stage that was starting; that is ours, not a drift."""
    cfg = pair.config(sync={"accept_write_loss_risk": True}, canary={"stages": [
        {"weight": 0, "duration": 0}, {"weight": 50, "duration": 0},
        {"weight": 100, "duration": 0, "manual_gate": True}]})
    pair.seed(cfg, State.CANARY, mode="switchover", majors={"blue": 15, "green": 15},
              stage=1, green_writable=True, weights=Weights.green_at(0),
              weights_target=Weights.green_at(50))
    pair.router.weights = Weights.green_at(50)

    def ctrl_c() -> None:
        raise Stop("operator pressed Ctrl-C at the manual gate")

    sleep = FakeSleep()
    sleep.on(1, ctrl_c)
    with pytest.raises(Stop):
        pair.release(cfg, sleep=sleep).run()

    row = pair.row(cfg)
    assert (row.state, row.status, row.error) == (State.CANARY, Status.RUNNING, None)
    assert row.facts.weights == Weights.green_at(50)
    assert row.facts.stage == 2  # the 50 % stage ran; the machine waits at the gate
    assert pair.router.history == []  # adopted, not set again
    assert "waiting for approval of stage 3" in " ".join(pair.log(cfg))


def test_weights_drifted_elsewhere_roll_back(pair: Pair) -> None:
    cfg = pair.config()
    pair.seed(cfg, State.CANARY, mode="switchover", stage=0,
              weights=Weights.green_at(0), weights_target=Weights.green_at(0))
    # A person moved traffic by hand while the release was stopped.
    pair.router.weights = Weights.green_at(30)

    outcome = pair.release(cfg, sleep=FakeSleep()).run()

    assert (outcome.state, outcome.status) == (State.ROLLED_BACK, Status.ROLLED_BACK)
    assert outcome.error is not None and "canary failed" in outcome.error
    assert "blue 70% / green 30%" in outcome.error
    assert pair.router.weights == Weights.green_at(0)
    assert pair.row(cfg).facts.rollback_from == State.CANARY


def test_an_inconclusive_stage_pauses_until_approved_then_goes_on(pair: Pair) -> None:
    cfg = pair.config(canary={"on_inconclusive": "pause"})
    pair.seed(cfg, State.CANARY, **{**SWITCHED_OVER, "stage": 1})
    pair.router.weights = Weights.green_at(100)
    other = pair.store(cfg)
    sleep = FakeSleep(limit=100_000)
    approved: list[int] = []

    def approve_when_paused() -> None:
        row = other.get(cfg.release.name)
        assert row is not None
        if row.facts.awaiting_approval is not None and not approved:
            approved.append(len(sleep.calls))
            other.approve_stage(cfg.release.name, row.facts.awaiting_approval)

    sleep.each = approve_when_paused
    outcome = pair.release(cfg, sleep=sleep).run()

    assert approved, "the machine never paused for an approval"
    # Metrics without data are inconclusive, never a pass: the stage was judged so.
    assert pair.metrics.queries and "colour='green'" in pair.metrics.queries[0]
    messages = pair.log(cfg)
    assert any(m.startswith("stage 100% inconclusive, waiting for a person") for m in messages)
    assert "the promotion approved" in messages
    # Went on: promoted, and stopped in its (not waited for) rollback window.
    assert (outcome.state, outcome.status) == (State.WINDOW, Status.PROMOTED)
    row = pair.row(cfg)
    assert row.facts.awaiting_approval is None and row.facts.stage == 2
    assert row.facts.promoted_at is not None
    kinds = pair.events.kinds()
    assert kinds.count(Kind.AWAITING_APPROVAL) == 1
    assert [(e.stage, e.stages) for e in pair.events.events
            if e.kind == Kind.AWAITING_APPROVAL] == [(None, 2)]
    assert Kind.STAGE_PASSED in kinds
    assert kinds[-3:] == [Kind.STATE_DONE, Kind.PROMOTED, Kind.STATE]  # then the window
    done = [e for e in pair.events.events if e.kind == Kind.STATE_DONE]
    assert [e.state for e in done] == ["canary", "promote"]
    assert all(e.details["duration_s"] >= 0 for e in done)


def test_a_finished_release_refuses_a_rollback(pair: Pair) -> None:
    cfg = pair.config()
    pair.seed(cfg, State.DONE, status=Status.PROMOTED, promoted_at=time.time() - 7200,
              **PROMOTED)
    pair.router.weights = Weights.green_at(100)

    with pytest.raises(OrchestrateError, match="is done: past its rollback window") as refused:
        pair.release(cfg, sleep=FakeSleep()).run(rollback="regret")
    assert refused.value.hint == "roll forward with a new release instead"
    row = pair.row(cfg)
    assert (row.state, row.status, row.rollback_requested) == (State.DONE, Status.PROMOTED,
                                                               None)
    assert pair.router.history == []


def test_a_router_failure_during_a_stage_rolls_back(pair: Pair) -> None:
    cfg = pair.config()
    pair.seed(cfg, State.CANARY, mode="switchover", majors={"blue": 15, "green": 15}, stage=0)
    pair.router.fail_next = 1

    outcome = pair.release(cfg, sleep=FakeSleep()).run()

    assert (outcome.state, outcome.status) == (State.ROLLED_BACK, Status.ROLLED_BACK)
    assert outcome.error is not None and "fake router told to fail" in outcome.error
    # The stage's change was refused; the rollback's one went through.
    assert pair.router.history == [Weights.green_at(0)]
    row = pair.row(cfg)
    assert row.facts.rollback_from == State.CANARY
    assert row.facts.weights_target == Weights.green_at(0)


def test_a_preflight_problem_changes_nothing(pair: Pair) -> None:
    cfg = pair.config()
    with psycopg.connect(pair.cluster.conninfo(pair.blue), autocommit=True) as blue:
        blue.execute("CREATE TABLE events (at timestamptz, what text)")  # no primary key

    with pytest.raises(PreflightError, match="nothing was changed") as refused:
        pair.release(cfg, sleep=FakeSleep()).run()

    assert "table public.events has no primary key" in refused.value.message
    assert pair.store(cfg).exists() is False  # not even the control schema
    assert pair.router.history == []
    with psycopg.connect(pair.cluster.conninfo(pair.blue), autocommit=True) as blue:
        assert blue.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)
