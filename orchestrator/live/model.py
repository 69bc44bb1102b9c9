"""What the live view shows, as plain data: one model for both ways of watching.

``orchestrate release`` feeds it the release's events as they happen
(``ViewModel.apply``); ``orchestrate status --watch`` rebuilds it from the control
schema every interval (``from_store``). Either way the same renderer
(``orchestrator.live.render``) draws it, so the two views cannot drift apart.

Only what the release measured is shown: check values and their limits, the
replication lag per direction, the side probes. Stage numbers are 1-based, as
people read them ("stage 2/4"); the store keeps 0-based indexes, converted here,
and a measurement taken after the last stage (the rollback window's probes) is
shown as the window's, not as a stage "5/4".
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from orchestrator.config import MetricCheck, ReleaseConfig
from orchestrator.events import Event, Kind
from orchestrator.record import TERMINAL, State, Status
from orchestrator.store import ReleaseRow, StateStore

# The note a stage writes once its weights are set (orchestrator.stages).
_STAGE_NOTE = re.compile(r"^stage (\d+)/(\d+): (\d+)% to green")
LAG_PREFIX = "replication-lag"
# Rows of the release log read per refresh of `status --watch`: enough for every
# state's "done" line of a long release, and one cheap query.
LOG_ROWS = 500


@dataclass
class Span:
    """A state of the timeline: ``duration_s`` is None while it runs."""

    state: str
    started: float | None
    duration_s: float | None = None
    # Left for a rollback (or a failure) instead of ending well.
    interrupted: bool = False


@dataclass
class Reading:
    """The last value of one check, probe, hook or lag measurement."""

    name: str
    value: float | None
    baseline: float | None
    verdict: str
    stage: int | None  # 1-based; None: taken in the rollback window
    at: float


@dataclass
class Bar:
    description: str
    done: float
    total: float


@dataclass
class ViewModel:
    release: str
    # (weight, duration in seconds) of each stage, from the config.
    stages: list[tuple[int, float]]
    # A check's limit as a person reads it ("<= 0.05", "<= blue + 0.01").
    limits: dict[str, str] = field(default_factory=dict)
    window_s: float = 0.0
    max_lag_bytes: int | None = None
    state: str | None = None
    status: str = Status.RUNNING.value
    timeline: list[Span] = field(default_factory=list)
    stage: int | None = None  # the current stage, 1-based
    stage_started: float | None = None
    green_weight: int | None = None
    readings: dict[str, Reading] = field(default_factory=dict)
    awaiting: str | None = None
    reason: str | None = None
    promoted_at: float | None = None
    progress: dict[str, Bar] = field(default_factory=dict)
    started: bool = True
    # Why the view is not current (`status --watch` lost the state database).
    stale: str | None = None

    @classmethod
    def for_config(cls, cfg: ReleaseConfig) -> ViewModel:
        canary = cfg.canary
        return cls(release=cfg.release.name,
                   stages=[(s.weight, s.duration) for s in canary.stages],
                   limits={c.name: limit_text(c) for c in canary.checks},
                   window_s=cfg.rollback.window, max_lag_bytes=cfg.sync.max_lag_bytes)

    # -------------------------------------------------------------- derived

    @property
    def finished(self) -> bool:
        """Nothing more will happen without a person: `status --watch` stops."""
        return (self.state in {s.value for s in TERMINAL}
                or self.status == Status.FAILED.value)

    def stage_number(self, index: int) -> int | None:
        """A stored 0-based stage index as people read it; None past the last stage."""
        return index + 1 if index < len(self.stages) else None

    def stage_left(self, now: float) -> float | None:
        if self.stage is None or self.stage_started is None or self.stage > len(self.stages):
            return None
        return max(0.0, self.stages[self.stage - 1][1] - (now - self.stage_started))

    def window_left(self, now: float) -> float | None:
        if self.promoted_at is None or self.state != State.WINDOW.value:
            return None
        return max(0.0, self.promoted_at + self.window_s - now)

    # --------------------------------------------------------------- events

    def apply(self, event: Event) -> None:
        self.started = True
        handler = _HANDLERS.get(event.kind)
        if handler is not None:
            handler(self, event)

    def _on_started(self, event: Event) -> None:
        self.timeline.append(Span(State.PREFLIGHT.value, None, 0.0))

    def _on_state(self, event: Event) -> None:
        state = event.state or ""
        self.state = state
        last = self.timeline[-1] if self.timeline else None
        if last is not None and last.duration_s is None and last.state == state:
            # Resumed: the state read from the store starts again, now.
            last.started = event.at
        else:
            if last is not None and last.duration_s is None:
                _interrupt(last, event.at)
            self.timeline.append(Span(state, event.at))
        if state == State.CANARY.value:
            self.stage_started = event.at
        if state == State.ROLLBACK.value:
            self.status = Status.RUNNING.value

    def _on_state_done(self, event: Event) -> None:
        for span in reversed(self.timeline):
            if span.state == event.state and span.duration_s is None:
                span.duration_s = float(event.details.get("duration_s", 0.0))
                break

    def _on_stage_passed(self, event: Event) -> None:
        passed = event.stage or 0
        self.awaiting = None
        if passed < len(self.stages):
            self.stage, self.stage_started = passed + 1, event.at
            self.green_weight = event.weight

    def _on_measurement(self, event: Event) -> None:
        details = event.details
        stage = event.stage if event.stage is not None and event.stage <= len(
            self.stages) else None
        if stage is not None and self.stage is None:
            # Resumed mid-canary: the first measurement tells which stage runs.
            self.stage = stage
        if stage is not None:
            self.green_weight = event.weight
        name = str(details.get("check"))
        self.readings[name] = Reading(name, details.get("value"), details.get("baseline"),
                                      str(details.get("verdict")), stage, event.at)

    def _on_awaiting(self, event: Event) -> None:
        self.awaiting = str(event.details.get("awaiting") or "the next stage")

    def _on_rolling_back(self, event: Event) -> None:
        self.reason = event.reason
        self.awaiting = None

    def _on_promoted(self, event: Event) -> None:
        self.status, self.promoted_at, self.green_weight = Status.PROMOTED.value, event.at, 100

    def _on_rolled_back(self, event: Event) -> None:
        self.status, self.green_weight = Status.ROLLED_BACK.value, 0
        self.state = State.ROLLED_BACK.value
        self.reason = event.reason or self.reason

    def _on_failed(self, event: Event) -> None:
        self.status, self.reason = Status.FAILED.value, event.reason
        if self.timeline and self.timeline[-1].duration_s is None:
            _interrupt(self.timeline[-1], event.at)

    def _on_done(self, event: Event) -> None:
        self.state = State.DONE.value


def _interrupt(span: Span, at: float) -> None:
    span.duration_s = max(0.0, at - span.started) if span.started is not None else 0.0
    span.interrupted = True


_HANDLERS = {
    Kind.STARTED: ViewModel._on_started,
    Kind.STATE: ViewModel._on_state,
    Kind.STATE_DONE: ViewModel._on_state_done,
    Kind.STAGE_PASSED: ViewModel._on_stage_passed,
    Kind.MEASUREMENT: ViewModel._on_measurement,
    Kind.AWAITING_APPROVAL: ViewModel._on_awaiting,
    Kind.ROLLING_BACK: ViewModel._on_rolling_back,
    Kind.PROMOTED: ViewModel._on_promoted,
    Kind.ROLLED_BACK: ViewModel._on_rolled_back,
    Kind.FAILED: ViewModel._on_failed,
    Kind.DONE: ViewModel._on_done,
}


def limit_text(check: MetricCheck) -> str:
    parts = []
    if check.min is not None:
        parts.append(f">= {check.min:g}")
    if check.max is not None:
        parts.append(f"<= {check.max:g}")
    if check.max_increase_over_blue is not None:
        parts.append(f"<= blue + {check.max_increase_over_blue:g}")
    if check.max_decrease_from_blue is not None:
        parts.append(f">= blue - {check.max_decrease_from_blue:g}")
    return ", ".join(parts)


# ------------------------------------------------------------------ the store


def _epoch(at: datetime | None) -> float | None:
    return at.timestamp() if at is not None else None


def from_store(store: StateStore, cfg: ReleaseConfig) -> ViewModel:
    """The model as the control schema has it now (`status --watch`)."""
    model = ViewModel.for_config(cfg)
    row = store.get(cfg.release.name)
    if row is None:
        model.started = False
        return model
    _from_row(model, row)
    _from_log(model, store.log_entries(row.name, limit=LOG_ROWS),
              _epoch(row.updated_at) or time.time())
    for m in store.latest_measurements(row.name):
        at = _epoch(m["at"]) or 0.0
        model.readings[m["check_name"]] = Reading(
            m["check_name"], m["value"], m["baseline"], m["verdict"],
            model.stage_number(m["stage"]), at)
    return model


def _from_row(model: ViewModel, row: ReleaseRow) -> None:
    facts = row.facts
    model.state, model.status = row.state.value, row.status.value
    model.reason = facts.rollback_reason or row.error
    model.promoted_at = facts.promoted_at
    if facts.weights is not None:
        model.green_weight = facts.weights.green
    if row.state == State.CANARY:
        model.stage = min(facts.stage + 1, len(model.stages))
    if facts.awaiting_approval is not None:
        index = facts.awaiting_approval
        model.awaiting = (f"stage {index + 1}" if index < len(model.stages)
                          else "the promotion")


def _from_log(model: ViewModel, entries: list[dict[str, Any]], updated: float) -> None:
    """The timeline from the "<state> done" lines, the stage's start from its note."""
    current_started = None
    for e in entries:
        at = _epoch(e["at"]) or 0.0
        span = _span_ended(e, at, current_started)
        if span is not None:
            model.timeline.append(span)
        if span is not None or e["message"].startswith("resuming in state "):
            current_started = at
        noted = _STAGE_NOTE.match(e["message"])
        if noted and model.state == State.CANARY.value and int(noted[1]) == model.stage:
            model.stage_started = at
    if model.state is not None and not model.finished:
        model.timeline.append(Span(model.state, current_started or updated))


def _span_ended(entry: dict[str, Any], at: float, started: float | None) -> Span | None:
    """The state a log line says ended, if it says one did."""
    message, state, took = entry["message"], entry["state"], entry["duration_s"]
    if state and message == f"{state} done" and took is not None:
        return Span(state, at - took, took)
    if message == "preflight passed":
        return Span(State.PREFLIGHT.value, None, 0.0)
    if message.startswith("rolling back: "):
        # The state it left never wrote its "done" line.
        began = started if started is not None else at
        return Span(state or "?", began, at - began, interrupted=True)
    return None
