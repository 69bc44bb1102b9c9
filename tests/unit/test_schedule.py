"""Maintenance windows, deadlines and stops as arithmetic, with fixed clocks (DST
changes included), and what a stop does in each phase of a release."""

from __future__ import annotations

import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from orchestrator.config import MaintenanceWindow, ReleaseConfig, parse_config
from orchestrator.errors import STOPPED_EXIT, ConfigError, Interrupted
from orchestrator.interrupts import Phase, Stop
from orchestrator.record import Facts, Outcome, State, Status
from orchestrator.routers.base import Weights
from orchestrator.schedule import (
    Limit,
    canary_seconds,
    current_window,
    latest_opening,
    next_opening,
    run_limit,
)
from orchestrator.store import ReleaseRow

BERLIN = ZoneInfo("Europe/Berlin")


def at(*parts: int, zone: ZoneInfo = BERLIN, fold: int = 0) -> float:
    return datetime(*parts, tzinfo=zone, fold=fold).timestamp()  # type: ignore[misc]


def utc(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()  # type: ignore[misc]


def config(**extra: Any) -> ReleaseConfig:
    db = {"host": "127.0.0.1", "dbname": "shop", "user": "u"}
    raw = {"release": {"name": "r"}, "blue": db, "green": {**db, "dbname": "shop2"},
           "router": {"kind": "fake"},
           "canary": {"stages": [{"weight": 0, "duration": "2m"},
                                 {"weight": 50, "duration": "10m"},
                                 {"weight": 100, "duration": "3m"}],
                      "checks": [], "allow_unanalysed": True}, **extra}
    return parse_config(raw, base_dir=Path("/tmp"))


SATURDAY_3 = MaintenanceWindow(cron="0 3 * * 6", duration="4h", timezone="Europe/Berlin")


def test_a_window_is_open_from_its_fire_time_for_its_duration() -> None:
    # Saturday 2024-06-15, 03:00 to 07:00 in Berlin (summer time, UTC+2).
    assert current_window([SATURDAY_3], at(2024, 6, 15, 2, 59)) is None
    opened = current_window([SATURDAY_3], at(2024, 6, 15, 3, 0))
    assert opened is not None
    assert (opened.opens, opened.closes) == (utc(2024, 6, 15, 1, 0), utc(2024, 6, 15, 5, 0))
    assert current_window([SATURDAY_3], at(2024, 6, 15, 6, 59)) == opened
    assert current_window([SATURDAY_3], at(2024, 6, 15, 7, 0)) is None
    assert current_window([SATURDAY_3], at(2024, 6, 16, 4, 0)) is None  # Sunday
    upcoming = next_opening([SATURDAY_3], at(2024, 6, 15, 7, 0))
    assert upcoming is not None and upcoming.opens == utc(2024, 6, 22, 1, 0)
    assert upcoming.describe(upcoming.opens) == "2024-06-22 03:00 Europe/Berlin"


def test_the_window_lasts_its_duration_in_elapsed_time_across_the_spring_change() -> None:
    # 2024-03-31: Berlin skips 02:00-03:00. A 01:30 window of 4h ends at 06:30 local
    # (four real hours, one of them skipped on the wall clock).
    night = MaintenanceWindow(cron="30 1 * * *", duration="4h", timezone="Europe/Berlin")
    opened = current_window([night], at(2024, 3, 31, 5, 0))
    assert opened is not None
    assert opened.opens == utc(2024, 3, 31, 0, 30)
    assert opened.closes == utc(2024, 3, 31, 4, 30) == at(2024, 3, 31, 6, 30)


def test_a_fire_time_the_spring_change_skips_opens_after_the_gap() -> None:
    skipped = MaintenanceWindow(cron="30 2 * * *", duration="1h", timezone="Europe/Berlin")
    opened = current_window([skipped], at(2024, 3, 31, 3, 10))
    assert opened is not None
    assert opened.opens == at(2024, 3, 31, 3, 0) == utc(2024, 3, 31, 1, 0)
    assert opened.closes == at(2024, 3, 31, 4, 0)


def test_a_fire_time_the_autumn_change_repeats_opens_once() -> None:
    # 2024-10-27: 02:00-03:00 happens twice in Berlin (UTC+2, then UTC+1).
    twice = MaintenanceWindow(cron="30 2 * * *", duration="1h", timezone="Europe/Berlin")
    first = at(2024, 10, 27, 2, 30, fold=0)
    assert first == utc(2024, 10, 27, 0, 30)
    opened = current_window([twice], at(2024, 10, 27, 2, 40, fold=0))
    assert opened is not None and (opened.opens, opened.closes) == (
        first, utc(2024, 10, 27, 1, 30))
    # The second 02:40 is one hour later: the window (one real hour) has closed, and
    # the repeated 02:30 opens no second window.
    assert current_window([twice], at(2024, 10, 27, 2, 40, fold=1)) is None
    assert latest_opening(twice, at(2024, 10, 27, 3, 20)).opens == first


def test_of_several_open_windows_the_one_closing_last_counts() -> None:
    short = MaintenanceWindow(cron="0 3 * * *", duration="1h", timezone="UTC")
    long = MaintenanceWindow(cron="0 2 * * *", duration="3h", timezone="UTC")
    opened = current_window([short, long], utc(2024, 6, 15, 3, 30))
    assert opened is not None and opened.closes == utc(2024, 6, 15, 5, 0)


def test_the_limit_is_the_earlier_of_deadline_and_window_end_less_the_margin() -> None:
    cfg = config(release={"name": "r", "deadline": "2h", "deadline_margin": "10m"})
    started = at(2024, 6, 15, 3, 0)
    window = current_window([SATURDAY_3], started)
    limit = run_limit(cfg, started=started, window=window)
    assert limit is not None and limit.at == started + 7200 - 600
    assert limit.what.startswith("deadline 2:00:00 after the run started passes at ")
    late = at(2024, 6, 15, 6, 0)  # one hour before the window closes
    limit = run_limit(cfg, started=late, window=current_window([SATURDAY_3], late))
    assert limit is not None and limit.at == utc(2024, 6, 15, 5, 0) - 600
    assert limit.what == "maintenance window closes at 2024-06-15 07:00 Europe/Berlin"
    assert run_limit(config(), started=late, window=None) is None
    assert canary_seconds(cfg) == 900 and canary_seconds(cfg, 2) == 180


@pytest.mark.parametrize(("window", "field", "says"), [
    ({"cron": "0 3 * *", "duration": "1h"}, "schedule.windows[0].cron", "five fields"),
    ({"cron": "61 3 * * *", "duration": "1h"}, "schedule.windows[0].cron", "five fields"),
    ({"cron": "0 0 3 * * 6", "duration": "1h"}, "schedule.windows[0].cron", "five fields"),
    ({"cron": "0 3 * * 6", "duration": "4 hours"}, "schedule.windows[0].duration",
     "not a duration"),
    ({"cron": "0 3 * * 6", "duration": 0}, "schedule.windows[0].duration", "longer than 0s"),
    ({"cron": "0 3 * * 6", "duration": "1h", "timezone": "Europe/Berlinn"},
     "schedule.windows[0].timezone", "IANA"),
    ({"cron": "0 3 * * 6", "duration": "1h", "timezone": "../etc/passwd"},
     "schedule.windows[0].timezone", "IANA"),
])
def test_a_malformed_window_is_a_config_error_naming_the_field(
        window: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(ConfigError) as bad:
        config(schedule={"windows": [window]})
    assert bad.value.exit_code == 2
    assert f"invalid configuration: {field}: " in bad.value.message
    assert says in bad.value.message


def test_a_malformed_deadline_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"release\.deadline: .*not a duration"):
        config(release={"name": "r", "deadline": "soon"})


# ------------------------------------------------------------------------ stops


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def stop_with(facts: Facts, state: State | None, *, limit_in: float | None = None,
              cfg: ReleaseConfig | None = None) -> tuple[Stop, Clock]:
    clock = Clock(1000.0)
    limit = None if limit_in is None else Limit(1000.0 + limit_in, "the test's limit")
    stop = Stop(limit, cfg=cfg, clock=clock)
    stop.state = state
    stop.facts_of = lambda: facts
    return stop, clock


MOVED = Facts(weights_target=Weights.green_at(20), weights=Weights.green_at(20),
              green_writable=True)


def test_outside_every_window_the_run_is_closed_unless_forced() -> None:
    cfg = config(schedule={"windows": [SATURDAY_3.model_dump()]})
    closed = Stop.for_run(cfg, clock=lambda: at(2024, 6, 14, 3, 0))  # a Friday
    assert closed.closed is not None
    assert "outside every maintenance window" in closed.closed
    assert "the next one opens at 2024-06-15 03:00 Europe/Berlin" in closed.closed
    forced = Stop.for_run(cfg, force=True, clock=lambda: at(2024, 6, 14, 3, 0))
    assert forced.closed is None and forced.limit is None
    inside = Stop.for_run(cfg, clock=lambda: at(2024, 6, 15, 4, 0))
    assert inside.closed is None and inside.limit is not None
    assert inside.limit.at == utc(2024, 6, 15, 5, 0) - 300  # the default margin: 5m


def test_a_stop_before_any_traffic_moved_interrupts_for_a_resume() -> None:
    for state, facts in [(State.SYNC, Facts()),
                         (State.CANARY, Facts(weights_target=Weights.green_at(0)))]:
        stop, _ = stop_with(facts, state)
        assert stop.phase() == Phase.BEFORE
        with pytest.raises(Interrupted, match="SIGTERM received before the canary"):
            stop.deliver(signal.SIGTERM)
        assert stop.acted


def test_a_signal_before_the_first_state_waits_for_the_loaded_facts(
        capfd: pytest.CaptureFixture[str]) -> None:
    # A resumed canary whose facts are not loaded yet reads as "before the canary":
    # acting then would exit "nothing to undo" with users on green.
    stop, _ = stop_with(Facts(), None)
    stop.deliver(signal.SIGTERM)
    stop.deliver(signal.SIGALRM)
    assert not stop.acted and "acted on at its first state" in capfd.readouterr().err
    stop.facts_of = lambda: MOVED
    assert stop.at(State.CANARY) == "SIGTERM received: all traffic back to blue"


def test_a_switchover_under_way_is_traffic_moved() -> None:
    # Blue fenced, the forward path dropped, green not yet writable: a stop there must
    # roll back (it unfences blue), not exit "nothing to undo".
    for facts in (Facts(blue_fenced=True), Facts(forward_dropped=True)):
        stop, _ = stop_with(facts, State.PROMOTE)
        assert stop.phase() == Phase.CANARY
        stop.deliver(signal.SIGTERM)
        assert stop.check() == "SIGTERM received: all traffic back to blue"


def test_outside_every_window_a_release_left_with_users_on_green_is_finished() -> None:
    cfg = config(schedule={"windows": [{"cron": "0 3 * * 6", "duration": "1h",
                                        "timezone": "UTC"}]})
    closed = Stop.for_run(cfg, clock=lambda: utc(2026, 12, 2, 12, 0))  # a Wednesday
    assert closed.closed
    row = ReleaseRow(name="r", state=State.CANARY, status=Status.RUNNING,
                     config_sha256="x", facts=MOVED)
    now = closed.left_unfinished(row)
    assert now.closed is None and now.limit is not None
    assert now.limit.at == utc(2026, 12, 2, 12, 0)
    assert "with r left in canary" in now.limit.what
    # Nothing moved, or over: the run stays closed and changes nothing.
    for quiet in (None, ReleaseRow(name="r", state=State.SYNC, status=Status.RUNNING,
                                   config_sha256="x"),
                  ReleaseRow(name="r", state=State.DONE, status=Status.PROMOTED,
                             config_sha256="x", facts=MOVED)):
        assert closed.left_unfinished(quiet) is closed


def test_a_stop_during_the_canary_asks_for_a_rollback_and_never_raises() -> None:
    stop, clock = stop_with(MOVED, State.CANARY, limit_in=60)
    assert stop.check() is None
    clock.now += 60
    assert stop.check() == "deadline: the test's limit: all traffic back to blue"
    stop, _ = stop_with(MOVED, State.CANARY)
    stop.deliver(signal.SIGINT)
    stop.deliver(signal.SIGALRM)  # the timer at the limit: the guard reads the clock
    assert stop.check() == "SIGINT received: all traffic back to blue"
    assert stop.exit_code(Outcome("r", State.ROLLED_BACK, Status.ROLLED_BACK, "x")) == (
        STOPPED_EXIT)


def test_signals_while_rolling_back_or_promoted_change_nothing(
        capfd: pytest.CaptureFixture[str]) -> None:
    stop, _ = stop_with(MOVED.model_copy(update={"rollback_reason": "x"}), State.CANARY)
    stop.deliver(signal.SIGTERM)
    stop.deliver(signal.SIGTERM)
    assert stop.check() is None and stop.signals == 2
    assert capfd.readouterr().err.count("finishing the rollback first") == 2
    stop, _ = stop_with(MOVED, State.WINDOW)
    stop.deliver(signal.SIGTERM)
    assert stop.check() is None and stop.stop_waiting() and not stop.acted
    assert "stays promoted" in capfd.readouterr().err
    assert stop.exit_code(Outcome("r", State.WINDOW, Status.PROMOTED, None)) == 0


def test_a_canary_that_cannot_end_before_the_limit_is_not_started() -> None:
    cfg = config()  # 15 minutes of stages
    stop, _ = stop_with(Facts(), State.CANARY, limit_in=899, cfg=cfg)
    paused = stop.before_canary()
    assert paused is not None and "its stages take 900s" in paused.message
    assert stop.exit_code(Outcome("r", State.CANARY, Status.RUNNING, None)) == STOPPED_EXIT
    stop, _ = stop_with(Facts(), State.CANARY, limit_in=900, cfg=cfg)
    assert stop.before_canary() is None and not stop.acted
    # Resumed at the last stage: only its 3 minutes count.
    stop, _ = stop_with(Facts(stage=2), State.CANARY, limit_in=200, cfg=cfg)
    assert stop.before_canary() is None


def test_the_handlers_are_installed_for_the_run_and_restored_after() -> None:
    before = signal.getsignal(signal.SIGTERM)
    stop, _ = stop_with(MOVED, State.CANARY)
    with stop.handling_signals():
        assert signal.getsignal(signal.SIGTERM) == stop._on_signal
        signal.raise_signal(signal.SIGTERM)
        assert stop.signalled == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before
