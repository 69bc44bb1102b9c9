"""Maintenance windows and deadlines as arithmetic: pure functions of the config and
a clock reading (seconds since the epoch), so that they are tested with fixed clocks.

- A window opens at each fire time of its cron expression, read as wall-clock time
  in its zone (``croniter``, with ``zoneinfo``), and lasts ``duration`` of elapsed
  time. Across a daylight-saving change: a fire time the spring change skips opens
  at the first minute after the gap (what ``croniter`` gives); a fire time the
  autumn change repeats opens once, at its first occurrence.
- The limit of a run is the earlier of its deadline (``release.deadline`` after the
  run started) and the end of the window it runs in, less ``release.deadline_margin``
  (the time a rollback takes): past it, a canary not yet promoted rolls back.
- The canary needs the sum of its remaining stages' durations: a run that cannot
  fit them before its limit does not start them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

from orchestrator.config import MaintenanceWindow, ReleaseConfig


@dataclass(frozen=True)
class Window:
    """One opening of a maintenance window, as epoch seconds."""

    opens: float
    closes: float
    zone: str

    def describe(self, at: float | None = None) -> str:
        when = self.closes if at is None else at
        local = datetime.fromtimestamp(when, ZoneInfo(self.zone))
        return f"{local:%Y-%m-%d %H:%M} {self.zone}"


@dataclass(frozen=True)
class Limit:
    """When the run must start rolling back (``at``), and why (``what``)."""

    at: float
    what: str


def _opening(window: MaintenanceWindow, fire: datetime) -> Window:
    zone = ZoneInfo(window.timezone)
    # croniter gives both occurrences of a wall time the autumn change repeats:
    # the window opens at the first one, once.
    first = fire.replace(tzinfo=None).replace(tzinfo=zone, fold=0)
    if first.utcoffset() == first.replace(fold=1).utcoffset() or first > fire:
        first = fire
    opens = first.timestamp()
    return Window(opens, opens + window.duration, window.timezone)


def latest_opening(window: MaintenanceWindow, now: float) -> Window:
    """The last opening at or before ``now`` (it may have closed since)."""
    zone = ZoneInfo(window.timezone)
    # A second past now: a run started by a CronJob at the exact fire time (cron has
    # minute resolution) is inside the window that fire time opens.
    local = datetime.fromtimestamp(now + 1, zone)
    fire = croniter(window.cron, local).get_prev(datetime)
    opening = _opening(window, fire)
    if opening.opens > now:  # the first occurrence moved it past now: one more back
        fire = croniter(window.cron, fire).get_prev(datetime)
        opening = _opening(window, fire)
    return opening


def current_window(windows: Sequence[MaintenanceWindow], now: float) -> Window | None:
    """The open window that stays open longest, or None when none is open."""
    open_now = [w for w in (latest_opening(each, now) for each in windows)
                if w.opens <= now < w.closes]
    return max(open_now, key=lambda w: w.closes, default=None)


def next_opening(windows: Sequence[MaintenanceWindow], now: float) -> Window | None:
    """The first window to open after ``now``."""
    found = []
    for each in windows:
        zone = ZoneInfo(each.timezone)
        fire = croniter(each.cron, datetime.fromtimestamp(now, zone)).get_next(datetime)
        found.append(_opening(each, fire))
    return min(found, key=lambda w: w.opens, default=None)


def canary_seconds(cfg: ReleaseConfig, from_stage: int = 0) -> float:
    """How long the canary stages from ``from_stage`` on take when every one passes
    on time (manual gates and a person's approval come on top)."""
    return sum(stage.duration for stage in cfg.canary.stages[from_stage:])


def run_limit(cfg: ReleaseConfig, *, started: float, window: Window | None) -> Limit | None:
    """When a run started at ``started`` inside ``window`` (None: no window applies)
    must begin its rollback, or None when nothing limits it."""
    margin = cfg.release.deadline_margin
    found: list[Limit] = []
    if cfg.release.deadline is not None:
        at = started + cfg.release.deadline
        found.append(Limit(at - margin, f"deadline {_span(cfg.release.deadline)} after the "
                           f"run started passes at {_utc(at)}"))
    if window is not None:
        found.append(Limit(window.closes - margin,
                           f"maintenance window closes at {window.describe()}"))
    return min(found, key=lambda limit: limit.at, default=None)


def _span(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def _utc(at: float) -> str:
    return f"{datetime.fromtimestamp(at, UTC):%Y-%m-%d %H:%M:%S} UTC"
