"""The rollback-request policy both faces use, with a fake store and a fake lock: what
recording decides, and who executes the rollback."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orchestrator import rollback_request
from orchestrator.errors import LockedError
from orchestrator.record import NO_ROLLBACK_FROM
from orchestrator.rollback_request import NotRollbackable, Recorded
from orchestrator.store import ReleaseRow

T0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


class FakeStore:
    """The release row and its log; ``request_rollback`` has the store's WHERE clause."""

    def __init__(self, row: ReleaseRow | None) -> None:
        self.row = row
        self.entries: list[dict[str, Any]] = []
        self.writes = 0
        self.opened = 0
        self.closed = 0

    def get(self, name: str) -> ReleaseRow | None:
        return self.row

    def request_rollback(self, name: str, reason: str) -> bool:
        self.writes += 1
        if (self.row is None or self.row.rollback_requested
                or self.row.state in NO_ROLLBACK_FROM):
            return False
        self.row.rollback_requested = reason
        return True

    def log_entries(self, name: str, limit: int = 50) -> list[dict[str, Any]]:
        return self.entries[-limit:]

    def close(self) -> None:
        self.closed += 1

    def opener(self) -> Callable[[], FakeStore]:
        def open_store() -> FakeStore:
            self.opened += 1
            return self
        return open_store

    def logged(self, level: str, state: str, message: str) -> None:
        at = T0 + timedelta(seconds=len(self.entries))
        self.entries.append({"at": at, "level": level, "state": state, "message": message})


def row(state: str = "canary", status: str = "running", **kw: Any) -> ReleaseRow:
    return ReleaseRow(name="shop-r1", state=state, status=status, config_sha256="x", **kw)


# -- recording ------------------------------------------------------------------------


def test_a_new_request_is_recorded_with_its_reason() -> None:
    store = FakeStore(row())
    recorded = rollback_request.record(store, "shop-r1", "operator")
    assert recorded == Recorded(new=True, reason="operator")
    assert store.row is not None and store.row.rollback_requested == "operator"


def test_recording_is_idempotent_and_keeps_the_first_reason() -> None:
    store = FakeStore(row())
    rollback_request.record(store, "shop-r1", "first")
    again = rollback_request.record(store, "shop-r1", "second")
    assert not again.new and again.requested == "first" and again.reason == "first"
    assert store.row is not None and store.row.rollback_requested == "first"


def test_a_row_already_showing_a_request_spares_the_write() -> None:
    current = row(rollback_requested="alert X")
    store = FakeStore(current)
    recorded = rollback_request.record(store, "shop-r1", "alert Y", row=current)
    assert store.writes == 0
    assert not recorded.new and recorded.requested == "alert X"


def test_a_rollback_the_machine_started_carries_its_error() -> None:
    current = row(state="rollback", error="canary check failed")
    store = FakeStore(current)
    recorded = rollback_request.record(store, "shop-r1", "operator", row=current)
    assert recorded == Recorded(new=False, rolling_back=True, reason="canary check failed")
    assert store.writes == 0


def test_the_window_still_takes_a_request() -> None:
    store = FakeStore(row(state="window", status="promoted"))
    assert rollback_request.record(store, "shop-r1", "operator").new


@pytest.mark.parametrize(
    ("current", "said"),
    [(None, "it is not started"),
     (row(state="cleanup", status="promoted"), "it is cleanup"),
     (row(state="done", status="promoted"), "it is done"),
     (row(state="rolled_back", status="rolled_back"), "it is rolled_back")],
)
def test_a_release_with_nothing_to_roll_back_is_refused_with_its_state(
        current: ReleaseRow | None, said: str) -> None:
    with pytest.raises(NotRollbackable) as refused:
        rollback_request.record(FakeStore(current), "shop-r1", "operator")
    assert said in refused.value.message and refused.value.exit_code == 1
    assert refused.value.hint is not None and "roll" in refused.value.hint


# -- executing ------------------------------------------------------------------------


def test_perform_returns_the_outcome_or_none_when_the_release_is_held() -> None:
    assert rollback_request.perform(lambda why: f"rolled back: {why}", "x") == \
        rollback_request.Done("rolled back: x")
    # A run returning None (the receiver's) still counts as done here.
    assert rollback_request.perform(lambda why: None, "x") == rollback_request.Done(None)

    def held(_why: str) -> str:
        raise LockedError("another orchestrator is running a release")
    assert rollback_request.perform(held, "x") is None


class Lock:
    """The release lock as ``run`` meets it: held for ``held_for`` attempts."""

    def __init__(self, held_for: int) -> None:
        self.held_for = held_for
        self.runs: list[str] = []

    def run(self, why: str) -> str:
        if self.held_for:
            self.held_for -= 1
            raise LockedError("another orchestrator is running a release")
        self.runs.append(why)
        return "rolled_back"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds


def wait(store: FakeStore, lock: Lock, *, timeout: float = 600.0,
         on_log: Callable[[], None] | None = None) -> tuple[Any, list[Recorded], Clock]:
    clock, heard = Clock(), []

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if on_log is not None:
            on_log()
    waited = rollback_request.request_and_wait(
        "shop-r1", "operator", run=lock.run, open_store=store.opener(), timeout=timeout,
        on_recorded=heard.append, clock=lambda: clock.now, sleep=sleep)
    return waited, heard, clock


def test_nobody_holds_the_release_the_caller_rolls_back_without_a_request() -> None:
    store = FakeStore(row())
    waited, heard, clock = wait(store, Lock(held_for=0))
    assert waited.outcome == "rolled_back" and heard == [] and clock.sleeps == 0
    assert store.writes == 0


def test_a_holder_that_exits_without_acting_is_taken_over() -> None:
    store = FakeStore(row())
    lock = Lock(held_for=3)
    waited, heard, clock = wait(store, lock)
    assert waited.outcome == "rolled_back" and lock.runs == ["operator"]
    # Asked once, then polled every second until the lock freed.
    assert heard == [Recorded(new=True, reason="operator")] and store.writes == 1
    assert clock.sleeps == 3 and store.opened == store.closed


def test_a_rollback_failure_the_holder_logs_after_the_request_is_reported() -> None:
    store = FakeStore(row())
    store.logged("error", "rollback", "an older failure, before the request")

    def holder_fails() -> None:
        store.logged("error", "rollback", "green stopped answering")
    waited, _, clock = wait(store, Lock(held_for=100), on_log=holder_fails)
    assert waited.holder_failure == "green stopped answering" and waited.outcome is None
    assert clock.sleeps == 1


def test_an_older_failure_alone_does_not_end_the_wait() -> None:
    store = FakeStore(row())
    store.logged("error", "rollback", "an older failure, before the request")
    waited, _, clock = wait(store, Lock(held_for=100), timeout=5)
    assert waited == rollback_request.Waited() and clock.now >= 5


def test_a_refused_request_while_held_raises_and_closes_the_store() -> None:
    store = FakeStore(row(state="done", status="promoted"))
    with pytest.raises(NotRollbackable):
        wait(store, Lock(held_for=100))
    assert store.opened == store.closed == 1
